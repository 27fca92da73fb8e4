#!/usr/bin/env bash
# tests/vm/snapshot_isolation.sh: a snapshot and its origin never see each other's writes.
# vm: --disks 2x256M
# Method: a 16 MiB origin (a slice of vda, filled with random bytes) with its COW store on a
# 64 MiB slice of vdb (16 KiB chunks); after each step every device is compared in full
# (O_DIRECT) with a model image kept in RAM:
# - a new snapshot is a device of the origin's size and reads as the origin did;
# - origin writes (4 KiB inside a chunk, a whole chunk, 2 MiB across chunks starting at a
#   sector that is not 4 KiB aligned) read back, and leave the snapshot as it was;
# - the snapshot is writable: writes to a chunk it already holds, to chunks it still shares
#   with the origin (partly and wholly) and across chunks read back, and leave the origin;
# - a second snapshot taken later holds the later image, and under more writes to the origin
#   (chunks one snapshot holds already, chunks both share) and to both snapshots (a chunk the
#   two share) each device keeps its own image;
# - `ublkdm del` + the same `add origin` reassembles the group: both snapshots come back
#   valid, and once activated (a reassembled origin serves none) as devices with their images.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
CHUNK=16384
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/origin.img" $MIB

dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
ss=$(blockdev --getss "$dev")
vm_log "origin $dev (id $id), logical block $ss"
s1=$(snap_create "$id" s1) || die "snapshot create failed"
if [[ -b $s1 && $s1 != "$dev" && $(blockdev --getsize64 "$s1") == $((MIB << 20)) ]] &&
	group "$id" && [[ $(g_snaps) == s1:valid && $(g_child s1) == "$s1" ]]; then
	pass "create-prints-a-device-of-the-origins-size"
else
	fail "create-prints-a-device-of-the-origins-size" "create printed '$s1'; list: $(ublkdm snapshot list "$id" 2>&1)"
fi
cp "$T/origin.img" "$T/s1.img"
expect_image "snapshot-reads-as-the-origin" "$s1" "$T/s1.img"

# Origin writes: inside chunk 5, all of chunk 100, 2 MiB from 4 MiB + one logical block.
ok=1
put "$dev" $((5 * CHUNK + 4096)) 4096 "$T/origin.img" || ok=0
put "$dev" $((100 * CHUNK)) $CHUNK "$T/origin.img" || ok=0
put "$dev" $(((4 << 20) + ss)) $((2 << 20)) "$T/origin.img" || ok=0
((ok)) || fail "origin-writes-succeed" "a write to $dev failed"
expect_image "origin-reads-its-writes" "$dev" "$T/origin.img"
expect_image "origin-writes-leave-the-snapshot" "$s1" "$T/s1.img"

# Snapshot writes: chunk 5 (s1 holds it now), part of chunk 300 and all of chunk 400 (shared
# with the origin), and 1 MiB across chunks from 10 MiB + one logical block.
ok=1
put "$s1" $((5 * CHUNK)) 4096 "$T/s1.img" || ok=0
put "$s1" $((300 * CHUNK + 8192)) 4096 "$T/s1.img" || ok=0
put "$s1" $((400 * CHUNK)) $CHUNK "$T/s1.img" || ok=0
put "$s1" $(((10 << 20) + ss)) $((1 << 20)) "$T/s1.img" || ok=0
if ((ok)); then pass "snapshot-is-writable"; else fail "snapshot-is-writable" "a write to $s1 failed"; fi
expect_image "snapshot-reads-its-writes" "$s1" "$T/s1.img"
expect_image "snapshot-writes-leave-the-origin" "$dev" "$T/origin.img"

s2=$(snap_create "$id" s2) || die "second snapshot create failed"
cp "$T/origin.img" "$T/s2.img"

# More origin writes: chunks 5 and 100 (s1 holds them, s2 not), chunk 300 (s1 holds its
# own), chunk 900 (both share the origin's); then s2 writes chunk 900 (now shared by both
# snapshots) and s1 writes chunks 950-952 (shared by s2 and the origin).
ok=1
put "$dev" $((5 * CHUNK)) $CHUNK "$T/origin.img" || ok=0
put "$dev" $((100 * CHUNK + 4096)) 4096 "$T/origin.img" || ok=0
put "$dev" $((300 * CHUNK)) 8192 "$T/origin.img" || ok=0
put "$dev" $((900 * CHUNK)) 4096 "$T/origin.img" || ok=0
put "$s2" $((900 * CHUNK + 4096)) 4096 "$T/s2.img" || ok=0
put "$s1" $((950 * CHUNK)) $((3 * CHUNK)) "$T/s1.img" || ok=0
((ok)) || fail "writes-to-three-devices-succeed" "a write failed"
expect_image "origin-holds-its-image" "$dev" "$T/origin.img"
expect_image "first-snapshot-holds-its-image" "$s1" "$T/s1.img"
expect_image "second-snapshot-holds-its-image" "$s2" "$T/s2.img"

# Restart: the same add reassembles the origin and both snapshots.
if ublkdm del "$id" >/dev/null && [[ ! -b $dev && ! -b $s1 && ! -b $s2 ]]; then
	pass "del-stops-the-group"
else
	fail "del-stops-the-group" "after del: $(echo /dev/ublkb*)"
fi
dev=$(add_origin "$orig" "$cow") || die "second add origin failed"
id=$(dev_id "$dev")
snap_activate "$id" s1 s2 >/dev/null || fail "activate-after-reassembly" "snapshot activate failed"
group "$id"
s1=$(g_child s1)
s2=$(g_child s2)
if [[ $(g_snaps) == "s1:valid s2:valid" && -b $s1 && -b $s2 ]]; then
	pass "add-reassembles-the-snapshots"
else
	fail "add-reassembles-the-snapshots" "snapshots '$(g_snaps)', devices '$s1' '$s2'"
fi
expect_image "origin-after-reassembly" "$dev" "$T/origin.img"
[[ -b $s1 ]] && expect_image "first-snapshot-after-reassembly" "$s1" "$T/s1.img"
[[ -b $s2 ]] && expect_image "second-snapshot-after-reassembly" "$s2" "$T/s2.img"
ublkdm del "$id" >/dev/null
vm_summary
