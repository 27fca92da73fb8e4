# shellcheck shell=bash
# tests/vm/common_cycles.sh: guest-side helpers for the counted crash-cycle VM tests
# (mirror_kills, mirror_cuts, snapshot_kills, snapshot_cuts). Source after common.sh.
#
# A cycle: fio writes verified 4 KiB blocks (crc32c headers; a new --randseed per cycle, so a
# block left over from an earlier cycle fails its header check) and saves its verify state
# (every write acknowledged so far) once told to through its trigger file. A kill comes
# first, with fio's writes in flight; the trigger follows (those writes wait for the recovery,
# and fio saves only what was acknowledged before). A power cut comes after the save, under
# another fio's writes (fio stops writing once it saved its state). After recovery a
# verify-only fio with the same job loads that state and reads every acknowledged block back;
# --continue_on_error=verify makes it count every bad block instead of stopping at the first.
#
# KILLS, CUTS              the cycles to run (CI: 14 kills, 7 cuts, to keep CI under 45 minutes; scripts/soak passes more)
# ACKED_MIN                writes the device completes in a cycle before the crash
# ACKED_RATE               fio's write rate cap (IOPS), so that it is still writing at the crash
#                          (its area is written once: it must not run out of blocks first)
# disk_writes DEV          writes DEV completed so far (/sys/block/NAME/stat, free to read)
# wait_disk_writes DEV N [SECS]  waits until DEV has completed N writes in all
# acked_start DEV SEED OFF SIZE CMD  starts the acknowledged-writes fio in the background
#                          (ACKED_PID); it saves its state and runs CMD once $T/trigger exists
# acked_saved              whether fio saved its state (after $T/trigger was made)
# acked_end                after that fio ended: keeps its saved state as $T/acked.state; fails
#                          if none was saved
# acked_verify DEV SEED OFF SIZE  reads back the writes of the saved state (the same job: fio
#                          derives a job's offsets from its seed and its index, 0 here); sets
#                          CHECKED (blocks verified) and LOST (blocks that failed, or 1 if fio
#                          failed), also written as "CHECKED LOST" to $T/verify.counts (for a
#                          caller that ran it in the background)
# wait_gone PID [SECS]     waits until PID is gone or a zombie (builtins only)
# wait_synced ID [SECS]    (a mirror) polls the status until every region is in sync and no
#                          resync runs; the last status JSON is left in ST (one CLI call per
#                          poll: each costs about a second under TCG)
# store_state DISK FILE..  a tar of FILEs (names relative to $T) written raw to DISK
# load_state DISK          unpacks what store_state wrote into $T
# legs_cmp OFFSET_MIB MIB DEV DEV  whether two legs' data areas are equal (read in parallel,
#                          compared with cmp: several times faster than checksums under TCG)
# dev_cmp DEV FILE_OR_DEV [MIB]  whether DEV reads exactly as the other (first MIB MiB)
# checked lost bad         the running counts: blocks verified, blocks lost, checks failed
#                          (0 here; a cut test carries them from boot to boot itself)
# failed NAME WHY          fail NAME (common.sh) and count it in bad
# counted WORD C           after acked_verify in cycle C (WORD: cycle or cut): fails
#                          WORD-C-acked-writes-verify if a block was lost or fewer than
#                          ACKED_MIN were checked; adds CHECKED and LOST to checked and lost

KILLS=${KILLS:-14}
CUTS=${CUTS:-7}
ACKED_MIN=${ACKED_MIN:-300}
ACKED_RATE=${ACKED_RATE:-500}
checked=0
lost=0
bad=0

failed() {
	fail "$@"
	bad=$((bad + 1))
}

counted() {
	local word=$1 c=$2
	if ((LOST > 0 || CHECKED < ACKED_MIN)); then
		failed "$word-$c-acked-writes-verify" "$CHECKED blocks verified, $LOST bad"
	fi
	checked=$((checked + CHECKED))
	lost=$((lost + LOST))
	vm_log "$word $c: $CHECKED acknowledged blocks verified"
}

disk_writes() {
	local dev
	dev=$(readlink -f "${1:?disk_writes DEV}")
	awk '{print $5}' "/sys/block/${dev##*/}/stat"
}

wait_disk_writes() {
	local dev=${1:?wait_disk_writes DEV N} n=${2:?wait_disk_writes DEV N} deadline f
	dev=$(readlink -f "$dev")
	deadline=$((SECONDS + ${3:-60}))
	# Builtins only: a poll that forks costs tens of milliseconds under TCG, and fio must not
	# run out of blocks before the crash.
	while read -r -a f <"/sys/block/${dev##*/}/stat" && ((f[4] < n)); do
		((SECONDS < deadline)) || return 1
		sleep 0.05
	done
}

_acked_job() {
	local dev=$1 seed=$2 off=$3 size=$4
	ACKED_JOB=(--name=acked --offset="$off" --size="$size" --randseed="$seed")
	ACKED_GLOBAL=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k
		--iodepth=16 --verify=crc32c --aux-path="$T")
}

# fio names a job's state file after the job's name and index (always 0 here); the saved state
# is kept as $T/acked.state and handed to the verify job under the name it looks for.
_state_in() { cp "$T/acked.state" "$T/local-acked-0-verify.state"; }

