# shellcheck shell=bash
# tests/vm/common_zero_copy.sh: guest-side helpers of the *_zero_copy VM tests, which check one
# target in the data path the booted kernel gives. Source after tests/vm/common.sh.
#
# zc_expect WHAT          sets ZC_WANT (zero-copy on newest, which offers AUTO_BUF_REG; copy on
#                         lts) and ZC_TEXT (the `data:` line `status` prints for it); dies on
#                         any other $UBLKDM_VM_KERNEL; logs that WHAT should be ZC_WANT
# zc_fallbacks N          N on the zero-copy path, 0 in copy mode (nothing falls back there)
# ZC_FIO                  fio's options for a crc32c write-and-verify job, but the file
# zc_verify DEV JOB..     fio crc32c write-and-verify of each JOB ("NAME|FIO ARGS") on DEV, one
#                         PASS/FAIL line each (fio-NAME-verify)
# zc_misaligned DEV MIB   a write and a read of 8 KiB at MIB MiB from memory aligned to 4
#                         bytes (ublk accepts it, an O_DIRECT backing device does not: in zero
#                         copy such a request falls back alone); PASS/FAIL
#                         memory-aligned-to-4-bytes-round-trips
# zc_kill ID DEV MIN NAME FIO_ARG..
#                         `kill -9` of device ID's daemon under a fio write job (FIO_ARG.., with
#                         its verify state saved in $T) once MIN more writes were acknowledged;
#                         PASS/FAIL NAME (the daemon gone, ID QUIESCED); leaves ZC_FIO_PID.
#                         The job must outlast MIN writes by far: a job that ends before fio
#                         sees its trigger file fails NAME, saying so
# zc_acked_verify MIN_BYTES FIO_ARG..
#                         waits for the killed job's fio to end, then verifies every write it
#                         had acknowledged (verify_state_load); PASS/FAIL
#                         acknowledged-writes-verify-after-recover (at least MIN_BYTES read)

zc_expect() {
	local what=${1:?zc_expect WHAT}
	case ${UBLKDM_VM_KERNEL:-} in
	newest) ZC_WANT=zero-copy ZC_TEXT='  data:    zero-copy' ;;
	lts) ZC_WANT=copy ZC_TEXT='  data:    copy (user copy)' ;;
	*) die "UBLKDM_VM_KERNEL is '${UBLKDM_VM_KERNEL:-}', not lts or newest" ;;
	esac
	# shellcheck disable=SC2034 # for the test that sources this
	readonly ZC_WANT ZC_TEXT
	vm_log "kernel $(uname -r) (${UBLKDM_VM_KERNEL}): $what should be $ZC_WANT"
}

zc_fallbacks() {
	if [[ $ZC_WANT == zero-copy ]]; then printf '%s\n' "${1:?zc_fallbacks N}"; else echo 0; fi
}

ZC_FIO=(--direct=1 --ioengine=io_uring --verify=crc32c --verify_fatal=1 --runtime=120)

zc_verify() {
	local dev=${1:?zc_verify DEV JOB..} entry name args
	shift
	for entry in "$@"; do
		name=${entry%%|*}
		read -ra args <<<"${entry#*|}"
		if run_fio "$name" --filename="$dev" "${ZC_FIO[@]}" "${args[@]}"; then
			pass "fio-$name-verify"
		else
			fail "fio-$name-verify" "$(grep -m1 -E 'err=|verify' "$T/$name.out")"
		fi
		grep -hE '^ *(write|read):' "$T/$name.out" || true
	done
}

zc_misaligned() {
	local dev=${1:?zc_misaligned DEV MIB} mib=${2:?zc_misaligned DEV MIB} err
	if err=$(python3 - "$dev" "$mib" 2>&1 <<'PY'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
area = mmap.mmap(-1, 3 * 4096)
data = bytes((i * 7 + 3) % 251 for i in range(8192))
view = memoryview(area)
view[4:4 + 8192] = data
offset = int(sys.argv[2]) << 20
assert os.pwritev(fd, [view[4:4 + 8192]], offset) == 8192, "short write"
view[:] = b"\0" * len(view)
assert os.preadv(fd, [view[4:4 + 8192]], offset) == 8192, "short read"
assert bytes(view[4:4 + 8192]) == data, "the data came back changed"
aligned = mmap.mmap(-1, 8192)
assert os.preadv(fd, [aligned], offset) == 8192 and bytes(aligned) == data, "device differs"
PY
	); then
		pass "memory-aligned-to-4-bytes-round-trips"
	else
		fail "memory-aligned-to-4-bytes-round-trips" "$err"
	fi
}

zc_kill() {
	local id=${1:?zc_kill ID DEV MIN NAME FIO_ARG..} dev=${2:?} min=${3:?} name=${4:?} pid writes
	shift 4
	pid=$(field "$id" .daemon_pid)
	run_fio kill-phase "$@" --verify_state_save=1 --trigger-file="$T/kill-now" \
		--trigger="kill -9 $pid" &
	ZC_FIO_PID=$!
	writes=$(field "$id" .daemon_status.io.writes)
	wait_writes "$id" $((writes + min)) || die "fio did not get going: $(cat "$T/kill-phase.err")"
	pid_alive "$ZC_FIO_PID" || die "fio ended before the kill: $(cat "$T/kill-phase.out")"
	touch "$T/kill-now"
	if ! wait_until 30 zc_gone "$pid"; then
		if pid_alive "$ZC_FIO_PID"; then
			fail "$name" "the daemon $pid outlived kill -9 by 30 s: $(zc_threads "$pid")"
		else
			# Not the daemon's fault: the job ended before fio saw its trigger file.
			fail "$name" "fio ended before its trigger killed the daemon (the job is too short)"
		fi
	elif wait_until 30 bash -c "[[ \$($UBLKDM status --json $id | jq -r .state) == QUIESCED ]]"; then
		pass "$name"
	else
		fail "$name" "state $(field "$id" .state) on $dev 30 s after the daemon died"
	fi
}

zc_gone() { ! pid_alive "${1:?zc_gone PID}"; }

# zc_threads PID: each thread's state and kernel wait channel, for a failure's message.
zc_threads() {
	local task out=
	for task in /proc/"${1:?zc_threads PID}"/task/*; do
		out+="$(sed 's/.*) //' "$task/stat" 2>/dev/null | cut -d' ' -f1):$(cat "$task/wchan" 2>/dev/null) "
	done
	printf '%s\n' "${out:-gone}"
}

zc_acked_verify() {
	local min=${1:?zc_acked_verify MIN_BYTES FIO_ARG..} verified=0 state_files
	shift
	if wait_until 60 bash -c "! kill -0 $ZC_FIO_PID 2>/dev/null"; then
		wait "$ZC_FIO_PID"
	else
		kill -9 "$ZC_FIO_PID"
		fail "kill-phase-ends" "fio still running 60 s after recovery"
	fi
	state_files=("$T"/*verify.state)
	if [[ -e ${state_files[0]} ]] &&
		timeout "$FIO_TIMEOUT" fio --name=kill-phase "$@" --verify_only=1 --verify_state_load=1 \
			--output-format=json --output="$T/verify.json" 2>"$T/verify.err"; then
		verified=$(jq -r '.jobs[0].read.io_bytes' "$T/verify.json")
	fi
	if ((verified >= min)); then
		pass "acknowledged-writes-verify-after-recover"
		vm_log "verified $((verified >> 20)) MiB of acknowledged writes"
	else
		fail "acknowledged-writes-verify-after-recover" "verified $verified bytes; $(head -3 "$T/verify.err")"
	fi
}
