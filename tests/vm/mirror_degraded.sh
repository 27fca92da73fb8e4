#!/usr/bin/env bash
# tests/vm/mirror_degraded.sh: a mirror whose leg died comes back degraded with the same
# `ublkdm add mirror` (like `mdadm --assemble --run`), never by creating over its legs.
# vm: --disks 3x256M
# Method: leg 1 is a dm-linear device over /dev/vdb, so it can be made to fail (an `error`
# table) or vanish (`dmsetup remove`). A 2-leg mirror (512 KiB regions) gets in sync; fio
# writes 32 MiB with crc32c headers; the mirror is deleted and leg 1 fails every I/O.
# 1. The same `add mirror` comes up degraded: it warns, status names "slot 1 (...):
#    unreadable: Input/output error", fio verifies every block.
# 2. 8 writes of 1 MiB land while degraded (16 regions).
# 3. Deleted again, then `add mirror --leg BLANK --leg SURVIVOR --force` (a blank replacement
#    given first): an assembly, not a create: the blank disk is not written, the survivor
#    keeps its data, status names the blank disk as not a member.
# 4. Leg 1 healed, `mirror add-leg` of it: only the regions written meanwhile resync (counts
#    printed); the legs end identical.
# 5. A fresh `add` over both legs, fio writes, kill -9 of the daemon, leg 1 removed, then
#    `ublkdm recover`: LIVE, degraded, status names the missing leg, fio verifies.
# The commands and their output are printed as a transcript ("$ ublkdm ...").
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

sectors=$(blockdev --getsz /dev/vdb)
dm_create leg1 "0 $sectors linear /dev/vdb 0" >/dev/null
LEG1=/dev/mapper/leg1
BLANK=/dev/vdc

# Prints a command and its output (stdout and stderr) for the transcript; returns its status.
show() {
	local out rc
	echo "\$ ublkdm $*"
	out=$(ublkdm "$@" 2>&1)
	rc=$?
	[[ -n $out ]] && printf '%s\n' "$out"
	((rc == 0)) || echo "(exit $rc)"
	return "$rc"
}

# Runs `ublkdm add mirror ARG..` for the transcript; sets $dev (the block device) and $id.
add_shown() {
	local out rc
	echo "\$ ublkdm add mirror $*"
	out=$(ublkdm add mirror "$@" 2>"$T/add.err")
	rc=$?
	cat "$T/add.err"
	[[ -n $out ]] && printf '%s\n' "$out"
	dev=$out
	id=$(dev_id "$out")
	return "$rc"
}

set_leg1() {
	if ! { dmsetup suspend leg1 && dmsetup load leg1 --table "0 $sectors $1" && dmsetup resume leg1; }; then
		die "cannot switch leg1 to $1"
	fi
}

fio_job=(--direct=1 --ioengine=io_uring --rw=write --bs=64k --iodepth=8 --offset=0 --size=32M
	--verify=crc32c --verify_fatal=1)
# Writes the job's 32 MiB (verified headers) to $1; the verify pass is separate.
fio_write() { run_fio "$2" --filename="$1" "${fio_job[@]}" --do_verify=0; }
fio_verify() { run_fio "$2" --filename="$1" "${fio_job[@]}" --verify_only=1; }
# Waits until no dirty bit is left (the cleaner clears them a few seconds after the writes).
wait_clean() { wait_until "${2:-60}" bash -c "(( \$($UBLKDM status --json $1 | jq -r '.daemon_status.target.status.regions.dirty') == 0 ))"; }

# --- the mirror, in sync, with data ------------------------------------------------------
dev=$(add_mirror --leg /dev/vda --leg "$LEG1" --region-size 512K) || die "add mirror failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
wait_in_sync "$id" 180 || die "the new mirror never got in sync: $(mstatus "$id" .regions)"
total=$(mstatus "$id" .regions.total)
fio_write "$dev" first || die "fio write failed: $(tail -3 "$T/first.out")"
wait_clean "$id" || vm_log "dirty bits left: $(mstatus "$id" .regions)"
ublkdm del "$id" >/dev/null || die "del failed"
vm_log "mirror in sync, 32 MiB written, deleted; now leg 1 fails every I/O"
set_leg1 error

# --- 1. the same add comes up degraded ---------------------------------------------------
echo "=== transcript: degraded assembly (leg 1 returns I/O errors) ==="
if add_shown --leg /dev/vda --leg "$LEG1" --region-size 512K; then
	pass "same-add-comes-up-degraded"
else
	fail "same-add-comes-up-degraded" "$(cat "$T/add.err")"
	die "no mirror to go on with"
fi
show status "$id"
echo "=== end of transcript ==="
set_sched_none "$dev"
line=$(mstatus "$id" '.missing_legs[0]')
if [[ $(mstatus "$id" .degraded) == true ]] && [[ $line == "slot 1 ($LEG1): unreadable: Input/output error" ]] &&
	grep -q "warning: mirror $id runs degraded: slot 1 ($LEG1): unreadable" "$T/add.err"; then
	pass "status-names-the-unreadable-leg"
