#!/usr/bin/env bash
# tests/vm/snapshot_fio.sh: a snapshot taken under load is one consistent point in time; a
# snapshot of a frozen ext4 is a clean filesystem; a merge is refused while the origin is open.
# vm: --disks 2x256M
# Method, part 1: a 16 MiB origin (a slice of vda, random bytes) with its COW store on a
# 64 MiB slice of vdb. fio writes the first 8 MiB sequentially in 16 KiB blocks (one chunk
#   each) of a fixed pattern, paced, at queue depth 4, and verifies them at the end. Mid-run
#   a snapshot is taken and read in full while fio goes on. That image must be one point in
#   time of a sequential writer: each 16 KiB block entirely old or entirely new (never torn),
#   new blocks a prefix, at most 3 (the other requests in flight) new ones after the first
#   old one, and the 8 MiB fio never touched unchanged. After fio ends and after the whole
#   origin is overwritten, the snapshot must still read the same. Deleting it frees its chunks.
# Part 2: ext4 on the same origin; files written, `fsfreeze -f`, snapshot create,
#   `fsfreeze -u`, then more writes and a rewrite of a file. `e2fsck -fn` of the snapshot must
#   be clean while the origin stays mounted and busy; mounted `-o ro,noload`, the snapshot
#   must hold the files of the freeze with their checksums, and nothing written after it;
#   while it is mounted, `snapshot delete` and `snapshot merge` of it must be refused.
# Part 3: the origin mounted again (files changed since the freeze): `snapshot merge` must be
#   refused (busy, exit 4, one line naming the origin and saying to unmount it) with the
#   snapshot, its device and the mounted files untouched; the same with the origin open in a
#   process; unmounted, the merge must run, `e2fsck -fn` of the origin be clean, and it must
#   hold the files of the freeze.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
BS=16384
FIO_MIB=8
MNT=$T/origin
SNAP_MNT=$T/snap
mkdir -p "$MNT" "$SNAP_MNT"
trap 'umount "$SNAP_MNT" "$MNT" 2>/dev/null; fsfreeze -u "$MNT" 2>/dev/null; _common_cleanup' EXIT

orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/old.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
vm_log "origin $dev (id $id)"

# ------------------------------------------------------------------ part 1: under fio
head -c $BS /dev/zero | tr '\0' '\132' >"$T/new.blk" # 0x5a, fio's pattern below
run_fio seq --filename="$dev" --direct=1 --ioengine=io_uring --rw=write --bs=$BS --iodepth=4 \
	--size=${FIO_MIB}M --rate=1m --verify=pattern --verify_pattern=0x5a --do_verify=1 \
	--verify_fatal=1 &
fio_pid=$!
# Snapshot once fio is a quarter of the way through (its paced run takes 8 s).
block_new() {
	dd if="$dev" bs=$BS skip="$1" count=1 iflag=direct status=none | cmp -s - "$T/new.blk"
}
wait_until 60 block_new $((FIO_MIB * 1048576 / BS / 4)) || die "fio did not get going: $(cat "$T/seq.err")"
s1=$(snap_create "$id" s1) || die "snapshot create failed"
dd if="$s1" of="$T/snap.img" bs=1M iflag=direct status=none || fail "snapshot-readable-under-load" "reading $s1 failed"
pid_alive "$fio_pid" || vm_log "note: fio ended before the snapshot was read"

verdict=$(python3 - "$T/old.img" "$T/snap.img" "$T/new.blk" $BS $((FIO_MIB * 1048576 / BS)) <<'PY'
import sys
old, snap, new = (open(p, "rb").read() for p in sys.argv[1:4])
bs, n = int(sys.argv[4]), int(sys.argv[5])
kinds = ""
for i in range(n):
    b = snap[i * bs:(i + 1) * bs]
    kinds += "N" if b == new else "O" if b == old[i * bs:(i + 1) * bs] else "T"
torn = kinds.count("T")
first_old = kinds.find("O") if "O" in kinds else n
late_new = kinds[first_old:].count("N")
rest_ok = snap[n * bs:] == old[n * bs:] and len(snap) == len(old)
print(torn, kinds.count("N"), kinds.count("O"), first_old, late_new, int(rest_ok),
      kinds.find("T"))
PY
)
read -r torn new old first_old late_new rest_ok first_torn <<<"${verdict:-x x x x x x x}"
vm_log "snapshot under fio: $new new blocks, $old old, $torn torn; first old block $first_old, $late_new new after it"
if [[ $torn == 0 ]]; then
	pass "no-torn-block-in-snapshot"
