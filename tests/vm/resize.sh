#!/usr/bin/env bash
# tests/vm/resize.sh: online resize (`ublkdm resize`) on both kernels.
# vm: --disks 2x256M --timeout 600 --kernels lts,newest
# Run: tests/vm/run-all [--debug] --kernel newest|lts tests/vm/resize.sh
# Method: a linear device over a dm-linear slice of /dev/vda (32 MiB) is written with fio
# (crc32c verify); the slice is then grown (dmsetup reload + resume, 64 MiB).
# - lts (6.12, no UPDATE_SIZE): `ublkdm resize ID` must fail with one line naming UPDATE_SIZE,
#   exit 5, and change nothing (blockdev --getsize64 and `status` keep 32 MiB; the data
#   verifies).
# - newest: `resize ID` must grow /dev/ublkbN to 64 MiB (blockdev --getsize64, status); the
#   old data verifies and fio writes and verifies the new area; `resize ID 16M` (shrinking)
#   and a size beyond the backing must fail with exit 2 and change nothing; after the slice
#   grows to 96 MiB, `resize ID 80M` serves 80 MiB, `kill -9` of the daemon leaves it
#   QUIESCED and `recover` brings it back LIVE at 80 MiB (the size asked is in the stored
#   spec) with every byte verified; `resize ID` then takes all 96 MiB. A zero device cannot
#   grow: exit 2.
# - both: a snapshot's device (an origin on /dev/vdb) keeps its size: `resize` of it fails
#   with one line, exit 2.
# - mirror (`mirror grow`): a 2-leg mirror over two 32 MiB dm slices (/dev/vda from 128 MiB,
#   /dev/vdb from 128 MiB) is fio-written (crc32c verify); the slices then grow to 64 MiB
#   (dmsetup reload; the mirror reads its legs' sizes again when it grows). On lts `mirror
#   grow` fails with one line naming UPDATE_SIZE, exit 5, and nothing changes. On newest,
#   with one slice grown, `mirror grow` fails with exit 2 naming slot 1; with both, it grows
#   /dev/ublkbN to all the legs hold, the old data verifies, the resync of the new area
#   (random bytes on one leg's slice beforehand) completes, fio writes and verifies half the
#   new area, and after an orderly stop the legs' data areas are byte-equal.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

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
# A snapshot's device keeps its size: `resize` of it is refused (exit 2, one line), whatever
# the kernel.
child_refused() {
	local origin cow odev oid sdev out code
	origin=$(dm_create org "0 65536 linear /dev/vdb 0")
	cow=$(dm_create cow "0 65536 linear /dev/vdb 65536")
	odev=$(ublkdm add origin "$origin" --cow "$cow") || die "add origin failed"
	oid=$(dev_id "$odev")
	sdev=$(ublkdm snapshot create "$oid" --name s1 --activate) || die "snapshot create failed"
	out=$(ublkdm resize "$(dev_id "$sdev")" 2>&1)
	code=$?
	if ((code == 2)) && [[ $(wc -l <<<"$out") == 1 && $out == *"keeps its size"* ]]; then
		pass "a-snapshot-device-cannot-be-resized-exit-2"
	else
		fail "a-snapshot-device-cannot-be-resized-exit-2" "exit $code: $out"
	fi
	ublkdm del "$oid" >/dev/null || fail "del" "del origin failed"
	dmsetup remove org && dmsetup remove cow
}
check() { # check NAME CMD..: pass or fail with the output of CMD
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}
mleg() { # mleg NAME DISK MIB: /dev/mapper/NAME is MIB MiB of DISK from its 128th MiB
	local table="0 $(($3 * 2048)) linear $2 262144"
	if [[ -e /dev/mapper/$1 ]]; then
		dmsetup suspend "$1" && dmsetup reload "$1" --table "$table" && dmsetup resume "$1"
	else
		dm_create "$1" "$table" >/dev/null
	fi
}
# A mirror grows once every leg is bigger (`mirror grow`), on newest only.
mirror_grow() {
	local mdev mid msize out code off
	mleg ml0 /dev/vda 32 || die "cannot create slice ml0"
	mleg ml1 /dev/vdb 32 || die "cannot create slice ml1"
	mdev=$(add_mirror --leg /dev/mapper/ml0 --leg /dev/mapper/ml1) || die "add mirror failed"
	mid=$(dev_id "$mdev")
	wait_in_sync "$mid" 120 || fail "mirror-initial-resync" "$(mstatus "$mid" .regions)"
	msize=$(($(size_of "$mdev") / MIB))
	dev=$mdev check "mirror-fio-writes-all-${msize}m" job mfirst 0 "$msize"
	mleg ml0 /dev/vda 64 || die "cannot grow slice ml0"
	if [[ $kernel == newest ]]; then
		out=$(ublkdm mirror grow "$mid" 2>&1)
		code=$?
		if ((code == 2)) && [[ $(wc -l <<<"$out") == 1 && $out == *"slot 1 (/dev/mapper/ml1"* &&
			$(size_of "$mdev") == $((msize * MIB)) ]]; then
			pass "mirror-grow-with-a-leg-not-bigger-exit-2"
		else
			fail "mirror-grow-with-a-leg-not-bigger-exit-2" "exit $code: $out"
		fi
	fi
	# What the bigger disk held before differs from the other leg's: the resync must copy it.
	dd if=/dev/urandom of=/dev/vdb bs=1M seek=160 count=32 oflag=direct status=none ||
		die "cannot fill the new area of ml1"
	mleg ml1 /dev/vdb 64 || die "cannot grow slice ml1"
	out=$(ublkdm mirror grow "$mid" 2>&1)
	code=$?
	if [[ $kernel == lts ]]; then
		if ((code == 5)) && [[ $(wc -l <<<"$out") == 1 && $out == error:*UPDATE_SIZE* &&
			$(size_of "$mdev") == $((msize * MIB)) &&
			$(mstatus "$mid" .size_sectors) == $((msize * 2048)) ]]; then
			pass "mirror-grow-without-update-size-is-one-line-exit-5"
		else
			fail "mirror-grow-without-update-size-is-one-line-exit-5" "exit $code: $out"
		fi
		dev=$mdev check "mirror-old-data-verifies" job mfirst 0 "$msize" --verify_only=1
	else
		if ((code == 0)) && [[ $out == *"grown from $msize MiB to $((msize + 32)) MiB"* &&
			$(size_of "$mdev") == $(((msize + 32) * MIB)) &&
			$(mstatus "$mid" .size_sectors) == $(((msize + 32) * 2048)) ]]; then
			pass "mirror-grow-grows-the-device"
		else
			fail "mirror-grow-grows-the-device" "exit $code: $out; size $(size_of "$mdev")"
		fi
		dev=$mdev check "mirror-old-data-verifies-after-grow" job mfirst 0 "$msize" --verify_only=1
		if wait_in_sync "$mid" 120; then
			pass "mirror-new-area-resynced"
		else
			fail "mirror-new-area-resynced" "$(mstatus "$mid" .regions)"
		fi
		# Half the new area: the other half is equal on the legs only by the resync.
		dev=$mdev check "mirror-fio-verifies-the-new-area" job msecond "$msize" 16
	fi
	off=$(data_offset_mib "$mid")
	ublkdm del "$mid" >/dev/null || fail "del" "del mirror $mid failed"
	if [[ $kernel == lts ]]; then # not grown: compare the mirror's data area alone
		mleg ml0 /dev/vda 32 || fail "mirror-slices" "cannot shrink ml0 back"
		mleg ml1 /dev/vdb 32 || fail "mirror-slices" "cannot shrink ml1 back"
	fi
	if legs_identical_raw "$off" /dev/mapper/ml0 /dev/mapper/ml1; then
		pass "mirror-legs-equal"
	else
		fail "mirror-legs-equal" "the legs' data areas differ"
	fi
	dmsetup remove ml0 && dmsetup remove ml1
}

