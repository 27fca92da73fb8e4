//! `ublkdm assemble --scan` and `ublkdm install-units`.

use super::*;

// ---------------------------------------------------------------------------------------------
// assemble --scan / install-units

/// What `assemble --scan` did with one thing it found.
#[derive(Debug, serde::Serialize)]
pub(super) struct Assembled {
    kind: &'static str,
    identity: String,
    legs: Vec<serde_json::Value>,
    missing: Vec<String>,
    left_out: Vec<String>,
    /// `started`, `recovered`, `served` (already), `refused` or `failed`.
    outcome: &'static str,
    id: Option<u32>,
    device: Option<PathBuf>,
    error: Option<String>,
}

pub(super) fn assemble_scan(registry: &Registry, json: bool) -> Result<()> {
    init_cli_logging();
    ublk::require_driver()?;
    let devices: Vec<DevInfo> = ublk::device_ids()
        .into_iter()
        .filter_map(|id| ublk::query(id).ok())
        .collect();
    // Probing runs an io_uring on its own thread, gone before any daemon is forked.
    let report = thread::scope(|scope| {
        scope
            .spawn(|| registry.scan())
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    let mut results = Vec::new();
    let mut failures = 0usize;
    let mut first_kind = None;
    for found in report.found {
        let (outcome, id, device, error) =
            bring_up(registry, &devices, found.spec, &found.identity);
        if let Some(err) = &error {
            failures += 1;
            first_kind.get_or_insert(err.kind());
        }
        let legs = found
            .found
            .iter()
            .map(|(path, role)| serde_json::json!({ "device": path, "role": role }))
            .collect();
        results.push(Assembled {
            kind: found.kind,
            identity: found.identity,
            legs,
            missing: found.missing,
            left_out: found.left_out,
            outcome,
            id,
            device,
            error: error.map(|e| e.chain().join(": ")),
        });
    }
    print_assembled(&results, report.probed, json);
    match first_kind {
        None => Ok(()),
        Some(kind) => Err(Error::new(
            kind,
            format!(
                "{failures} of {} found could not be brought up",
                results.len()
            ),
        )),
    }
}

/// Serves one thing found by the scan unless a device already does: a running daemon is left
/// alone, a QUIESCED device (its daemon died) is recovered, otherwise a new device is added.
pub(super) fn bring_up(
    registry: &Registry,
    devices: &[DevInfo],
    spec: Result<TargetSpec>,
    identity: &str,
) -> (&'static str, Option<u32>, Option<PathBuf>, Option<Error>) {
    let spec = match spec {
        Ok(spec) => spec,
        Err(err) => return ("refused", None, None, Some(err)),
    };
    let served = devices.iter().find(|d| {
        d.spec
            .as_ref()
            .and_then(|s| registry.identity(s))
            .as_deref()
            == Some(identity)
    });
    let (start, outcome) = match served {
        Some(d) if d.state == DevState::Quiesced && !daemon::process_alive(d.daemon_pid) => {
            let stored = d.spec.clone().expect("matched by its spec");
            (Start::Recover(d.id), ("recovered", stored))
        }
        Some(d) => return ("served", Some(d.id), Some(d.block_device.clone()), None),
        None => (Start::Add(DeviceConfig::default()), ("started", spec)),
    };
    let (outcome, spec) = outcome;
    match daemon::launch(registry, start, spec) {
        Ok(path) => {
            let id = path.to_str().and_then(|p| parse_id(p).ok());
            (outcome, id, Some(path), None)
        }
        Err(err) => ("failed", None, None, Some(err)),
    }
}

pub(super) fn print_assembled(results: &[Assembled], probed: usize, json: bool) {
    if json {
        let out = serde_json::json!({ "probed": probed, "found": results });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return;
    }
    if results.is_empty() {
        println!("no ublkdm mirror found ({probed} devices probed)");
        return;
    }
    for r in results {
        let legs: Vec<String> = r
            .legs
            .iter()
            .map(|l| format!("{} ({})", text(&l["device"]), text(&l["role"])))
            .collect();
        let what = match (r.outcome, &r.device, &r.error) {
            ("served", Some(dev), _) => format!("already served as {}", dev.display()),
            (outcome, Some(dev), _) => format!("{outcome} as {}", dev.display()),
            (outcome, _, Some(err)) => {
                let prefix = format!("{} {}: ", r.kind, r.identity);
                format!("{outcome}: {}", err.strip_prefix(&prefix).unwrap_or(err))
            }
            (outcome, None, None) => outcome.to_owned(),
        };
        let mut line = format!(
            "{} {}: {what}; legs {}",
            r.kind,
            r.identity,
            legs.join(", ")
        );
        if r.error.is_none() || !r.missing.is_empty() {
            let missing = if r.missing.is_empty() {
                "none".to_owned()
            } else {
                r.missing.join(", ")
            };
            line.push_str(&format!("; missing {missing}"));
        }
        if !r.left_out.is_empty() {
            line.push_str(&format!("; left out {}", r.left_out.join(", ")));
        }
        println!("{line}");
    }
}

/// Where `install-units` writes the unit unless told otherwise.
pub(super) const UNIT_DIR: &str = "/etc/systemd/system";
/// The unit's file name.
pub(super) const UNIT_NAME: &str = "ublkdm-assemble.service";
/// The unit as shipped in the repository.
pub(super) const UNIT_TEXT: &str = include_str!("../../scripts/systemd/ublkdm-assemble.service");
/// The binary the shipped unit names; `install-units` puts its own path there.
pub(super) const UNIT_BINARY: &str = "/usr/local/sbin/ublkdm";

/// The unit with ExecStart pointing at `exe`.
pub(super) fn unit_text(exe: &std::path::Path) -> String {
    UNIT_TEXT.replace(UNIT_BINARY, &exe.to_string_lossy())
}

pub(super) fn install_units(prefix: Option<PathBuf>) -> Result<()> {
    let dir = prefix.unwrap_or_else(|| PathBuf::from(UNIT_DIR));
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| Error::io("cannot find this program's path", e))?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let path = dir.join(UNIT_NAME);
    std::fs::write(&path, unit_text(&exe))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    println!(
        "wrote {} (ExecStart={} assemble --scan)",
        path.display(),
        exe.display()
    );
    println!("enable it with: systemctl daemon-reload && systemctl enable {UNIT_NAME}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_this_binary_once_at_boot() {
        let text = unit_text(std::path::Path::new("/opt/x/ublkdm"));
        assert!(
            text.contains("ExecStart=/opt/x/ublkdm assemble --scan"),
            "{text}"
        );
        assert!(text.contains("Type=oneshot"));
        assert!(text.contains("After=systemd-udev-settle.service"));
        assert!(!text.contains(UNIT_BINARY));
        let dir = tempfile::tempdir().expect("temp dir");
        install_units(Some(dir.path().join("units"))).expect("install");
        let written = std::fs::read_to_string(dir.path().join("units").join(UNIT_NAME))
            .expect("the unit is written");
        assert!(written.contains(" assemble --scan"));
        assert!(
            Cli::try_parse_from(["ublkdm", "assemble"]).is_err(),
            "--scan is required"
        );
        assert!(Cli::try_parse_from(["ublkdm", "assemble", "--scan", "--json"]).is_ok());
    }
}
