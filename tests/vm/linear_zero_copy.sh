#!/usr/bin/env bash
# tests/vm/linear_zero_copy.sh: a linear device in zero copy where the kernel offers it (newest),
# in copy mode where it does not (lts) and with `--copy`; data integrity either way.
# vm: --disks 2x256M --timeout 900 --kernels newest
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/linear_zero_copy.sh
# Method: the data path expected is derived from the booted kernel ($UBLKDM_VM_KERNEL: newest
# offers AUTO_BUF_REG, lts does not) and must agree with `features --json`. A linear device over
# /dev/vda must say it in `status --json` (.data_path) and `status` (`data:` line). fio then
# writes and verifies (crc32c) 4 KiB random blocks at depth 32, 1 MiB sequential blocks at depth
# 8 and random blocks of 4 KiB..1 MiB at depth 16 (each read back and checked); the device must
# then equal the backing disk over the written range. A write and a
# read from memory aligned to 4 bytes only (which ublk accepts and an O_DIRECT backing disk
# refuses) must come back intact: in zero copy through the per-request copy fallback, counted in
# `zero_copy_fallbacks` (exactly the 2 requests; aligned fio I/O counts none). `kill -9` of the
# daemon under fio: QUIESCED, `recover` brings it back LIVE with the same data path, every
# acknowledged write verifies, and a new fio verify passes. `add linear --copy` gives a copy
# device whatever the kernel.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_zero_copy.sh"

BACKING=/dev/vda
require_block "$BACKING"
zc_expect "a linear device"
want=$ZC_WANT

offered=$(ublkdm features --json | jq -r .zero_copy_data_path)
if [[ $offered == "$want" ]]; then
	pass "features-agree-with-the-kernel"
else
	fail "features-agree-with-the-kernel" "features say linear devices get '$offered'"
fi

dev=$(add_linear "$BACKING" --queues 2) || die "add failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
status=$(ublkdm status "$id")
echo "$status" | head -8
if [[ $(field "$id" .data_path) == "$want" ]] && grep -qxF "$ZC_TEXT" <<<"$status"; then
	pass "status-says-$want"
else
	fail "status-says-$want" "data_path $(field "$id" .data_path); $(grep data: <<<"$status")"
fi
vm_log "device $dev (id $id), granted flags $(field "$id" .flags)"

# --- fio verify: block sizes 4 KiB .. 1 MiB, random and sequential, several in flight.
zc_verify "$dev" \
	"4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=32M" \
	"1m-seqwrite-qd8|--rw=write --bs=1M --iodepth=8 --offset=32M --size=96M" \
	"4k-1m-randwrite-qd16|--rw=randwrite --bsrange=4k-1M --iodepth=16 --offset=128M --size=64M"
if cmp <(dd if="$dev" bs=1M count=192 iflag=direct status=none) \
	<(dd if="$BACKING" bs=1M count=192 iflag=direct status=none); then
	pass "device-matches-backing"
else
	fail "device-matches-backing" "cmp found a difference in the first 192 MiB"
fi
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
if [[ $fallbacks == 0 ]]; then
	pass "aligned-io-never-falls-back"
else
	fail "aligned-io-never-falls-back" "zero_copy_fallbacks $fallbacks"
fi

# --- memory aligned to 4 bytes: ublk takes it, O_DIRECT on the backing disk does not.
zc_misaligned "$dev" 240
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
want_fallbacks=$(zc_fallbacks 2)
if [[ $fallbacks == "$want_fallbacks" ]]; then
	pass "fallbacks-counted"
else
	fail "fallbacks-counted" "zero_copy_fallbacks $fallbacks, expected $want_fallbacks"
fi

# --- kill -9 under fio, recover, acknowledged writes verify (as linear_recover, in this mode).
kill_job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=64k --iodepth=16
	--offset=0 --size=128M --verify=crc32c --verify_fatal=1 --aux-path="$T")
zc_kill "$id" "$dev" 500 kill-9-leaves-device-quiesced "${kill_job[@]}" --runtime=120
if again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE &&
	$(field "$id" .data_path) == "$want" ]]; then
	pass "recover-brings-device-live-$want"
else
	fail "recover-brings-device-live-$want" "recover '${again:-}', state $(field "$id" .state), data path $(field "$id" .data_path)"
fi
zc_acked_verify $((500 * 65536)) "${kill_job[@]}"
if run_fio after-recover --filename="$dev" "${ZC_FIO[@]}" --rw=randwrite --bs=1M --iodepth=8 --offset=128M --size=64M; then
	pass "fio-verify-after-recover"
else
	fail "fio-verify-after-recover" "$(grep -m1 -E 'err=|verify' "$T/after-recover.out")"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"

# --- --copy: copy mode whatever the kernel offers.
dev=$(add_linear "$BACKING" --copy) || die "add --copy failed"
id=$(dev_id "$dev")
if [[ $(field "$id" .data_path) == copy ]] &&
	run_fio copy-mode --filename="$dev" "${ZC_FIO[@]}" --rw=randwrite --bs=128k --iodepth=8 --offset=0 --size=32M; then
	pass "copy-flag-gives-a-copy-device"
else
	fail "copy-flag-gives-a-copy-device" "data_path $(field "$id" .data_path); $(grep -m1 -E 'err=|verify' "$T/copy-mode.out")"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
vm_summary
