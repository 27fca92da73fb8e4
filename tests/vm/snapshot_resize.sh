#!/usr/bin/env bash
# tests/vm/snapshot_resize.sh: an origin grows online, its snapshots keep their size.
# vm: --disks 2x128M --timeout 900 --kernels newest
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/snapshot_resize.sh
# (CI runs it on newest only: tests/vm/resize.sh checks lts's exit 5.)
# Method: a 16 MiB origin of random bytes (a dm-linear slice of vda) with its COW store on a
# 64 MiB slice of vdb and one snapshot s1. On lts (no UPDATE_SIZE) `ublkdm resize` must fail
# with exit 5 and one line, the origin keeping its size. On newest the slice's table is
# reloaded at 32 MiB and `ublkdm resize ID` must grow the origin's device to 32 MiB while s1
# stays 16 MiB with its image; 16 MiB written to the new area must copy no chunk for s1; a
# snapshot s2 taken then is 32 MiB and equals the origin; a write to the old area is copied
# for both (s1 and s2 keep their images); a shrink (`resize ID 8M`) is refused (exit 2).
# `kill -9` of the daemon and `recover` must bring back the same sizes and images, and so
# must `del` and the same `add origin` (which reassembles the grown store).
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

kernel=${UBLKDM_VM_KERNEL:-}
[[ $kernel == newest || $kernel == lts ]] || die "UBLKDM_VM_KERNEL is '$kernel', not lts or newest"
MIB=16
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/s1.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
s1=$(snap_create "$id" s1) || die "snapshot s1 failed"
bytes() { blockdev --getsize64 "$1"; }

if [[ $kernel == lts ]]; then
	out=$(ublkdm resize "$id" 2>&1)
	rc=$?
	if ((rc == 5)) && refused "$rc" "$out" && (($(bytes "$dev") == MIB << 20)); then
		pass "resize-without-update-size-exits-5"
	else
		fail "resize-without-update-size-exits-5" "exit $rc: $out"
	fi
	vm_summary
	exit
fi

# --- newest: the slice grows, then the origin.
if ! { dmsetup suspend origin &&
	dmsetup reload origin --table "0 $((2 * MIB * 2048)) linear /dev/vda 0" &&
	dmsetup resume origin; }; then
	die "cannot grow the origin's slice"
fi
if out=$(ublkdm resize "$id" 2>&1) && (($(bytes "$dev") == 2 * MIB << 20)) &&
	(($(bytes "$s1") == MIB << 20)); then
	pass "origin-grows-snapshot-keeps-its-size"
else
	fail "origin-grows-snapshot-keeps-its-size" "resize: $out; origin $(bytes "$dev"), s1 $(bytes "$s1") bytes"
fi
used=$(sstatus "$id" .cow.used)
cp "$T/s1.img" "$T/origin.img"
head -c $((MIB << 20)) /dev/urandom >>"$T/origin.img"
dd if="$T/origin.img" of="$dev" bs=1M skip=$MIB seek=$MIB oflag=direct status=none ||
	fail "new-area-writable" "writing the origin's new area failed"
if [[ $(sstatus "$id" .cow.used) == "$used" ]]; then
	pass "new-area-copies-nothing-for-older-snapshots"
else
	fail "new-area-copies-nothing-for-older-snapshots" "COW chunks used $used -> $(sstatus "$id" .cow.used)"
fi
expect_image "origin-holds-the-new-area" "$dev" "$T/origin.img"
expect_image "s1-keeps-its-image" "$s1" "$T/s1.img"
s2=$(snap_create "$id" s2) || die "snapshot s2 failed"
cp "$T/origin.img" "$T/s2.img"
if (($(bytes "$s2") == 2 * MIB << 20)); then
	pass "later-snapshot-has-the-new-size"
else
	fail "later-snapshot-has-the-new-size" "s2 has $(bytes "$s2") bytes"
fi
put "$dev" 0 $((1 << 20)) "$T/origin.img" || fail "old-area-writable" "writing the origin failed"
out=$(ublkdm resize "$id" 8M 2>&1)
rc=$?
if ((rc == 2)) && refused "$rc" "$out"; then
	pass "shrink-refused"
else
	fail "shrink-refused" "exit $rc: $out"
fi
check_all() {
	local when=$1
	[[ $(bytes "$dev") == $((2 * MIB << 20)) && $(bytes "$s1") == $((MIB << 20)) ]] ||
		fail "sizes-$when" "origin $(bytes "$dev"), s1 $(bytes "$s1") bytes"
	expect_image "origin-$when" "$dev" "$T/origin.img"
	expect_image "s1-$when" "$s1" "$T/s1.img"
	expect_image "s2-$when" "$s2" "$T/s2.img"
}
check_all "after-writes"

# --- kill -9 and recover, then del and the same add origin: the growth was recorded.
pid=$(daemon_pid "$id")
kill -9 "$pid"
wait_until 30 bash -c "! [[ -d /proc/$pid ]]" || fail "kill" "daemon $pid still alive"
if ublkdm recover "$id" >/dev/null; then
	check_all "after-recover"
else
	fail "recover" "recover $id failed"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
dev=$(add_origin "$orig" "$cow") || die "add origin after the growth failed"
id=$(dev_id "$dev")
read -r s1 s2 < <(snap_activate "$id" s1 s2 | tr '\n' ' ')
check_all "after-reassembly"
vm_summary
