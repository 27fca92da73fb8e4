//! `ublkdm add` and `ublkdm recover`: a spec, then a daemon for it.

use super::*;

// ---------------------------------------------------------------------------------------------
// add / recover

pub(super) fn add(target: AddTarget) -> Result<()> {
    let (spec, options) = match target {
        AddTarget::Linear { device, options } => (
            TargetSpec::Linear {
                device: absolute(device)?,
            },
            options,
        ),
        AddTarget::Mirror { mirror, options } => (mirror_spec(mirror)?, options),
        AddTarget::Origin {
            device,
            cow,
            chunk_size,
            force,
            options,
        } => (
            TargetSpec::Origin {
                device: absolute(device)?,
                cow: absolute(cow)?,
                chunk_size_sectors: chunk_size.map_or(0, |b| b >> crate::units::SECTOR_SHIFT),
                force,
            },
            options,
        ),
    };
    let config = DeviceConfig {
        queues: options.queues,
        depth: options.depth,
        io_buf_bytes: ublk::IO_BUF_BYTES,
    };
    config.validate()?;
    ublk::require_driver()?;
    start_daemon(Start::Add(config), spec, options.foreground)
}

pub(super) fn recover(id: u32, foreground: bool) -> Result<()> {
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
    if let TargetSpec::Child { parent, kind, name } = &spec {
        return Err(Error::invalid(format!(
            "device {id} is {kind} '{name}' of device {parent}: 'ublkdm recover {parent}' brings \
             back the whole group"
        )));
    }
    start_daemon(Start::Recover(id), spec, foreground)
}

pub(super) fn start_daemon(start: Start, spec: TargetSpec, foreground: bool) -> Result<()> {
    if foreground {
        daemon::init_logging();
        return daemon::run_foreground(start, spec);
    }
    let mirror = matches!(spec, TargetSpec::Mirror { .. });
    let path = daemon::launch(start, spec)?;
    println!("{}", path.display());
    if mirror {
        warn_degraded(&path);
    }
    Ok(())
}

/// Prints a warning for every leg a mirror's daemon started without (and every leg given
/// that is not a member), from its status.
pub(super) fn warn_degraded(path: &std::path::Path) {
    let id = path
        .to_string_lossy()
        .rsplit("ublkb")
        .next()
        .map(str::parse::<u32>);
    let Some(Ok(id)) = id else { return };
    let Ok(status) = control::request(id, Command::Status) else {
        return;
    };
    let target = &status["target"]["status"];
    let lines = |key: &str| target[key].as_array().cloned().unwrap_or_default();
    for line in lines("missing_legs") {
        eprintln!("warning: mirror {id} runs degraded: {}", text(&line));
    }
    for line in lines("not_members") {
        eprintln!(
            "warning: {}",
            text(&line).replace(" ID ", &format!(" {id} "))
        );
    }
}

/// The spec of `add mirror`: legs made absolute and checked for repeats (the same device under
/// two names included), the region size in sectors. A leg that does not exist is kept: the
/// mirror may assemble degraded without it (a create refuses it).
pub(super) fn mirror_spec(args: MirrorArgs) -> Result<TargetSpec> {
    let mut legs = Vec::with_capacity(args.legs.len());
    let mut seen = Vec::new();
    for leg in args.legs {
        let leg = absolute(leg)?;
        let Ok(real) = std::fs::canonicalize(&leg) else {
            legs.push(leg);
            continue;
        };
        if seen.contains(&real) {
            return Err(Error::invalid(format!(
                "leg {} is given twice (as {})",
                real.display(),
                leg.display()
            )));
        }
        seen.push(real);
        legs.push(leg);
    }
    let resync_throttle = crate::copy::ThrottleConfig {
        floor_mbps: args.resync_min_mbps,
        ceiling_mbps: args.resync_max_mbps,
    };
    resync_throttle.validate().map_err(Error::invalid)?;
    Ok(TargetSpec::Mirror {
        uuid: None,
        legs,
        region_size_sectors: args.region_size >> crate::units::SECTOR_SHIFT,
        nosync: args.nosync,
        force: args.force,
        resync_throttle,
    })
}
