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
# Kill only once a good number of writes was acknowledged (fio starts slowly under TCG).
wait_writes "$id" 3000 ||
	die "fio did not get going"
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
verified=0
if timeout "$FIO_TIMEOUT" fio --name=write-phase "${job[@]}" --verify_only=1 --verify_state_load=1 \
	--output-format=json --output="$T/verify.json" 2>"$T/verify.err"; then
	verified=$(jq -r '.jobs[0].read.io_bytes' "$T/verify.json")
fi
# At least the 3000 blocks acknowledged before the kill must have been read and verified.
if ((verified >= 3000 * 4096)); then
	pass "acknowledged-writes-verify"
	vm_log "verified $((verified >> 20)) MiB of acknowledged writes"
else
	fail "acknowledged-writes-verify" "verified $verified bytes; $(head -3 "$T/verify.err")"
fi
if wait_in_sync "$id" 120; then
	echo "recover: $(mstatus "$id" .resync.regions_done) regions resynced after the kill"
else
	fail "resync-after-recover" "$(mstatus "$id" .regions)"
fi
offset=$(data_offset_mib "$id")
ublkdm del "$id" >/dev/null
if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical"; else fail "legs-identical" "legs differ"; fi
vm_summary
