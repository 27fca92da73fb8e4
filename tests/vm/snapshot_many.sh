#!/usr/bin/env bash
# tests/vm/snapshot_many.sh: an origin with 64 snapshots (the most a group has), each served as
# a device by the one daemon, within a bounded daemon memory; a create the ublk driver refuses
# is a clear error that leaves the daemon and the other devices running.
# vm: --disks 2x256M --timeout 1500
# Method: a 16 MiB origin (a slice of vda, random bytes) with its COW store on a 128 MiB slice
# of vdb. 64 snapshots are created one by one, each with
# `snapshot create`; the daemon's VmRSS and thread count are read from /proc after the 1st, the
# 16th and the 64th, and the origin is written (1 MiB, its model too) after the 1st and the
# 16th so that s1, s16 and s64 hold three different images. Then every device is read in
# parallel (4 MiB of each, in 512 KiB requests) and the RSS read again. The bound: the
# daemon's RSS before the snapshots, plus its request-buffer budget (64 MiB), plus 512 KiB of
# bookkeeping per device (threads, rings, the map): the old design, one 512 KiB buffer per
# tag, cost 64 MiB per snapshot. Then s2 is deleted and the daemon is put in a cgroup whose
# pids.max allows two threads more than it has: the next `snapshot create` takes the snapshot
# but its device's queue thread cannot start. It must fail with exit 4 and one `error:` line
# naming the snapshot and the thread, leave no new ublk device, and the daemon must still
# answer and serve the other devices; once the limit is lifted, the next snapshot command (a
# delete of s3) serves the snapshot (taken in the group's metadata before its device failed) with the origin's data
# of that time.
# Prints `COUNT: snapshot-many created=N rss_kib=[before s1 s16 s64 after-io] threads=[..]`.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
SNAPS=64
BUDGET_KIB=$((64 << 10))  # the daemon's request-buffer budget (src/ublk/pool.rs)
PER_DEVICE_KIB=512        # allowance for a device's threads, rings and bookkeeping
MAX_PARAM=/sys/module/ublk_drv/parameters/ublks_max

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/${1:?rss_kib PID}/status"; }
threads() { awk '/^Threads:/ { print $2 }' "/proc/${1:?threads PID}/status"; }
ublk_devices() { find /sys/class/ublk-char -mindepth 1 -maxdepth 1 | wc -l; }

# A cgroup of its own for process PID, with the pids controller; prints its folder.
pids_cgroup() {
	local root=/sys/fs/cgroup cg=/sys/fs/cgroup/ublkdm-many
	grep -q " $root cgroup2 " /proc/mounts || mount -t cgroup2 none "$root" || die "cannot mount cgroup2"
	echo +pids >"$root/cgroup.subtree_control" || die "no pids controller"
	mkdir -p "$cg" || die "cannot create $cg"
	echo "${1:?pids_cgroup PID}" >"$cg/cgroup.procs" || die "cannot move $1 to $cg"
	echo "$cg"
}

# The driver's device limit (64 by default, if it applies to root) must allow 66 devices.
if [[ -w $MAX_PARAM ]]; then echo 128 >"$MAX_PARAM" || die "cannot raise ublks_max"; fi

orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 128)
fill_random "$orig" "$T/origin.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
pid=$(daemon_pid "$id")
[[ -n $pid && -d /proc/$pid ]] || die "no daemon pid for device $id"
rss=("$(rss_kib "$pid")")
thr=("$(threads "$pid")")
vm_log "daemon $pid before snapshots: rss ${rss[0]} KiB, ${thr[0]} threads"

created=0
G=""
declare -A snapdev
for ((i = 1; i <= SNAPS; i++)); do
	if ! out=$(snap_create "$id" "s$i" 2>&1); then
		vm_log "snapshot create s$i failed: $out"
		break
	fi
	snapdev[$i]=$out
	created=$i
	if ((i == 1 || i == 16 || i == SNAPS)); then
		rss+=("$(rss_kib "$pid")")
		thr+=("$(threads "$pid")")
		vm_log "after $i snapshots: rss ${rss[-1]} KiB, ${thr[-1]} threads"
		cp "$T/origin.img" "$T/s$i.img"
	fi
	if ((i == 1 || i == 16)); then
		put "$dev" $(((i / 2 + 1) << 20)) $((1 << 20)) "$T/origin.img" || fail "origin-write-after-s$i" "the write failed"
	fi
