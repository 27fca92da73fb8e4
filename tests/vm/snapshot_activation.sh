#!/usr/bin/env bash
# tests/vm/snapshot_activation.sh: snapshots need not be devices. `snapshot create` makes one
# in metadata only; `activate` serves it as a device, `deactivate` stops the device and keeps
# the snapshot; the active set survives a daemon's death; delete and merge work on inactive
# snapshots.
# vm: --disks 2x256M
# Method: a 16 MiB origin of random bytes (a slice of vda), its COW store on a 64 MiB slice of
# vdb, and model images in RAM (tmpfs):
# - `snapshot create ID --name s1` prints the name, adds no /dev/ublkb node and no child;
#   `snapshot list` shows s1 inactive (`no`, device `-`), the status JSON `"active": false`;
# - the origin is written (the copy-on-write serves the inactive s1 as well);
# - `snapshot activate ID s1` prints a new device that reads as s1's model (checksums);
#   activating it again prints the same device; the list shows it active;
# - `snapshot deactivate` while the device is open is refused (exit 4, one line) and leaves
#   it served; closed, the device goes and s1 stays (valid, inactive); deactivating it again
#   succeeds; the origin is written again; activated again, s1 reads the same image;
# - `snapshot create --activate` prints a device (s2, reading as the origin then); s3 is
#   made inactive; `kill -9` of the daemon and `ublkdm recover` bring back exactly s1 and s2
#   as devices (the same ones; s3 none), the stored spec's active set is [s1, s2];
# - an unknown name is refused with exit 3; the inactive s3 is deleted;
# - s1 deactivated, the origin written once more, then `snapshot merge ID s1` of the inactive
#   s1: the origin ends holding s1's image (checksums), s1 is gone, s2 still reads its own.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/origin.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"

nodes() { find /dev -maxdepth 1 -name 'ublkb*' | sort | tr '\n' ' '; }
served() { jq -r '[.daemon_status.children[]?.name] | join(" ")' <<<"$G"; }
# The `snapshot list` row of NAME, its words joined by one space.
list_row() { ublkdm snapshot list "$id" | awk -v n="$1" '$1 == n { $1 = $1; print }'; }

# Made in metadata only.
before=$(nodes)
cp "$T/origin.img" "$T/s1.img"
out=$(ublkdm snapshot create "$id" --name s1)
rc=$?
group "$id"
if ((rc == 0)) && [[ $out == s1 && $(nodes) == "$before" && -z $(served) && $(g_snaps) == s1:valid ]]; then
	pass "create-makes-no-device"
else
	fail "create-makes-no-device" "exit $rc, printed '$out'; nodes '$(nodes)' (were '$before'); children '$(served)'"
fi
row=$(list_row s1)
if [[ $row == "s1 valid no - 0" && $(g '.snapshots[0].active') == false ]]; then
	pass "list-shows-it-inactive"
else
	fail "list-shows-it-inactive" "row '$row', status active $(g '.snapshots[0].active')"
fi

