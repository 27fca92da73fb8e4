#!/usr/bin/env bash
# tests/vm/mirror_recover.sh: kill -9 of a mirror's daemon under fio, then `ublkdm recover`.
# vm: --disks 2x256M
# Method: as linear_recover.sh, on a 2-leg mirror: fio saves its verify state and kills the
# daemon; the device must wait QUIESCED; `ublkdm recover` reassembles the mirror from its
# legs' metadata (the dirty regions resync); every acknowledged write must verify, and the
# legs must end identical.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

FIO_TIMEOUT=120
dev=$(add_mirror --leg /dev/vda --leg /dev/vdb --nosync) || die "add mirror failed"
id=$(dev_id "$dev")
pid=$(field "$id" .daemon_pid)
set_sched_none "$dev"

job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16
	--size=64M --verify=crc32c --verify_fatal=1 --aux-path="$T")
trigger=$T/kill-now
run_fio write-phase "${job[@]}" --runtime=120 --verify_state_save=1 \
	--trigger-file="$trigger" --trigger="kill -9 $pid" &
fio_pid=$!
sleep 4
pid_alive "$fio_pid" || die "fio ended before the kill: $(cat "$T/write-phase.out")"
touch "$trigger"

if wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
	pass "kill-9-leaves-mirror-quiesced"
else
	fail "kill-9-leaves-mirror-quiesced" "state $(field "$id" .state)"
fi
if again=$(ublkdm recover "$id") && [[ $again == "$dev" ]] && [[ $(field "$id" .state) == LIVE ]]; then
	pass "recover-reassembles-mirror"
else
	fail "recover-reassembles-mirror" "recover printed '${again:-}', state $(field "$id" .state)"
fi
vm_log "after recover: $(mstatus "$id" '.regions')"
if wait_until 60 bash -c "! kill -0 $fio_pid 2>/dev/null"; then
	wait "$fio_pid"
else
	kill -9 "$fio_pid"
	fail "write-phase-ends" "fio still running 60 s after recovery"
fi
if run_fio verify-phase "${job[@]}" --verify_only=1 --verify_state_load=1 --name=write-phase; then
	pass "acknowledged-writes-verify"
else
	fail "acknowledged-writes-verify" "$(grep -m1 -E 'err=|verify' "$T/verify-phase.out")"
fi
wait_in_sync "$id" 120 || fail "resync-after-recover" "$(mstatus "$id" .regions)"
offset=$(data_offset_mib "$id")
ublkdm del "$id" >/dev/null
if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical"; else fail "legs-identical" "legs differ"; fi
vm_summary
