#!/usr/bin/env bash
# tests/vm/smoke.sh: proves the VM harness (owned by scripts/vm/'s author).
# Run: scripts/vm/run --disks 2x256M tests/vm/smoke.sh
set -euo pipefail
# shellcheck source=scripts/vm/lib.sh
. "${UBLKDM_REPO:-$(dirname "$0")/../..}/scripts/vm/lib.sh"

vm_log "kernel $(uname -r), disks: ${UBLKDM_DISKS:-none}"
ls -l /dev/vd*

# ublk_drv was loaded by the harness.
if [[ -c /dev/ublk-control ]]; then pass "ublk-control"; else fail "ublk-control" "/dev/ublk-control missing"; fi

# 1 MiB write + read-back on the raw disk, bypassing the page cache.
require_block /dev/vda
tmp=$(mktemp -d)
head -c 1M /dev/urandom >"$tmp/pattern"
dd if="$tmp/pattern" of=/dev/vda bs=1M count=1 oflag=direct status=none
dd if=/dev/vda of="$tmp/back" bs=1M count=1 iflag=direct status=none
if cmp -s "$tmp/pattern" "$tmp/back"; then pass "vda-readback"; else fail "vda-readback" "data differs"; fi

# A kernel dm target over vdb (no udev: dm_create makes the node).
require_block /dev/vdb
sectors=$(blockdev --getsz /dev/vdb)
dev=$(dm_create smoke-linear "0 $sectors linear /dev/vdb 0")
if [[ -b $dev ]] && (($(blockdev --getsz "$dev") == sectors)); then
	pass "dm-linear"
else
	fail "dm-linear" "$dev is not a block device of $sectors sectors"
fi
dmsetup remove smoke-linear

# fio with data verification on the raw disk: ~5 s of 4k random writes, then
# every block read back and checked. Size-bounded on purpose: with --time_based
# fio spends the whole runtime writing and silently skips the verify phase.
set_sched_none /dev/vda
if fio --name=smoke --filename=/dev/vda --direct=1 --ioengine=io_uring --rw=randwrite \
	--bs=4k --size=16M --iodepth=8 --verify=crc32c --verify_fatal=1 \
	--output="$tmp/fio.txt" && grep -q ' read: IOPS=' "$tmp/fio.txt"; then
	grep -E 'IOPS=' "$tmp/fio.txt"
	pass "fio-verify"
else
	cat "$tmp/fio.txt" || true
	fail "fio-verify" "fio failed or did not verify"
fi

vm_summary
