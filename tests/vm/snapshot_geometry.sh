#!/usr/bin/env bash
# tests/vm/snapshot_geometry.sh: the devices of a snapshot group advertise what is true of
# every device under them, and an origin that is not a whole number of chunks works.
# vm: --disks 2x256M
# Method: origins are dm-linear slices of vda (512-byte sectors; the first one's cache set
# to "write through", so that origin has no volatile cache); their COW stores are regular
# files on an ext4 file system with 4 KiB blocks (ublkdm serves files in 4 KiB blocks, with
# a volatile cache), on vdb. Models of every image are kept in RAM and compared (O_DIRECT):
# - the origin and the snapshot both have 4 KiB logical blocks and say "write back" in
#   queue/write_cache, so the kernel sends them FLUSH (the COW's cache is not hidden);
# - 4 KiB O_DIRECT writes to the snapshot work (into a chunk it shares, then in place), a
#   512-byte buffered write with fsync works, a 512-byte O_DIRECT write is refused by the
#   kernel itself (EINVAL, no failed request in the kernel log) and the snapshot stays valid;
# - an origin of 16 MiB + 11 sectors (the last 16 KiB chunk is 11 sectors long) is served
#   in whole 4 KiB blocks; after a snapshot a write to its last block leaves the snapshot
#   reading the old tail, valid; the snapshot's own write to its tail merges back into the
#   origin, and the 3 sectors past what is served are never written.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
CHUNK=16384
MNT=$T/mnt
modprobe ext4 || die "cannot load ext4"
mkdir -p "$MNT"
fs=$(slice cowfs /dev/vdb 0 128)
{ mkfs.ext4 -F -q -b 4096 "$fs" && mount "$fs" "$MNT"; } || die "cannot make the COW file system"
truncate -s 48M "$MNT/cow1" "$MNT/cow2" || die "cannot make the COW files"

# The sysfs queue folder of a block device (by its numbers: /dev/mapper nodes are not links).
queue_dir() {
	local dev=${1:?queue_dir DEV}
	printf '/sys/dev/block/%d:%d/queue\n' "0x$(stat -Lc %t "$dev")" "0x$(stat -Lc %T "$dev")"
}
# A queue setting, e.g. `queue_of /dev/ublkb1 write_cache`.
queue_of() { cat "$(queue_dir "${1:?queue_of DEV FILE}")/${2:?queue_of DEV FILE}"; }

orig=$(slice origin /dev/vda 0 $MIB)
echo "write through" >"$(queue_dir "$orig")/write_cache" || die "cannot set the cache of $orig"
[[ $(blockdev --getss "$orig") == 512 ]] || die "the origin slice does not have 512-byte sectors"
[[ $(queue_of "$orig" write_cache) == "write through" ]] || die "the origin slice has a volatile cache"
fill_random "$orig" "$T/origin.img" $MIB
dev=$(add_origin "$orig" "$MNT/cow1") || die "add origin failed"
id=$(dev_id "$dev")
s1=$(snap_create "$id" s1) || die "snapshot create failed"
vm_log "origin $dev (id $id), snapshot $s1"
for d in "$dev" "$s1"; do
	ss=$(blockdev --getss "$d")
	wc=$(queue_of "$d" write_cache)
	if [[ $ss == 4096 && $wc == "write back" ]]; then
		pass "${d##*/}-advertises-4k-blocks-and-a-volatile-cache"
	else
		fail "${d##*/}-advertises-4k-blocks-and-a-volatile-cache" "logical block $ss, write_cache '$wc'"
	fi
done
cp "$T/origin.img" "$T/s1.img"

# 4 KiB O_DIRECT writes: into chunk 5, shared with the origin, then in place; across chunks.
ok=1
put "$s1" $((5 * CHUNK + 4096)) 4096 "$T/s1.img" || ok=0
put "$s1" $((5 * CHUNK + 8192)) 4096 "$T/s1.img" || ok=0
put "$s1" $((9 * CHUNK + 12288)) 8192 "$T/s1.img" || ok=0
if ((ok)); then pass "4k-direct-writes-to-the-snapshot"; else fail "4k-direct-writes-to-the-snapshot" "a write to $s1 failed"; fi
# 512 bytes through the page cache (which reads and writes whole blocks), then fsync.
head -c 512 /dev/urandom >"$T/small"
if dd if="$T/small" of="$s1" bs=512 seek=$((20 * CHUNK / 512 + 3)) conv=notrunc,fsync status=none; then
	dd if="$T/small" of="$T/s1.img" bs=512 seek=$((20 * CHUNK / 512 + 3)) conv=notrunc status=none
	pass "buffered-512-byte-write-to-the-snapshot"
