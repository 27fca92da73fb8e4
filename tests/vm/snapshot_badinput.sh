#!/usr/bin/env bash
# tests/vm/snapshot_badinput.sh: bad snapshot requests fail with one line and a non-zero exit,
# and leave the origin's data alone.
# vm: --disks 2x256M
# Cases, each an `error: ` line on stderr (exactly one) and a non-zero exit; after them the
# origin (an 8 MiB slice of vda, random bytes) must hold the same bytes:
# - add origin with a COW device smaller than one chunk (a 4 KiB dm slice: the error must
#   say it is too small); with a chunk size larger than the whole COW device (16M on 8 MiB);
#   with a chunk size that is not a power of two (12K, exit 2); with one below 4 KiB (2K,
#   exit 2); with one file (or a symlink to it) or one device (two paths) as both origin and
#   COW store (exit 2, naming both): no ublk device may remain;
# - on a working group with snapshot s1: create of a name that exists; delete and merge of an
#   unknown name (exit 3, not-found, as docs/exit-codes.md says); `ublkdm del` of the
#   snapshot's own id (s1 must go on serving its image); a snapshot command on a linear
#   device. Then a delete of s1 while a reader holds it open must be refused at once (busy,
#   exit 4; dm refuses to remove an open device) with s1 intact, and succeed once closed;
# - at the end, add origin over a COW store whose two superblock slots are both damaged
#   (magic kept, checksums failing): corrupt metadata, exit 7, one line naming the store's
#   device, and no device remains.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=8
orig=$(slice origin /dev/vda 0 $MIB)
tiny=$(dm_create tiny "0 8 linear /dev/vdb $((200 << 11))")
small=$(slice small /dev/vdb 16 8)
cow=$(slice cow /dev/vdb 32 64)
lin_disk=$(slice lin /dev/vdb 128 16)
fill_random "$orig" "$T/origin.img" $MIB

# NAME WANT_RC CMD..: WANT_RC "any" for any non-zero exit.
expect_refusal() {
	local name=$1 want=$2 out rc
	shift 2
	out=$(ublkdm "$@" 2>&1 >/dev/null)
	rc=$?
	if refused "$rc" "$out" && [[ $want == any || $rc == "$want" ]]; then
		pass "$name"
		vm_log "$name: exit $rc: $(tr '\n' '|' <<<"$out")"
	else
		fail "$name" "exit $rc (want ${want/any/non-zero}), stderr: $(tr '\n' '|' <<<"$out")"
	fi
}
no_devices() { [[ -z $(ls /sys/class/ublk-char/ 2>/dev/null) ]]; }

expect_refusal cow-smaller-than-a-chunk any add origin "$orig" --cow "$tiny"
# The error must say what is wrong (not only that a read failed).
out=$(ublkdm add origin "$orig" --cow "$tiny" 2>&1)
if grep -q 'too small' <<<"$out"; then
	pass "cow-smaller-than-a-chunk-says-too-small"
else
	fail "cow-smaller-than-a-chunk-says-too-small" "$(tr '\n' '|' <<<"$out")"
fi
expect_refusal chunk-larger-than-the-cow any add origin "$orig" --cow "$small" --chunk-size 16M
expect_refusal chunk-not-power-of-two 2 add origin "$orig" --cow "$cow" --chunk-size 12K
expect_refusal chunk-below-4K 2 add origin "$orig" --cow "$cow" --chunk-size 2K
# One file or device as both origin and COW store, under any path: exit 2, naming both.
disk=$T/disk.img
{ truncate -s 16M "$disk" && ln -s "$disk" "$T/disk.link"; } || die "cannot make a file"
expect_refusal origin-and-cow-one-file 2 add origin "$disk" --cow "$disk"
orig_node=/dev/$(lsblk -dno KNAME "$orig")
[[ -b $orig_node && $orig_node != "$orig" ]] || die "no second node for $orig ($orig_node)"
expect_refusal origin-and-cow-one-device 2 add origin "$orig" --cow "$orig_node"
out=$(ublkdm add origin "$disk" --cow "$T/disk.link" 2>&1)
rc=$?
if ((rc == 2)) && refused "$rc" "$out" && [[ $out == *"$disk and $T/disk.link are the same device"* ]]; then
	pass "origin-and-cow-one-file-via-symlink"
