# shellcheck shell=bash
# tests/vm/common_snapshot.sh: guest-side helpers for the snapshot VM tests. Source after
# common.sh.
#
# The tests keep their devices small (under TCG, reading a snapshot in full costs seconds per
# 16 MiB): origins and COW stores are dm-linear slices of the VM's disks, and each test keeps
# a model of what every device must read as (image files in $T, a tmpfs), compared with cmp
# (several times faster than checksums there).
#
# slice NAME DISK START_MIB MIB  a dm-linear slice of DISK; prints /dev/mapper/NAME
# slow_slice NAME DISK START_MIB MIB  the same slice through dm-delay (no delay yet)
# write_delay NAME DISK START_MIB MIB MS  sets the write (and flush) delay of a slow_slice
# add_origin ORIGIN COW [ARG..]  ublkdm add origin ORIGIN --cow COW ARG..; prints /dev/ublkbN
# sstatus ID JQ             a field of the group's status (under .daemon_status.target.status)
# group ID                  one `status --json ID` kept in $G, for several look-ups: each CLI
#                           call costs about a second under TCG
# g JQ                      a field of the kept status' target status (.daemon_status.target.status)
# g_snaps                   the kept snapshots as "NAME:STATE ..." in creation order
# g_child NAME              the device serving snapshot NAME in the kept status ("" if none)
# snap_create ID NAME       ublkdm snapshot create ID --name NAME --activate; prints the
#                           snapshot's device
# snap_activate ID NAME..   ublkdm snapshot activate ID NAME for each NAME (after `add origin`
#                           reassembled a store, none is active); prints their devices
# snap_names ID             the snapshots' names in creation order, space-separated
# dev_sum DEV               sha256 of all of DEV, read O_DIRECT
# file_sum FILE             sha256 of FILE
# random_image FILE MIB     a file of MIB MiB of random bytes (a model to write and compare)
# fill_random DEV FILE MIB  random_image FILE MIB, written to DEV (O_DIRECT); dies if it fails
# put DEV OFF LEN [MODEL..] writes LEN random bytes at byte OFF to DEV (O_DIRECT) and to each
#                           MODEL file; fails if the device write fails
# same_image DEV FILE       whether DEV (read O_DIRECT) holds exactly FILE's bytes
# expect_image NAME DEV FILE  PASS NAME if DEV holds FILE's bytes, else FAIL with where not
# expect_sum NAME DEV SUM [WHAT]  PASS NAME if DEV's checksum is SUM, else FAIL with WHAT
# merge_active ID           whether a merge runs (merge_idle ID: whether the status says none)
# wait_merged ID SECS       waits until no merge runs (merge.active false)
# daemon_pid ID             the pid of device ID's daemon
# refused RC OUT            whether a CLI call failed with exactly one `error: ` line

slice() {
	local name=${1:?slice NAME DISK START MIB} disk=${2:?slice} start=${3:?slice} mib=${4:?slice}
	dm_create "$name" "0 $((mib * 2048)) linear $disk $((start * 2048))"
}

_delay_table() { echo "0 $(($4 * 2048)) delay $2 $(($3 * 2048)) 0 $2 $(($3 * 2048)) ${5:-0}"; }

slow_slice() {
	modprobe dm_delay 2>/dev/null || true
	dm_create "${1:?slow_slice NAME DISK START MIB}" "$(_delay_table "$@")"
}

write_delay() {
	local name=${1:?write_delay NAME DISK START MIB MS}
	dmsetup suspend "$name" && dmsetup reload "$name" --table "$(_delay_table "$@")" &&
		dmsetup resume "$name"
}

add_origin() {
	local origin=${1:?add_origin ORIGIN COW [ARG..]} cow=${2:?add_origin ORIGIN COW [ARG..]}
	shift 2
	ublkdm add origin "$origin" --cow "$cow" "$@"
}

sstatus() {
	ublkdm status --json "${1:?sstatus ID JQ}" | jq -r ".daemon_status.target.status | ${2:?sstatus ID JQ}"
}

