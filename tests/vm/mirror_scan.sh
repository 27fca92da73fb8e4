#!/usr/bin/env bash
# tests/vm/mirror_scan.sh: the mirror is identified by its UUID, not by its paths.
# vm: --disks 4x128M --phases 2
# Phase 1: a 2-leg mirror on vda+vdb with known data; the stored spec records its UUID and
#   legs; `mirror replace-leg 1 /dev/vdc`: the stored spec follows (vda, vdc); `kill -9` of the
#   daemon, then `ublkdm recover`: the mirror comes back with the replaced leg, in sync, and
#   the data verifies. The VM then shuts down (an orderly stop) and boots again.
# Phase 2 (same disks, a real reboot): `ublkdm assemble --scan` finds the mirror by its
#   superblocks and starts it without being told a path (vdb, the old leg, is left out); the
#   data verifies; `--json` parses and says the mirror is already served; then vdc is cloned
#   onto vdd and the scan refuses the duplicate, naming both devices; `install-units` writes
#   the unit.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

DATA_MIB=16

# The same 16 MiB in both boots (nothing in $T survives the reboot).
data() {
	python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(9).randbytes(16 << 20))'
}
data_sha() { data | sha256sum | cut -d' ' -f1; }

spec_of() { ublkdm list --json | jq -c ".[] | select(.id == ${1:?spec_of ID}) | .spec"; }

slot_devices() { mstatus "${1:?slot_devices ID}" '[.legs[] | "\(.slot)=\(.device)"] | join(" ")'; }

# Passes NAME if DEV reads as the data phase 1 wrote.
check_data() {
	if [[ $(sha_range "$2" "$DATA_MIB") == "$(data_sha)" ]]; then
		pass "$1"
	else
		fail "$1" "the data differs"
	fi
}

# Runs `ublkdm assemble --scan` for the transcript (NOTE after the command line): its output in
# $out, its exit status in $rc.
scan_shown() {
	echo "\$ ublkdm assemble --scan${1:-}"
	out=$(ublkdm assemble --scan 2>&1)
	rc=$?
	echo "$out"
	echo "(exit $rc)"
}

phase1() {
	local dev id uuid spec pid again
	dev=$(add_mirror --leg /dev/vda --leg /dev/vdb --region-size 1M) || die "add mirror failed"
	id=$(dev_id "$dev")
	wait_in_sync "$id" 180 || die "initial resync did not finish"
	data | dd of="$dev" bs=1M oflag=direct status=none || die "cannot write the data"
	uuid=$(mstatus "$id" .uuid)
	spec=$(spec_of "$id")
	echo "stored spec after add: $spec"
	if [[ $(jq -r .uuid <<<"$spec") == "$uuid" && $(jq -c .legs <<<"$spec") == '["/dev/vda","/dev/vdb"]' ]]; then
		pass "spec-records-uuid-and-legs"
	else
		fail "spec-records-uuid-and-legs" "uuid $uuid, spec $spec"
	fi
	echo "\$ ublkdm mirror replace-leg $id 1 /dev/vdc"
	ublkdm mirror replace-leg "$id" 1 /dev/vdc || die "replace-leg failed"
	wait_in_sync "$id" 180 || die "resync of the new leg did not finish"
	spec=$(spec_of "$id")
	echo "stored spec after replace-leg: $spec"
	if [[ $(jq -c .legs <<<"$spec") == '["/dev/vda","/dev/vdc"]' && $(jq -r .uuid <<<"$spec") == "$uuid" ]]; then
		pass "spec-follows-replace-leg"
	else
		fail "spec-follows-replace-leg" "$spec"
	fi
	pid=$(field "$id" .daemon_pid)
	echo "\$ kill -9 $pid   # the daemon of device $id"
	kill -9 "$pid"
	wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]" ||
		die "the device did not go QUIESCED"
	echo "\$ ublkdm recover $id"
	again=$(ublkdm recover "$id") || die "recover failed"
	echo "$again"
	echo "\$ ublkdm list"
	ublkdm list
	wait_in_sync "$id" 180 || fail "recover-resync" "$(mstatus "$id" .regions)"
	echo "legs after recover: $(slot_devices "$id")"
	if [[ $again == "$dev" && $(slot_devices "$id") == "0=/dev/vda 1=/dev/vdc" ]]; then
		pass "recover-uses-the-replaced-leg"
	else
		fail "recover-uses-the-replaced-leg" "recover printed $again; legs $(slot_devices "$id")"
	fi
	check_data data-verifies-after-recover "$dev"
	# Phase 2 finds the mirror by its UUID alone: keep it where the reboot cannot lose it.
	echo "$uuid" | dd of=/dev/vdd bs=4096 count=1 conv=sync oflag=direct status=none
	vm_log "phase 1 done; rebooting"
}

