#!/usr/bin/env bash
# tests/vm/mirror_remote.sh: a mirror leg on "another host": nbdkit serves /dev/vdb from a
# second network namespace over a veth pair, and the mirror's second leg is nbd://ADDR/.
# vm: --disks 2x128M
# Method (issue 13): the guest has no network card, so this traffic never leaves it.
# - fio verify on the local+remote mirror with no delay, then with netem delay 5 ms;
# - reads failing on the server (nbdkit's error filter): served and repaired from the local
#   leg, the remote leg stays in sync;
# - the server killed -9 under fio and started again: fio sees no error, the leg fails, is
#   added back by itself when its link returns, and resyncs only the regions written
#   meanwhile (both counts printed); status shows the link's epoch 2;
# - write-behind=16 (assembled again with --leg-options) at 20 ms: the lag stays at most 16
#   writes and is seen above 0 while fio writes;
# - the legs are then identical; the far disk alone assembles (disaster recovery) with every
#   acknowledged write;
# - split brain, twice: the far disk alone writes, this side alone writes, and the link
#   returns: add-leg is refused (exit 7), then `mirror resolve --keep-remote` (then
#   `--keep-local`) keeps that side's data and discards the other's; the legs end identical;
# - the same leg served by qemu-nbd and by nbd-server: a short fio verify each.
set -uo pipefail
. "$UBLKDM_REPO/scripts/vm/lib.sh"
. "$UBLKDM_REPO/tests/vm/common.sh"
. "$UBLKDM_REPO/tests/vm/common_mirror.sh"

FAR=10.99.0.2
URL="nbd://$FAR/"
READFAIL=$T/readfail

modprobe veth || die "no veth module"
modprobe sch_netem || die "no sch_netem module"
ip netns add far || die "cannot create a network namespace"
ip link add v0 type veth peer name v1 netns far || die "cannot create a veth pair"
{ ip addr add 10.99.0.1/24 dev v0 && ip link set v0 up; } || die "cannot set up v0"
{ ip -n far addr add "$FAR/24" dev v1 && ip -n far link set v1 up && ip -n far link set lo up; } ||
	die "cannot set up v1"

# The far host's NBD server: /dev/vdb, reads failing while $READFAIL exists.
serve() {
	ip netns exec far nbdkit -f -i "$FAR" -p 10809 --filter=error file file=/dev/vdb \
		error-pread-rate=100% error-pread-file="$READFAIL" &
	NBDKIT=$!
	wait_until 20 bash -c "exec 3<>/dev/tcp/$FAR/10809" 2>/dev/null || die "nbdkit does not answer"
}
stop_serving() { kill -9 "$NBDKIT" 2>/dev/null; wait "$NBDKIT" 2>/dev/null; }
# A remote leg not reached at assembly (a slow first connect) is reached in the background.
leg_in_sync() { [[ $(leg_state "$1" "$2") == in-sync ]]; }
trap 'stop_serving; _common_cleanup' EXIT
serve

# Both disks start zeroed: no initial copy needed.
dev=$(add_mirror --leg /dev/vda --leg "$URL" --region-size 512K --nosync) ||
	die "add mirror with a remote leg failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
wait_until 60 leg_in_sync "$id" 1
if [[ $(leg_state "$id" 1) == in-sync && $(mstatus "$id" .legs[1].link.state) == Connected ]]; then
	pass "remote-leg-in-sync"
else
	fail "remote-leg-in-sync" "$(mstatus "$id" .legs[1])"
fi
ublkdm status "$id"

verify_job=(--filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k
	--iodepth=16 --size=16M --verify=crc32c --verify_fatal=1)
if run_fio verify-0ms "${verify_job[@]}" --offset=0; then
	pass "fio-verify-no-delay"
else
	fail "fio-verify-no-delay" "$(grep -m1 -E 'err=|verify' "$T/verify-0ms.out")"
fi
tc qdisc add dev v0 root netem delay 5ms || die "cannot add netem delay"
if run_fio verify-5ms "${verify_job[@]}" --offset=16M --size=8M; then
	pass "fio-verify-5ms"
else
	fail "fio-verify-5ms" "$(grep -m1 -E 'err=|verify' "$T/verify-5ms.out")"
fi
tc qdisc del dev v0 root

# Reads fail on the server: served by the local leg, the bad regions rewritten.
head -c 16M /dev/urandom >"$T/pattern"
dd if="$T/pattern" of="$dev" bs=1M seek=96 oflag=direct status=none || die "cannot write the pattern"
want=$(sha256sum <"$T/pattern" | cut -d' ' -f1)
touch "$READFAIL"
got=$(sha_range "$dev" 16 96)
if [[ $got == "$want" ]]; then
	pass "reads-survive-server-read-errors"
else
	fail "reads-survive-server-read-errors" "the data read back differs"
