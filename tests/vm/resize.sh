#!/usr/bin/env bash
# tests/vm/resize.sh: online resize (`ublkdm resize`) on both kernels.
# vm: --disks 2x256M --timeout 600
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/resize.sh
# Method: a linear device over a dm-linear slice of /dev/vda (64 MiB) is written with fio
# (crc32c verify); the slice is then grown (dmsetup reload + resume, 128 MiB).
# - lts (6.12, no UPDATE_SIZE): `ublkdm resize ID` must fail with one line naming UPDATE_SIZE,
#   exit 5, and change nothing (blockdev --getsize64 and `status` keep 64 MiB; the data
#   verifies).
# - newest: `resize ID` must grow /dev/ublkbN to 128 MiB (blockdev --getsize64, status); the
#   old data verifies and fio writes and verifies the new area; `resize ID 64M` (shrinking)
#   and a size beyond the backing must fail with exit 2 and change nothing; after the slice
#   grows to 192 MiB, `resize ID 160M` serves 160 MiB, `kill -9` of the daemon leaves it
#   QUIESCED and `recover` brings it back LIVE at 160 MiB (the size asked is in the stored
#   spec) with every byte verified; `resize ID` then takes all 192 MiB. A zero device cannot
#   grow: exit 2.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

require_block /dev/vda
kernel=${UBLKDM_VM_KERNEL:-}
[[ $kernel == lts || $kernel == newest ]] || die "UBLKDM_VM_KERNEL is '$kernel', not lts or newest"
MIB=$((1 << 20))

slice() { # slice MIB: /dev/mapper/grow is the first MIB MiB of /dev/vda
	local table="0 $(($1 * 2048)) linear /dev/vda 0"
	if [[ -e /dev/mapper/grow ]]; then
		dmsetup suspend grow && dmsetup reload grow --table "$table" && dmsetup resume grow
	else
		dm_create grow "$table" >/dev/null
	fi
}
size_of() { blockdev --getsize64 "$1"; }
# fio jobs, the same definition writes and later verifies (verify_only regenerates the data).
job() { # job NAME OFFSET_MIB SIZE_MIB [ARG..]
	local name=$1 off=$2 size=$3
	shift 3
	run_fio "$name" --filename="$dev" --direct=1 --ioengine=io_uring --rw=write --bs=256k \
		--iodepth=8 --offset="${off}M" --size="${size}M" --verify=crc32c --verify_fatal=1 \
		--randseed="$off" "$@"
}
check() { # check NAME CMD..: pass or fail with the output of CMD
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}

slice 64 || die "cannot create the dm slice"
dev=$(add_linear /dev/mapper/grow) || die "add failed"
id=$(dev_id "$dev")
check "fio-writes-the-first-64m" job first 0 64
slice 128 || die "cannot grow the dm slice"

if [[ $kernel == lts ]]; then
	out=$(ublkdm resize "$id" 2>&1)
	code=$?
	if ((code == 5)) && [[ $(wc -l <<<"$out") == 1 && $out == error:*UPDATE_SIZE* ]]; then
		pass "resize-without-update-size-is-one-line-exit-5"
	else
		fail "resize-without-update-size-is-one-line-exit-5" "exit $code: $out"
	fi
	if [[ $(size_of "$dev") == $((64 * MIB)) && $(field "$id" .size_bytes) == $((64 * MIB)) &&
		$(field "$id" .daemon_status.target.status.size_sectors) == $((64 * 2048)) ]]; then
		pass "nothing-changed"
	else
		fail "nothing-changed" "size $(size_of "$dev"), status $(field "$id" .size_bytes)"
	fi
	check "old-data-verifies" job first 0 64 --verify_only=1
	ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
	dmsetup remove grow
	vm_summary
	exit
fi

# --- newest: grow to all of the backing.
out=$(ublkdm resize "$id" 2>&1)
if [[ $out == *"grown from 64 MiB to 128 MiB"* && $(size_of "$dev") == $((128 * MIB)) &&
	$(field "$id" .size_bytes) == $((128 * MIB)) ]]; then
	pass "resize-grows-the-device-to-the-backing"
else
	fail "resize-grows-the-device-to-the-backing" "$out; size $(size_of "$dev")"
fi
check "old-data-verifies-after-resize" job first 0 64 --verify_only=1
check "fio-verifies-the-new-area" job second 64 64

# --- refused: shrinking, beyond the backing; nothing changes.
for args in "64M" "256M"; do
	out=$(ublkdm resize "$id" $args 2>&1)
	code=$?
	if ((code == 2)) && [[ $(wc -l <<<"$out") == 1 && $(size_of "$dev") == $((128 * MIB)) ]]; then
		pass "resize-to-$args-refused-exit-2"
	else
		fail "resize-to-$args-refused-exit-2" "exit $code: $out; size $(size_of "$dev")"
	fi
done
vm_log "shrink: $(ublkdm resize "$id" 64M 2>&1)"

# --- a size asked for survives kill -9 and recover.
slice 192 || die "cannot grow the dm slice again"
out=$(ublkdm resize "$id" 160M 2>&1)
if [[ $(size_of "$dev") == $((160 * MIB)) ]]; then
	pass "resize-to-a-size-that-fits"
else
	fail "resize-to-a-size-that-fits" "$out; size $(size_of "$dev")"
fi
check "fio-verifies-up-to-the-size-asked" job third 128 32
pid=$(field "$id" .daemon_pid)
kill -9 "$pid"
if wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]" &&
	again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE &&
	$(size_of "$dev") == $((160 * MIB)) ]]; then
	pass "recover-after-resize-keeps-the-size"
else
	fail "recover-after-resize-keeps-the-size" "state $(field "$id" .state), size $(size_of "$dev"): $(tail -3 "/var/log/ublkdm/$id.log")"
fi
check "data-verifies-after-recover-1" job first 0 64 --verify_only=1
check "data-verifies-after-recover-2" job second 64 64 --verify_only=1
check "data-verifies-after-recover-3" job third 128 32 --verify_only=1
out=$(ublkdm resize "$id" 2>&1)
if [[ $(size_of "$dev") == $((192 * MIB)) ]]; then
	pass "resize-after-recover-takes-all"
else
	fail "resize-after-recover-takes-all" "$out; size $(size_of "$dev")"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
dmsetup remove grow

# --- a target that cannot grow.
zdev=$(ublkdm add zero --size 64M) || die "add zero failed"
out=$(ublkdm resize "$(dev_id "$zdev")" 2>&1)
code=$?
if ((code == 2)) && [[ $(wc -l <<<"$out") == 1 && $out == *"cannot be resized"* ]]; then
	pass "a-zero-device-cannot-grow-exit-2"
else
	fail "a-zero-device-cannot-grow-exit-2" "exit $code: $out"
fi
ublkdm del "$(dev_id "$zdev")" >/dev/null || fail "del" "del zero failed"
vm_summary
