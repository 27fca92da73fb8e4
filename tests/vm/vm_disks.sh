#!/usr/bin/env bash
# tests/vm/vm_disks.sh: the VM's own disks take what ublkdm's tests give them (a check of
# the harness, scripts/vm/run, run with the tests so that CI runs it).
# vm: --disks 2x256M
# Run: tests/vm/run-all tests/vm/vm_disks.sh
# Method: 1 MiB O_DIRECT writes that start 1 KiB off a 4 KiB boundary (ext4 with 1 KiB blocks
# makes them, and so does ublkdm serving it), from buffers of scattered pages (256 segments a
# MiB, as a long-running daemon's are), 16 in flight, then read back and verified by fio; the
# guest must log no I/O error on the disk. qemu 7.2 merges neighbouring requests up to 1024
# iovecs and, with cache=none, pads a write that is not 4 KiB-aligned on the host; padded past
# 1024 iovecs it fails the write with EINVAL (linear_fs lost files to it, 2 rounds in 30).
# scripts/vm/run turns qemu's request merging off; this fails if that ever goes.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"

DISK=/dev/vda
require_block "$DISK"
set_sched_none "$DISK"
tmp=$(mktemp -d)
trap 'umount "$tmp/frag" 2>/dev/null; rm -rf "$tmp"' EXIT

# Scattered pages: no transparent huge pages, and every other page of a tmpfs file freed, so
# that fio's buffers are made of single pages.
thp=/sys/kernel/mm/transparent_hugepage/enabled
[[ ! -w $thp ]] || echo never >"$thp" || die "cannot turn transparent huge pages off"
{ mkdir -p "$tmp/frag" && mount -t tmpfs -o size=80M frag "$tmp/frag"; } || die "cannot mount tmpfs"
xfs_io -f -c "pwrite -q -b 4k 0 64m" "$tmp/frag/f" || die "cannot fill $tmp/frag/f"
for ((i = 0; i < 8192; i++)); do echo "fpunch $((i * 8192)) 4096"; done | xfs_io "$tmp/frag/f" ||
	die "cannot punch holes in $tmp/frag/f"

dmesg -C
if fio --name=misaligned --filename="$DISK" --direct=1 --ioengine=io_uring --rw=write \
	--bs=1M --offset=1k --size=200M --iodepth=16 --iodepth_batch_submit=8 \
	--verify=crc32c --verify_fatal=1 --output="$tmp/fio.txt"; then
	pass "misaligned-large-writes-verify"
else
	fail "misaligned-large-writes-verify" "fio: $(grep -m1 -E 'err=|error' "$tmp/fio.txt")"
fi
errors=$(dmesg | grep -c "I/O error, dev ${DISK#/dev/}")
if ((errors == 0)); then
	pass "no-disk-io-errors"
else
	fail "no-disk-io-errors" "$errors on $DISK: $(dmesg | grep -m1 "I/O error, dev ${DISK#/dev/}")"
fi
vm_summary