fi
rm -f "$READFAIL"
read_errors=$(mstatus "$id" .legs[1].read_errors)
if ((read_errors > 0)) && [[ $(leg_state "$id" 1) == in-sync ]]; then
	pass "read-errors-repaired-leg-stays"
else
	fail "read-errors-repaired-leg-stays" "read errors $read_errors, state $(leg_state "$id" 1)"
fi
wait_in_sync "$id" 120 || fail "repair-resync-ends" "$(mstatus "$id" .regions)"

# The server dies under fio and comes back.
total=$(mstatus "$id" .regions.total)
run_fio under-kill --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
	--iodepth=16 --offset=0 --size=8M --loops=2 --rate_iops=300 --verify=crc32c \
	--verify_fatal=1 --runtime=60 &
fio_pid=$!
sleep 3
stop_serving
vm_log "nbdkit killed"
if wait "$fio_pid"; then
	pass "fio-survives-server-kill"
else
	fail "fio-survives-server-kill" "$(grep -m1 -E 'err=|verify' "$T/under-kill.out")"
fi
state=$(leg_state "$id" 1)
if [[ $state == failed ]]; then
	pass "killed-server-fails-the-leg"
else
	fail "killed-server-fails-the-leg" "leg 1 is '$state'"
fi
# Written while apart: fio's 16 regions and 8 x 1 MiB, 2 regions each, away from them.
for i in $(seq 0 7); do
	dd if=/dev/urandom of="$dev" bs=1M count=1 seek=$((40 + 8 * i)) oflag=direct status=none
done
written=32
serve
vm_log "nbdkit back"
wait_until 90 bash -c "[[ \$($UBLKDM status --json $id | jq -r '.daemon_status.target.status.legs[1].state') != failed ]]" ||
	fail "leg-comes-back-by-itself" "$(mstatus "$id" .legs[1])"
resynced=$(mstatus "$id" .resync.regions_total)
wait_in_sync "$id" 180 || fail "return-resync-ends" "$(mstatus "$id" '.regions, .resync')"
echo "server kill: regions written while apart: $written; resynced on return: $resynced of $total"
if ((resynced >= 16 && resynced <= written + 4 && resynced < total / 4)); then
	pass "return-resyncs-only-what-changed"
else
	fail "return-resyncs-only-what-changed" "resynced $resynced (written $written, total $total)"
fi
epoch=$(mstatus "$id" .legs[1].link.epoch)
if [[ $epoch == 2 ]]; then pass "status-shows-reconnect"; else fail "status-shows-reconnect" "epoch '$epoch'"; fi
ublkdm status "$id"

# Write-behind: the same mirror assembled again with its options, on a slow link.
ublkdm del "$id" >/dev/null || die "del failed"
dev=$(add_mirror --leg /dev/vda --leg "$URL" --region-size 512K --leg-options 1=write-behind=16) ||
	die "assemble with --leg-options failed"
id=$(dev_id "$dev")
set_sched_none "$dev"
wait_until 60 leg_in_sync "$id" 1 || fail "write-behind-leg-in-sync" "$(mstatus "$id" .legs[1])"
tc qdisc add dev v0 root netem delay 20ms || die "cannot add netem delay"
run_fio behind --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
	--iodepth=32 --offset=64M --size=8M --runtime=10 --time_based &
fio_pid=$!
max=0
for _ in $(seq 1 20); do
	lag=$(mstatus "$id" '.legs[1].lag.writes // 0')
	((lag > max)) && max=$lag
	sleep 0.3
done
wait "$fio_pid" || fail "fio-write-behind" "$(grep -m1 -E 'err=' "$T/behind.out")"
echo "write-behind=16: the most writes behind seen: $max"
if ((max > 0 && max <= 16)); then
	pass "write-behind-lag-bounded"
else
	fail "write-behind-lag-bounded" "the lag seen reached $max"
fi
ublkdm status "$id"
tc qdisc del dev v0 root
wait_until 60 bash -c "[[ \$($UBLKDM status --json $id | jq -r '.daemon_status.target.status.legs[1].lag.writes') == 0 ]]" ||
	fail "lag-drains" "$(mstatus "$id" .legs[1].lag)"
wait_in_sync "$id" 120 || fail "behind-in-sync" "$(mstatus "$id" .regions)"

offset=$(data_offset_mib "$id")
mib=$(($(blockdev --getsize64 "$dev") / 1048576))
acked=$(sha_range "$dev" "$mib")
ublkdm del "$id" >/dev/null
stop_serving
if legs_identical_raw "$offset" /dev/vda /dev/vdb; then pass "legs-identical"; else fail "legs-identical" "legs differ"; fi

# Disaster recovery: this host is gone; the far disk alone assembles, degraded, with every
# acknowledged write (here it is local to the guest, as it is to the far host).
far_alone() {
	dev=$(add_mirror --leg /dev/vdb) || die "the far disk alone does not assemble"
	id=$(dev_id "$dev")
}
far_alone
if [[ $(mstatus "$id" .degraded) == true && $(sha_range "$dev" "$mib") == "$acked" ]]; then
	pass "disaster-recovery-far-disk-alone"
