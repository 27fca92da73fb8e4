#!/usr/bin/env bash
# tests/vm/snapshot_cuts.sh: CUTS (7) power cuts of the VM under writes to a snapshot origin
# with two snapshots, each followed by assembly with the same `ublkdm add origin` in the next
# boot, counted.
# vm: --disks 3x64M --phases 8 --timeout 300
# The origin is a 16 MiB slice of vda, its COW store a 64 MiB slice of vdb; vdc holds the
# test's state (a tar at 0) and the snapshots' models (s1 at 8 MiB, s2 at 24 MiB).
# Boot PHASE=p of CUTS+1 over the same disks:
# - p = 1: the origin is filled with random bytes; snapshot s1; 8 MiB of the origin's second
#   half rewritten; snapshot s2; both images are stored on vdc (the snapshots are never
#   written, so these are their models for every later boot).
# - p > 1: `ublkdm add origin ORIGIN --cow COW` must reassemble the origin LIVE with s1 and
#   s2 valid, each served by a device once activated (`snapshot activate`: a reassembled
#   origin serves none); s1 and s2 must read exactly as their models; a
#   verify-only fio (common_cycles.sh) must read back every write acknowledged before the last
#   cut (none may be lost).
# - p <= CUTS: fio writes verified blocks to an 8 MiB window of the origin (the window
#   alternates between the halves, so that the first two copy chunks for the snapshots) with seed p;
#   once the device completed ACKED_MIN writes fio saves what was acknowledged; another fio
#   keeps writing 16 KiB blocks to the other half; the verify state and the counts so far
#   are stored on vdc, and the power is cut under those writes.
# - p = CUTS+1 prints `COUNT: snapshot-cuts cycles=N
#   acked_writes_checked=N writes_lost=N snapshots_checked=N` and one PASS (or FAIL) for all.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"
# Slower writes than the mirror's (copy-on-write): fio must still write at the cut.
ACKED_MIN=${ACKED_MIN:-200}
ACKED_RATE=${ACKED_RATE:-200}
. "$UBLKDM_REPO/tests/vm/common_cycles.sh"

STATE_DISK=/dev/vdc
MIB=16
phase=${PHASE:-1}
((phase >= 1 && phase <= CUTS + 1)) || die "PHASE must be 1 to $((CUTS + 1)) (CUTS=$CUTS)"
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
model1=$(slice model1 "$STATE_DISK" 8 $MIB)
model2=$(slice model2 "$STATE_DISK" 24 $MIB)

# The counts so far (checked, lost and bad from common_cycles.sh, and these), carried from boot
# to boot on the state disk.
snaps=0
window() { echo $(((($1 - 1) % 2) * 8)); }

first_boot() {
	fill_random "$orig" "$T/s1.img" $MIB
	dev=$(add_origin "$orig" "$cow") || die "add origin failed"
	id=$(dev_id "$dev")
	snap_create "$id" s1 >/dev/null || die "snapshot s1 failed"
	cp "$T/s1.img" "$T/s2.img"
	put "$dev" $((8 << 20)) $((8 << 20)) "$T/s2.img" || die "writing the origin failed"
	snap_create "$id" s2 >/dev/null || die "snapshot s2 failed"
	{ dd if="$T/s1.img" of="$model1" bs=1M oflag=direct status=none &&
		dd if="$T/s2.img" of="$model2" bs=1M oflag=direct status=none; } || die "cannot store the models"
	rm -f "$T/s1.img" "$T/s2.img"
	set_sched_none "$dev"
	vm_log "origin $dev with s1 and s2: $CUTS cuts"
}

# After a cut: reassemble, check the group and the snapshots against their models.
assemble_after_cut() {
	local c=$((phase - 1)) s snap model verify_pid
	load_state "$STATE_DISK"
	[[ -f $T/counts && -f $T/acked.state ]] || die "no state on $STATE_DISK (phase $c did not run?)"
	# shellcheck source=/dev/null
	. "$T/counts"
	dev=$(add_origin "$orig" "$cow") || die "cut $c: assembly failed"
	id=$(dev_id "$dev")
	set_sched_none "$dev"
	# Read back what was acknowledged before the cut while the snapshots are compared.
	acked_verify "$dev" "$c" "$(window "$c")M" 8M &
	verify_pid=$!
	snap_activate "$id" s1 s2 >/dev/null || failed "cut-$c-activation" "snapshot activate failed"
	group "$id"
	if [[ $(jq -r .state <<<"$G") != LIVE || $(g_snaps) != "s1:valid s2:valid" ]]; then
		failed "cut-$c-assembly" "state $(jq -r .state <<<"$G"), snapshots '$(g_snaps)'"
	fi
	for s in s1 s2; do
		snap=$(g_child "$s")
		model=$model1
		[[ $s == s2 ]] && model=$model2
		if [[ -b $snap ]] && dev_cmp "$snap" "$model" >/dev/null; then
			snaps=$((snaps + 1))
		else
			failed "cut-$c-$s-reads-as-model" "'$snap' does not hold $s's image"
		fi
	done
	wait "$verify_pid"
	read -r CHECKED LOST <"$T/verify.counts"
	counted cut "$c"
	vm_log "cut $c: reassembled; store $(g '.cow | tojson')"
}

# Writes, the state stored, then the cut (never returns).
write_and_cut() {
	local c=$phase base noise_pid
	base=$(disk_writes "$dev")
	acked_start "$dev" "$c" "$(window "$c")M" 8M true
	{ wait_disk_writes "$dev" $((base + ACKED_MIN)) 90 && pid_alive "$ACKED_PID"; } ||
		die "cut $c: fio did not get going: $(head -c 300 "$T/acked.err")"
	touch "$T/trigger"
	wait "$ACKED_PID"
	acked_end || die "cut $c: fio saved no verify state: $(head -c 300 "$T/acked.err")"
	timeout 120 fio --name=noise --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
		--bs=16k --iodepth=8 --offset="$(window $((c + 1)))M" --size=8M --time_based --runtime=100 \
		--output="$T/noise.out" &
	noise_pid=$!
	printf 'checked=%s\nlost=%s\nbad=%s\nsnaps=%s\n' "$checked" "$lost" "$bad" "$snaps" >"$T/counts"
	base=$(disk_writes "$dev")
	store_state "$STATE_DISK" counts acked.state || die "cannot store the state"
	{ wait_disk_writes "$dev" $((base + 8)) 30 && pid_alive "$noise_pid"; } ||
		die "cut $c: the background writer is not writing"
	vm_log "cut $c: state stored; cutting the power under writes"
	power_cut
}

if ((phase == 1)); then
	first_boot
else
	assemble_after_cut
fi
if ((phase <= CUTS)); then
	write_and_cut
fi
echo "COUNT: snapshot-cuts cycles=$CUTS acked_writes_checked=$checked writes_lost=$lost snapshots_checked=$snaps"
if ((bad == 0 && lost == 0 && snaps == 2 * CUTS)); then
	pass "snapshot-$CUTS-cuts-every-acked-write-verifies-snapshots-intact"
else
	fail "snapshot-cuts" "$bad failed checks over $CUTS cuts, $lost writes lost, $snaps snapshot checks passed"
fi
vm_summary
