#!/usr/bin/env bash
# tests/vm/snapshot_overflow.sh: a full COW store invalidates the snapshot, never the origin.
# vm: --disks 2x256M
# Method: a 16 MiB origin (a slice of vda, random bytes) with an 8 MiB COW store (a slice of
# vdb: room for fewer than 512 chunks of 16 KiB) and one snapshot. One 12 MiB write to the
# origin (768 chunks) must succeed although the store fills up on the way: then the snapshot
# must be invalid (list says why), its reads and writes must fail (EIO: dd fails), its chunks
# must be free again, and the origin must hold exactly what was written and stay writable.
# A merge of the invalid snapshot must be refused, leaving it served by the same device.
# After `ublkdm del` and the same `add origin`, all of that must still hold, and a new
# snapshot must work.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 8)
fill_random "$orig" "$T/origin.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
s1=$(snap_create "$id" s1) || die "snapshot create failed"
vm_log "origin $dev, snapshot $s1"

# Reads and writes of an invalid snapshot fail; a read of the first block is enough.
snapshot_fails_io() {
	! dd if="$1" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null &&
		! dd if=/dev/zero of="$1" bs=4k count=1 seek=100 oflag=direct status=none 2>/dev/null
}

# Checks the invalid snapshot and the origin; TAG names the cases.
check_overflowed() {
	local tag=$1 snap reason
	group "$id"
	snap=$(g_child s1)
	reason=$(g '.snapshots[] | select(.name == "s1") | .reason // ""')
	if [[ $(g_snaps) == s1:invalid && -n $reason ]]; then
		pass "snapshot-invalid$tag"
		vm_log "s1: invalid: $reason; served by '$snap'"
	else
		fail "snapshot-invalid$tag" "snapshots '$(g_snaps)' (reason '$reason')"
	fi
	if [[ -z $snap ]]; then
		vm_log "no device serves the invalid snapshot"
	elif snapshot_fails_io "$snap"; then
		pass "invalid-snapshot-io-fails$tag"
	else
		fail "invalid-snapshot-io-fails$tag" "I/O to $snap succeeded"
	fi
	if [[ $(g .cow.used) == 0 ]]; then
		pass "invalid-snapshot-releases-its-chunks$tag"
	else
		fail "invalid-snapshot-releases-its-chunks$tag" "COW $(g '.cow | tojson')"
	fi
	expect_image "origin-holds-what-was-written$tag" "$dev" "$T/origin.img"
	if put "$dev" $(((14 << 20) + 4096)) $((1 << 20)) "$T/origin.img" && same_image "$dev" "$T/origin.img"; then
		pass "origin-stays-writable$tag"
	else
		fail "origin-stays-writable$tag" "a write to $dev failed or did not read back"
	fi
}

if put "$dev" $((2 << 20)) $((12 << 20)) "$T/origin.img"; then
	pass "origin-write-succeeds-through-overflow"
else
	fail "origin-write-succeeds-through-overflow" "the 12 MiB write to $dev failed"
fi
check_overflowed ""
# Refused commands leave the invalid snapshot as it was, served by the same device.
out=$(ublkdm snapshot merge "$id" s1 2>&1 >/dev/null)
rc=$?
group "$id"
if refused "$rc" "$out" && [[ $(g_snaps) == s1:invalid && $(g_child s1) == "$s1" && -b $s1 ]]; then
	pass "merge-of-invalid-snapshot-refused"
	vm_log "merge of an invalid snapshot: exit $rc: $out"
else
	fail "merge-of-invalid-snapshot-refused" "exit $rc: $(tr '\n' '|' <<<"$out"); snapshots '$(g_snaps)', s1 served by '$(g_child s1)' (was $s1)"
fi

ublkdm del "$id" >/dev/null || fail "del" "ublkdm del $id failed"
dev=$(add_origin "$orig" "$cow") || die "add origin after del failed"
id=$(dev_id "$dev")
# A reassembled origin serves no snapshot; an invalid one may be activated (its I/O fails).
snap_activate "$id" s1 >/dev/null || fail "activate-invalid-after-reassembly" "snapshot activate failed"
check_overflowed "-after-reassembly"

if s2=$(snap_create "$id" s2) && [[ -b $s2 ]]; then
	cp "$T/origin.img" "$T/s2.img"
	put "$dev" 0 $((1 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"
	expect_image "new-snapshot-after-overflow" "$s2" "$T/s2.img"
else
	fail "new-snapshot-after-overflow" "snapshot create failed"
fi
ublkdm del "$id" >/dev/null
vm_summary
