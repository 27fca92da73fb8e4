#!/usr/bin/env bash
# tests/vm/linear_badinput.sh: bad input fails cleanly.
# Run: scripts/vm/run --disks 2x256M tests/vm/linear_badinput.sh (or tests/vm/run-all).
# Method: each bad command must exit with its documented code (docs/exit-codes.md), print an
# `error: ...` line first on stderr, and leave nothing behind: no new ublk device, no daemon
# log, the disks' first MiB unchanged.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

require_block /dev/vda
require_block /dev/vdb
sum_before=$(sha_range /dev/vdb 1)

# expect_fail NAME CODE PATTERN CMD..: CMD exits CODE and its first stderr line is
# "error: ..." matching PATTERN.
expect_fail() {
	local name=$1 code=$2 pattern=$3 rc first
	shift 3
	"$@" >"$T/out" 2>"$T/err"
	rc=$?
	first=$(head -n1 "$T/err")
	if ((rc == code)) && [[ $first == error:* && $first =~ $pattern ]] && [[ ! -s $T/out ]]; then
		pass "$name"
	else
		fail "$name" "exit $rc (want $code), stderr '$first', stdout '$(head -c 200 "$T/out")'"
	fi
}

devices() { find /sys/class/ublk-char -maxdepth 1 -name 'ublkc*' 2>/dev/null | wc -l; }

expect_fail missing-device 3 "/dev/nonexistent" "$UBLKDM" add linear /dev/nonexistent
truncate -s 0 "$T/empty"
expect_fail zero-size-file 2 "is empty" "$UBLKDM" add linear "$T/empty"
expect_fail directory 2 "neither a block device nor a regular file" "$UBLKDM" add linear "$T"
expect_fail unknown-option 2 "--bogus" "$UBLKDM" add linear /dev/vdb --bogus
expect_fail zero-queues 2 "queues" "$UBLKDM" add linear /dev/vdb --queues 0
expect_fail huge-depth 2 "depth" "$UBLKDM" add linear /dev/vdb --depth 100000
expect_fail unknown-target 2 "mirrorx" "$UBLKDM" add mirrorx /dev/vdb
expect_fail status-of-nothing 3 "no ublk device 7" "$UBLKDM" status 7
expect_fail del-of-nothing 3 "no ublk device 7" "$UBLKDM" del 7
expect_fail bad-id 2 "not a device id" "$UBLKDM" status /dev/vda

if [[ $(devices) == 0 ]]; then pass "no-device-created"; else fail "no-device-created" "$(devices) devices"; fi

# A disk already served by a ublkdm device is held O_EXCL.
dev=$(add_linear /dev/vda) || die "add failed"
id=$(dev_id "$dev")
expect_fail disk-already-served 4 "/dev/vda is in use" "$UBLKDM" add linear /dev/vda
expect_fail recover-live-device 4 "LIVE" "$UBLKDM" recover "$id"
if [[ $(devices) == 1 ]]; then pass "only-one-device"; else fail "only-one-device" "$(devices) devices"; fi
ublkdm del "$id" >/dev/null

leftover=$(find /var/log/ublkdm -name 'starting-*' 2>/dev/null)
if [[ -z $leftover ]]; then pass "no-stray-logs"; else fail "no-stray-logs" "$leftover"; fi
if [[ $(sha_range /dev/vdb 1) == "$sum_before" ]]; then
	pass "disk-untouched"
else
	fail "disk-untouched" "/dev/vdb changed"
fi
vm_summary
