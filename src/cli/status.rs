//! `ublkdm list` and `ublkdm status`.

use super::*;
use crate::target::ChildSpec;

// ---------------------------------------------------------------------------------------------
// list / status

pub(super) fn list(registry: &Registry, json: bool) -> Result<()> {
    init_cli_logging();
    let devices: Vec<DevInfo> = if ublk::driver_loaded() {
        // A device deleted between listing and querying is simply not shown.
        ublk::device_ids()
            .into_iter()
            .filter_map(|id| ublk::query(id).ok())
            .collect()
    } else {
        Vec::new()
    };
    if json {
        let rows: Vec<_> = devices.iter().map(device_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(());
    }
    println!(
        "{:<4} {:<13} {:<9} {:>10}  {:<14} TARGET",
        "ID", "DEVICE", "STATE", "SIZE", "DAEMON"
    );
    for d in &devices {
        let size = d.size_bytes.map_or_else(|| "-".to_owned(), human_bytes);
        println!(
            "{:<4} {:<13} {:<9} {:>10}  {:<14} {}",
            d.id,
            d.block_device.display(),
            d.state,
            size,
            daemon_column(d.daemon_pid),
            registry.describe(d.spec.as_ref())
        );
    }
    Ok(())
}

pub(super) fn status(registry: &Registry, id: u32, json: bool) -> Result<()> {
    init_cli_logging();
    let info = ublk::query(id)?;
    let alive = daemon::process_alive(info.daemon_pid);
    let reply = alive.then(|| match info.spec.as_ref().and_then(TargetSpec::as_child) {
        Some(child) => control::request(child.parent, Command::Status)
            .map(|group| child_status(registry, &info, &group, &child)),
        None => control::request(id, Command::Status),
    });
    if json {
        let mut out = device_json(&info);
        match &reply {
            Some(Ok(status)) => out["daemon_status"] = status.clone(),
            Some(Err(err)) => out["daemon_error"] = err.chain().join(": ").into(),
            None => {}
        }
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    print_status(registry, &info, alive, reply.as_ref());
    Ok(())
}

/// A child's share of its parent daemon's status, shaped like a daemon status of its own.
pub(super) fn child_status(
    registry: &Registry,
    info: &DevInfo,
    group: &serde_json::Value,
    child: &ChildSpec,
) -> serde_json::Value {
    let (kind, name) = (&child.kind, child.name.as_str());
    let named = |list: &serde_json::Value| {
        list.as_array()
            .and_then(|items| items.iter().find(|item| item["name"] == name).cloned())
            .unwrap_or(serde_json::Value::Null)
    };
    let child = named(&group["children"]);
    // The parent's kind knows where its status keeps its children's.
    let parent_kind = group["spec"]["target"]
        .as_str()
        .and_then(|k| registry.find(k));
    let target = match parent_kind {
        Some(parent) => parent.child_status(&group["target"]["status"], name),
        None => serde_json::json!({ "name": name, "state": "unknown" }),
    };
    serde_json::json!({
        "device": info,
        "daemon": group["daemon"],
        "target": { "kind": kind, "status": target },
        "io": child["io"],
    })
}

pub(super) fn device_json(info: &DevInfo) -> serde_json::Value {
    let mut value = serde_json::to_value(info).expect("json");
    value["daemon_alive"] = daemon::process_alive(info.daemon_pid).into();
    value
}

pub(super) fn print_status(
    registry: &Registry,
    info: &DevInfo,
    alive: bool,
    reply: Option<&Result<serde_json::Value>>,
) {
    println!(
        "{} (ublk device {}): {}",
        info.block_device.display(),
        info.id,
        info.state
    );
    if alive {
        let daemon_id = info
            .spec
            .as_ref()
            .and_then(TargetSpec::as_child)
            .map_or(info.id, |child| child.parent);
        println!(
            "  daemon:  pid {}, running; log {}",
            info.daemon_pid,
            daemon::log_path(daemon_id).display()
        );
    } else {
        println!("  daemon:  pid {}, dead", info.daemon_pid);
        if info.state == DevState::Quiesced {
            println!(
                "           the device is QUIESCED: 'ublkdm recover {}' takes it over",
                info.id
            );
        }
    }
    if let Some(size) = info.size_bytes {
        println!(
            "  size:    {} ({size} bytes, {} sectors)",
            human_bytes(size),
            size >> crate::units::SECTOR_SHIFT
        );
    }
    println!(
        "  queues:  {} x depth {}, max io {}",
        info.queues,
        info.depth,
        human_bytes(u64::from(info.max_io_bytes))
    );
    println!(
        "  flags:   {:#x}{}",
        info.flags,
        if info.user_recovery {
            " (user recovery)"
        } else {
            ""
        }
    );
    println!("  data:    {}", ublk::data_path_text(info.flags));
    println!("  target:  {}", registry.describe(info.spec.as_ref()));
    match reply {
        Some(Ok(status)) => print_daemon_status(registry, status),
        Some(Err(err)) => println!("  (no answer from the daemon: {})", err.chain().join(": ")),
        None => {}
    }
}

pub(super) fn print_daemon_status(registry: &Registry, status: &serde_json::Value) {
    for line in registry.status_lines(status) {
        println!("    {line}");
    }
    if let Some(children) = status["children"].as_array().filter(|c| !c.is_empty()) {
        let served: Vec<_> = children
            .iter()
            .map(|c| format!("{} {}", text(&c["name"]), text(&c["device"])))
            .collect();
        println!("  children: {}", served.join(", "));
    }
    let io = &status["io"];
    println!(
        "  io:      reads {}, writes {}, flushes {}, discards {}, write-zeroes {}, errors {}",
        io["reads"], io["writes"], io["flushes"], io["discards"], io["write_zeroes"], io["errors"]
    );
    println!("  flusher: {}", flusher_text(&io["io_flusher"]));
}

/// The queue threads' io-flusher flags (`[true, true]`) as `2 of 2 queue threads are io
/// flushers`: a queue thread that is not one can deadlock under memory pressure.
fn flusher_text(flags: &serde_json::Value) -> String {
    let flags = flags.as_array().map(Vec::as_slice).unwrap_or_default();
    let set = flags.iter().filter(|f| f.as_bool() == Some(true)).count();
    format!(
        "{set} of {} queue threads are io flushers (PR_SET_IO_FLUSHER)",
        flags.len()
    )
}

pub(super) fn daemon_column(pid: i32) -> String {
    if daemon::process_alive(pid) {
        pid.to_string()
    } else {
        format!("{pid} (dead)")
    }
}

/// `bytes` in the largest binary unit that keeps it at or above 1.
pub(super) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_flushers_are_counted() {
        let flags = serde_json::json!([true, false]);
        assert_eq!(
            flusher_text(&flags),
            "1 of 2 queue threads are io flushers (PR_SET_IO_FLUSHER)"
        );
        assert!(flusher_text(&serde_json::Value::Null).starts_with("0 of 0"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100), "100 B");
    }
}
