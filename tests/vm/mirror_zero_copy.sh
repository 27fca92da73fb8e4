#!/usr/bin/env bash
# tests/vm/mirror_zero_copy.sh: a 2-leg mirror in zero copy where the kernel offers it
# (newest), in copy mode where it does not (lts); data integrity and equal legs either way.
# vm: --disks 2x256M --timeout 900
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/mirror_zero_copy.sh
# Method: the data path expected is derived from the booted kernel ($UBLKDM_VM_KERNEL: newest
# offers AUTO_BUF_REG, lts does not). A 2-leg mirror over /dev/vda and /dev/vdb (nosync: both
# blank) must say it in `status --json` (.data_path) and `status` (`data:` line). fio then
# writes and verifies (crc32c) 4 KiB random blocks at depth 32, 1 MiB sequential blocks at
# depth 8 and random blocks of 4 KiB..1 MiB at depth 16 (each read back and checked): in zero
# copy one registered buffer goes to both legs and large reads are split across them. A write
# and a read from memory aligned to 4 bytes only (which ublk accepts and O_DIRECT on the legs
# refuses) must round-trip: in zero copy through the per-request copy fallback, exactly those
# 2 requests counted in `zero_copy_fallbacks` (aligned fio I/O counts none). Once in sync the
# legs must be equal over the written data area (cmp, the metadata skipped). `kill -9` of the
# daemon under fio: QUIESCED, `recover` brings it back LIVE with the same data path, every
# acknowledged write verifies, and after an orderly stop the legs are equal again.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

LEGS=(/dev/vda /dev/vdb)
# The MiB fio writes, from the start of the device.
WRITTEN_MIB=112
for leg in "${LEGS[@]}"; do require_block "$leg"; done
kernel=${UBLKDM_VM_KERNEL:-}
case $kernel in
newest) want=zero-copy want_text='  data:    zero-copy' ;;
lts) want=copy want_text='  data:    copy (user copy)' ;;
*) die "UBLKDM_VM_KERNEL is '$kernel', not lts or newest" ;;
esac
vm_log "kernel $(uname -r) ($kernel): a mirror should be $want"

dev=$(add_mirror --leg "${LEGS[0]}" --leg "${LEGS[1]}" --nosync --queues 2) || die "add mirror failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
status=$(ublkdm status "$id")
if [[ $(field "$id" .data_path) == "$want" ]] && grep -qxF "$want_text" <<<"$status"; then
	pass "status-says-$want"
else
	fail "status-says-$want" "data_path $(field "$id" .data_path); $(grep data: <<<"$status")"
fi
offset=$(data_offset_mib "$id")
vm_log "mirror $dev (id $id), flags $(field "$id" .flags), data at $offset MiB"

# Whether both legs hold the same first WRITTEN_MIB MiB of data (after the metadata).
legs_equal() {
	cmp <(dd if="${LEGS[0]}" bs=1M skip="$offset" count="$WRITTEN_MIB" iflag=direct status=none) \
		<(dd if="${LEGS[1]}" bs=1M skip="$offset" count="$WRITTEN_MIB" iflag=direct status=none)
}

# --- fio verify: block sizes 4 KiB .. 1 MiB, random and sequential, several in flight.
common=(--filename="$dev" --direct=1 --ioengine=io_uring --verify=crc32c --verify_fatal=1 --runtime=120)
jobs=(
	"4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=16M"
	"1m-seqwrite-qd8|--rw=write --bs=1M --iodepth=8 --offset=16M --size=64M"
	"4k-1m-randwrite-qd16|--rw=randwrite --bsrange=4k-1M --iodepth=16 --offset=80M --size=32M"
)
for entry in "${jobs[@]}"; do
	name=${entry%%|*}
	read -ra args <<<"${entry#*|}"
	if run_fio "$name" "${common[@]}" "${args[@]}"; then
		pass "fio-$name-verify"
	else
		fail "fio-$name-verify" "$(grep -m1 -E 'err=|verify' "$T/$name.out")"
	fi
	grep -hE '^ *(write|read):' "$T/$name.out" || true
done
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
if [[ $fallbacks == 0 ]]; then
	pass "aligned-io-never-falls-back"
else
	fail "aligned-io-never-falls-back" "zero_copy_fallbacks $fallbacks"
fi

