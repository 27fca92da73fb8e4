# shellcheck shell=bash
# tests/vm/common_mirror.sh: guest-side helpers for the mirror VM tests. Source after common.sh.
#
# add_mirror ARG..          ublkdm add mirror ARG..; prints /dev/ublkbN
# mstatus ID JQ             a field of the mirror's status (under .daemon_status.target.status)
# wait_in_sync ID SECS      waits until every region is in sync and no resync runs
# leg_state ID SLOT         the state of the leg in SLOT
# data_offset_mib ID        the legs' data offset, in MiB (it is 1 MiB aligned)
# legs_identical_raw OFFSET_MIB DEV..  whether every DEV's data area (after OFFSET_MIB) is the
#                           same up to the end of the smallest DEV (after the mirror is gone)
# wipe_superblocks DEV..    zeroes each DEV's superblock slots (its first MiB), as a user wipes
#                           a retired leg (a create never overwrites a mirror's leg)

add_mirror() { ublkdm add mirror "$@"; }

mstatus() {
	ublkdm status --json "${1:?mstatus ID JQ}" | jq -r ".daemon_status.target.status | ${2:?mstatus ID JQ}"
}

_in_sync() {
	local s
	s=$(ublkdm status --json "$1" | jq -r '.daemon_status.target.status | "\(.regions.in_sync) \(.regions.total) \(.resync.active)"')
	read -r in total active <<<"$s"
	[[ $in == "$total" && $active == false ]]
}

wait_in_sync() { wait_until "${2:-120}" _in_sync "${1:?wait_in_sync ID SECS}"; }

leg_state() { mstatus "$1" ".legs[] | select(.slot == $2) | .state"; }

data_offset_mib() { echo $(($(mstatus "$1" .data_offset_sectors) / 2048)); }

legs_identical_raw() {
	local offset=$1 mib first sum size
	shift
	mib=$(($(blockdev --getsize64 "$1") / 1048576 - offset))
	for dev in "$@"; do
		size=$(($(blockdev --getsize64 "$dev") / 1048576 - offset))
		((size < mib)) && mib=$size
	done
	first=$(sha_range "$1" "$mib" "$offset")
	for dev in "$@"; do
		sum=$(sha_range "$dev" "$mib" "$offset")
		[[ $sum == "$first" ]] || { vm_log "$dev differs from $1 in $mib MiB of data"; return 1; }
	done
}

wipe_superblocks() {
	local dev
	for dev in "$@"; do
		dd if=/dev/zero of="$dev" bs=1M count=1 oflag=direct status=none || die "cannot wipe $dev"
	done
}