acked_start() {
	local cmd=${5:?acked_start DEV SEED OFF SIZE CMD}
	rm -f "$T"/*acked*verify.state "$T/trigger"
	_acked_job "$@"
	timeout "$FIO_TIMEOUT" fio "${ACKED_GLOBAL[@]}" "${ACKED_JOB[@]}" --verify_fatal=1 --runtime=60 \
		--rate_iops="$ACKED_RATE" --verify_state_save=1 --trigger-file="$T/trigger" \
		--trigger="$cmd" --output="$T/acked.out" 2>"$T/acked.err" &
	# shellcheck disable=SC2034 # read by the test scripts
	ACKED_PID=$!
}

acked_counts() {
	local json=$1 errs failed
	CHECKED=$(jq -r '.jobs[0].read.total_ios // 0' "$json" 2>/dev/null) || CHECKED=0
	errs=$(jq -r '.jobs[0].total_err // 0' "$json" 2>/dev/null) || errs=1
	[[ $CHECKED =~ ^[0-9]+$ ]] || CHECKED=0
	[[ $errs =~ ^[0-9]+$ ]] || errs=1
	LOST=$errs
	((CHECKED >= LOST)) && CHECKED=$((CHECKED - LOST))
	((LOST == 0)) && return 0
	# fio takes every write issued before the last IODEPTH as completed, but a write can stay
	# in flight longer (one that waits for a copy-on-write) and fail at the kill: a bad block
	# that fio saw fail was never acknowledged, so it is not lost.
	failed=$(comm -12 <(_bad_offsets "$T/verify.err") <(_failed_offsets "$T/acked.err") | wc -l)
	vm_log "verify: $LOST bad blocks, $failed of them writes that failed at the crash; $(grep -m2 -i verify "$T/verify.err")"
	LOST=$((LOST - failed))
}

_bad_offsets() { grep -o 'requested block: offset=[0-9]*' "$1" 2>/dev/null | cut -d= -f2 | sort -u; }

_failed_offsets() { grep 'io_u error' "$1" 2>/dev/null | grep -o 'write offset=[0-9]*' | cut -d= -f2 | sort -u; }

acked_saved() { compgen -G "$T/*acked-0-verify.state" >/dev/null; }

acked_end() {
	local state errors
	state=$(compgen -G "$T/*acked-0-verify.state" | head -1)
	[[ -n $state ]] || return 1
	mv "$state" "$T/acked.state"
	# Writes in flight at a kill may fail (not acknowledged, so not checked): say how many.
	errors=$(grep -c 'io_u error' "$T/acked.err")
	((errors == 0)) || vm_log "fio saw $errors failed writes: $(grep -m1 'io_u error' "$T/acked.err")"
}

acked_verify() {
	_acked_job "$@"
	CHECKED=0
	LOST=1
	echo "0 1" >"$T/verify.counts"
	rm -f "$T/verify.json" "$T"/*acked*verify.state
	[[ -f $T/acked.state ]] || { vm_log "no verify state in $T"; return 1; }
	_state_in
	# Depth 1: near the end of the saved state fio must tell the writes it saw completed from
	# those still in flight at the crash (which may have failed), and it decides that on the
	# reads it completed; reads issued ahead of it would check unacknowledged writes too.
	timeout "$FIO_TIMEOUT" fio "${ACKED_GLOBAL[@]}" "${ACKED_JOB[@]}" --iodepth=1 --verify_only=1 \
		--verify_state_load=1 --verify_fatal=0 --continue_on_error=verify --output-format=json \
		--output="$T/verify.json" 2>"$T/verify.err"
	acked_counts "$T/verify.json"
	echo "$CHECKED $LOST" >"$T/verify.counts"
	((LOST == 0))
}

store_state() {
	local disk=${1:?store_state DISK FILE..}
	shift
	# fullblock: without it conv=sync pads every short pipe read with zeroes, which tar takes
	# for the end of the archive.
	(cd "$T" && tar -cf - "$@") |
		dd of="$disk" bs=1M iflag=fullblock conv=sync oflag=direct status=none
}

load_state() {
	dd if="${1:?load_state DISK}" bs=1M count=4 iflag=direct status=none | tar -xf - -C "$T" 2>/dev/null
}

legs_cmp() {
	local off=${1:?legs_cmp OFFSET MIB A B} mib=${2:?legs_cmp} a=${3:?legs_cmp} b=${4:?legs_cmp}
	cmp <(dd if="$a" bs=1M skip="$off" count="$mib" iflag=direct status=none) \
		<(dd if="$b" bs=1M skip="$off" count="$mib" iflag=direct status=none)
}

dev_cmp() {
	local a=${1:?dev_cmp DEV OTHER [MIB]} b=${2:?dev_cmp DEV OTHER [MIB]} mib=${3:-}
	local count=()
	[[ -n $mib ]] && count=(count="$mib")
	cmp <(dd if="$a" bs=1M "${count[@]}" iflag=direct status=none) \
		<(dd if="$b" bs=1M "${count[@]}" status=none)
}

wait_gone() {
	local pid=${1:?wait_gone PID [SECS]} deadline=$((SECONDS + ${2:-30})) st
	while read -r st 2>/dev/null <"/proc/$pid/stat"; do
		st=${st##*) }
		[[ ${st:0:1} == Z ]] && return 0
		((SECONDS < deadline)) || return 1
		sleep 0.05
	done
}

wait_synced() {
	local id=${1:?wait_synced ID [SECS]} deadline=$((SECONDS + ${2:-120})) s in total active
	while :; do
		if ST=$(ublkdm status --json "$id") &&
			s=$(jq -r '.daemon_status.target.status | "\(.regions.in_sync) \(.regions.total) \(.resync.active)"' <<<"$ST"); then
			read -r in total active <<<"$s"
			[[ $in == "$total" && $active == false ]] && return 0
		fi
		((SECONDS < deadline)) || return 1
		sleep 0.2
	done
}