else
	fail "status-names-the-unreadable-leg" "missing_legs[0] '$line'; add said: $(cat "$T/add.err")"
fi
if fio_verify "$dev" verify-degraded; then
	pass "data-verifies-degraded"
else
	fail "data-verifies-degraded" "$(grep -m1 -E 'err=|verify' "$T/verify-degraded.out")"
fi

# --- 2. writes while degraded: 8 x 1 MiB at 16 MiB steps from 100 MiB, 2 regions each ----
for i in $(seq 0 7); do
	dd if=/dev/urandom of="$dev" bs=1M count=1 seek=$((100 + 16 * i)) oflag=direct status=none
done
written_regions=16
ublkdm del "$id" >/dev/null || die "del failed"

# --- 3. a blank replacement given first, with --force: never a create --------------------
blank_before=$(sha_range "$BLANK" 8)
echo "=== transcript: a blank disk given first, with --force ==="
if add_shown --leg "$BLANK" --leg /dev/vda --region-size 512K --force; then
	pass "blank-first-assembles"
else
	fail "blank-first-assembles" "$(cat "$T/add.err")"
	die "no mirror to go on with"
fi
show status "$id"
echo "=== end of transcript ==="
set_sched_none "$dev"
if [[ $(sha_range "$BLANK" 8) == "$blank_before" ]] &&
	mstatus "$id" '.not_members[0]' | grep -q "^$BLANK: blank, not a member"; then
	pass "blank-disk-not-written"
else
	fail "blank-disk-not-written" "not_members: $(mstatus "$id" .not_members)"
fi
if fio_verify "$dev" verify-blank-first; then
	pass "survivor-keeps-its-data"
else
	fail "survivor-keeps-its-data" "$(grep -m1 -E 'err=|verify' "$T/verify-blank-first.out")"
fi

# --- 4. the returning leg resyncs only what changed --------------------------------------
set_leg1 "linear /dev/vdb 0"
echo "=== transcript: the returning leg ==="
show mirror add-leg "$id" "$LEG1" || fail "re-add-accepted" "add-leg failed"
resynced=$(mstatus "$id" .resync.regions_total)
wait_in_sync "$id" 180 || fail "re-add-resync-completes" "$(mstatus "$id" '.regions, .resync')"
show status "$id" | grep -E 'degraded|missing_legs|slot|in_sync|regions_done'
echo "=== end of transcript ==="
echo "re-add: resynced $resynced regions of $total; written while degraded: $written_regions"
if ((resynced >= written_regions && resynced <= written_regions + 2)); then
	pass "re-add-resyncs-only-what-changed"
else
	fail "re-add-resyncs-only-what-changed" "resynced $resynced regions (written $written_regions, total $total)"
fi
offset=$(data_offset_mib "$id")
ublkdm del "$id" >/dev/null
if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical"; else fail "legs-identical" "legs differ"; fi

# --- 5. recover with a leg dead meanwhile ------------------------------------------------
dev=$(add_mirror --leg /dev/vda --leg "$LEG1" --region-size 512K) || die "add mirror failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
[[ $(mstatus "$id" .degraded) == false ]] || fail "whole-again" "$(mstatus "$id" .missing_legs)"
fio_write "$dev" before-kill || fail "fio-before-kill" "$(tail -3 "$T/before-kill.out")"
pid=$(field "$id" .daemon_pid)
kill -9 "$pid"
wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]" ||
	fail "killed-mirror-quiesced" "state $(field "$id" .state)"
# The leg dies under its dm device. A mirror is found by its UUID, so recover would find the
# leg's superblock on /dev/vdb itself and come back whole: a small dm device stacked on
# /dev/vdb gives it a holder, so the scan leaves it alone, as a dead disk would be.
set_leg1 error
dm_create hold "0 8 linear /dev/vdb 0" >/dev/null || die "cannot hold /dev/vdb"
echo "=== transcript: recover after the daemon died and leg 1 died ==="
show recover "$id"
rc=$?
show status "$id"
echo "=== end of transcript ==="
line=$(mstatus "$id" '.missing_legs[0]')
if ((rc == 0)) && [[ $(field "$id" .state) == LIVE ]] &&
	[[ $line == "slot 1 ($LEG1): unreadable: "* ]]; then
	pass "recover-comes-up-degraded"
else
	fail "recover-comes-up-degraded" "recover exit $rc, state $(field "$id" .state), missing_legs[0] '$line'"
fi
if fio_verify "$dev" verify-recovered; then
	pass "data-verifies-after-recover"
else
	fail "data-verifies-after-recover" "$(grep -m1 -E 'err=|verify' "$T/verify-recovered.out")"
fi
ublkdm del "$id" >/dev/null
vm_summary
