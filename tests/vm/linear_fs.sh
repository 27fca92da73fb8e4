#!/usr/bin/env bash
# tests/vm/linear_fs.sh: a filesystem on a linear device.
# Run: scripts/vm/run --disks 2x256M tests/vm/linear_fs.sh (or tests/vm/run-all).
# Method: mkfs.ext4 on the device, mount, write files of random data, umount, e2fsck -fn
# must be clean; mount again and the files must read back with the same checksums; finally
# the backing disk, served by a second daemon after del, must hold the same filesystem.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"

BACKING=/dev/vda
# The guest's record of I/O errors on the VM's own disks, for a failure message: a backing
# disk that failed a write loses the data below ublkdm, which passes the error up.
disk_errors() {
	local n
	n=$(dmesg | grep -c 'I/O error, dev vd')
	((n == 0)) || printf ' (%s I/O errors on the backing disks: %s)' "$n" \
		"$(dmesg | grep -m1 'I/O error, dev vd')"
}
MNT=$T/mnt
modprobe ext4 || die "cannot load ext4"
mkdir -p "$MNT"
require_block "$BACKING"
dev=$(add_linear "$BACKING") || die "add failed"
id=$(dev_id "$dev")
vm_log "serving $BACKING as $dev (id $id)"

if mkfs.ext4 -F -q "$dev" && mount "$dev" "$MNT"; then
	pass "mkfs-and-mount"
else
	fail "mkfs-and-mount" "mkfs.ext4 or mount failed"
fi

for i in 1 2 3 4 5 6 7 8; do
	head -c $((i * 3))M /dev/urandom >"$MNT/file$i"
done
mkdir -p "$MNT/dir/sub" && cp "$MNT/file1" "$MNT/dir/sub/copy"
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/sums"
sync
if umount "$MNT" && e2fsck -fn "$dev" >"$T/fsck.out" 2>&1; then
	pass "e2fsck-clean"
else
	fail "e2fsck-clean" "umount or e2fsck failed: $(tail -3 "$T/fsck.out" 2>/dev/null)"
fi

if mount "$dev" "$MNT" && (cd "$MNT" && sha256sum --quiet -c "$T/sums"); then
	pass "files-read-back"
else
	fail "files-read-back" "checksums differ after remount$(disk_errors)"
fi
umount "$MNT" 2>/dev/null

# Same bytes with a fresh daemon: nothing lived only in the first daemon's memory.
ublkdm del "$id" >/dev/null
if dev=$(add_linear "$BACKING") && mount -o ro "$dev" "$MNT" && (cd "$MNT" && sha256sum --quiet -c "$T/sums"); then
	pass "files-survive-a-new-daemon"
else
	fail "files-survive-a-new-daemon" "checksums differ under a new daemon$(disk_errors)"
fi
umount "$MNT" 2>/dev/null
vm_summary
