#!/usr/bin/env bash
# tests/vm/snapshot_kills.sh: KILLS (14) kill -9 of a snapshot origin's daemon under fio (two
# snapshots), each followed by `ublkdm recover`, counted.
# vm: --disks 2x64M --timeout 1500
# Method: a 16 MiB origin of random bytes (a slice of vda) with its COW store on a 64 MiB
# slice of vdb; snapshot s1, 8 MiB written to the origin's second half, snapshot s2; their
# images are kept in RAM as models (the snapshots are never written). Each cycle
# (common_cycles.sh): fio writes verified blocks to an 8 MiB window of the origin with a new
# seed (the window alternates between the origin's halves: the first cycles copy most chunks
# for the snapshots under the kill, later ones fewer); once the device completed ACKED_MIN
# writes the daemon is killed under them and fio saves what was acknowledged; `ublkdm
# recover` must bring back the origin LIVE and both snapshots, valid, on their devices; a
# verify-only fio must find every acknowledged block (none lost); s1 and s2 must read
# exactly as their models.
# Prints `COUNT: snapshot-kills cycles=N acked_writes_checked=N writes_lost=N
# snapshots_checked=N cow_used=[..]` (the store's use after each cycle).
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"
# Slower writes than the mirror's (copy-on-write): fio must still write at the kill.
ACKED_MIN=${ACKED_MIN:-200}
ACKED_RATE=${ACKED_RATE:-250}
. "$UBLKDM_REPO/tests/vm/common_cycles.sh"

MIB=16
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/s1.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
s1=$(snap_create "$id" s1) || die "snapshot s1 failed"
cp "$T/s1.img" "$T/s2.img"
put "$dev" $((8 << 20)) $((8 << 20)) "$T/s2.img" || die "writing the origin failed"
s2=$(snap_create "$id" s2) || die "snapshot s2 failed"
group "$id"
pid=$(jq -r .daemon_pid <<<"$G")
vm_log "origin $dev (id $id), s1 $s1, s2 $s2, $KILLS cycles; store $(g '.cow | tojson')"

snaps=0
cow_used=()
window() { echo $(((($1 - 1) % 2) * 8))M; }
for ((c = 1; c <= KILLS; c++)); do
	base=$(disk_writes "$dev")
	acked_start "$dev" "$c" "$(window "$c")" 8M true
	if ! wait_disk_writes "$dev" $((base + ACKED_MIN)) 90 || ! pid_alive "$ACKED_PID"; then
		failed "cycle-$c-writes" "fio did not get going or ended early: $(head -c 300 "$T/acked.err")"
		break
	fi
	# The kill first, under writes; then fio saves what was acknowledged (its writes in
	# flight wait for the recovery meanwhile).
	kill -9 "$pid"
	touch "$T/trigger"
	wait_gone "$pid" 30 || { failed "cycle-$c-kill" "daemon $pid still alive"; break; }
	wait_until 30 acked_saved || { failed "cycle-$c-state" "fio saved no verify state"; break; }
	wait_until 30 bash -c "$UBLKDM recover $id >/dev/null 2>$T/recover.err" ||
		{ failed "cycle-$c-recover" "$(cat "$T/recover.err")"; break; }
	wait_until 60 bash -c "! kill -0 $ACKED_PID 2>/dev/null" ||
		{ failed "cycle-$c-fio-ends" "fio still running after recover"; break; }
	acked_end || { failed "cycle-$c-state" "fio saved no verify state"; break; }
	# Read back what was acknowledged while the snapshots are compared (fio only reads).
	acked_verify "$dev" "$c" "$(window "$c")" 8M &
	verify_pid=$!
	group "$id"
	pid=$(jq -r .daemon_pid <<<"$G")
	cow_used+=("$(g .cow.used)")
	if [[ $(jq -r .state <<<"$G") != LIVE || $(g_snaps) != "s1:valid s2:valid" ||
		$(g_child s1) != "$s1" || $(g_child s2) != "$s2" ]]; then
		failed "cycle-$c-recover-group" "state $(jq -r .state <<<"$G"), snapshots '$(g_snaps)', s1 on '$(g_child s1)', s2 on '$(g_child s2)'"
	fi
	for s in s1 s2; do
		snap_dev=$s1
		[[ $s == s2 ]] && snap_dev=$s2
		if dev_cmp "$snap_dev" "$T/$s.img" >/dev/null; then
			snaps=$((snaps + 1))
		else
			failed "cycle-$c-$s-reads-as-model" "$snap_dev does not hold $s's image"
		fi
	done
	wait "$verify_pid"
	read -r CHECKED LOST <"$T/verify.counts"
	counted cycle "$c"
	vm_log "cycle $c: killed after $(($(disk_writes "$dev") - base)) writes at $(window "$c"); store ${cow_used[-1]}"
done
cycles=$((c - 1))
echo "COUNT: snapshot-kills cycles=$cycles acked_writes_checked=$checked writes_lost=$lost snapshots_checked=$snaps cow_used=[${cow_used[*]}]"
if ((cycles == KILLS && bad == 0 && lost == 0)); then
	pass "snapshot-$KILLS-kills-every-acked-write-verifies-snapshots-intact"
else
	fail "snapshot-kills" "$cycles of $KILLS cycles ran, $bad failed checks, $lost writes lost"
fi
vm_summary
