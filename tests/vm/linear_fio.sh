#!/usr/bin/env bash
# tests/vm/linear_fio.sh: data integrity of a linear device under fio, end to end.
# Run: scripts/vm/run --disks 2x256M tests/vm/linear_fio.sh (or tests/vm/run-all).
# Method: a linear device over /dev/vda with 2 queues; fio writes 4 KiB random blocks at
# iodepth 32, then 1 MiB sequential blocks, each verified with crc32c; the device and the
# backing disk must then hold the same bytes over the written range (read O_DIRECT); list and
# status must show the device; the control socket must answer its protocol; the queue threads
# must not be pinned (each may run on every CPU the daemon may); del must remove device and
# daemon.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

BACKING=/dev/vda
require_block "$BACKING"
dev=$(add_linear "$BACKING" --queues 2) || die "add failed"
require_block "$dev"
id=$(dev_id "$dev")
vm_log "serving $BACKING as $dev (id $id)"
set_sched_none "$dev"

common=(--filename="$dev" --direct=1 --ioengine=io_uring --verify=crc32c --verify_fatal=1 --runtime=180)
if run_fio randwrite "${common[@]}" --rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=64M; then
	pass "fio-4k-randwrite-qd32-verify"
else
	fail "fio-4k-randwrite-qd32-verify" "fio failed: $(grep -m1 -E 'err=|verify' "$T/randwrite.out")"
fi
if run_fio seqwrite "${common[@]}" --rw=write --bs=1M --iodepth=8 --offset=64M --size=128M; then
	pass "fio-1m-seqwrite-verify"
else
	fail "fio-1m-seqwrite-verify" "fio failed: $(grep -m1 -E 'err=|verify' "$T/seqwrite.out")"
fi
grep -hE '^ *(write|read):' "$T"/randwrite.out "$T"/seqwrite.out || true

# The written range, read back through the device and straight from the backing disk.
if cmp <(dd if="$dev" bs=1M count=192 iflag=direct status=none) \
	<(dd if="$BACKING" bs=1M count=192 iflag=direct status=none); then
	pass "device-matches-backing"
else
	fail "device-matches-backing" "cmp found a difference in the first 192 MiB"
fi

state=$(field "$id" .state)
flusher=$(field "$id" '.daemon_status.io.io_flusher | all')
kind=$(field "$id" '.daemon_status.target.kind')
if [[ $state == LIVE && $flusher == true && $kind == linear ]] && ublkdm list | grep -q "^$id .*LIVE"; then
	pass "list-and-status"
else
	fail "list-and-status" "state=$state io_flusher=$flusher kind=$kind"
	ublkdm list
fi

# The control socket: root-only, versioned, target commands routed to the target.
sock=/run/ublkdm/$id.sock
status_ok=$(control "$id" '{"version":1,"cmd":"status"}' | jq -r '.ok and .result.target.kind == "linear"')
cmd_err=$(control "$id" '{"version":1,"cmd":"target","name":"fail-leg","args":{"leg":1}}' | jq -r '.error.kind')
version_err=$(control "$id" '{"version":2,"cmd":"status"}' | jq -r '.error.kind')
junk_err=$(control "$id" 'not json' | jq -r '.ok')
modes="$(stat -c %a /run/ublkdm) $(stat -c %a "$sock")"
if [[ $status_ok == true && $cmd_err == invalid-argument && $version_err == invalid-argument &&
	$junk_err == false && $modes == "700 600" ]]; then
	pass "control-socket"
else
	fail "control-socket" "status=$status_ok target-cmd=$cmd_err version=$version_err junk=$junk_err modes=$modes"
fi

# Queue threads are not pinned: each may run on every CPU the daemon may (module doc of
# src/ublk/mod.rs), so a queue's server can run beside the application that submits to it.
cpus_allowed() { awk '/^Cpus_allowed_list:/ { print $2 }' "$1/status"; }
pid=$(field "$id" .daemon_pid)
allowed=$(cpus_allowed "/proc/$pid")
queues=() pinned=0
for task in /proc/"$pid"/task/*; do
	name=$(cat "$task/comm" 2>/dev/null) || continue
	[[ $name == "ublk${id}q"* ]] || continue
	cpus=$(cpus_allowed "$task")
	queues+=("$name:$cpus")
	[[ $cpus == "$allowed" ]] || pinned=$((pinned + 1))
done
if ((${#queues[@]} == 2 && pinned == 0)); then
	pass "queue-threads-unpinned"
else
	fail "queue-threads-unpinned" "the daemon may run on CPUs $allowed; its queue threads: ${queues[*]:-none}"
fi

if ublkdm del "$id" && wait_until 10 bash -c "! [[ -e /sys/class/ublk-char/ublkc$id ]]" && ! pid_alive "$pid"; then
	pass "del"
else
	fail "del" "device or daemon (pid $pid) still there"
fi
vm_summary
