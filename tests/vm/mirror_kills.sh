#!/usr/bin/env bash
# tests/vm/mirror_kills.sh: KILLS (14) kill -9 of a 2-leg mirror's daemon under fio, each followed
# by `ublkdm recover`, counted.
# vm: --disks 2x16M --timeout 1500
# Method: a 2-leg mirror (512 KiB regions) on vda+vdb. Each cycle (common_cycles.sh): fio
# writes verified blocks to the first 12 MiB with a new seed; once the device completed
# ACKED_MIN writes the daemon is killed under them and fio saves what was acknowledged;
# `ublkdm recover` must bring the mirror back LIVE; the dirty regions resync; a verify-only fio must find every
# acknowledged block (none lost); the legs' data areas must be identical once in sync.
# In the middle cycle leg 1 is failed (`mirror fail-leg`) before fio starts, the writes land
# degraded, and `mirror add-leg` re-adds it under fio just before the kill: the recover then
# meets a resync in progress. In the next cycle leg 1 is failed again and the kill comes while
# degraded; if `recover` leaves the leg out, `mirror add-leg` brings it back.
# Prints `COUNT: mirror-kills cycles=N acked_writes_checked=N writes_lost=N resync_regions=[..]`.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"
. "$UBLKDM_REPO/tests/vm/common_cycles.sh"

LEG0=/dev/vda
LEG1=/dev/vdb
dev=$(add_mirror --leg "$LEG0" --leg "$LEG1" --nosync --region-size 512K) || die "add mirror failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
st=$(ublkdm status --json "$id") || die "no status"
pid=$(jq -r .daemon_pid <<<"$st")
offset=$(($(jq -r .daemon_status.target.status.data_offset_sectors <<<"$st") / 2048))
data_mib=$(($(blockdev --getsize64 "$LEG0") / 1048576 - offset))
mid=$(((KILLS + 1) / 2))
vm_log "mirror $dev (id $id), $KILLS cycles, leg 1 failed and re-added in cycle $mid, failed before the kill in cycle $((mid + 1))"

resync=()
for ((c = 1; c <= KILLS; c++)); do
	if ((c == mid || c == mid + 1)); then
		ublkdm mirror fail-leg "$id" 1 >/dev/null || failed "cycle-$c-fail-leg" "fail-leg refused"
	fi
	base=$(disk_writes "$dev")
	acked_start "$dev" "$c" 0 12M true
	if ! wait_disk_writes "$dev" $((base + ACKED_MIN)) 90 || ! pid_alive "$ACKED_PID"; then
		failed "cycle-$c-writes" "fio did not get going: $(head -c 300 "$T/acked.err")"
		break
	fi
	if ((c == mid)); then
		ublkdm mirror add-leg "$id" "$LEG1" >/dev/null || failed "cycle-$c-add-leg" "add-leg refused"
	fi
	pid_alive "$ACKED_PID" ||
		{ failed "cycle-$c-kill" "fio ended before the kill: $(head -c 300 "$T/acked.err")"; break; }
	# The kill first, under writes; then fio saves what was acknowledged (its writes in
	# flight wait for the recovery meanwhile).
	kill -9 "$pid"
	touch "$T/trigger"
	wait_gone "$pid" 30 || { failed "cycle-$c-kill" "daemon $pid still alive"; break; }
	wait_until 30 acked_saved || { failed "cycle-$c-state" "fio saved no verify state"; break; }
	# The device goes QUIESCED once the kernel sees the daemon gone: recover may need a retry.
	wait_until 30 bash -c "$UBLKDM recover $id >/dev/null 2>$T/recover.err" ||
		{ failed "cycle-$c-recover" "$(cat "$T/recover.err")"; break; }
	wait_until 60 bash -c "! kill -0 $ACKED_PID 2>/dev/null" ||
		{ failed "cycle-$c-fio-ends" "fio still running after recover"; break; }
	acked_end || { failed "cycle-$c-state" "fio saved no verify state"; break; }
	# Read back what was acknowledged while the dirty regions resync (fio only reads).
	acked_verify "$dev" "$c" 0 12M &
	verify_pid=$!
	if ((c == mid + 1)); then
		# Recovered with leg 1 failed: whether it comes back (from the bitmap) or stays out,
		# it must end in sync with what was written meanwhile.
		legs=$(mstatus "$id" '[.legs[].state] | join(",")')
		vm_log "cycle $c: recovered with leg 1 failed before the kill: legs $legs"
		if [[ $legs != in-sync,in-sync ]]; then
			ublkdm mirror add-leg "$id" "$LEG1" >/dev/null || failed "cycle-$c-add-leg" "add-leg refused"
		fi
	fi
	wait_synced "$id" 120 || failed "cycle-$c-resync" "$(jq -c .daemon_status.target.status.regions <<<"$ST")"
	pid=$(jq -r .daemon_pid <<<"$ST")
	resync+=("$(jq -r .daemon_status.target.status.resync.regions_done <<<"$ST")")
	legs=$(jq -r '[.daemon_status.target.status.legs[].state] | join(",")' <<<"$ST")
	if [[ $(jq -r .state <<<"$ST") != LIVE || $legs != in-sync,in-sync ]]; then
		failed "cycle-$c-live" "state $(jq -r .state <<<"$ST"), legs $legs"
	fi
	legs_cmp "$offset" "$data_mib" "$LEG0" "$LEG1" >/dev/null ||
		failed "cycle-$c-legs-identical" "the legs' data areas differ"
	wait "$verify_pid"
	read -r CHECKED LOST <"$T/verify.counts"
	counted cycle "$c"
	vm_log "cycle $c: killed after $(($(disk_writes "$dev") - base)) writes; ${resync[-1]} regions resynced"
done
cycles=$((c - 1))
echo "COUNT: mirror-kills cycles=$cycles acked_writes_checked=$checked writes_lost=$lost resync_regions=[${resync[*]}]"
if ((cycles == KILLS && bad == 0 && lost == 0)); then
	pass "mirror-$KILLS-kills-every-acked-write-verifies-legs-identical"
else
	fail "mirror-kills" "$cycles of $KILLS cycles ran, $bad failed checks, $lost writes lost"
fi
vm_summary