else
	fail "disaster-recovery-far-disk-alone" "degraded $(mstatus "$id" .degraded), data differs or not"
fi

# Split brain: both sides written apart, then the link returns. Nothing moves until
# `resolve` picks a side; each side once.
split_then_resolve() {
	local keep=$1 theirs ours at_theirs at_ours kept rc
	head -c 1M /dev/urandom >"$T/theirs"
	head -c 1M /dev/urandom >"$T/ours"
	dd if="$T/theirs" of="$dev" bs=1M seek=100 oflag=direct status=none
	ublkdm del "$id" >/dev/null
	dev=$(add_mirror --leg /dev/vda) || die "this side alone does not assemble"
	id=$(dev_id "$dev")
	dd if="$T/ours" of="$dev" bs=1M seek=110 oflag=direct status=none
	serve
	for _ in 1 2 3; do
		ublkdm mirror add-leg "$id" "$URL" >"$T/add.out" 2>&1
		rc=$?
		# A first connect slower than the client's timeout (a loaded emulated guest): again.
		grep -q "cannot connect" "$T/add.out" || break
	done
	if ((rc == 7)) && grep -q "split brain" "$T/add.out" &&
		[[ $(mstatus "$id" '.split_brain | length') == 1 ]]; then
		pass "split-brain-refused-$keep"
	else
		fail "split-brain-refused-$keep" "add-leg exit $rc: $(head -c 300 "$T/add.out")"
	fi
	ublkdm mirror resolve "$id" "--keep-$keep" || fail "resolve-$keep" "resolve failed"
	wait_in_sync "$id" 180 || fail "resolve-$keep-resync" "$(mstatus "$id" .regions)"
	theirs=$(sha256sum <"$T/theirs" | cut -d' ' -f1)
	ours=$(sha256sum <"$T/ours" | cut -d' ' -f1)
	at_theirs=$(sha_range "$dev" 1 100)
	at_ours=$(sha_range "$dev" 1 110)
	if [[ $keep == remote ]]; then
		[[ $at_theirs == "$theirs" && $at_ours != "$ours" ]]
	else
		[[ $at_theirs != "$theirs" && $at_ours == "$ours" ]]
	fi
	kept=$?
	if ((kept == 0)); then
		pass "resolve-keeps-$keep"
	else
		fail "resolve-keeps-$keep" "the data is not the $keep side's"
	fi
	echo "split brain resolved --keep-$keep: ${keep} side's 1 MiB kept, the other side's discarded"
	ublkdm del "$id" >/dev/null
	stop_serving
	if legs_identical_raw "$offset" /dev/vda /dev/vdb; then
		pass "legs-identical-after-$keep"
	else
		fail "legs-identical-after-$keep" "legs differ"
	fi
}
split_then_resolve remote
far_alone
split_then_resolve local

# The same leg served by qemu-nbd and by nbd-server: a short fio verify each.
other_server() {
	local name=$1 url=$2
	dev=$(add_mirror --leg /dev/vda --leg "$url") || { fail "$name-assembles" "add failed"; return; }
	id=$(dev_id "$dev")
	set_sched_none "$dev"
	wait_until 60 leg_in_sync "$id" 1
	if [[ $(leg_state "$id" 1) == in-sync ]] &&
		run_fio "$name" "${verify_job[@]}" --offset=32M --size=4M; then
		pass "fio-verify-$name"
	else
		fail "fio-verify-$name" "leg 1 $(leg_state "$id" 1); $(grep -m1 -E 'err=|verify' "$T/$name.out")"
	fi
	wait_in_sync "$id" 60 || fail "$name-in-sync" "$(mstatus "$id" .regions)"
	ublkdm del "$id" >/dev/null
}
ip netns exec far qemu-nbd -f raw --cache=none -b "$FAR" -p 10810 -t /dev/vdb &
QEMU_NBD=$!
wait_until 20 bash -c "exec 3<>/dev/tcp/$FAR/10810" 2>/dev/null || die "qemu-nbd does not answer"
other_server qemu-nbd "nbd://$FAR:10810/"
kill -9 "$QEMU_NBD"
wait "$QEMU_NBD" 2>/dev/null
printf '[generic]\n\tlistenaddr = %s\n\tport = 10811\n[export]\n\texportname = /dev/vdb\n\tflush = true\n\tfua = true\n' \
	"$FAR" >"$T/nbd-server.conf"
ip netns exec far nbd-server -C "$T/nbd-server.conf" -p "$T/nbd-server.pid" || die "nbd-server does not start"
wait_until 20 bash -c "exec 3<>/dev/tcp/$FAR/10811" 2>/dev/null || die "nbd-server does not answer"
other_server nbd-server "nbd://$FAR:10811/export"
pkill -9 -x nbd-server
vm_summary
