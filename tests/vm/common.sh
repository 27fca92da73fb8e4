# shellcheck shell=bash
# tests/vm/common.sh: guest-side helpers shared by the ublkdm VM tests.
# Source it after scripts/vm/lib.sh (which refuses to run outside the VM):
#   . "$UBLKDM_REPO/scripts/vm/lib.sh"; . "$UBLKDM_REPO/tests/vm/common.sh"
#
# UBLKDM                 the binary under test (default: target/release/ublkdm; run-all
#                        passes --env UBLKDM=... for the profile it built)
# T                      a scratch folder (tmpfs), removed at exit
# add_linear DISK [ARG..] ublkdm add linear DISK ARG..; prints /dev/ublkbN (bounded)
# dev_id /dev/ublkbN     prints N
# field ID JQ            a field of `ublkdm status --json ID` (jq filter), e.g. '.state'
# wait_until SECS CMD..  polls CMD every 0.1 s until it succeeds; fails after SECS
# wait_writes ID N [SECS] waits until device ID's daemon has acknowledged N writes (60 s)
# pid_alive PID          whether PID runs (a zombie does not)
# run_fio NAME ARG..     fio --name=NAME ARG.. with output in $T/NAME.out (stderr in
#                        $T/NAME.err); bounded by
#                        FIO_TIMEOUT (default 240 s) on top of the job's own bounds
# control ID LINE       sends LINE to /run/ublkdm/ID.sock, prints the reply line
# sha_range DEV MIB [SKIP_MIB]  sha256 of MIB MiB of DEV after SKIP_MIB, read O_DIRECT
# Every test ends with `ublkdm del --all` (bounded), so one failure cannot hang the VM, and
# prints the daemons' logs if a case failed.

UBLKDM=${UBLKDM:-$UBLKDM_REPO/target/release/ublkdm}
[[ -x $UBLKDM ]] || die "no ublkdm binary at $UBLKDM (build it first)"
FIO_TIMEOUT=${FIO_TIMEOUT:-240}
# Bounds for the CLI itself: add and del have their own bounds below these.
CLI_TIMEOUT=120

T=$(mktemp -d)
_common_cleanup() {
	if ((VM_FAILED > 0)); then
		# The daemons' side of the story, for the failure above.
		for log in /var/log/ublkdm/*.log; do
			[[ -f $log ]] && { echo "--- $log (last 30 lines)"; tail -n 30 "$log"; }
		done
	fi
	timeout "$CLI_TIMEOUT" "$UBLKDM" del --all >/dev/null 2>&1 || true
	rm -rf "$T"
}
trap _common_cleanup EXIT

ublkdm() { timeout "$CLI_TIMEOUT" "$UBLKDM" "$@"; }

add_linear() {
	local disk=${1:?add_linear DISK}
	shift
	ublkdm add linear "$disk" "$@"
}

dev_id() { printf '%s\n' "${1##*ublkb}"; }

field() {
	ublkdm status --json "${1:?field ID JQ}" | jq -r "${2:?field ID JQ}"
}

wait_until() {
	local secs=${1:?wait_until SECS CMD..} deadline
	shift
	deadline=$((SECONDS + secs))
	until "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 0.1
	done
}

wait_writes() {
	local id=${1:?wait_writes ID N} n=${2:?wait_writes ID N}
	wait_until "${3:-60}" bash -c "(( \$($UBLKDM status --json $id | jq -r '.daemon_status.io.writes // 0') >= $n ))"
}

pid_alive() {
	local st
	# The state is the field after the parenthesised command name.
	st=$(sed 's/.*) //' "/proc/${1:?pid_alive PID}/stat" 2>/dev/null | cut -d' ' -f1)
	[[ -n $st && $st != Z && $st != X ]]
}

run_fio() {
	local name=${1:?run_fio NAME ARG..}
	shift
	timeout "$FIO_TIMEOUT" fio --name="$name" --output="$T/$name.out" "$@" 2>"$T/$name.err"
}

sha_range() {
	local dev=${1:?sha_range DEV MIB [SKIP]} mib=${2:?sha_range DEV MIB [SKIP]} skip=${3:-0}
	dd if="$dev" bs=1M count="$mib" skip="$skip" iflag=direct status=none | sha256sum | cut -d' ' -f1
}

control() {
	python3 - "${1:?control ID LINE}" "${2:?control ID LINE}" <<'PY'
import socket, sys
conn = socket.socket(socket.AF_UNIX)
conn.settimeout(10)
conn.connect(f"/run/ublkdm/{sys.argv[1]}.sock")
conn.sendall(sys.argv[2].encode() + b"\n")
print(conn.makefile().readline().strip())
PY
}
