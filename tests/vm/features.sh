#!/usr/bin/env bash
# tests/vm/features.sh: ublk features detected from the driver (GET_FEATURES), never assumed.
# vm: --disks 1x64M --kernels lts,newest
# Run: tests/vm/run-all [--kernel lts|newest] tests/vm/features.sh
# Method: `ublkdm features --json` must answer with the kernel's release, a non-zero mask, a
# row per known feature whose `offered` is exactly its bit of the mask, USER_RECOVERY and
# USER_COPY offered and used, and nothing else used but zero copy (SUPPORT_ZERO_COPY and
# AUTO_BUF_REG, used by zero-copy targets, and UPDATE_SIZE, by `resize`) where offered. What the kernel
# adds is checked against the kernel the harness booted ($UBLKDM_VM_KERNEL): on lts (6.12)
# AUTO_BUF_REG, UPDATE_SIZE and QUIESCE are not offered, on newest (6.16+) they are. The table
# form must exit 0 and end with the data path of new devices (on newest, then of zero-copy
# devices: zero-copy). A linear device must then say its data path in `status --json`
# (.data_path) and `status` (lts: `data:    copy (user copy)`; newest: `data:    zero-copy`),
# and be granted only flags the driver offered, user copy among them.
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
used='["USER_RECOVERY","USER_COPY"]'
linear_path=copy
linear_text='  data:    copy (user copy)'
copy_line="new devices ask for: USER_RECOVERY, USER_COPY; data path: copy"
last_line=$copy_line
if [[ $kernel == newest ]]; then
	used='["SUPPORT_ZERO_COPY","USER_RECOVERY","USER_COPY","UPDATE_SIZE","AUTO_BUF_REG"]'
	linear_path=zero-copy
	linear_text='  data:    zero-copy'
	last_line="zero-copy devices (unless --copy) ask for: SUPPORT_ZERO_COPY, USER_RECOVERY, USER_COPY, AUTO_BUF_REG; data path: zero-copy"
fi
if offered USER_RECOVERY && offered USER_COPY &&
	[[ $(jq -c '[.features[] | select(.used) | .name]' "$T/f.json") == "$used" ]]; then
	pass "recovery-user-copy-and-zero-copy-where-offered-used-nothing-else"
else
	fail "recovery-user-copy-and-zero-copy-where-offered-used-nothing-else" "used: $(jq -c '[.features[] | select(.used) | .name]' "$T/f.json"), expected $used"
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
	grep -qxF "$copy_line" "$T/f.txt" && [[ $(tail -n1 "$T/f.txt") == "$last_line" ]]; then
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
if [[ $(field "$id" .data_path) == "$linear_path" ]] && grep -qxF "$linear_text" <<<"$status"; then
	pass "status-says-$linear_path"
else
	fail "status-says-$linear_path" "data_path $(field "$id" .data_path); $(grep data: <<<"$status")"
fi
user_copy=$((1 << 7))
if ((flags & user_copy && (flags & ~mask) == 0)); then
	pass "granted-flags-are-offered-ones"
else
	fail "granted-flags-are-offered-ones" "granted $flags, offered $mask"
fi
ublkdm del "$id" >/dev/null || fail "del" "del $id failed"
vm_summary