done
if ((created == SNAPS)); then
	pass "all-$SNAPS-snapshots-created"
else
	fail "all-$SNAPS-snapshots-created" "create s$((created + 1)) failed after $created"
fi
if pid_alive "$pid" && group "$id" && [[ $(g '.snapshots | length') == "$created" ]]; then
	pass "daemon-answers-status"
else
	fail "daemon-answers-status" "daemon $pid alive: $(pid_alive "$pid" && echo yes || echo no)"
fi
served=$(jq -r '.daemon_status.children | length' <<<"$G" 2>/dev/null)
if [[ $served == "$created" ]]; then
	pass "every-snapshot-is-served"
else
	fail "every-snapshot-is-served" "$served devices for $created snapshots"
fi

# Every device read at once: the request buffers of all of them are in use together.
if ((created == SNAPS)); then
	for ((i = 1; i <= SNAPS; i++)); do
		dd if="${snapdev[$i]}" of=/dev/null bs=1M count=4 iflag=direct status=none &
	done
	dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct status=none &
	wait
	rss+=("$(rss_kib "$pid")")
	thr+=("$(threads "$pid")")
	vm_log "after reading every device at once: rss ${rss[-1]} KiB"
	bound=$((rss[0] + BUDGET_KIB + (SNAPS + 1) * PER_DEVICE_KIB))
	worst=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
	if ((worst <= bound)); then
		pass "rss-within-the-buffer-budget"
	else
		fail "rss-within-the-buffer-budget" "rss reached $worst KiB, bound $bound KiB (rss [${rss[*]}])"
	fi
	expect_image "s1-holds-its-image" "${snapdev[1]}" "$T/s1.img"
	expect_image "s16-holds-its-image" "${snapdev[16]}" "$T/s16.img"
	expect_image "s64-holds-its-image" "${snapdev[$SNAPS]}" "$T/s$SNAPS.img"
	expect_image "origin-holds-its-image" "$dev" "$T/origin.img"
fi
echo "COUNT: snapshot-many created=$created rss_kib=[${rss[*]}] threads=[${thr[*]}]"

# A device that cannot start: the daemon's cgroup allows too few threads for the snapshot's
# queue thread.
if ((created == SNAPS)); then
	ublkdm snapshot delete "$id" s2 >/dev/null || fail "delete-s2" "snapshot delete failed"
	cg=$(pids_cgroup "$pid")
	before=$(ublk_devices)
	# Two more: the serving thread and the kernel's worker for ADD_DEV (io_uring runs the
	# driver's control commands on a worker thread of the caller's).
	echo $(($(cat "$cg/pids.current") + 2)) >"$cg/pids.max"
	cp "$T/origin.img" "$T/extra.img"
	out=$(snap_create "$id" extra 2>&1)
	rc=$?
	echo max >"$cg/pids.max"
	vm_log "create under a thread limit: exit $rc: $out"
	if ((rc == 4)) && refused $rc "$out" && grep -q "'extra'.*thread" <<<"$out"; then
		pass "refused-create-is-a-clear-error"
	else
		fail "refused-create-is-a-clear-error" "exit $rc: $out"
	fi
	if (($(ublk_devices) == before)) && pid_alive "$pid" && group "$id" &&
		[[ -z $(g_child extra) && $(jq -r '.daemon_status.children | length' <<<"$G") == $((SNAPS - 1)) ]]; then
		pass "refused-create-leaves-no-device-and-the-rest-served"
	else
		fail "refused-create-leaves-no-device-and-the-rest-served" "$(ublk_devices) ublk devices (was $before)"
	fi
	put "$dev" 0 $((1 << 20)) "$T/origin.img" || fail "origin-writable-after-refusal" "the write failed"
	expect_image "s16-intact-after-refusal" "${snapdev[16]}" "$T/s16.img"
	ublkdm snapshot delete "$id" s3 >/dev/null || fail "delete-s3" "snapshot delete failed"
	group "$id"
	if [[ -b $(g_child extra) ]]; then
		pass "taken-snapshot-served-at-the-next-command"
	else
		fail "taken-snapshot-served-at-the-next-command" "no device for 'extra'"
	fi
	expect_image "extra-holds-the-origin-when-taken" "$(g_child extra)" "$T/extra.img"
fi
ublkdm del "$id" >/dev/null
vm_summary
