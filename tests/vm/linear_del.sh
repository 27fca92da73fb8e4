#!/usr/bin/env bash
# tests/vm/linear_del.sh: `ublkdm del` while fio is writing to the device.
# Run: scripts/vm/run --disks 2x256M tests/vm/linear_del.sh (or tests/vm/run-all).
# Method: fio writes at iodepth 32 for up to 60 s; after a few seconds `ublkdm del` must
# return within a bound (no hang in STOP/DEL), the device and its daemon must be gone, fio
# must end promptly and report I/O errors, and the backing disk must be free again.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

BACKING=/dev/vda
DEL_BOUND=40
FIO_TIMEOUT=120
require_block "$BACKING"
dev=$(add_linear "$BACKING") || die "add failed"
id=$(dev_id "$dev")
pid=$(field "$id" .daemon_pid)
vm_log "serving $BACKING as $dev (id $id), daemon pid $pid"

run_fio busy --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=32 \
	--size=200M --time_based --runtime=60 &
fio_pid=$!
# Delete only once writes are flowing (fio starts slowly under TCG).
wait_until 60 bash -c "(( \$($UBLKDM status --json $id | jq -r '.daemon_status.io.writes // 0') >= 1000 ))" ||
	die "fio did not get going: $(cat "$T/busy.err")"
pid_alive "$fio_pid" || die "fio ended early: $(cat "$T/busy.out")"

t0=$SECONDS
ublkdm del "$id"
rc=$?
took=$((SECONDS - t0))
vm_log "del returned $rc after ${took}s"
if ((rc == 0 && took <= DEL_BOUND)); then
	pass "del-under-io-is-bounded"
else
	fail "del-under-io-is-bounded" "exit $rc after ${took}s (bound ${DEL_BOUND}s)"
fi

if [[ ! -e /sys/class/ublk-char/ublkc$id && ! -b $dev ]] && wait_until 10 bash -c "! [[ -d /proc/$pid ]]"; then
	pass "device-and-daemon-gone"
else
	fail "device-and-daemon-gone" "ublkc$id or daemon $pid still present"
fi

if wait_until 30 bash -c "! kill -0 $fio_pid 2>/dev/null"; then
	wait "$fio_pid"
	fio_rc=$?
	vm_log "fio exit $fio_rc; first errors: $(head -2 "$T/busy.err" | tr '\n' ' ')"
	if ((fio_rc != 0)) || grep -qE 'err= *[1-9]' "$T/busy.out"; then
		pass "fio-sees-errors"
	else
		fail "fio-sees-errors" "fio exit 0 and no err= in its report"
	fi
else
	fio_task_dir=/proc/$(pgrep -x fio | head -1)/task
	for task in "$fio_task_dir"/*; do
		echo "fio task $task: $(cut -d' ' -f3 "$task/stat") $(tr '\n' ' ' <"$task/stack" 2>/dev/null | head -c 300)"
	done
	kill -9 "$fio_pid" $(pgrep -x fio)
	fail "fio-sees-errors" "fio still running 30 s after del"
fi

# The daemon released its O_EXCL hold: the disk can be taken again.
if dev2=$(add_linear "$BACKING") && ublkdm del "$(dev_id "$dev2")"; then
	pass "backing-disk-released"
else
	fail "backing-disk-released" "cannot serve $BACKING again"
fi
vm_summary
