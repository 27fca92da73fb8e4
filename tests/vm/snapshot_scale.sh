#!/usr/bin/env bash
# tests/vm/snapshot_scale.sh: a thousand snapshots of one origin, as dm-thin holds them: made
# in metadata only, a few activated as devices; an origin first write still costs one copy per
# chunk; a deactivated snapshot merges.
# vm: --disks 2x256M --timeout 600
# Method: a 16 MiB origin of random bytes (a slice of vda), its COW store on a 64 MiB slice of
# vdb (room for 1024 snapshots), and model images in RAM (tmpfs):
# - 1024 `snapshot-create` commands over the control socket (one process for all: a CLI call
#   costs about a second under TCG); the status lists 1024 snapshots, none a device; the
#   1025th create is refused with Busy (exit 4) in one line;
# - s0, s341, s682 and s1023 are activated: four devices;
# - 4 MiB of the origin is written (256 chunks of 16 KiB): the COW store's used chunks and the
#   exception index grow by exactly 256 (one copy and one entry per chunk, whatever the number
#   of snapshots), and every snapshot's exception count is 256; written again, nothing more
#   is copied; the four devices read the origin's first image (checksums);
# - s341 is deactivated and merged while inactive: the origin ends holding its image, s341 is
#   gone, 1023 snapshots stay, and the other devices still read their image.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"

MIB=16
SNAPSHOTS=1024
CHUNK_KIB=16
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/origin.img" $MIB
first=$(file_sum "$T/origin.img")
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"

# Creates snapshots s0 .. s(N-1) over one control-socket connection each, from one process;
# prints how many failed and the first error.
create_many() {
	python3 - "$id" "${1:?create_many N}" <<'PY'
import json, socket, sys
failed, first = 0, ""
for i in range(int(sys.argv[2])):
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(60)
    conn.connect(f"/run/ublkdm/{sys.argv[1]}.sock")
    request = {"version": 1, "cmd": "target", "name": "snapshot-create", "args": {"name": f"s{i}"}}
    conn.sendall(json.dumps(request).encode() + b"\n")
    reply = json.loads(conn.makefile().readline())
    conn.close()
    if not reply.get("ok"):
        failed += 1
        first = first or json.dumps(reply)
print(failed, first)
PY
}

t0=$SECONDS
read -r failed first_error < <(create_many $SNAPSHOTS)
secs=$((SECONDS - t0))
group "$id"
count=$(g '.snapshots | length')
children=$(jq -r '.daemon_status.children | length' <<<"$G")
if [[ $failed == 0 && $count == "$SNAPSHOTS" && $children == 0 ]]; then
	pass "1024-snapshots-made-in-metadata"
	vm_log "$SNAPSHOTS snapshot creates in $secs s"
else
	fail "1024-snapshots-made-in-metadata" "$failed failed ($first_error); $count listed, $children devices"
fi
out=$(ublkdm snapshot create "$id" --name one-too-many 2>&1)
rc=$?
if ((rc == 4)) && refused $rc "$out"; then
	pass "the-1025th-is-refused"
	vm_log "the 1025th: $out"
else
	fail "the-1025th-is-refused" "exit $rc: $out"
fi

# Four devices.
declare -A devs
for name in s0 s341 s682 s1023; do
	devs[$name]=$(ublkdm snapshot activate "$id" "$name") || die "activate $name failed"
done
group "$id"
[[ $(jq -r '.daemon_status.children | length' <<<"$G") == 4 ]] || fail "four-devices" "$(jq -c .daemon_status.children <<<"$G")"

# Origin first writes: one copy per chunk for all 1024.
used0=$(g .cow.used)
entries0=$(g .cow.index_entries)
put "$dev" 0 $((4 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"
group "$id"
chunks=$(((4 << 10) / CHUNK_KIB))
grew=$(($(g .cow.used) - used0))
entries=$(($(g .cow.index_entries) - entries0))
per_snapshot=$(g '[.snapshots[].exceptions] | unique | join(",")')
if [[ $grew == "$chunks" && $entries == "$chunks" && $per_snapshot == "$chunks" ]]; then
	pass "one-copy-per-chunk-for-1024-snapshots"
else
	fail "one-copy-per-chunk-for-1024-snapshots" "used +$grew, index entries +$entries, per-snapshot exceptions $per_snapshot (want $chunks)"
fi
echo "COUNT: snapshot-scale snapshots=$SNAPSHOTS chunks_written=$chunks cow_used=$(g .cow.used) index_entries=$(g .cow.index_entries) exceptions=$(g .exceptions)"
put "$dev" 0 $((4 << 20)) "$T/origin.img" || fail "origin-write" "write to $dev failed"
used1=$(sstatus "$id" .cow.used)
if [[ $used1 == $((used0 + chunks)) ]]; then
	pass "a-rewrite-copies-nothing"
else
	fail "a-rewrite-copies-nothing" "used $used1, want $((used0 + chunks))"
fi
for name in s0 s1023; do
	expect_sum "$name-reads-its-image" "${devs[$name]}" "$first" "$name"
done

# A deactivated snapshot merges.
ublkdm snapshot deactivate "$id" s341 >/dev/null || fail "deactivate" "deactivate s341 failed"
wait_until 10 test ! -b "${devs[s341]}" || fail "deactivate" "${devs[s341]} still there"
if ublkdm snapshot merge "$id" s341 >/dev/null && wait_merged "$id" 180; then
	group "$id"
	names=$(g '[.snapshots[].name] | index("s341")')
	if [[ $names == null && $(g '.snapshots | length') == $((SNAPSHOTS - 1)) ]]; then
		pass "deactivated-snapshot-merged-and-gone"
	else
		fail "deactivated-snapshot-merged-and-gone" "s341 at $names, $(g '.snapshots | length') snapshots"
	fi
	expect_sum "origin-holds-the-merged-image" "$dev" "$first" origin
	expect_sum "s682-still-reads-its-image" "${devs[s682]}" "$first" s682
else
	fail "deactivated-snapshot-merged-and-gone" "merge of s341 did not end: $(sstatus "$id" .merge)"
fi
ublkdm del "$id" >/dev/null
vm_summary
