//! `ublkdm add` and `ublkdm recover`: a spec, then a daemon for it.

use super::*;
use crate::target::ChildSpec;

// ---------------------------------------------------------------------------------------------
// add / recover

pub(super) fn add(registry: &Registry, spec: TargetSpec, options: AddOptions) -> Result<()> {
    let config = DeviceConfig {
        queues: options.queues,
        depth: options.depth,
        io_buf_bytes: ublk::IO_BUF_BYTES,
        copy: options.copy,
    };
    config.validate()?;
    ublk::require_driver()?;
    start_daemon(registry, Start::Add(config), spec, options.foreground)
}

pub(super) fn recover(registry: &Registry, id: u32, foreground: bool) -> Result<()> {
    let info = ublk::query(id)?;
    if info.state != DevState::Quiesced {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "device {id} is {}: only a QUIESCED device (its daemon died) can be recovered",
                info.state
            ),
        ));
    }
    if daemon::process_alive(info.daemon_pid) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "the daemon of device {id} (pid {}) is still running",
                info.daemon_pid
            ),
        ));
    }
    let spec = info.spec.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("device {id} has no stored ublkdm target (was it created by ublkdm?)"),
        )
    })?;
    if let Some(ChildSpec { parent, kind, name }) = spec.as_child() {
        return Err(Error::invalid(format!(
            "device {id} is {kind} '{name}' of device {parent}: 'ublkdm recover {parent}' brings \
             back the whole group"
        )));
    }
    start_daemon(registry, Start::Recover(id), spec, foreground)
}

pub(super) fn start_daemon(
    registry: &Registry,
    start: Start,
    spec: TargetSpec,
    foreground: bool,
) -> Result<()> {
    if foreground {
        daemon::init_logging();
        return daemon::run_foreground(registry, start, spec);
    }
    let kind = registry.kind_of(&spec)?;
    let path = daemon::launch(registry, start, spec)?;
    println!("{}", path.display());
    if let Some(id) = path.to_str().and_then(|p| parse_id(p).ok()) {
        kind.after_start(id);
    }
    Ok(())
}