slice 32 || die "cannot create the dm slice"
dev=$(add_linear /dev/mapper/grow) || die "add failed"
id=$(dev_id "$dev")
check "fio-writes-the-first-32m" job first 0 32
slice 64 || die "cannot grow the dm slice"

if [[ $kernel == lts ]]; then
	out=$(ublkdm resize "$id" 2>&1)
	code=$?
	if ((code == 5)) && [[ $(wc -l <<<"$out") == 1 && $out == error:*UPDATE_SIZE* ]]; then
		pass "resize-without-update-size-is-one-line-exit-5"
	else
		fail "resize-without-update-size-is-one-line-exit-5" "exit $code: $out"
	fi
	if [[ $(size_of "$dev") == $((32 * MIB)) && $(field "$id" .size_bytes) == $((32 * MIB)) &&
		$(field "$id" .daemon_status.target.status.size_sectors) == $((32 * 2048)) ]]; then
		pass "nothing-changed"
	else
		fail "nothing-changed" "size $(size_of "$dev"), status $(field "$id" .size_bytes)"
	fi
	check "old-data-verifies" job first 0 32 --verify_only=1
	ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
	dmsetup remove grow
	child_refused
	mirror_grow
	vm_summary
	exit
fi

# --- newest: grow to all of the backing.
out=$(ublkdm resize "$id" 2>&1)
if [[ $out == *"grown from 32 MiB to 64 MiB"* && $(size_of "$dev") == $((64 * MIB)) &&
	$(field "$id" .size_bytes) == $((64 * MIB)) ]]; then
	pass "resize-grows-the-device-to-the-backing"
