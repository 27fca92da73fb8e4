#!/usr/bin/env bash
# tests/vm/snapshot_shared.sh: four snapshots under random origin writes each hold their own
# image, and a chunk first written after them is copied once, not once per snapshot.
# vm: --disks 2x256M
# Method: a 16 MiB origin (a slice of vda, random bytes), COW store on a 64 MiB slice of vdb
# with the default chunk size (16 KiB), and a model image of the origin in RAM. Four rounds:
# take snapshot sN (its image: the origin's), then write the first 8 chunks (so that each
# snapshot but the last holds 8 chunks of its own) and 2 random blocks (4-64 KiB, at random
# logical-block offsets) to the first 12 MiB. Then one write covers the 256 chunks of the
# last 4 MiB, which no write touched yet: each needs a copy for all four snapshots, so the
# store's used chunks must grow by exactly 256 and the snapshots' exceptions by 4 x 256; a
# second write over the same chunks must copy nothing. Every snapshot must then read as the
# origin did when it was taken, and the origin as its model. Deleting s2 must free the chunks
# only s2 used and leave s3 (which shares chunks with it) intact.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
FIRST=256 # chunks in the last 4 MiB
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/origin.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
group "$id"
chunk=$(($(g .chunk_sectors) * 512))
if ((chunk == 16384)); then pass "default-chunk-is-16K"; else fail "default-chunk-is-16K" "chunk $chunk bytes"; fi

snaps=()
ok=1
RANDOM=7 # the same offsets every run
for i in 1 2 3 4; do
	cp "$T/origin.img" "$T/s$i.img"
	snaps+=("$(snap_create "$id" "s$i")") || die "snapshot create s$i failed"
	put "$dev" 0 $((8 * 16384)) "$T/origin.img" || ok=0
	for _ in 1 2; do
		len=$(((RANDOM % 16 + 1) * 4096))
		put "$dev" $(((RANDOM * 32768 + RANDOM) % ((12 << 20) - len) / 512 * 512)) $len "$T/origin.img" || ok=0
	done
done
((ok)) || fail "random-writes-succeed" "a write to $dev failed"
group "$id"
used0=$(g .cow.used)
exc0=$(g .exceptions)
vm_log "4 snapshots after random writes: cow used $used0, exceptions $exc0"

put "$dev" $((12 << 20)) $((4 << 20)) "$T/origin.img" || fail "first-writes-succeed" "the 4 MiB write failed"
group "$id"
used1=$(g .cow.used)
exc1=$(g .exceptions)
vm_log "after first writes to $FIRST chunks: cow used $used1, exceptions $exc1"
if ((used1 - used0 == FIRST)); then
	pass "one-copy-per-chunk-for-four-snapshots"
else
	fail "one-copy-per-chunk-for-four-snapshots" "used grew by $((used1 - used0)) chunks for $FIRST first writes"
fi
if ((exc1 - exc0 == 4 * FIRST)); then
	pass "every-snapshot-maps-the-shared-copy"
else
	fail "every-snapshot-maps-the-shared-copy" "exceptions grew by $((exc1 - exc0)), expected $((4 * FIRST))"
fi
put "$dev" $((12 << 20)) $((4 << 20)) "$T/origin.img" || fail "second-writes-succeed" "the 4 MiB write failed"
used2=$(sstatus "$id" .cow.used)
if ((used2 == used1)); then
	pass "second-write-copies-nothing"
else
	fail "second-write-copies-nothing" "used went from $used1 to $used2"
fi
for i in 1 2 3 4; do
	expect_image "s$i-holds-its-image" "${snaps[i - 1]}" "$T/s$i.img"
done
expect_image "origin-holds-its-image" "$dev" "$T/origin.img"

if ublkdm snapshot delete "$id" s2 >/dev/null && group "$id" &&
	[[ $(g_snaps) == "s1:valid s3:valid s4:valid" && -z $(g_child s2) ]]; then
	pass "delete-one-of-four"
else
	fail "delete-one-of-four" "snapshots now '$(g_snaps)'"
fi
used3=$(g .cow.used)
vm_log "after deleting s2: cow used $used3 (was $used2)"
if ((used2 - used3 >= 8)); then
	pass "delete-frees-chunks-only-it-used"
else
	fail "delete-frees-chunks-only-it-used" "used $used2 -> $used3"
fi
expect_image "s3-intact-after-delete" "${snaps[2]}" "$T/s3.img"
ublkdm del "$id" >/dev/null
vm_summary