else
	fail "origin-and-cow-one-file-via-symlink" "exit $rc: $(tr '\n' '|' <<<"$out")"
fi
if no_devices && same_image "$orig" "$T/origin.img"; then
	pass "refused-adds-leave-no-device-and-the-origin"
else
	fail "refused-adds-leave-no-device-and-the-origin" "devices: $(ls /sys/class/ublk-char/); origin $(same_image "$orig" "$T/origin.img" || echo changed)"
fi

dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
s1=$(snap_create "$id" s1) || die "snapshot create failed"
expect_refusal create-existing-name any snapshot create "$id" --name s1
expect_refusal delete-unknown-name 3 snapshot delete "$id" nosuch
expect_refusal merge-unknown-name 3 snapshot merge "$id" nosuch
expect_refusal del-of-a-snapshot-id any del "$(dev_id "$s1")"
if [[ $(snap_names "$id") == s1 && -b $s1 ]] && same_image "$s1" "$T/origin.img" && same_image "$dev" "$T/origin.img"; then
	pass "snapshot-survives-refusals"
else
	fail "snapshot-survives-refusals" "snapshots '$(snap_names "$id")', $s1 $([[ -b $s1 ]] || echo gone), or the origin changed"
fi
# Held open (not exclusively) by a reader, the snapshot is not deleted (like dmsetup remove of
# an open device): busy (exit 4) at once, intact; once closed, it deletes.
exec 3<"$s1"
out=$(timeout 20 "$UBLKDM" snapshot delete "$id" s1 2>&1)
rc=$?
if ((rc == 4)) && [[ $(snap_names "$id") == s1 && -b $s1 ]] && same_image "$s1" "$T/origin.img"; then
	pass "delete-of-an-open-snapshot-is-refused"
else
	fail "delete-of-an-open-snapshot-is-refused" "exit $rc: $out; snapshots '$(snap_names "$id")'"
fi
exec 3<&-
out=$(timeout 20 "$UBLKDM" snapshot delete "$id" s1 2>&1)
rc=$?
if ((rc == 0)) && [[ -z $(snap_names "$id") ]] && wait_until 10 test ! -b "$s1" &&
	s9=$(snap_create "$id" s9) && same_image "$s9" "$T/origin.img"; then
	pass "delete-once-closed"
else
	fail "delete-once-closed" "exit $rc: $out; snapshots '$(snap_names "$id")'"
fi
lin=$(add_linear "$lin_disk") || die "add linear failed"
expect_refusal snapshot-command-on-linear any snapshot create "$(dev_id "$lin")" --name x
ublkdm del --all >/dev/null
# A store whose two superblock slots are both damaged (magic kept, checksums failing).
bad=$(slice badcow /dev/vdb 160 16)
add_origin "$orig" "$bad" >/dev/null || die "add origin on $bad failed"
ublkdm del --all >/dev/null
for at in 100 $((4096 + 100)); do
	printf 'ZZZZ' | dd of="$bad" bs=1 seek="$at" conv=notrunc,fsync status=none || die "cannot damage $bad"
done
expect_refusal corrupt-store 7 add origin "$orig" --cow "$bad"
out=$(ublkdm add origin "$orig" --cow "$bad" 2>&1)
if grep -q "^error: the snapshot store on .*: no superblock slot passes its checksum" <<<"$out" && no_devices; then
	pass "corrupt-store-names-the-store"
else
	fail "corrupt-store-names-the-store" "$(tr '\n' '|' <<<"$out"); devices: $(ls /sys/class/ublk-char/)"
fi
vm_summary
