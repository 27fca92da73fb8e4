#!/usr/bin/env bash
# tests/vm/mirror_scrub.sh: scrub finds a mismatch planted behind the mirror's back, and
# `--repair` fixes it.
# vm: --disks 2x256M
# Method: a 2-leg mirror in sync, data written through it; 4 KiB of random bytes written
# straight onto leg 1's data area (not through the mirror); `ublkdm mirror scrub` must count
# at least one mismatched region; `scrub --repair` must rewrite it so that the legs compare
# equal; a last check scrub must count none.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

dev=$(add_mirror --leg /dev/vda --leg /dev/vdb) || die "add mirror failed"
id=$(dev_id "$dev")
wait_in_sync "$id" 180 || die "never in sync"
dd if=/dev/urandom of="$dev" bs=1M count=32 oflag=direct status=none
offset=$(data_offset_mib "$id")

# 4 KiB of garbage at 10 MiB into leg 1's data.
dd if=/dev/urandom of=/dev/vdb bs=4k count=1 seek=$(((offset + 10) * 256)) oflag=direct status=none

scrub_and_wait() {
	ublkdm mirror scrub "$id" "$@" >/dev/null || return 1
	wait_until 120 bash -c "[[ \$($UBLKDM status --json $id | jq -r '.daemon_status.target.status.scrub.mode // \"done\"') == done || \$($UBLKDM status --json $id | jq -r '.daemon_status.target.status.last_scrub != null') == true ]]"
	wait_until 120 bash -c "[[ \$($UBLKDM status --json $id | jq -r '.daemon_status.target.status.scrub') == null ]]"
}

scrub_and_wait || fail "scrub-check-runs" "scrub did not finish"
found=$(mstatus "$id" .mismatch_count)
vm_log "check scrub: last_scrub $(mstatus "$id" .last_scrub)"
if ((found >= 1)); then pass "scrub-finds-planted-mismatch"; else fail "scrub-finds-planted-mismatch" "mismatch_count $found"; fi

scrub_and_wait --repair || fail "scrub-repair-runs" "repair did not finish"
scrub_and_wait || fail "scrub-recheck-runs" "check did not finish"
after=$(mstatus "$id" .last_scrub.mismatches)
if [[ $after == 0 ]]; then pass "repair-leaves-no-mismatch"; else fail "repair-leaves-no-mismatch" "last scrub: $(mstatus "$id" .last_scrub)"; fi
ublkdm del "$id" >/dev/null
if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical-after-repair"; else fail "legs-identical-after-repair" "legs differ"; fi
vm_summary
