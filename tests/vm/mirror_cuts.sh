#!/usr/bin/env bash
# tests/vm/mirror_cuts.sh: CUTS (7) power cuts of the VM under writes to a 2-leg mirror, each
# followed by assembly with the same `ublkdm add mirror` in the next boot, counted.
# vm: --disks 3x16M --phases 8 --timeout 300
# Boot PHASE=p of CUTS+1 over the same disks (vda+vdb the legs, vdc the test's state):
# - p > 1: `ublkdm add mirror --leg /dev/vda --leg /dev/vdb` must assemble the mirror LIVE
#   with both legs; the dirty regions resync; a verify-only fio (common_cycles.sh) must read
#   back every write acknowledged before the last cut (none may be lost); once in sync the
#   legs' data areas must be identical.
# - p <= CUTS: fio writes verified blocks to the first 12 MiB with seed p; once the
#   device completed ACKED_MIN writes fio saves what was acknowledged; another fio keeps
#   writing 64 KiB blocks to the next 3 MiB; the verify state and the counts so far are
#   stored on vdc, and the power is cut under those writes. In the middle cycle leg 1 is
#   failed (`mirror fail-leg`) before the writes and re-added (`mirror add-leg`) under them,
#   seconds before the cut (its resync may or may not be over by then).
# - p = CUTS+1 prints `COUNT: mirror-cuts cycles=N
#   acked_writes_checked=N writes_lost=N resync_regions=[..]` and one PASS (or FAIL) for all.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"
# fio saves its state only once it sees its trigger (seconds under TCG): slow enough writes
# that it has not written all its blocks by then.
ACKED_RATE=${ACKED_RATE:-300}
. "$UBLKDM_REPO/tests/vm/common_cycles.sh"

LEG0=/dev/vda
LEG1=/dev/vdb
STATE_DISK=/dev/vdc
phase=${PHASE:-1}
((phase >= 1 && phase <= CUTS + 1)) || die "PHASE must be 1 to $((CUTS + 1)) (CUTS=$CUTS)"
mid=$(((CUTS + 1) / 2))

# The counts so far (checked, lost and bad from common_cycles.sh, and these), carried from boot
# to boot on the state disk.
resync=""

# After a cut: assemble, resync, compare the legs.
assemble_after_cut() {
	local c=$((phase - 1)) legs offset data_mib verify_pid
	load_state "$STATE_DISK"
	[[ -f $T/counts && -f $T/acked.state ]] || die "no state on $STATE_DISK (phase $c did not run?)"
	# shellcheck source=/dev/null
	. "$T/counts"
	dev=$(add_mirror --leg "$LEG0" --leg "$LEG1") || die "cut $c: assembly failed"
	id=$(dev_id "$dev")
	set_sched_none "$dev"
	# Read back what was acknowledged before the cut while the dirty regions resync.
	acked_verify "$dev" "$c" 0 12M &
	verify_pid=$!
	wait_synced "$id" 120 || failed "cut-$c-resync" "$(jq -c .daemon_status.target.status.regions <<<"$ST")"
	resync+="${resync:+ }$(jq -r .daemon_status.target.status.resync.regions_done <<<"$ST")"
	legs=$(jq -r '[.daemon_status.target.status.legs[].state] | join(",")' <<<"$ST")
	[[ $(jq -r .state <<<"$ST") == LIVE && $legs == in-sync,in-sync ]] ||
		failed "cut-$c-assembly" "state $(jq -r .state <<<"$ST"), legs $legs"
	offset=$(($(jq -r .daemon_status.target.status.data_offset_sectors <<<"$ST") / 2048))
	data_mib=$(($(blockdev --getsize64 "$LEG0") / 1048576 - offset))
	legs_cmp "$offset" "$data_mib" "$LEG0" "$LEG1" >/dev/null ||
		failed "cut-$c-legs-identical" "the legs' data areas differ"
	wait "$verify_pid"
	read -r CHECKED LOST <"$T/verify.counts"
	counted cut "$c"
	vm_log "cut $c: assembled, ${resync##* } regions resynced"
}

# Writes, the state stored, then the cut (never returns).
write_and_cut() {
	local c=$phase base noise_pid
	((c == mid)) && { ublkdm mirror fail-leg "$id" 1 >/dev/null || failed "cut-$c-fail-leg" "fail-leg refused"; }
	base=$(disk_writes "$dev")
	acked_start "$dev" "$c" 0 12M true
	{ wait_disk_writes "$dev" $((base + ACKED_MIN)) 90 && pid_alive "$ACKED_PID"; } ||
		die "cut $c: fio did not get going: $(head -c 300 "$T/acked.err")"
	if ((c == mid)); then
		ublkdm mirror add-leg "$id" "$LEG1" >/dev/null || failed "cut-$c-add-leg" "add-leg refused"
	fi
	pid_alive "$ACKED_PID" || die "cut $c: fio ended before its state was saved"
	touch "$T/trigger"
	wait "$ACKED_PID"
	acked_end || die "cut $c: fio saved no verify state: $(head -c 300 "$T/acked.err")"
	timeout 120 fio --name=noise --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
		--bs=64k --iodepth=8 --offset=12M --size=3M --time_based --runtime=100 \
		--output="$T/noise.out" &
	noise_pid=$!
	printf 'checked=%s\nlost=%s\nbad=%s\nresync="%s"\n' "$checked" "$lost" "$bad" "$resync" >"$T/counts"
	base=$(disk_writes "$dev")
	store_state "$STATE_DISK" counts acked.state || die "cannot store the state"
	{ wait_disk_writes "$dev" $((base + 8)) 30 && pid_alive "$noise_pid"; } ||
		die "cut $c: the background writer is not writing"
	vm_log "cut $c: state stored; cutting the power under writes"
	power_cut
}

if ((phase == 1)); then
	dev=$(add_mirror --leg "$LEG0" --leg "$LEG1" --nosync) || die "add mirror failed"
	id=$(dev_id "$dev")
	set_sched_none "$dev"
	vm_log "mirror $dev: $CUTS cuts, leg 1 failed and re-added before cut $mid"
else
	assemble_after_cut
fi
if ((phase <= CUTS)); then
	write_and_cut
fi
echo "COUNT: mirror-cuts cycles=$CUTS acked_writes_checked=$checked writes_lost=$lost resync_regions=[$resync]"
if ((bad == 0 && lost == 0)); then
	pass "mirror-$CUTS-cuts-every-acked-write-verifies-legs-identical"
else
	fail "mirror-cuts" "$bad failed checks over $CUTS cuts, $lost writes lost"
fi
vm_summary
