#!/usr/bin/env bash
# tests/vm/snapshot_discard.sh: discard on a snapshot origin and on its snapshots.
# vm: --disks 2x256M
# Method: a 16 MiB origin (a dm-linear slice of vda) with a COW store on vdb, chunks of
# 16 KiB, a model of every image in RAM:
# - the origin and its snapshots advertise discard (queue/discard_max_bytes), which they
#   refused before;
# - blkdiscard of 4 MiB of the origin succeeds and the snapshot still reads its image (the
#   chunks were copied first), valid;
# - a snapshot's own 4 MiB (256 chunks in the COW store) are released by blkdiscard of that
#   range: the store's used chunks fall by 256, and the snapshot reads the origin's data
#   there again;
# - ext4 on a second snapshot: files written, removed, then fstrim releases their chunks.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
CHUNK=16384
MNT=$T/mnt
mkdir -p "$MNT"
modprobe ext4 || die "cannot load ext4"

orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/origin.img" $MIB
dev=$(add_origin "$orig" "$cow" --chunk-size $CHUNK) || die "add origin failed"
id=$(dev_id "$dev")
s1=$(snap_create "$id" s1) || die "snapshot create failed"
cp "$T/origin.img" "$T/s1.img"
vm_log "origin $dev (id $id), snapshot $s1"

for d in "$dev" "$s1"; do
	max=$(cat "/sys/block/${d##*/}/queue/discard_max_bytes")
	if ((max > 0)); then
		pass "${d##*/}-advertises-discard"
	else
		fail "${d##*/}-advertises-discard" "discard_max_bytes is $max"
	fi
done

# The origin: its last 4 MiB discarded; the snapshot keeps its image.
if blkdiscard -o $((12 << 20)) -l $((4 << 20)) "$dev"; then
	pass "origin-discard-succeeds"
else
	fail "origin-discard-succeeds" "blkdiscard on $dev failed"
fi
expect_image "snapshot-keeps-its-image-after-an-origin-discard" "$s1" "$T/s1.img"
expect_snaps() {
	local name=${1:?expect_snaps NAME WANT} want=${2:?expect_snaps NAME WANT}
	group "$id"
	if [[ $(g_snaps) == "$want" ]]; then pass "$name"; else fail "$name" "snapshots: $(g_snaps)"; fi
}
expect_snaps "snapshot-valid-after-origin-discard" "s1:valid"

# The snapshot: 4 MiB of its own (chunks 0..256), then discarded.
put "$s1" 0 $((4 << 20)) "$T/s1.img" || die "cannot write the snapshot"
used_before=$(sstatus "$id" .cow.used)
if blkdiscard -o 0 -l $((4 << 20)) "$s1"; then
	pass "snapshot-discard-succeeds"
else
	fail "snapshot-discard-succeeds" "blkdiscard on $s1 failed"
fi
used_after=$(sstatus "$id" .cow.used)
if ((used_before - used_after == 256)); then
	pass "snapshot-discard-releases-its-256-chunks"
else
	fail "snapshot-discard-releases-its-256-chunks" "COW chunks used: $used_before before, $used_after after"
fi
# What it reads there now is the origin's (unchanged there since the snapshot).
dd if="$T/origin.img" of="$T/s1.img" bs=1M count=4 conv=notrunc status=none
expect_image "discarded-range-reads-the-origin" "$s1" "$T/s1.img"

# ext4 on a second snapshot: fstrim gives back the chunks of removed files.
s2=$(snap_create "$id" s2) || die "second snapshot create failed"
{ mkfs.ext4 -F -q -E nodiscard "$s2" && mount "$s2" "$MNT"; } || die "cannot make ext4 on $s2"
dd if=/dev/urandom of="$MNT/data" bs=1M count=6 conv=fsync status=none || die "cannot write a file"
sync
used_full=$(sstatus "$id" .cow.used)
rm "$MNT/data" && sync
if fstrim "$MNT"; then
	pass "fstrim-on-a-snapshot-succeeds"
else
	fail "fstrim-on-a-snapshot-succeeds" "fstrim $MNT failed"
fi
used_trimmed=$(sstatus "$id" .cow.used)
# 6 MiB of file data is 384 chunks; most come back (the file system's own blocks stay).
if ((used_full - used_trimmed >= 300)); then
	pass "fstrim-releases-the-removed-files-chunks"
else
	fail "fstrim-releases-the-removed-files-chunks" "COW chunks used: $used_full with the file, $used_trimmed after fstrim"
fi
umount "$MNT" || die "cannot unmount $MNT"
vm_log "COW chunks used: $used_before, $used_after, $used_full, $used_trimmed"
expect_snaps "snapshots-valid-at-the-end" "s1:valid s2:valid"
vm_summary
