#!/usr/bin/env bash
# tests/vm/zero_target.sh: the `zero` example target (targets/zero/) as a real /dev/ublkbN.
# vm: --disks 1x16M
# Run: tests/vm/run-all tests/vm/zero_target.sh
# Method: `ublkdm add zero --size 64M` must give a 64 MiB device whose status names the kind;
# random data written to it must read back as zeros (writes are dropped, like dm-zero); fio's
# mixed random I/O must end without an error; a size that is not whole sectors is refused with
# one line and exit 2; `del` removes the device.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

dev=$(ublkdm add zero --size 64M) || die "add zero failed"
id=$(dev_id "$dev")
vm_log "zero device $dev (id $id)"
if [[ $(blockdev --getsize64 "$dev") == $((64 << 20)) && $(field "$id" .daemon_status.target.kind) == zero ]]; then
	pass "a-64-MiB-zero-device"
else
	fail "a-64-MiB-zero-device" "size $(blockdev --getsize64 "$dev"), kind $(field "$id" .daemon_status.target.kind)"
fi

head -c 1M /dev/urandom | dd of="$dev" bs=1M seek=3 oflag=direct status=none || fail "writes-accepted" "dd failed"
if cmp -s <(dd if="$dev" bs=1M skip=3 count=1 iflag=direct status=none) <(head -c 1M /dev/zero); then
	pass "written-data-reads-as-zeros"
else
	fail "written-data-reads-as-zeros" "the device did not read zeros"
fi

if run_fio mixed --filename="$dev" --direct=1 --ioengine=io_uring --rw=randrw --bs=4k \
	--iodepth=16 --size=32M; then
	pass "fio-mixed-io-without-errors"
else
	fail "fio-mixed-io-without-errors" "$(tail -5 "$T/mixed.err")"
fi

out=$(ublkdm add zero --size 1000 2>&1)
rc=$?
if ((rc == 2)) && [[ $(wc -l <<<"$out") == 1 && $out == *"not a whole number of sectors"* ]]; then
	pass "a-partial-sector-size-is-refused"
else
	fail "a-partial-sector-size-is-refused" "exit $rc: $out"
fi

if ublkdm del "$id" >/dev/null && [[ ! -b $dev ]]; then
	pass "del-removes-it"
else
	fail "del-removes-it" "$dev is still there"
fi
vm_summary
