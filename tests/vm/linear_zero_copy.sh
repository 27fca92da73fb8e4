#!/usr/bin/env bash
# tests/vm/linear_zero_copy.sh: a linear device in zero copy where the kernel offers it (newest),
# in copy mode where it does not (lts) and with `--copy`; data integrity either way.
# vm: --disks 2x256M --timeout 900 --kernels newest
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/linear_zero_copy.sh
# Method: the data path expected is derived from the booted kernel ($UBLKDM_VM_KERNEL: newest
# offers AUTO_BUF_REG, lts does not) and must agree with `features --json`. A linear device over
# /dev/vda must say it in `status --json` (.data_path) and `status` (`data:` line). fio then
# writes and verifies (crc32c) 4 KiB random blocks at depth 32, 1 MiB sequential blocks at depth
# 8 and random blocks of 4 KiB..1 MiB at depth 16 (each read back and checked); the device must
# then equal the backing disk over the written range. A write and a
# read from memory aligned to 4 bytes only (which ublk accepts and an O_DIRECT backing disk
# refuses) must come back intact: in zero copy through the per-request copy fallback, counted in
# `zero_copy_fallbacks` (exactly the 2 requests; aligned fio I/O counts none). `kill -9` of the
# daemon under fio: QUIESCED, `recover` brings it back LIVE with the same data path, every
# acknowledged write verifies, and a new fio verify passes. `add linear --copy` gives a copy
# device whatever the kernel.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

BACKING=/dev/vda
require_block "$BACKING"
kernel=${UBLKDM_VM_KERNEL:-}
case $kernel in
newest) want=zero-copy want_text='  data:    zero-copy' ;;
lts) want=copy want_text='  data:    copy (user copy)' ;;
*) die "UBLKDM_VM_KERNEL is '$kernel', not lts or newest" ;;
esac
vm_log "kernel $(uname -r) ($kernel): a linear device should be $want"

offered=$(ublkdm features --json | jq -r .zero_copy_data_path)
if [[ $offered == "$want" ]]; then
	pass "features-agree-with-the-kernel"
else
	fail "features-agree-with-the-kernel" "features say linear devices get '$offered'"
fi

dev=$(add_linear "$BACKING" --queues 2) || die "add failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
status=$(ublkdm status "$id")
echo "$status" | head -8
if [[ $(field "$id" .data_path) == "$want" ]] && grep -qxF "$want_text" <<<"$status"; then
	pass "status-says-$want"
else
	fail "status-says-$want" "data_path $(field "$id" .data_path); $(grep data: <<<"$status")"
fi
vm_log "device $dev (id $id), granted flags $(field "$id" .flags)"

# --- fio verify: block sizes 4 KiB .. 1 MiB, random and sequential, several in flight.
common=(--filename="$dev" --direct=1 --ioengine=io_uring --verify=crc32c --verify_fatal=1 --runtime=180)
jobs=(
	"4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=32M"
	"1m-seqwrite-qd8|--rw=write --bs=1M --iodepth=8 --offset=32M --size=96M"
	"4k-1m-randwrite-qd16|--rw=randwrite --bsrange=4k-1M --iodepth=16 --offset=128M --size=64M"
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
if cmp <(dd if="$dev" bs=1M count=192 iflag=direct status=none) \
	<(dd if="$BACKING" bs=1M count=192 iflag=direct status=none); then
	pass "device-matches-backing"
else
	fail "device-matches-backing" "cmp found a difference in the first 192 MiB"
fi
fallbacks=$(field "$id" .daemon_status.io.zero_copy_fallbacks)
if [[ $fallbacks == 0 ]]; then
	pass "aligned-io-never-falls-back"
else
	fail "aligned-io-never-falls-back" "zero_copy_fallbacks $fallbacks"
fi

# --- memory aligned to 4 bytes: ublk takes it, O_DIRECT on the backing disk does not.
misaligned() {
	python3 - "$dev" <<'PY'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
area = mmap.mmap(-1, 3 * 4096)
data = bytes((i * 7 + 3) % 251 for i in range(8192))
view = memoryview(area)
view[4:4 + 8192] = data
offset = 240 << 20
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

# --- kill -9 under fio, recover, acknowledged writes verify (as linear_recover, in this mode).
pid=$(field "$id" .daemon_pid)
kill_job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=64k --iodepth=16
	--offset=0 --size=128M --verify=crc32c --verify_fatal=1 --aux-path="$T")
trigger=$T/kill-now
run_fio kill-phase "${kill_job[@]}" --runtime=120 --verify_state_save=1 \
	--trigger-file="$trigger" --trigger="kill -9 $pid" &
fio_pid=$!
before=$(field "$id" .daemon_status.io.writes)
wait_writes "$id" $((before + 500)) || die "fio did not get going: $(cat "$T/kill-phase.err")"
pid_alive "$fio_pid" || die "fio ended before the kill: $(cat "$T/kill-phase.out")"
touch "$trigger"
if wait_until 30 bash -c "! [[ -d /proc/$pid ]] || grep -q '^[^)]*) Z' /proc/$pid/stat" &&
	wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
	pass "kill-9-leaves-device-quiesced"
else
	fail "kill-9-leaves-device-quiesced" "state $(field "$id" .state)"
fi
if again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE &&
	$(field "$id" .data_path) == "$want" ]]; then
	pass "recover-brings-device-live-$want"
else
	fail "recover-brings-device-live-$want" "recover '${again:-}', state $(field "$id" .state), data path $(field "$id" .data_path)"
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
if ((verified >= 500 * 65536)); then
	pass "acknowledged-writes-verify-after-recover"
	vm_log "verified $((verified >> 20)) MiB of acknowledged writes"
else
	fail "acknowledged-writes-verify-after-recover" "verified $verified bytes; $(head -3 "$T/verify.err")"
fi
if run_fio after-recover "${common[@]}" --rw=randwrite --bs=1M --iodepth=8 --offset=128M --size=64M; then
	pass "fio-verify-after-recover"
else
	fail "fio-verify-after-recover" "$(grep -m1 -E 'err=|verify' "$T/after-recover.out")"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"

# --- --copy: copy mode whatever the kernel offers.
dev=$(add_linear "$BACKING" --copy) || die "add --copy failed"
id=$(dev_id "$dev")
if [[ $(field "$id" .data_path) == copy ]] &&
	run_fio copy-mode "${common[@]}" --rw=randwrite --bs=128k --iodepth=8 --offset=0 --size=32M; then
	pass "copy-flag-gives-a-copy-device"
else
	fail "copy-flag-gives-a-copy-device" "data_path $(field "$id" .data_path); $(grep -m1 -E 'err=|verify' "$T/copy-mode.out")"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
vm_summary
