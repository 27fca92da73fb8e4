#!/usr/bin/env bash
# tests/vm/snapshot_powercut.sh: the VM loses power during copy-on-write in one group and
# during a merge in another; after boot `add origin` reassembles both, every image is intact
# and the merge finishes.
# vm: --disks 3x256M --phases 2
# Two groups, on slices of vda (origins) and vdb (COW stores), plus vdc for the state:
# - group A: a 16 MiB origin of random bytes with snapshot a1. fio writes verified 4 KiB
#   blocks to the first 8 MiB (each first write to a chunk copies it for a1) while another
#   fio writes elsewhere without pause; fio's verify state (what was acknowledged) is saved.
# - group B: a 16 MiB origin of random bytes, snapshot b1, 8 MiB written to the origin,
#   snapshot b2, then (origin writes delayed by 50 ms) `snapshot merge ID b1`.
# Phase 1 stores the verify state and the model images (a1, b1, b2) on vdc and, with the
#   second fio still writing and the merge still running, cuts the power.
# Phase 2 (same disks): the same `add origin` must reassemble each group (serving no
#   snapshot: a1 and b2 are activated); a1 must hold the
#   image it had before the cut; a verify-only fio must find every acknowledged write on
#   origin A; origin B must read as b1 at once, the merge must resume and finish, b1 must be
#   gone and b2 must hold its image.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

STATE_DISK=/dev/vdc
MIB=16
orig_a=$(slice origa /dev/vda 0 $MIB)
orig_b=$(slow_slice origb /dev/vda 64 $MIB)
cow_a=$(slice cowa /dev/vdb 0 64)
cow_b=$(slice cowb /dev/vdb 96 64)
job=(--direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16 --offset=0 --size=8M
	--verify=crc32c --verify_fatal=1 --aux-path="$T")

phase1() {
	local a ida b idb a1 trigger noise_pid fio_pid merge
	# Group B first: its merge is to run at the cut.
	fill_random "$orig_b" "$T/b1.img" $MIB
	# One chunk per merge step, so that the merge is still running at the cut.
	export UBLKDM_MERGE_STEP_CHUNKS=1
	b=$(add_origin "$orig_b" "$cow_b") || die "add origin B failed"
	unset UBLKDM_MERGE_STEP_CHUNKS
	idb=$(dev_id "$b")
	snap_create "$idb" b1 >/dev/null || die "snapshot b1 failed"
	cp "$T/b1.img" "$T/b2.img"
	put "$b" $((8 << 20)) $((8 << 20)) "$T/b2.img" || die "writing origin B failed"
	snap_create "$idb" b2 >/dev/null || die "snapshot b2 failed"
	write_delay origb /dev/vda 64 $MIB 50 || die "cannot slow origin B down"
	ublkdm snapshot merge "$idb" b1 >/dev/null || die "merge of b1 failed to start"

	fill_random "$orig_a" "$T/a1.img" $MIB
	a=$(add_origin "$orig_a" "$cow_a") || die "add origin A failed"
	ida=$(dev_id "$a")
	a1=$(snap_create "$ida" a1) || die "snapshot a1 failed"
	vm_log "phase 1: origin A $a with a1 $a1; origin B $b merging b1"
	timeout 120 fio --name=noise --filename="$a" --direct=1 --ioengine=io_uring --rw=randwrite \
		--bs=16k --iodepth=8 --offset=10M --size=6M --time_based --runtime=100 \
		--output="$T/noise.out" &
	noise_pid=$!
	trigger=$T/save-now
	run_fio acked --filename="$a" "${job[@]}" --runtime=90 --verify_state_save=1 \
		--trigger-file="$trigger" --trigger="true" &
	fio_pid=$!
	wait_writes "$ida" 1000 || die "fio did not get going"
	touch "$trigger"
	wait "$fio_pid"
	pid_alive "$noise_pid" || die "the background writer stopped before the cut"
	merge=$(sstatus "$idb" ".merge | tojson")
	[[ $(jq -r .active <<<"$merge") == true ]] || die "the merge ended before the cut: $merge"
	(cd "$T" && tar -cf - ./*verify.state a1.img b1.img b2.img) |
		dd of="$STATE_DISK" bs=1M iflag=fullblock conv=sync oflag=direct status=none ||
		die "cannot store the state"
	vm_log "phase 1: state stored; merge $merge; COW A $(sstatus "$ida" ".cow | tojson"); cutting the power"
	pass "phase1-writes-merge-and-cut"
	power_cut
}

phase2() {
	local a ida b idb a1 b2 verified
	dd if="$STATE_DISK" bs=1M count=128 iflag=direct status=none | tar -xf - -C "$T" 2>/dev/null
	if [[ ! -f $T/b2.img ]] || ! compgen -G "$T/*verify.state" >/dev/null; then
		die "no state on $STATE_DISK (phase 1 did not run?)"
	fi

	# A reassembled origin serves no snapshot until `snapshot activate`.
	if a=$(add_origin "$orig_a" "$cow_a") && ida=$(dev_id "$a") && snap_activate "$ida" a1 >/dev/null &&
		group "$ida" && a1=$(g_child a1) &&
		[[ -b $a1 && $(g_snaps) == a1:valid ]]; then
		pass "reassembles-after-cut-during-cow"
	else
		fail "reassembles-after-cut-during-cow" "add printed '${a:-}', a1 '${a1:-}', snapshots '$(g_snaps)'"
	fi
	[[ -b ${a1:-} ]] && expect_image "snapshot-intact-after-cut-during-cow" "$a1" "$T/a1.img"
	verified=0
	if [[ -b ${a:-} ]] && timeout "$FIO_TIMEOUT" fio --name=acked --filename="$a" "${job[@]}" \
		--verify_only=1 --verify_state_load=1 --output-format=json --output="$T/verify.json" \
		2>"$T/verify.err"; then
		verified=$(jq -r '.jobs[0].read.io_bytes' "$T/verify.json")
	fi
	echo "power cut: verified $((verified / 4096)) acknowledged 4 KiB blocks on origin A"
	if ((verified >= 500 * 4096)); then
		pass "acknowledged-writes-verify"
	else
		fail "acknowledged-writes-verify" "verified $verified bytes; $(head -3 "$T/verify.err")"
	fi

	if b=$(add_origin "$orig_b" "$cow_b") && idb=$(dev_id "$b"); then
		pass "reassembles-after-cut-during-merge"
	else
		die "add origin B failed after the cut"
	fi
	snap_activate "$idb" b2 >/dev/null || fail "activate-b2-during-merge" "snapshot activate failed"
	echo "power cut: merge after assembly: $(sstatus "$idb" ".merge | tojson")"
	expect_image "origin-reads-as-merging-snapshot-after-cut" "$b" "$T/b1.img"
	if wait_merged "$idb" 120 && group "$idb" && [[ $(g_snaps) == b2:valid ]]; then
		pass "merge-resumes-and-completes-after-cut"
	else
		fail "merge-resumes-and-completes-after-cut" "merge $(g '.merge | tojson'), snapshots '$(g_snaps)'"
	fi
	expect_image "origin-holds-merged-image" "$b" "$T/b1.img"
	b2=$(g_child b2)
	if [[ -b $b2 ]]; then
		expect_image "other-snapshot-intact-after-cut-during-merge" "$b2" "$T/b2.img"
	else
		fail "other-snapshot-intact-after-cut-during-merge" "no device serves b2"
	fi
	ublkdm del --all >/dev/null
}

case ${PHASE:-1} in
1) phase1 ;;
2) phase2 ;;
*) die "PHASE must be 1 or 2" ;;
esac
vm_summary
