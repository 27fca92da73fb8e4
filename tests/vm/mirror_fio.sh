#!/usr/bin/env bash
# tests/vm/mirror_fio.sh: data integrity of 2- and 3-leg mirrors under fio, end to end.
# vm: --disks 3x256M
# Method: a new 2-leg mirror resyncs leg 0 to leg 1 in the background; once in sync, fio
# writes 4 KiB random blocks (iodepth 32) and 1 MiB sequential blocks with crc32c verify;
# after an orderly stop the legs' data areas must be identical. Then a 3-leg mirror over the
# same disks does the same, once the first mirror's superblocks are wiped: a create never
# overwrites a disk that carries a mirror (even with --force, which is for foreign data), and
# the same legs given again would assemble the old 2-leg mirror.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

run_legs() {
	local name=$1 dev id
	shift
	local legs=("$@") args=()
	for l in "${legs[@]}"; do args+=(--leg "$l"); done
	dev=$(add_mirror "${args[@]}") || { fail "$name-add" "add mirror failed"; return; }
	id=$(dev_id "$dev")
	set_sched_none "$dev"
	if wait_in_sync "$id" 180; then pass "$name-initial-resync"; else fail "$name-initial-resync" "$(mstatus "$id" .regions)"; fi
	local common=(--filename="$dev" --direct=1 --ioengine=io_uring --verify=crc32c --verify_fatal=1 --runtime=180)
	if run_fio "$name-rand" "${common[@]}" --rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=48M &&
		run_fio "$name-seq" "${common[@]}" --rw=write --bs=1M --iodepth=8 --offset=48M --size=96M; then
		pass "$name-fio-verify"
	else
		fail "$name-fio-verify" "$(grep -h -m1 -E 'err=|verify' "$T/$name"-*.out)"
	fi
	grep -hE '^ *(write|read):' "$T/$name"-*.out || true
	local states offset
	states=$(mstatus "$id" '[.legs[].state] | join(",")')
	offset=$(data_offset_mib "$id")
	ublkdm del "$id" >/dev/null || fail "$name-del" "del failed"
	# Compared after the orderly stop, straight from the disks.
	if [[ $states == "in-sync,in-sync"* ]] && legs_identical "$offset" "${legs[@]}"; then
		pass "$name-legs-identical"
	else
		fail "$name-legs-identical" "leg states $states"
	fi
}

# Whether the 144 MiB fio wrote are the same on every leg, after OFFSET MiB of metadata.
legs_identical() {
	local offset=$1 first sum
	shift
	first=$(sha_range "$1" 144 "$offset")
	for dev in "$@"; do
		sum=$(sha_range "$dev" 144 "$offset")
		[[ $sum == "$first" ]] || { vm_log "$dev differs from $1"; return 1; }
	done
}

run_legs two /dev/vda /dev/vdb
wipe_superblocks /dev/vda /dev/vdb
run_legs three /dev/vda /dev/vdb /dev/vdc
vm_summary