else
	fail "buffered-512-byte-write-to-the-snapshot" "dd to $s1 failed"
fi
# Failed requests of the snapshot device in the kernel log ("... error, dev ublkbN, ...").
failed_requests() { dmesg | grep -c "error, dev ${s1##*/}," || true; }
before=$(failed_requests)
if out=$(dd if="$T/small" of="$s1" bs=512 seek=1 oflag=direct conv=notrunc status=none 2>&1); then
	fail "512-byte-direct-write-is-refused" "a 512-byte write to a 4 KiB device succeeded"
elif ! grep -q "Invalid argument" <<<"$out"; then
	fail "512-byte-direct-write-is-refused" "dd failed otherwise: $out"
elif (($(failed_requests) != before)); then
	fail "512-byte-direct-write-is-refused" "the kernel sent it, and the daemon failed it"
else
	pass "512-byte-direct-write-is-refused"
fi
expect_image "snapshot-reads-its-writes" "$s1" "$T/s1.img"
expect_image "origin-untouched-by-snapshot-writes" "$dev" "$T/origin.img"
group "$id"
if [[ $(g_snaps) == s1:valid ]]; then
	pass "snapshot-stays-valid"
else
	fail "snapshot-stays-valid" "snapshots: $(g_snaps)"
fi
ublkdm del "$id" >/dev/null || fail "del" "ublkdm del $id failed"

# An origin of 16 MiB + 11 sectors: its last chunk is short, and not whole 4 KiB blocks.
SECTORS=$((MIB * 2048 + 11))
SERVED=$(((MIB << 20) + 4096))
orig2=$(dm_create origin2 "0 $SECTORS linear /dev/vda $((32 * 2048))")
head -c $((SECTORS * 512)) /dev/urandom >"$T/raw2.img"
dd if="$T/raw2.img" of="$orig2" bs=512 oflag=direct status=none || die "cannot fill $orig2"
head -c $SERVED "$T/raw2.img" >"$T/origin2.img"
dev2=$(add_origin "$orig2" "$MNT/cow2") || die "add origin (short chunk) failed"
id2=$(dev_id "$dev2")
size=$(blockdev --getsize64 "$dev2")
if [[ $size == "$SERVED" ]]; then
	pass "served-in-whole-blocks"
else
	fail "served-in-whole-blocks" "$dev2 has $size bytes, not $SERVED"
fi
t1=$(snap_create "$id2" t1) || die "snapshot create (short chunk) failed"
cp "$T/origin2.img" "$T/t1.img"
if put "$dev2" $((SERVED - 4096)) 4096 "$T/origin2.img"; then
	pass "origin-write-to-the-last-block"
else
	fail "origin-write-to-the-last-block" "the write to $dev2 failed"
fi
expect_image "origin-reads-its-new-tail" "$dev2" "$T/origin2.img"
expect_image "snapshot-keeps-the-old-tail" "$t1" "$T/t1.img"
group "$id2"
if [[ $(g_snaps) == t1:valid ]]; then
	pass "short-chunk-snapshot-stays-valid"
else
	fail "short-chunk-snapshot-stays-valid" "snapshots: $(g_snaps)"
fi
put "$t1" $((SERVED - 4096)) 4096 "$T/t1.img" || fail "snapshot-write-to-the-last-block" "the write to $t1 failed"
expect_image "snapshot-reads-its-tail" "$t1" "$T/t1.img"
if ublkdm snapshot merge "$id2" t1 >/dev/null && wait_merged "$id2" 120; then
	pass "merge-of-the-short-chunk"
else
	fail "merge-of-the-short-chunk" "merge: $(sstatus "$id2" .merge)"
fi
expect_image "origin-reads-as-the-merged-snapshot" "$dev2" "$T/t1.img"
ublkdm del "$id2" >/dev/null || fail "del" "ublkdm del $id2 failed"
if dd if="$orig2" bs=512 skip=$((SERVED / 512)) count=3 iflag=direct status=none |
	cmp -s - <(tail -c 1536 "$T/raw2.img"); then
	pass "sectors-past-the-served-size-untouched"
else
	fail "sectors-past-the-served-size-untouched" "the last 3 sectors of $orig2 changed"
fi
umount "$MNT" || true
vm_summary
