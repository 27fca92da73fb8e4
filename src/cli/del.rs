//! `ublkdm del`: through the daemon where one runs, bounded at every step.

use super::*;
use crate::target::ChildSpec;

/// How long `del` waits for a daemon to stop and delete its device after being asked.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `del` waits for a killed daemon to be gone.
pub(super) const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The polling step of those waits.
pub(super) const POLL_STEP: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// del

pub(super) fn del(id: Option<u32>, all: bool) -> Result<()> {
    init_cli_logging();
    ublk::require_driver()?;
    let ids = if all {
        parents_first(ublk::device_ids())
    } else {
        id.into_iter().collect()
    };
    let mut first_error = None;
    for id in ids {
        if all && !ublk::device_exists(id) {
            continue; // a child, gone with its parent
        }
        match del_one(id) {
            Ok(()) => println!("deleted device {id}"),
            Err(err) if all => {
                report(&err);
                first_error.get_or_insert(err);
            }
            Err(err) => return Err(err),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `ids` with the children of other devices last (deleting a parent deletes its children).
pub(super) fn parents_first(mut ids: Vec<u32>) -> Vec<u32> {
    let is_child = |id: &u32| {
        ublk::query(*id).is_ok_and(|i| i.spec.as_ref().and_then(TargetSpec::as_child).is_some())
    };
    ids.sort_by_key(|id| (is_child(id), *id));
    ids
}

/// Deletes one device and its children: through its daemon if it runs (socket, then SIGTERM,
/// then SIGKILL), then on the driver directly. A child goes only with its parent, unless the
/// parent is gone. Every step is bounded.
pub(super) fn del_one(id: u32) -> Result<()> {
    let info = ublk::query(id)?;
    if let Some(ChildSpec { parent, kind, name }) =
        info.spec.as_ref().and_then(TargetSpec::as_child)
    {
        if ublk::device_exists(parent) {
            return Err(Error::invalid(format!(
                "device {id} is {kind} '{name}' of device {parent}: 'ublkdm snapshot delete \
                 {parent} {name}' deletes it, 'ublkdm del {parent}' the whole group"
            )));
        }
        return remove_device(id);
    }
    del_parent(&info)?;
    for child in daemon::child_devices(id) {
        log::info!("deleting device {}, a child of device {id}", child.id);
        remove_device(child.id)?;
    }
    Ok(())
}

pub(super) fn del_parent(info: &DevInfo) -> Result<()> {
    let id = info.id;
    let pid = info.daemon_pid;
    if daemon::process_alive(pid) {
        if !daemon::is_ublkdm(pid) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("device {id} is served by pid {pid}, which is not ublkdm"),
            ));
        }
        if stop_daemon(id, pid) {
            return Ok(());
        }
    }
    remove_device(id)
}

/// Deletes device `id` on the driver (its daemon is gone), bounded.
pub(super) fn remove_device(id: u32) -> Result<()> {
    if ublk::device_exists(id) {
        ublk::remove(id)?;
    }
    if wait_until(STOP_TIMEOUT, || !ublk::device_exists(id)) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Daemon,
            format!("device {id} is still there after deletion"),
        ))
    }
}

/// Asks the daemon to stop, then signals it; true once the device is gone, false once the
/// daemon is dead but the device remains (the caller deletes it).
pub(super) fn stop_daemon(id: u32, pid: i32) -> bool {
    match control::request(id, Command::Stop) {
        Ok(_) if wait_until(STOP_TIMEOUT, || !ublk::device_exists(id)) => return true,
        Ok(_) => log::warn!("device {id}: the daemon did not finish stopping; sending SIGTERM"),
        Err(err) => log::warn!("device {id}: {}; sending SIGTERM", err.chain().join(": ")),
    }
    if daemon::signal(pid, libc::SIGTERM).is_ok()
        && wait_until(STOP_TIMEOUT, || !ublk::device_exists(id))
    {
        return true;
    }
    log::warn!("device {id}: the daemon (pid {pid}) ignored SIGTERM; killing it");
    let _ = daemon::signal(pid, libc::SIGKILL);
    wait_until(KILL_TIMEOUT, || !daemon::process_alive(pid));
    !ublk::device_exists(id)
}

/// Polls `done` every [`POLL_STEP`] until it holds or `timeout` passes; whether it held.
pub(super) fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_STEP);
    }
}
