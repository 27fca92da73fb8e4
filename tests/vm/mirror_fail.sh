#!/usr/bin/env bash
# tests/vm/mirror_fail.sh: a leg fails under fio, the mirror goes on, the leg comes back and
# only what changed meanwhile is resynced.
# vm: --disks 2x256M
# Method: leg 1 is a dm-linear device over /dev/vdb, so its table can be switched at run
# time. A 2-leg mirror (512 KiB regions) gets in sync; fio runs verified random writes; the
# table of leg 1 is switched to `error`: fio must finish without an error and status must
# show leg 1 failed. While degraded, fio goes on in its 16 regions and 8 writes of 1 MiB land
# at known places (16 more regions).
# Then the table is switched back and `ublkdm mirror add-leg` re-adds the device: the resync
# must cover about the regions written while degraded (printed), not the whole device, and
# end with identical legs.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

sectors=$(blockdev --getsz /dev/vdb)
dm_create leg1 "0 $sectors linear /dev/vdb 0"
LEG1=/dev/mapper/leg1
require_block "$LEG1"

dev=$(add_mirror --leg /dev/vda --leg "$LEG1" --region-size 512K) || die "add mirror failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
wait_in_sync "$id" 180 || die "the new mirror never got in sync: $(mstatus "$id" .regions)"
total=$(mstatus "$id" .regions.total)

# fio keeps writing (and verifying) its 8 MiB, 16 regions, before, during and after the
# failure: rate-limited passes so that it is still running when the leg fails.
job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16
	--offset=0 --size=8M --loops=4 --rate_iops=400 --verify=crc32c --verify_fatal=1)
run_fio under-failure "${job[@]}" --runtime=90 &
fio_pid=$!
sleep 3
{ dmsetup suspend leg1 && dmsetup load leg1 --table "0 $sectors error" && dmsetup resume leg1; } ||
	die "cannot switch leg1 to error"
vm_log "leg 1 now fails every I/O"

if wait "$fio_pid"; then
	pass "fio-survives-leg-failure"
else
	fail "fio-survives-leg-failure" "$(grep -m1 -E 'err=|verify' "$T/under-failure.out")"
fi
state=$(leg_state "$id" 1)
if [[ $state == failed ]] && [[ $(mstatus "$id" .legs[0].state) == in-sync ]]; then
	pass "status-shows-failed-leg"
else
	fail "status-shows-failed-leg" "leg 1 is '$state'"
fi
ublkdm status "$id"

# Writes while degraded: 8 x 1 MiB at 16 MiB steps from 100 MiB, 2 regions each.
for i in $(seq 0 7); do
	dd if=/dev/urandom of="$dev" bs=1M count=1 seek=$((100 + 16 * i)) oflag=direct status=none
done
# fio's 16 regions (written after the failure too) and the 16 above.
written_regions=32

{ dmsetup suspend leg1 && dmsetup load leg1 --table "0 $sectors linear /dev/vdb 0" && dmsetup resume leg1; } ||
	die "cannot switch leg1 back"
if ublkdm mirror add-leg "$id" "$LEG1"; then
	pass "re-add-accepted"
else
	fail "re-add-accepted" "add-leg failed"
fi
resynced=$(mstatus "$id" .resync.regions_total)
wait_in_sync "$id" 180 || fail "re-add-resync-completes" "$(mstatus "$id" '.regions, .resync')"
vm_log "regions written while degraded: about $written_regions (plus fio's before the failure was seen); resynced on re-add: $resynced of $total"
echo "re-add: resynced $resynced regions of $total; written while degraded: $written_regions"
# The bitmap must cover every region written while degraded, and little else: the whole
# device is $total regions.
if ((resynced >= 16 && resynced <= written_regions + 2 && resynced < total / 8)); then
	pass "re-add-resyncs-only-what-changed"
else
	fail "re-add-resyncs-only-what-changed" "resynced $resynced regions (written $written_regions, total $total)"
fi
offset=$(data_offset_mib "$id")
ublkdm del "$id" >/dev/null
if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical"; else fail "legs-identical" "legs differ"; fi
vm_summary