phase2() {
	local uuid out rc id dev json
	uuid=$(dd if=/dev/vdd bs=4096 count=1 iflag=direct status=none | tr -d '\0' | head -1)
	[[ -n $uuid ]] || die "no uuid from phase 1 on /dev/vdd"
	dd if=/dev/zero of=/dev/vdd bs=4096 count=1 oflag=direct status=none
	[[ $(ublkdm list --json | jq length) == 0 ]] || die "devices exist after the reboot"
	scan_shown
	id=$(ublkdm list --json | jq -r ".[] | select(.spec.uuid == \"$uuid\") | .id")
	if ((rc == 0)) && [[ -n $id && $out == *"mirror $uuid: started as /dev/ublkb$id"* ]]; then
		pass "assemble-scan-starts-the-mirror"
	else
		fail "assemble-scan-starts-the-mirror" "rc $rc, id '${id:-}'"
		return
	fi
	dev=/dev/ublkb$id
	wait_in_sync "$id" 180 || fail "scan-resync" "$(mstatus "$id" .regions)"
	echo "legs after the scan: $(slot_devices "$id")"
	if [[ $(slot_devices "$id") == "0=/dev/vda 1=/dev/vdc" && $out == *"left out /dev/vdb: an older leg of slot 1"* ]]; then
		pass "scan-finds-the-current-legs-only"
	else
		fail "scan-finds-the-current-legs-only" "$(slot_devices "$id")"
	fi
	check_data data-verifies-after-scan "$dev"
	echo "\$ ublkdm assemble --scan --json"
	json=$(ublkdm assemble --scan --json)
	echo "$json"
	if [[ $(jq -r ".found[] | select(.identity == \"$uuid\") | .outcome" <<<"$json") == served ]] &&
		[[ $(jq -r '.found | length' <<<"$json") == 1 ]]; then
		pass "scan-json-parses-and-skips-a-served-mirror"
	else
		fail "scan-json-parses-and-skips-a-served-mirror" "$json"
	fi
	ublkdm del "$id" >/dev/null || die "del failed"
	# A cloned disk: vdc copied onto vdd claims slot 1 of the same mirror.
	dd if=/dev/vdc of=/dev/vdd bs=1M iflag=direct oflag=direct status=none || die "cannot clone vdc"
	scan_shown "   # after dd if=/dev/vdc of=/dev/vdd"
	if ((rc == 7)) && [[ $out == *"/dev/vdc and /dev/vdd both carry slot 1"* ]] &&
		[[ $(ublkdm list --json | jq length) == 0 ]]; then
		pass "a-cloned-leg-is-refused"
	else
		fail "a-cloned-leg-is-refused" "rc $rc"
	fi
	json=$(ublkdm assemble --scan --json 2>/dev/null)
	if [[ $(jq -r '.found[0].outcome' <<<"$json") == refused ]]; then
		pass "scan-json-says-refused"
	else
		fail "scan-json-says-refused" "$json"
	fi
	out=$(ublkdm install-units --prefix "$T/units") || fail "install-units" "failed"
	echo "$out"
	if grep -q "^ExecStart=.* assemble --scan$" "$T/units/ublkdm-assemble.service"; then
		pass "install-units-writes-the-unit"
	else
		fail "install-units-writes-the-unit" "$(cat "$T/units/ublkdm-assemble.service")"
	fi
}

case ${PHASE:-1} in
1) phase1 ;;
2) phase2 ;;
*) die "PHASE must be 1 or 2" ;;
esac
vm_summary