else
	fail "resize-grows-the-device-to-the-backing" "$out; size $(size_of "$dev")"
fi
check "old-data-verifies-after-resize" job first 0 32 --verify_only=1
check "fio-verifies-the-new-area" job second 32 32

# --- refused: shrinking, beyond the backing; nothing changes.
for args in 16M 256M; do
	out=$(ublkdm resize "$id" "$args" 2>&1)
	code=$?
	if ((code == 2)) && [[ $(wc -l <<<"$out") == 1 && $(size_of "$dev") == $((64 * MIB)) ]]; then
		pass "resize-to-$args-refused-exit-2"
	else
		fail "resize-to-$args-refused-exit-2" "exit $code: $out; size $(size_of "$dev")"
	fi
done
vm_log "shrink: $(ublkdm resize "$id" 16M 2>&1)"

# --- a size asked for survives kill -9 and recover.
slice 96 || die "cannot grow the dm slice again"
out=$(ublkdm resize "$id" 80M 2>&1)
if [[ $(size_of "$dev") == $((80 * MIB)) ]]; then
	pass "resize-to-a-size-that-fits"
else
	fail "resize-to-a-size-that-fits" "$out; size $(size_of "$dev")"
fi
check "fio-verifies-up-to-the-size-asked" job third 64 16
pid=$(field "$id" .daemon_pid)
kill -9 "$pid"
if wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]" &&
	again=$(ublkdm recover "$id") && [[ $again == "$dev" && $(field "$id" .state) == LIVE &&
	$(size_of "$dev") == $((80 * MIB)) ]]; then
	pass "recover-after-resize-keeps-the-size"
else
	fail "recover-after-resize-keeps-the-size" "state $(field "$id" .state), size $(size_of "$dev"): $(tail -3 "/var/log/ublkdm/$id.log")"
fi
check "data-verifies-after-recover-1" job first 0 32 --verify_only=1
check "data-verifies-after-recover-2" job second 32 32 --verify_only=1
check "data-verifies-after-recover-3" job third 64 16 --verify_only=1
out=$(ublkdm resize "$id" 2>&1)
if [[ $(size_of "$dev") == $((96 * MIB)) ]]; then
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
child_refused
mirror_grow
vm_summary
