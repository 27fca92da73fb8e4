#!/bin/bash
# scripts/vm/guest.sh: stage 2 of the VM harness (owned by scripts/vm/).
# scripts/vm/run copies it into the job share; scripts/vm/init runs it with
# bash inside the chroot (host root + overlay). It loads the drivers, waits for
# the virtio disks, runs the guest script with its output going to the console
# and to $UBLKDM_JOB/guest.log, and writes the exit status to
# $UBLKDM_JOB/status. It never powers off itself: init does that afterwards.
set -u

export UBLKDM_JOB=/run/ublkdm-job
export UBLKDM_IN_VM=1
export HOME=/root
export LANG=C.UTF-8
export TERM=dumb
# No udev in the guest: libdevmapper must not wait for udev cookies.
export DM_DISABLE_UDEV=1
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
for d in /usr/local/cargo/bin /root/.cargo/bin; do
	[ -d "$d" ] && PATH="$d:$PATH"
done
export PATH

job_err() { echo "vm: error: $*" >&2; }

# Defines UBLKDM_REPO, UBLKDM_DISKS, UBLKDM_THROTTLE, the --env exports,
# GUEST_SCRIPT and the GUEST_ARGS array.
# shellcheck source=/dev/null
. "$UBLKDM_JOB/job.env" || { job_err "cannot read job.env"; exit 1; }

modprobe ublk_drv || job_err "modprobe ublk_drv failed"
modprobe virtio_blk || job_err "modprobe virtio_blk failed"
# virtio_blk probes asynchronously: wait (10 s at most) for every disk node.
for dev in $UBLKDM_DISKS; do
	for _ in $(seq 100); do
		[ -b "$dev" ] && break
		sleep 0.1
	done
	[ -b "$dev" ] || job_err "$dev did not appear"
done
# No udev here, so the devtmpfs has no /dev/fd: bash's process substitution needs it.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd || job_err "cannot link /dev/fd"

# /tmp and /run are fresh tmpfs here; a checkout that lives there is bound back from the
# host's view (see init), at the same path, so that absolute paths still work.
case $UBLKDM_REPO in
/tmp/* | /run/*)
	top=${UBLKDM_REPO#/}
	top=${top%%/*}
	if ! { mkdir -p "$UBLKDM_REPO" &&
		mount --bind "/.host-$top/${UBLKDM_REPO#/"$top"/}" "$UBLKDM_REPO"; }; then
		job_err "cannot bind the checkout at $UBLKDM_REPO"
		exit 1
	fi
	;;
esac

: >"$UBLKDM_JOB/started"
cd "$UBLKDM_REPO" || { job_err "cannot cd to $UBLKDM_REPO"; exit 1; }

bash "$GUEST_SCRIPT" "${GUEST_ARGS[@]}" </dev/null 2>&1 | tee "$UBLKDM_JOB/guest.log"
rc=${PIPESTATUS[0]}
echo "$rc" >"$UBLKDM_JOB/status.tmp" && mv "$UBLKDM_JOB/status.tmp" "$UBLKDM_JOB/status"
sync
exit 0
