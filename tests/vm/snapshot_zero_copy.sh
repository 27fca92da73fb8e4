#!/usr/bin/env bash
# tests/vm/snapshot_zero_copy.sh: an origin and its snapshot in zero copy where the kernel offers
# it (newest), in copy mode where it does not (lts); data integrity either way.
# vm: --disks 2x128M --timeout 900 --kernels newest
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/snapshot_zero_copy.sh
# Method: the data path expected is derived from the booted kernel ($UBLKDM_VM_KERNEL: newest
# offers AUTO_BUF_REG, lts does not). A 16 MiB origin of random bytes (a slice of vda) with its
# COW store on a 64 MiB slice of vdb, and one snapshot s1 taken before any write: both devices
# must say the data path in `status --json` (.data_path). s1 must read as the origin's image
# (its checksum, taken before the writes). fio then writes and verifies (crc32c) the origin: 4 KiB
# random blocks at depth 32 and 1 MiB sequential blocks at depth 8, every first write copying
# its chunk for s1 (zero copy: the old chunk through the copy engine, the new data from the
# request's own pages); s1 read in zero copy (chunks from the origin and the COW store into one
# request's pages) must still equal the image from before. No fallback for any of it; a 4 KiB
# write to s1 (which must see no data: snapshot writes are served in copy mode) must count one
# fallback in zero copy and none on lts, and read back. `kill -9` of the daemon under fio: the
# origin QUIESCED, `recover` brings back the origin and s1 LIVE with the same data path,
# every acknowledged write verifies, and s1 still holds its image.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_snapshot.sh"
. "$UBLKDM_REPO/tests/vm/common_zero_copy.sh"

zc_expect "the origin and its snapshot"
want=$ZC_WANT
want_fallbacks=$(zc_fallbacks 1)

MIB=16
orig=$(slice origin /dev/vda 0 $MIB)
cow=$(slice cow /dev/vdb 0 64)
fill_random "$orig" "$T/s1.img" $MIB
dev=$(add_origin "$orig" "$cow") || die "add origin failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
s1=$(snap_create "$id" s1) || die "snapshot create failed"
sid=$(dev_id "$s1")
before=$(file_sum "$T/s1.img")

# The fallbacks of the origin (as its own device) and of s1 (a child of its daemon).
fallbacks() {
	group "$id"
	printf '%s %s\n' "$(jq -r .daemon_status.io.zero_copy_fallbacks <<<"$G")" \
		"$(jq -r '.daemon_status.children[] | select(.name == "s1") | .io.zero_copy_fallbacks' <<<"$G")"
}
paths() { printf '%s %s\n' "$(field "$id" .data_path)" "$(field "$sid" .data_path)"; }

if [[ $(paths) == "$want $want" ]]; then
	pass "status-says-$want"
else
	fail "status-says-$want" "origin and s1 data paths: $(paths)"
fi

# --- fio verify on the origin; every first write copies its chunk for s1.
zc_verify "$dev" \
	"4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=4M" \
	"1m-seqwrite-qd8|--rw=write --bs=1M --iodepth=8 --offset=4M --size=8M"
group "$id"
vm_log "store after fio: $(g '.cow | tojson'), exceptions $(g .exceptions)"
if (($(g .exceptions) > 0)); then
	pass "first-writes-copied-chunks"
else
	fail "first-writes-copied-chunks" "no exception after writes to the origin"
fi
expect_sum "snapshot-keeps-its-image" "$s1" "$before" "s1 after the origin writes"
if [[ $(fallbacks) == "0 0" ]]; then
	pass "aligned-io-never-falls-back"
else
	fail "aligned-io-never-falls-back" "origin and s1 fallbacks: $(fallbacks)"
fi

# --- a snapshot write: served in copy mode, one fallback in zero copy.
if put "$s1" $((4 << 20)) 4096 "$T/s1.img"; then
	pass "snapshot-write-served"
else
	fail "snapshot-write-served" "a 4 KiB write to $s1 failed"
fi
if [[ $(fallbacks) == "0 $want_fallbacks" ]]; then
	pass "snapshot-write-falls-back-$want_fallbacks"
else
	fail "snapshot-write-falls-back-$want_fallbacks" "origin and s1 fallbacks: $(fallbacks)"
fi
expect_image "snapshot-reads-its-write" "$s1" "$T/s1.img"

# --- kill -9 under fio, recover, acknowledged writes verify, s1 intact.
vm_log "kill phase"
kill_job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16
	--offset=0 "--size=${MIB}M" --verify=crc32c --verify_fatal=1 --aux-path="$T")
zc_kill "$id" "$dev" 200 kill-9-leaves-device-quiesced "${kill_job[@]}" --runtime=60
if again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE &&
	$(field "$sid" .state) == LIVE && $(paths) == "$want $want" ]]; then
	pass "recover-brings-both-live-$want"
else
	fail "recover-brings-both-live-$want" "recover '${again:-}', states $(field "$id" .state) $(field "$sid" .state), data paths $(paths)"
fi
zc_acked_verify $((200 * 4096)) "${kill_job[@]}"
expect_image "snapshot-intact-after-recover" "$s1" "$T/s1.img"
vm_summary
