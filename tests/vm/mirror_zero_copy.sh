#!/usr/bin/env bash
# tests/vm/mirror_zero_copy.sh: a 2-leg mirror in zero copy where the kernel offers it
# (newest), in copy mode where it does not (lts); data integrity and equal legs either way.
# vm: --disks 2x256M --timeout 900 --kernels newest
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/mirror_zero_copy.sh
# Method: the data path expected is derived from the booted kernel ($UBLKDM_VM_KERNEL: newest
# offers AUTO_BUF_REG, lts does not). A 2-leg mirror over /dev/vda and /dev/vdb (nosync: both
# blank) must say it in `status --json` (.data_path) and `status` (`data:` line). fio then
# writes and verifies (crc32c) 4 KiB random blocks at depth 32, 1 MiB sequential blocks at
# depth 8 and random blocks of 4 KiB..1 MiB at depth 16 (each read back and checked): in zero
# copy one registered buffer goes to both legs and large reads are split across them. A write
# and a read from memory aligned to 4 bytes only (which ublk accepts and O_DIRECT on the legs
# refuses) must round-trip: in zero copy through the per-request copy fallback, exactly those
# 2 requests counted in `zero_copy_fallbacks` (aligned fio I/O counts none). Once in sync the
# legs must be equal over the written data area (cmp, the metadata skipped). `kill -9` of the
# daemon under fio's 4 KiB writes (common_cycles.sh): QUIESCED, `recover` brings it back LIVE
# with the same data path, every acknowledged write verifies, and once in sync and stopped
# the legs are equal again.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"
. "$UBLKDM_REPO/tests/vm/common_cycles.sh"
. "$UBLKDM_REPO/tests/vm/common_zero_copy.sh"

LEGS=(/dev/vda /dev/vdb)
# The MiB fio writes, from the start of the device.
WRITTEN_MIB=64
for leg in "${LEGS[@]}"; do require_block "$leg"; done
zc_expect "a mirror"
want=$ZC_WANT

dev=$(add_mirror --leg "${LEGS[0]}" --leg "${LEGS[1]}" --nosync --queues 2) || die "add mirror failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
status=$(ublkdm status "$id")
json=$(ublkdm status --json "$id")
path=$(jq -r .data_path <<<"$json")
if [[ $path == "$want" ]] && grep -qxF "$ZC_TEXT" <<<"$status"; then
	pass "status-says-$want"
else
	fail "status-says-$want" "data_path $path; $(grep data: <<<"$status")"
fi
offset=$(($(jq -r .daemon_status.target.status.data_offset_sectors <<<"$json") / 2048))
vm_log "mirror $dev (id $id), flags $(jq -r .flags <<<"$json"), data at $offset MiB"

# Whether both legs hold the same first WRITTEN_MIB MiB of data (after the metadata).
legs_equal() {
	cmp <(dd if="${LEGS[0]}" bs=1M skip="$offset" count="$WRITTEN_MIB" iflag=direct status=none) \
		<(dd if="${LEGS[1]}" bs=1M skip="$offset" count="$WRITTEN_MIB" iflag=direct status=none)
}

# --- fio verify: block sizes 4 KiB .. 1 MiB, random and sequential, several in flight.
zc_verify "$dev" \
	"4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=8M" \
	"1m-seqwrite-qd8|--rw=write --bs=1M --iodepth=8 --offset=8M --size=32M" \
	"4k-1m-randwrite-qd16|--rw=randwrite --bsrange=4k-1M --iodepth=16 --offset=40M --size=24M"
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
if [[ $fallbacks == 0 ]]; then
	pass "aligned-io-never-falls-back"
else
	fail "aligned-io-never-falls-back" "zero_copy_fallbacks $fallbacks"
fi

# --- memory aligned to 4 bytes: ublk takes it, O_DIRECT on the legs does not.
zc_misaligned "$dev" 62
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
want_fallbacks=$(zc_fallbacks 2)
if [[ $fallbacks == "$want_fallbacks" ]]; then
	pass "fallbacks-counted"
else
	fail "fallbacks-counted" "zero_copy_fallbacks $fallbacks, expected $want_fallbacks"
fi
states=$(mstatus "$id" '[.legs[].state] | join(",")')
vm_log "fio and fallbacks done; legs $states"
if wait_in_sync "$id" 60 && [[ $states == in-sync,in-sync ]] && legs_equal; then
	pass "legs-equal-after-fio"
else
	fail "legs-equal-after-fio" "leg states $states; $(mstatus "$id" .regions)"
fi

# --- kill -9 under fio, recover, acknowledged writes verify (as mirror_kills, in this mode).
# fio counts every write issued before its last IODEPTH as acknowledged, but a mirror write can
# stay in flight longer (its dirty bit being marked) and fail at the kill: acked_verify
# (common_cycles.sh) does not count a bad block that fio saw fail.
vm_log "kill -9 under fio"
pid=$(field "$id" .daemon_pid)
base=$(disk_writes "$dev")
acked_start "$dev" 7 0 16M true
wait_disk_writes "$dev" $((base + ACKED_MIN)) 60 || die "fio did not get going: $(head -c 300 "$T/acked.err")"
pid_alive "$ACKED_PID" || die "fio ended before the kill: $(head -c 300 "$T/acked.err")"
kill -9 "$pid"
touch "$T/trigger"
if wait_gone "$pid" 30 &&
	wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
	pass "kill-9-leaves-mirror-quiesced"
else
	fail "kill-9-leaves-mirror-quiesced" "state $(field "$id" .state)"
fi
wait_until 30 acked_saved || fail "kill-phase-state" "fio saved no verify state"
if wait_until 30 bash -c "$UBLKDM recover $id >/dev/null 2>$T/recover.err" &&
	[[ $(field "$id" .state) == LIVE && $(field "$id" .data_path) == "$want" ]]; then
	pass "recover-brings-mirror-live-$want"
else
	fail "recover-brings-mirror-live-$want" "$(cat "$T/recover.err"), state $(field "$id" .state), data path $(field "$id" .data_path)"
fi
wait_until 60 bash -c "! kill -0 $ACKED_PID 2>/dev/null" || fail "kill-phase-ends" "fio still running after recover"
if acked_end && acked_verify "$dev" 7 0 16M && ((CHECKED >= ACKED_MIN)); then
	pass "acknowledged-writes-verify-after-recover"
	vm_log "verified $CHECKED acknowledged blocks"
else
	fail "acknowledged-writes-verify-after-recover" "$CHECKED blocks verified, $LOST bad"
fi
synced=0
wait_in_sync "$id" 120 && synced=1
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
vm_log "in sync: $synced; stopped"
if ((synced)) && legs_equal; then
	pass "legs-equal-after-recover"
else
	fail "legs-equal-after-recover" "in sync: $synced"
fi
vm_summary
