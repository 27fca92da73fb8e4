#!/usr/bin/env bash
# tests/vm/mirror_badinput.sh: bad mirror requests fail with one line and a non-zero exit,
# and write nothing.
# vm: --disks 2x256M
# Cases: one leg; a leg given twice; legs of wildly different sizes (a 16 MiB dm-linear
# slice against a 256 MiB disk); a leg held by another ublkdm device; a region size that is
# not a power of two; an unknown mirror command. After each, no device exists and the legs
# still hold their marker bytes.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

# A marker in the first MiB of each disk: a refused add must leave it.
for d in /dev/vda /dev/vdb; do
	printf 'ublkdm-marker-%s' "$d" | dd of="$d" bs=4k conv=sync oflag=direct status=none
done
marker_ok() { [[ $(dd if="$1" bs=4k count=1 iflag=direct status=none | tr -d '\0') == "ublkdm-marker-$1" ]]; }
dm_create small "0 32768 linear /dev/vdb 8192"

expect_refusal() {
	local name=$1 out rc
	shift
	out=$(ublkdm "$@" 2>&1)
	rc=$?
	local lines
	lines=$(printf '%s\n' "$out" | grep -c '^error: ')
	if ((rc != 0)) && ((lines == 1)) && [[ -z $(ls /sys/class/ublk-char/ 2>/dev/null) ]] &&
		marker_ok /dev/vda && marker_ok /dev/vdb; then
		pass "$name"
		vm_log "$name: exit $rc: $(printf '%s\n' "$out" | head -1)"
	else
		fail "$name" "exit $rc, output: $out"
	fi
}

expect_refusal one-leg add mirror --leg /dev/vda
expect_refusal leg-twice add mirror --leg /dev/vda --leg /dev/vda
expect_refusal sizes-differ add mirror --leg /dev/vda --leg /dev/mapper/small --force
expect_refusal region-not-power-of-two add mirror --leg /dev/vda --leg /dev/vdb --region-size 96K
# The slice holds /dev/vdb (dm claims its devices); let go of it for the in-use case.
dmsetup remove small || die "cannot remove the dm slice"
lin=$(add_linear /dev/vdb) || die "add linear failed"
out=$(ublkdm add mirror --leg /dev/vda --leg /dev/vdb 2>&1)
rc=$?
if ((rc != 0)) && grep -q 'in use' <<<"$out" && marker_ok /dev/vda; then
	pass "leg-in-use"
else
	fail "leg-in-use" "exit $rc: $out"
fi
out=$(ublkdm mirror fail-leg "$(dev_id "$lin")" 0 2>&1)
rc=$?
if ((rc != 0)) && [[ $(grep -c '^error: ' <<<"$out") == 1 ]]; then pass "mirror-command-on-linear"; else fail "mirror-command-on-linear" "exit $rc: $out"; fi
ublkdm del --all >/dev/null
vm_summary