# --- memory aligned to 4 bytes: ublk takes it, O_DIRECT on the legs does not.
misaligned() {
	python3 - "$dev" <<'PY'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
area = mmap.mmap(-1, 3 * 4096)
data = bytes((i * 7 + 3) % 251 for i in range(8192))
view = memoryview(area)
view[4:4 + 8192] = data
offset = 104 << 20
assert os.pwritev(fd, [view[4:4 + 8192]], offset) == 8192, "short write"
view[:] = b"\0" * len(view)
assert os.preadv(fd, [view[4:4 + 8192]], offset) == 8192, "short read"
assert bytes(view[4:4 + 8192]) == data, "the data came back changed"
aligned = mmap.mmap(-1, 8192)
assert os.preadv(fd, [aligned], offset) == 8192 and bytes(aligned) == data, "device differs"
PY
}
if err=$(misaligned 2>&1); then
	pass "memory-aligned-to-4-bytes-round-trips"
else
	fail "memory-aligned-to-4-bytes-round-trips" "$err"
fi
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
want_fallbacks=0
[[ $want == zero-copy ]] && want_fallbacks=2
if [[ $fallbacks == "$want_fallbacks" ]]; then
	pass "fallbacks-counted"
else
	fail "fallbacks-counted" "zero_copy_fallbacks $fallbacks, expected $want_fallbacks"
fi
states=$(mstatus "$id" '[.legs[].state] | join(",")')
if wait_in_sync "$id" 60 && [[ $states == in-sync,in-sync ]] && legs_equal; then
	pass "legs-equal-after-fio"
else
	fail "legs-equal-after-fio" "leg states $states; $(mstatus "$id" .regions)"
fi

# --- kill -9 under fio, recover, acknowledged writes verify (as mirror_recover, in this mode).
pid=$(field "$id" .daemon_pid)
kill_job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=64k --iodepth=16
	--offset=0 --size=64M --verify=crc32c --verify_fatal=1 --aux-path="$T")
trigger=$T/kill-now
run_fio kill-phase "${kill_job[@]}" --runtime=60 --verify_state_save=1 \
	--trigger-file="$trigger" --trigger="kill -9 $pid" &
fio_pid=$!
before=$(field "$id" .daemon_status.io.writes)
wait_writes "$id" $((before + 300)) || die "fio did not get going: $(cat "$T/kill-phase.err")"
pid_alive "$fio_pid" || die "fio ended before the kill: $(cat "$T/kill-phase.out")"
touch "$trigger"
if wait_until 30 bash -c "! [[ -d /proc/$pid ]] || grep -q '^[^)]*) Z' /proc/$pid/stat" &&
	wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
	pass "kill-9-leaves-mirror-quiesced"
else
	fail "kill-9-leaves-mirror-quiesced" "state $(field "$id" .state)"
fi
if again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE &&
	$(field "$id" .data_path) == "$want" ]]; then
	pass "recover-brings-mirror-live-$want"
else
	fail "recover-brings-mirror-live-$want" "recover '${again:-}', state $(field "$id" .state), data path $(field "$id" .data_path)"
fi
if wait_until 60 bash -c "! kill -0 $fio_pid 2>/dev/null"; then
	wait "$fio_pid"
else
	kill -9 "$fio_pid"
	fail "kill-phase-ends" "fio still running 60 s after recovery"
fi
state_files=("$T"/*verify.state)
verified=0
if [[ -e ${state_files[0]} ]] &&
	timeout "$FIO_TIMEOUT" fio --name=kill-phase "${kill_job[@]}" --verify_only=1 --verify_state_load=1 \
		--output-format=json --output="$T/verify.json" 2>"$T/verify.err"; then
	verified=$(jq -r '.jobs[0].read.io_bytes' "$T/verify.json")
fi
if ((verified >= 300 * 65536)); then
	pass "acknowledged-writes-verify-after-recover"
	vm_log "verified $((verified >> 20)) MiB of acknowledged writes"
else
	fail "acknowledged-writes-verify-after-recover" "verified $verified bytes; $(head -3 "$T/verify.err")"
fi
synced=0
wait_in_sync "$id" 120 && synced=1
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
if ((synced)) && legs_equal; then
	pass "legs-equal-after-recover"
else
	fail "legs-equal-after-recover" "in sync: $synced"
fi
vm_summary