else
	fail "no-torn-block-in-snapshot" "$torn of the 16 KiB blocks are neither old nor new (first: block $first_torn) [$verdict]"
fi
if [[ $torn == 0 ]] && ((new > 0 && old > 0 && late_new <= 3)); then
	pass "snapshot-is-one-point-in-time"
else
	fail "snapshot-is-one-point-in-time" "$new new blocks, $old old, $late_new new after the first old one (at $first_old)"
fi
if [[ $rest_ok == 1 ]]; then
	pass "snapshot-keeps-unwritten-area"
else
	fail "snapshot-keeps-unwritten-area" "the $FIO_MIB MiB fio never wrote differ"
fi

if wait "$fio_pid"; then
	pass "origin-fio-verifies"
else
	fail "origin-fio-verifies" "fio failed: $(grep -m2 -iE 'err|bad' "$T/seq.out" "$T/seq.err")"
fi
expect_image "snapshot-stable-after-fio" "$s1" "$T/snap.img"
random_image "$T/third.img" $MIB
dd if="$T/third.img" of="$dev" bs=1M oflag=direct status=none || fail "origin-overwrite" "writing $dev failed"
expect_image "snapshot-stable-after-origin-overwrite" "$s1" "$T/snap.img"
if ublkdm snapshot delete "$id" s1 >/dev/null && wait_until 10 test ! -b "$s1" && group "$id" &&
	[[ -z $(g_snaps) && $(g .cow.used) == 0 ]]; then
	pass "delete-frees-the-snapshot"
else
	fail "delete-frees-the-snapshot" "snapshots '$(g_snaps)', cow $(g '.cow | tojson'), $s1 $([[ -b $s1 ]] && echo still exists)"
fi

# ------------------------------------------------------------------ part 2: ext4 + fsfreeze
modprobe ext4 || die "cannot load ext4"
{ mkfs.ext4 -F -q "$dev" && mount "$dev" "$MNT"; } || die "mkfs.ext4 or mount of the origin failed"
mkdir -p "$MNT/dir"
for i in 1 2 3; do head -c $((i * 512 * 1024)) /dev/urandom >"$MNT/dir/before$i"; done
(cd "$MNT" && sha256sum dir/before*) >"$T/before.sums"
fsfreeze -f "$MNT" || die "fsfreeze -f failed"
s2=$(snap_create "$id" frozen)
rc=$?
fsfreeze -u "$MNT" || die "fsfreeze -u failed"
((rc == 0)) || die "snapshot create of a frozen ext4 failed"
# The origin goes on: a new file, a rewritten one, a deleted one.
head -c $((1 << 20)) /dev/urandom >"$MNT/after"
head -c $((512 << 10)) /dev/urandom >"$MNT/dir/before1"
rm "$MNT/dir/before2"
sync
if e2fsck -fn "$s2" >"$T/fsck.out" 2>&1; then
	pass "frozen-snapshot-fsck-clean"
else
	fail "frozen-snapshot-fsck-clean" "e2fsck -fn $s2: $(tail -3 "$T/fsck.out" | tr '\n' ' ')"
fi
if mount -o ro,noload "$s2" "$SNAP_MNT" && (cd "$SNAP_MNT" && sha256sum --quiet -c "$T/before.sums") &&
	[[ ! -e $SNAP_MNT/after ]]; then
	pass "frozen-snapshot-holds-the-files-of-the-freeze"
