#!/usr/bin/env bash
# tests/vm/linear_recover.sh: kill -9 of the daemon under fio, then `ublkdm recover`.
# Run: scripts/vm/run --disks 2x256M tests/vm/linear_recover.sh (or tests/vm/run-all).
# Method: fio writes 4 KiB random blocks with crc32c verify headers. A fio trigger file makes
# fio save its write state (every write acknowledged so far) and then run `kill -9` on the
# daemon. The device must go QUIESCED (not gone); `ublkdm recover` must bring it back LIVE
# under a new daemon; fio (whose last writes waited or failed) must end; a verify-only fio
# pass that loads the saved state must find every acknowledged block intact.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

BACKING=/dev/vda
FIO_TIMEOUT=90
require_block "$BACKING"
dev=$(add_linear "$BACKING") || die "add failed"
id=$(dev_id "$dev")
pid=$(field "$id" .daemon_pid)
vm_log "serving $BACKING as $dev (id $id), daemon pid $pid"
set_sched_none "$dev"

# The same job for the write phase and the verify phase: offsets come from the same seed.
job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16
	--size=96M --verify=crc32c --verify_fatal=1 --aux-path="$T")
trigger=$T/kill-now
run_fio write-phase "${job[@]}" --runtime=120 --verify_state_save=1 \
	--trigger-file="$trigger" --trigger="kill -9 $pid" &
fio_pid=$!
# Kill only once a good number of writes has been acknowledged (fio starts slowly under TCG).
writes() { ublkdm status --json "$id" | jq -r '.daemon_status.io.writes // 0'; }
wait_writes "$id" 3000 ||
	die "fio did not get going: $(writes) writes; $(cat "$T/write-phase.err")"
pid_alive "$fio_pid" || die "fio ended before the kill: $(cat "$T/write-phase.out")"
vm_log "$(writes) writes acknowledged; killing the daemon through fio's trigger"
touch "$trigger"

if wait_until 30 bash -c "! [[ -d /proc/$pid ]] || grep -q '^[^)]*) Z' /proc/$pid/stat" &&
	wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
	pass "kill-9-leaves-device-quiesced"
else
	fail "kill-9-leaves-device-quiesced" "state $(field "$id" .state), daemon pid $pid"
fi
ublkdm status "$id" | head -3

if again=$(ublkdm recover "$id") && [[ $again == "$dev" ]] && [[ $(field "$id" .state) == LIVE ]] &&
	pid_alive "$(field "$id" .daemon_pid)"; then
	pass "recover-brings-device-live"
else
	fail "recover-brings-device-live" "recover printed '${again:-}', state $(field "$id" .state)"
fi

# fio stops after the trigger; writes that were queued while QUIESCED complete now.
if wait_until 60 bash -c "! kill -0 $fio_pid 2>/dev/null"; then
	wait "$fio_pid"
	vm_log "write phase ended (fio exit $?): $(grep -m1 -E '^ *write:' "$T/write-phase.out")"
else
	kill -9 "$fio_pid"
	fail "write-phase-ends" "fio still running 60 s after recovery"
fi

state_files=("$T"/*verify.state)
verified=0
if [[ -e ${state_files[0]} ]] &&
	timeout "$FIO_TIMEOUT" fio --name=write-phase "${job[@]}" --verify_only=1 --verify_state_load=1 \
		--output-format=json --output="$T/verify.json" 2>"$T/verify.err"; then
	verified=$(jq -r '.jobs[0].read.io_bytes' "$T/verify.json")
fi
# At least the 3000 blocks acknowledged before the kill must have been read and verified.
if ((verified >= 3000 * 4096)); then
	pass "acknowledged-writes-verify"
	vm_log "verified $((verified >> 20)) MiB of acknowledged writes"
else
	fail "acknowledged-writes-verify" "verified $verified bytes; state files: ${state_files[*]}; $(head -3 "$T/verify.err")"
fi

newpid=$(field "$id" .daemon_pid)
if ublkdm del "$id" && ! [[ -e /sys/class/ublk-char/ublkc$id ]] && ! pid_alive "$newpid"; then
	pass "del-after-recover"
else
	fail "del-after-recover" "device or daemon (pid $newpid) still there"
fi
vm_summary
