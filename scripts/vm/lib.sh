# shellcheck shell=bash
# scripts/vm/lib.sh: guest-side helpers for VM test scripts (owned by scripts/vm/).
# Source it from a script run by scripts/vm/run:
#   . "$UBLKDM_REPO/scripts/vm/lib.sh"
# Sourcing it anywhere but inside the harness VM exits at once: the helpers
# write to raw disks such as /dev/vda, which on the host is the root disk.
#
# vm_log MSG...          timestamped line on stdout
# die MSG...             "error: MSG" on stderr, exit 1
# require_block DEV      die unless DEV is a block device
# dm_create NAME TABLE   dmsetup create + mknodes (no udev here), prints /dev/mapper/NAME
# set_sched_none DEV     I/O scheduler "none" for DEV (no-op where it has none)
# fill_disk DEV          write every byte of DEV once (sparse backing reads are free)
# pass NAME              "PASS: NAME"
# fail NAME WHY          "FAIL: NAME: WHY" (does not exit)
# vm_summary             "N passed, N failed"; returns 1 if any failed
# power_cut              ask the host to SIGKILL qemu now (never returns)

if [[ ${UBLKDM_IN_VM:-} != 1 ]] || ! grep -qw 'ublkdm.vm=1' /proc/cmdline 2>/dev/null; then
	echo "error: ${0##*/} must run inside the VM: scripts/vm/run ${0##*/} ..." >&2
	exit 1
fi

VM_PASSED=0
VM_FAILED=0
_VM_T0=$SECONDS

vm_log() { printf '[vm +%ss] %s\n' "$((SECONDS - _VM_T0))" "$*"; }

die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

require_block() {
	[[ -b ${1:?require_block DEV} ]] || die "$1 is not a block device"
}

dm_create() {
	local name=${1:?dm_create NAME TABLE} table=${2:?dm_create NAME TABLE}
	modprobe dm_mod 2>/dev/null || true
	dmsetup create "$name" --table "$table" || die "dmsetup create $name failed (table: $table)"
	# No udev in the guest: without this /dev/mapper/NAME does not exist, and a
	# write to it would silently create a plain file on /dev's tmpfs.
	dmsetup mknodes "$name" || die "dmsetup mknodes $name failed"
	require_block "/dev/mapper/$name"
	printf '/dev/mapper/%s\n' "$name"
}

set_sched_none() {
	local dev name f
	dev=$(readlink -f "${1:?set_sched_none DEV}")
	require_block "$dev"
	name=${dev##*/}
	f=/sys/class/block/$name/queue/scheduler
	if [[ -w $f ]] && grep -qw none "$f"; then
		echo none >"$f" || die "cannot set scheduler of $name"
	fi
}

fill_disk() {
	local dev=${1:?fill_disk DEV} size
	require_block "$dev"
	size=$(blockdev --getsize64 "$dev") || die "cannot size $dev"
	dd if=/dev/zero of="$dev" bs=1M count="$size" iflag=count_bytes oflag=direct \
		conv=notrunc status=none || die "filling $dev failed"
}

pass() {
	VM_PASSED=$((VM_PASSED + 1))
	printf 'PASS: %s\n' "${1:?pass NAME}"
}

fail() {
	VM_FAILED=$((VM_FAILED + 1))
	printf 'FAIL: %s: %s\n' "${1:?fail NAME WHY}" "${2:-failed}"
}

vm_summary() {
	printf '%d passed, %d failed\n' "$VM_PASSED" "$VM_FAILED"
	((VM_FAILED == 0))
}

power_cut() {
	vm_log "power cut requested"
	: >"${UBLKDM_JOB:?}/poweroff-now"
	sleep infinity
}