group() { G=$(ublkdm status --json "${1:?group ID}"); }

g() { jq -r ".daemon_status.target.status | ${1:?g JQ}" <<<"$G"; }

g_snaps() { g '[.snapshots[] | "\(.name):\(.state)"] | join(" ")'; }

g_child() {
	jq -r ".daemon_status.children[]? | select(.name == \"${1:?g_child NAME}\") | .device" <<<"$G"
}

snap_create() {
	ublkdm snapshot create "${1:?snap_create ID NAME}" --name "${2:?snap_create ID NAME}" --activate
}

snap_activate() {
	local id=${1:?snap_activate ID NAME..} name
	shift
	for name in "${@:?snap_activate ID NAME..}"; do
		ublkdm snapshot activate "$id" "$name" || return 1
	done
}

snap_names() { sstatus "${1:?snap_names ID}" '[.snapshots[].name] | join(" ")'; }

dev_sum() {
	local dev=${1:?dev_sum DEV}
	sha_range "$dev" $(($(blockdev --getsize64 "$dev") / 1048576))
}

file_sum() { sha256sum <"${1:?file_sum FILE}" | cut -d' ' -f1; }

random_image() {
	head -c "$((${2:?random_image FILE MIB} << 20))" /dev/urandom >"${1:?random_image FILE MIB}"
}

fill_random() {
	local dev=${1:?fill_random DEV FILE MIB} file=${2:?fill_random DEV FILE MIB} mib=${3:?fill_random DEV FILE MIB}
	random_image "$file" "$mib"
	dd if="$file" of="$dev" bs=1M oflag=direct status=none || die "cannot fill $dev"
}

put() {
	local dev=${1:?put DEV OFF LEN [MODEL..]} off=${2:?put DEV OFF LEN} len=${3:?put DEV OFF LEN} m
	shift 3
	head -c "$len" /dev/urandom >"$T/payload"
	dd if="$T/payload" of="$dev" bs="$len" seek="$off" oflag=seek_bytes,direct conv=notrunc \
		status=none || return 1
	for m in "$@"; do
		dd if="$T/payload" of="$m" bs="$len" seek="$off" oflag=seek_bytes conv=notrunc status=none
	done
}

same_image() {
	dd if="${1:?same_image DEV FILE}" bs=1M iflag=direct status=none | cmp -s - "${2:?same_image DEV FILE}"
}

expect_image() {
	local name=${1:?expect_image NAME DEV FILE} dev=${2:?expect_image NAME DEV FILE} file=${3:?expect_image NAME DEV FILE} out
	if same_image "$dev" "$file"; then
		pass "$name"
	else
		# Once more, for where they differ (cmp -s above is faster under TCG).
		out=$(dd if="$dev" bs=1M iflag=direct status=none | cmp - "$file" 2>&1)
		fail "$name" "$dev does not hold ${file##*/}: ${out:-read failed}"
	fi
}

expect_sum() {
	local name=${1:?expect_sum NAME DEV SUM} dev=${2:?expect_sum NAME DEV SUM} want=${3:?expect_sum NAME DEV SUM} got
	got=$(dev_sum "$dev")
	if [[ $got == "$want" ]]; then
		pass "$name"
	else
		fail "$name" "${4:-$dev} reads as ${got:0:12}.., expected ${want:0:12}.."
	fi
}

merge_active() { [[ $(sstatus "${1:?merge_active ID}" .merge.active) == true ]]; }

merge_idle() { [[ $(sstatus "${1:?merge_idle ID}" .merge.active) == false ]]; }

wait_merged() { wait_until "${2:-120}" merge_idle "${1:?wait_merged ID SECS}"; }

daemon_pid() { field "${1:?daemon_pid ID}" .daemon_pid; }

refused() {
	local rc=${1:?refused RC OUT} out=${2-}
	((rc != 0)) && [[ $(grep -c '^error: ' <<<"$out") == 1 ]]
}
