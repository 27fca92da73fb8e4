#!/usr/bin/env bash
# tests/vm/features.sh: ublk features detected from the driver (GET_FEATURES), never assumed.
# vm: --disks 1x64M
# Run: tests/vm/run-all [--kernel lts|newest] tests/vm/features.sh
# Method: `ublkdm features --json` must answer with the kernel's release, a non-zero mask, a
# row per known feature whose `offered` is exactly its bit of the mask, USER_RECOVERY and
# USER_COPY offered and used, and nothing else used (zero copy and resize are not used yet).
# What the kernel adds is checked against the kernel the harness booted ($UBLKDM_VM_KERNEL):
# on lts (6.12) AUTO_BUF_REG, UPDATE_SIZE and QUIESCE are not offered, on newest (6.16+) they
# are. The table form must exit 0 and end with the data path. A linear device must then say
# `copy` in `status --json` (.data_path) and `data:    copy (user copy)` in `status`, and be
# granted only flags the driver offered.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

kernel=${UBLKDM_VM_KERNEL:-}
vm_log "kernel $(uname -r) (harness kernel '$kernel')"
offered() { jq -e --arg n "$1" '.features[] | select(.name == $n) | .offered' "$T/f.json" >/dev/null; }

if ublkdm features --json >"$T/f.json" 2>"$T/f.err" && jq -e . "$T/f.json" >/dev/null; then
	pass "features-json-answers"
else
	fail "features-json-answers" "$(cat "$T/f.err")"
fi
echo "--- ublkdm features --json"
cat "$T/f.json"
mask=$(jq -r '.mask' "$T/f.json")
if [[ $(jq -r '.get_features' "$T/f.json") == true && $(jq -r '.kernel' "$T/f.json") == "$(uname -r)" ]] &&
	((mask > 0)); then
	pass "get-features-reported"
else
	fail "get-features-reported" "get_features $(jq -r '.get_features' "$T/f.json"), kernel $(jq -r '.kernel' "$T/f.json"), mask $mask"
fi
# Every row's `offered` is its bit of the mask, and the mask's bits all appear.
if jq -e '.mask as $m | [.features[] | (.offered == ((($m / pow(2; .bit)) | floor) % 2 == 1))] | all' \
	"$T/f.json" >/dev/null && (($(jq '.features | length' "$T/f.json") >= 20)); then
	pass "each-feature-decoded-from-its-bit"
else
	fail "each-feature-decoded-from-its-bit" "rows disagree with mask $mask"
fi
if offered USER_RECOVERY && offered USER_COPY &&
	[[ $(jq -c '[.features[] | select(.used) | .name]' "$T/f.json") == '["USER_RECOVERY","USER_COPY"]' ]]; then
	pass "recovery-and-user-copy-used-nothing-else"
else
	fail "recovery-and-user-copy-used-nothing-else" "used: $(jq -c '[.features[] | select(.used) | .name]' "$T/f.json")"
fi

newer=(AUTO_BUF_REG UPDATE_SIZE QUIESCE)
case $kernel in
newest)
	missing=()
	for n in "${newer[@]}"; do offered "$n" || missing+=("$n"); done
	if ((${#missing[@]} == 0)); then
		pass "newest-offers-auto-buf-reg-update-size-quiesce"
	else
		fail "newest-offers-auto-buf-reg-update-size-quiesce" "not offered: ${missing[*]}"
	fi
	;;
lts)
	extra=()
	for n in "${newer[@]}"; do offered "$n" && extra+=("$n"); done
	if ((${#extra[@]} == 0)); then
		pass "lts-lacks-auto-buf-reg-update-size-quiesce"
	else
		fail "lts-lacks-auto-buf-reg-update-size-quiesce" "offered: ${extra[*]}"
	fi
	;;
*) fail "harness-kernel-known" "UBLKDM_VM_KERNEL is '$kernel', not lts or newest" ;;
esac

if ublkdm features >"$T/f.txt" 2>&1 && (($(grep -c '^ *[0-9]\+  [A-Z_]\+ ' "$T/f.txt") >= 20)) &&
	[[ $(tail -n1 "$T/f.txt") == "new devices ask for: USER_RECOVERY, USER_COPY; data path: copy" ]]; then
	pass "features-table"
else
	fail "features-table" "$(cat "$T/f.txt")"
fi
echo "--- ublkdm features"
cat "$T/f.txt"

dev=$(add_linear /dev/vda) || die "add linear failed"
id=$(dev_id "$dev")
flags=$(field "$id" .flags)
vm_log "linear device $dev (id $id), granted flags $flags"
status=$(ublkdm status "$id")
echo "$status"
if [[ $(field "$id" .data_path) == copy ]] && grep -qx '  data:    copy (user copy)' <<<"$status"; then
	pass "status-says-copy"
else
	fail "status-says-copy" "data_path $(field "$id" .data_path); $(grep data: <<<"$status")"
fi
user_copy=$((1 << 7))
if ((flags & user_copy && (flags & ~mask) == 0)); then
	pass "granted-flags-are-offered-ones"
else
	fail "granted-flags-are-offered-ones" "granted $flags, offered $mask"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
vm_summary
