# shellcheck shell=bash
# scripts/vm/bench.sh: guest-side helpers the benchmarks (scripts/bench-*) share. Source after
# scripts/vm/lib.sh (for die).
#
# now                  seconds since the epoch with nanoseconds: durations are taken as
#                      differences, and reported only as ratios to a peer timed in the same boot
# since T0             seconds from T0 (a `now`) to now
# want TARGET          whether BENCH_TARGETS (space-separated; unset or empty: all) names TARGET
# fio_line TIMEOUT RW LABEL.. -- FIO_ARG..
#                      runs one fio job (direct, io_uring, JSON output) with FIO_ARG.., bounded by
#                      TIMEOUT seconds, and prints "BENCH LABEL.. IOPS BYTES_PER_SEC" for its RW
#                      side (read or write); dies if fio fails

now() { date +%s.%N; }

since() { awk -v a="${1:?since T0}" -v b="$(now)" 'BEGIN { print b - a }'; }

want() { [[ -z ${BENCH_TARGETS:-} || " $BENCH_TARGETS " == *" $1 "* ]]; }

fio_line() {
	local timeout=${1:?fio_line TIMEOUT RW LABEL.. -- FIO_ARG..} rw=${2:?fio_line TIMEOUT RW} labels=() out
	shift 2
	while (($#)) && [[ $1 != -- ]]; do
		labels+=("$1")
		shift
	done
	(($#)) || die "fio_line: no -- before the fio arguments"
	shift
	out=$(timeout "$timeout" fio --direct=1 --ioengine=io_uring "$@" --output-format=json) ||
		die "fio ${labels[*]} failed: fio $*"
	jq -r --arg l "${labels[*]}" --arg rw "$rw" \
		'"BENCH \($l) \(.jobs[0][$rw].iops | floor) \(.jobs[0][$rw].bw_bytes)"' <<<"$out"
}
