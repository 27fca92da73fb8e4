#!/usr/bin/env bash
# tests/vm/snapshot_merge.sh: merging a snapshot rolls the origin back to it, also across a
# kill -9 of the daemon, while the origin stays readable and writable.
# vm: --disks 2x256M
# Method: a 16 MiB origin (a slice of vda through dm-delay, so that a merge can be slowed
# down) with its COW store on a 64 MiB slice of vdb; model images in RAM.
# Part 1: snapshot s1; writes to the origin and to s1; `snapshot merge ID s1` must read as s1
#   at once (the origin compared in full right after the command), end by itself
#   (merge.active false), leave the origin with s1's image, remove s1's device and s1 from
#   the list, and free the store.
# Part 2: snapshot s2, 8 MiB written to the origin (512 chunks to merge back), snapshot s3.
#   With origin writes delayed by 100 ms (the merge then takes 50 s at least: one chunk per
#   step, each step's origin write delayed), `snapshot merge ID s2`; mid-merge the origin is read
#   in full (it must read as s2) and written (512 KiB); then, while the merge still runs, the
#   daemon is killed with -9. The device must wait QUIESCED; `ublkdm recover ID` must bring
#   back the origin and s3's device (same paths); with the delay removed the merge must
#   resume and finish; the origin must then hold s2's image plus the mid-merge write, and
#   s3 (whose chunks the merge had to preserve) its own image.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
CHUNK=16384
orig=$(slow_slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/origin.img" $MIB
# One chunk per merge step (as before merges were batched), so that a merge can be caught.
export UBLKDM_MERGE_STEP_CHUNKS=1
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
unset UBLKDM_MERGE_STEP_CHUNKS
id=$(dev_id "$dev")
vm_log "origin $dev (id $id)"

# ------------------------------------------------------------------ part 1: a plain merge
s1=$(snap_create "$id" s1) || die "snapshot create failed"
cp "$T/origin.img" "$T/s1.img"
ok=1
put "$dev" $((2 << 20)) $((2 << 20)) "$T/origin.img" || ok=0
put "$dev" $((700 * CHUNK + 4096)) 4096 "$T/origin.img" || ok=0
put "$s1" $((10 << 20)) $((1 << 20)) "$T/s1.img" || ok=0
put "$s1" $((5 << 20)) 8192 "$T/s1.img" || ok=0
((ok)) || fail "writes-before-merge" "a write failed"
if out=$(ublkdm snapshot merge "$id" s1); then
	pass "merge-starts"
	vm_log "merge: $out"
else
	fail "merge-starts" "snapshot merge failed: $out"
fi
expect_image "origin-reads-as-snapshot-at-once" "$dev" "$T/s1.img"
if wait_merged "$id" 120; then
	pass "merge-completes"
else
	fail "merge-completes" "merge: $(sstatus "$id" ".merge | tojson")"
fi
expect_image "origin-holds-snapshot-image-after-merge" "$dev" "$T/s1.img"
group "$id"
if [[ -z $(g_snaps) && ! -b $s1 && -z $(g_child s1) && $(g .cow.used) == 0 ]]; then
	pass "merged-snapshot-is-gone"
else
	fail "merged-snapshot-is-gone" "snapshots '$(g_snaps)', COW $(g '.cow | tojson'), $s1 $([[ -b $s1 ]] && echo exists)"
fi

# ------------------------------------------------------------------ part 2: kill -9 mid-merge
cp "$T/s1.img" "$T/origin.img"
s2=$(snap_create "$id" s2) || die "snapshot s2 failed"
cp "$T/origin.img" "$T/s2.img"
put "$dev" $((8 << 20)) $((8 << 20)) "$T/origin.img" || fail "origin-write" "8 MiB write failed"
s3=$(snap_create "$id" s3) || die "snapshot s3 failed"
cp "$T/origin.img" "$T/s3.img"
# 100 ms, not less: at 20 ms a slow CI machine finished the merge (10 s at least) before the
# checks below were done, and the kill found nothing to interrupt.
write_delay origin /dev/vda 0 $MIB 100 || die "cannot slow the origin down"
ublkdm snapshot merge "$id" s2 >/dev/null || fail "merge-starts-with-another-snapshot" "merge s2 failed"
if wait_until 10 test ! -b "$s2"; then
	pass "merge-removes-the-snapshots-device"
else
	fail "merge-removes-the-snapshots-device" "$s2 still exists"
fi
# The origin reads as s2 at once and takes writes while the merge runs.
expect_image "origin-reads-as-snapshot-during-merge" "$dev" "$T/s2.img"
if put "$dev" $((10 << 20)) $((512 << 10)) "$T/s2.img" && same_image "$dev" "$T/s2.img"; then
	pass "origin-writable-during-merge"
else
	fail "origin-writable-during-merge" "a write during the merge failed or did not read back"
fi
pid=$(daemon_pid "$id")
merge=$(sstatus "$id" ".merge | tojson")
if [[ $(jq -r .active <<<"$merge") == true ]] && (($(jq -r '.total - .done' <<<"$merge") > 0)); then
	pass "merge-running-at-the-kill"
else
	fail "merge-running-at-the-kill" "merge $merge (too fast to interrupt: slow it down more)"
fi
kill -9 "$pid"
vm_log "killed the daemon; merge was $merge"
if wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
	pass "kill-9-leaves-origin-quiesced"
else
	fail "kill-9-leaves-origin-quiesced" "state $(field "$id" .state)"
fi
write_delay origin /dev/vda 0 $MIB 0 || die "cannot remove the delay"
if again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE ]]; then
	pass "recover-brings-the-origin-back"
else
	fail "recover-brings-the-origin-back" "recover printed '${again:-}', state $(field "$id" .state)"
fi
group "$id"
if [[ $(g_child s3) == "$s3" && -b $s3 ]]; then
	pass "recover-brings-the-snapshots-back"
else
	fail "recover-brings-the-snapshots-back" "s3 served by '$(g_child s3)', was $s3"
fi
vm_log "after recover: merge $(g '.merge | tojson')"
if wait_merged "$id" 120 && group "$id" && [[ $(g_snaps) == s3:valid && $(g '.merge.error // ""') == "" ]]; then
	pass "merge-resumes-and-completes"
else
	fail "merge-resumes-and-completes" "merge $(g '.merge | tojson'), snapshots '$(g_snaps)'"
fi
expect_image "origin-holds-snapshot-image-after-resumed-merge" "$dev" "$T/s2.img"
expect_image "other-snapshot-intact-after-merge" "$s3" "$T/s3.img"
ublkdm del "$id" >/dev/null
vm_summary
