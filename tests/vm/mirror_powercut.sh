#!/usr/bin/env bash
# tests/vm/mirror_powercut.sh: the VM loses power during writes; after boot the same `add`
# assembles the mirror, only dirty regions resync, and acknowledged writes are intact.
# vm: --disks 3x256M --phases 2 --kernels lts,newest
# Phase 1: a 2-leg mirror (nosync) on vda+vdb; fio writes verified 4 KiB blocks to the first
#   64 MiB while another fio writes elsewhere without pause; fio's verify state (what was
#   acknowledged) is saved and stored on vdc (the job folder does not survive the boot); then,
#   with the second fio still writing, the VM is killed.
# Phase 2 (same disks): `ublkdm add mirror --leg /dev/vda --leg /dev/vdb` must assemble the
#   mirror and resync only dirty regions (at most the 192 written in phase 1, of 510); the resync
#   must finish; a verify-only fio must find every acknowledged block; the legs must match.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

STATE_DISK=/dev/vdc
job=(--direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16 --offset=0 --size=64M
	--verify=crc32c --verify_fatal=1 --aux-path="$T")

phase1() {
	local dev id trigger noise_pid
	dev=$(add_mirror --leg /dev/vda --leg /dev/vdb --nosync) || die "add mirror failed"
	id=$(dev_id "$dev")
	vm_log "phase 1: $dev, $(mstatus "$id" .regions.total) regions"
	timeout 120 fio --name=noise --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
		--bs=64k --iodepth=8 --offset=128M --size=32M --time_based --runtime=100 --output="$T/noise.out" &
	noise_pid=$!
	trigger=$T/save-now
	run_fio acked --filename="$dev" "${job[@]}" --runtime=90 --verify_state_save=1 \
		--trigger-file="$trigger" --trigger="true" &
	local fio_pid=$!
	# Save the state only once a good number of writes was acknowledged (TCG starts slowly).
	wait_writes "$id" 3000 ||
		die "fio did not get going"
	touch "$trigger"
	wait "$fio_pid"
	pid_alive "$noise_pid" || die "the background writer stopped before the cut"
	# fullblock: without it conv=sync pads every short pipe read with zeroes, which tar takes
	# for the end of the archive.
	(cd "$T" && tar -cf - ./*verify.state) |
		dd of="$STATE_DISK" bs=1M iflag=fullblock conv=sync oflag=direct status=none ||
		die "cannot store the verify state"
	vm_log "phase 1: verify state stored; cutting the power under writes"
	pass "phase1-writes-and-cut"
	power_cut
}

phase2() {
	local dev id total resynced
	mkdir -p "$T/state"
	dd if="$STATE_DISK" bs=1M count=4 iflag=direct status=none | tar -xf - -C "$T" 2>/dev/null
	compgen -G "$T/*verify.state" >/dev/null || die "no verify state on $STATE_DISK (phase 1 did not run?)"
	dev=$(add_mirror --leg /dev/vda --leg /dev/vdb) || die "assembly failed"
	id=$(dev_id "$dev")
	total=$(mstatus "$id" .regions.total)
	# The resync of the dirty regions may finish before anyone looks: count what it copied.
	if wait_in_sync "$id" 180; then
		pass "resync-completes"
	else
		fail "resync-completes" "$(mstatus "$id" .regions)"
	fi
	resynced=$(mstatus "$id" .resync.regions_done)
	# Phase 1 wrote regions 0-127 (the verified job) and 256-319 (the other): 192 regions.
	# Every one may be dirty at the cut; none of the other regions may be resynced.
	local touched=192
	echo "power cut: $resynced of $total regions resynced after assembly (written before the cut: $touched)"
	if ((resynced > 0 && resynced <= touched)); then
		pass "assembly-resyncs-only-dirty-regions"
	else
		fail "assembly-resyncs-only-dirty-regions" "$resynced of $total regions resynced"
	fi
	local verified=0
	if timeout "$FIO_TIMEOUT" fio --name=acked --filename="$dev" "${job[@]}" --verify_only=1 \
		--verify_state_load=1 --output-format=json --output="$T/verify.json" 2>"$T/verify.err"; then
		verified=$(jq -r '.jobs[0].read.io_bytes' "$T/verify.json")
	fi
	# fio verifies exactly the writes it saw acknowledged before saving its state (a clean
	# exit means none was lost or torn); the device's write count above includes the other
	# job's, so require a good number of blocks rather than all 3000.
	echo "power cut: verified $((verified / 4096)) acknowledged 4 KiB blocks"
	if ((verified >= 1000 * 4096)); then
		pass "acknowledged-writes-verify"
		vm_log "verified $((verified >> 20)) MiB of acknowledged writes"
	else
		fail "acknowledged-writes-verify" "verified $verified bytes; $(head -3 "$T/verify.err")"
	fi
	local offset
	offset=$(data_offset_mib "$id")
	ublkdm del "$id" >/dev/null
	if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical"; else fail "legs-identical" "legs differ"; fi
}

case ${PHASE:-1} in
1) phase1 ;;
2) phase2 ;;
*) die "PHASE must be 1 or 2" ;;
esac
vm_summary