else
	fail "frozen-snapshot-holds-the-files-of-the-freeze" "files there: $(cd "$SNAP_MNT" 2>/dev/null && find . -type f | tr '\n' ' ')"
fi
# A mounted snapshot is in use: delete and merge are refused, and the mount goes on.
out=$(ublkdm snapshot delete "$id" frozen 2>&1 >/dev/null)
rc=$?
out2=$(ublkdm snapshot merge "$id" frozen 2>&1 >/dev/null)
rc2=$?
if refused "$rc" "$out" && refused "$rc2" "$out2" && (cd "$SNAP_MNT" && sha256sum --quiet -c "$T/before.sums"); then
	pass "mounted-snapshot-delete-and-merge-refused"
	vm_log "delete of a mounted snapshot: exit $rc: $out"
else
	fail "mounted-snapshot-delete-and-merge-refused" "delete: exit $rc: $out; merge: exit $rc2: $out2"
fi
umount "$SNAP_MNT" 2>/dev/null
if umount "$MNT" && e2fsck -fn "$dev" >"$T/fsck2.out" 2>&1; then
	pass "origin-fsck-clean"
else
	fail "origin-fsck-clean" "$(tail -3 "$T/fsck2.out" | tr '\n' ' ')"
fi

# ------------------------------------------------------------------ part 3: merge, origin open
# A merge makes the origin read as the snapshot at once: under a mounted file system it is
# refused (busy, exit 4, one line saying what to do), changing nothing; unmounted, it runs.
mount "$dev" "$MNT" || die "mounting the origin again failed"
(cd "$MNT" && sha256sum after dir/before1) >"$T/after.sums"
out=$(ublkdm snapshot merge "$id" frozen 2>&1 >/dev/null)
rc=$?
vm_log "merge with the origin mounted: exit $rc: $out"
group "$id"
if ((rc == 4)) && refused "$rc" "$out" && [[ $out == *"$dev"*unmount* ]] &&
	[[ $(g_snaps) == frozen:valid && $(g .merge.active) == false && -b $s2 ]] &&
	(cd "$MNT" && sha256sum --quiet -c "$T/after.sums") && [[ ! -e $MNT/dir/before2 ]]; then
	pass "merge-under-mounted-origin-refused"
else
	fail "merge-under-mounted-origin-refused" "exit $rc: $out; snapshots '$(g_snaps)', merge $(g '.merge | tojson')"
fi
# Open in a process (no mount): refused the same way.
umount "$MNT" || die "umount of the origin failed"
exec {holder}<"$dev"
out=$(ublkdm snapshot merge "$id" frozen 2>&1 >/dev/null)
rc=$?
exec {holder}<&-
if ((rc == 4)) && refused "$rc" "$out" && [[ $out == *"$dev"* ]] && group "$id" &&
	[[ $(g_snaps) == frozen:valid && -b $s2 ]]; then
	pass "merge-under-open-origin-refused"
else
	fail "merge-under-open-origin-refused" "exit $rc: $out; snapshots '$(g_snaps)'"
fi
if ublkdm snapshot merge "$id" frozen >/dev/null && wait_merged "$id" 120 &&
	e2fsck -fn "$dev" >"$T/fsck3.out" 2>&1; then
	pass "merge-of-closed-origin-fsck-clean"
else
	fail "merge-of-closed-origin-fsck-clean" "merge $(sstatus "$id" ".merge | tojson"): $(tail -3 "$T/fsck3.out" 2>/dev/null | tr '\n' ' ')"
fi
if mount -o ro "$dev" "$MNT" && (cd "$MNT" && sha256sum --quiet -c "$T/before.sums") &&
	[[ ! -e $MNT/after ]]; then
	pass "merged-origin-holds-the-frozen-files"
else
	fail "merged-origin-holds-the-frozen-files" "files there: $(cd "$MNT" 2>/dev/null && find . -type f | tr '\n' ' ')"
fi
umount "$MNT" 2>/dev/null
ublkdm del "$id" >/dev/null
vm_summary