# The origin written: the inactive snapshot keeps its image all the same.
put "$dev" $((2 << 20)) $((4 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"

s1=$(ublkdm snapshot activate "$id" s1)
rc=$?
if ((rc == 0)) && [[ -b $s1 && $s1 != "$dev" ]]; then
	pass "activate-prints-a-device"
	expect_sum "activated-snapshot-reads-its-image" "$s1" "$(file_sum "$T/s1.img")" s1
else
	die "activate failed: exit $rc, printed '$s1'"
fi
again=$(ublkdm snapshot activate "$id" s1)
rc=$?
row=$(list_row s1)
if ((rc == 0)) && [[ $again == "$s1" && $row == "s1 valid yes $s1 "* ]]; then
	pass "activate-is-idempotent"
else
	fail "activate-is-idempotent" "exit $rc, printed '$again' (first '$s1'); row '$row'"
fi

# Deactivate: refused while open, then the device goes and the snapshot stays.
exec 3<"$s1"
out=$(ublkdm snapshot deactivate "$id" s1 2>&1)
rc=$?
if ((rc == 4)) && refused $rc "$out" && [[ -b $s1 ]] && group "$id" && [[ $(served) == s1 ]]; then
	pass "deactivate-in-use-refused"
	vm_log "deactivate of an open snapshot: $out"
else
	fail "deactivate-in-use-refused" "exit $rc: $out; children '$(served)'"
fi
exec 3<&-
out=$(ublkdm snapshot deactivate "$id" s1 2>&1)
rc=$?
if ((rc == 0)) && wait_until 10 test ! -b "$s1" && group "$id" && [[ -z $(served) && $(g_snaps) == s1:valid ]]; then
	pass "deactivate-stops-the-device-keeps-the-snapshot"
	vm_log "deactivate: $out"
else
	fail "deactivate-stops-the-device-keeps-the-snapshot" "exit $rc: $out; children '$(served)', snapshots '$(g_snaps)', nodes '$(nodes)'"
fi
out=$(ublkdm snapshot deactivate "$id" s1 2>&1)
rc=$?
if ((rc == 0)) && [[ $(list_row s1) == "s1 valid no - "* ]]; then
	pass "deactivate-inactive-is-a-no-op"
else
	fail "deactivate-inactive-is-a-no-op" "exit $rc: $out; row '$(list_row s1)'"
fi
put "$dev" $((8 << 20)) $((4 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"
s1=$(ublkdm snapshot activate "$id" s1)
[[ -b $s1 ]] || die "second activate failed: '$s1'"
expect_sum "reactivated-snapshot-reads-the-same" "$s1" "$(file_sum "$T/s1.img")" s1

# create --activate serves at once; s3 stays in metadata.
cp "$T/origin.img" "$T/s2.img"
s2=$(ublkdm snapshot create "$id" --name s2 --activate)
rc=$?
if ((rc == 0)) && [[ -b $s2 ]]; then
	pass "create-activate-prints-a-device"
	expect_image "create-activate-device-reads-the-origin" "$s2" "$T/s2.img"
else
	fail "create-activate-prints-a-device" "exit $rc, printed '$s2'"
fi
[[ $(ublkdm snapshot create "$id" --name s3) == s3 ]] || fail "create-s3" "snapshot create s3 failed"
put "$dev" 0 $((1 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"

# The daemon dies; recover brings back exactly the active set.
pid=$(daemon_pid "$id")
kill -9 "$pid"
wait_until 30 bash -c "! kill -0 $pid 2>/dev/null" || die "daemon $pid still alive"
# (The driver may not have quiesced the devices yet: recover is retried, as snapshot_kills does.)
wait_until 30 bash -c "$UBLKDM recover $id >/dev/null 2>$T/recover.err" ||
	die "recover failed: $(cat "$T/recover.err")"
group "$id"
spec_active=$(jq -c '.daemon_status.spec.active' <<<"$G")
if [[ $(jq -r .state <<<"$G") == LIVE && $(served) == "s1 s2" && $(g_child s1) == "$s1" &&
	$(g_child s2) == "$s2" && $(g_snaps) == "s1:valid s2:valid s3:valid" && $spec_active == '["s1","s2"]' ]]; then
	pass "recover-restores-the-active-set"
else
	fail "recover-restores-the-active-set" "state $(jq -r .state <<<"$G"), children '$(served)' on '$(g_child s1)' '$(g_child s2)' (were '$s1' '$s2'), snapshots '$(g_snaps)', spec active $spec_active"
fi
active=$(g '[.snapshots[] | "\(.name):\(.active)"] | join(" ")')
if [[ $active == "s1:true s2:true s3:false" ]]; then
	pass "status-shows-the-active-set"
else
	fail "status-shows-the-active-set" "$active"
fi
expect_image "s1-after-recover" "$s1" "$T/s1.img"
expect_image "s2-after-recover" "$s2" "$T/s2.img"
expect_image "origin-after-recover" "$dev" "$T/origin.img"

out=$(ublkdm snapshot activate "$id" nosuch 2>&1)
rc=$?
if ((rc == 3)) && refused $rc "$out"; then
	pass "activate-unknown-refused"
else
	fail "activate-unknown-refused" "exit $rc: $out"
fi

# Delete an inactive snapshot.
n=$(nodes)
if ublkdm snapshot delete "$id" s3 >/dev/null && group "$id" &&
	[[ $(g_snaps) == "s1:valid s2:valid" && $(nodes) == "$n" ]]; then
	pass "delete-inactive"
else
	fail "delete-inactive" "snapshots '$(g_snaps)', nodes '$(nodes)' (were '$n')"
fi

# Merge a deactivated snapshot: the origin rolls back to its image.
if ! { ublkdm snapshot deactivate "$id" s1 >/dev/null && wait_until 10 test ! -b "$s1"; }; then
	fail "deactivate-before-merge" "s1 still served by $s1"
fi
put "$dev" $((4 << 20)) $((2 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"
out=$(ublkdm snapshot merge "$id" s1 2>&1)
rc=$?
if ((rc == 0)) && wait_merged "$id" 120 && group "$id" && [[ $(g_snaps) == s2:valid && $(served) == s2 ]]; then
	pass "merge-of-a-deactivated-snapshot"
	vm_log "merge: $out"
else
	fail "merge-of-a-deactivated-snapshot" "exit $rc: $out; snapshots '$(g_snaps)', children '$(served)'"
fi
expect_sum "origin-holds-the-merged-image" "$dev" "$(file_sum "$T/s1.img")" origin
expect_image "s2-intact-after-merge" "$s2" "$T/s2.img"
spec_active=$(field "$id" '.daemon_status.spec.active | tojson')
if [[ $spec_active == '["s2"]' ]]; then
	pass "merged-snapshot-left-the-active-set"
else
	fail "merged-snapshot-left-the-active-set" "spec active $spec_active"
fi
ublkdm del "$id" >/dev/null
vm_summary
