//! The command line: parsing (clap derive) and the commands.
//!
//! `ublkdm add`, `list`, `status`, `del`, `recover`, `assemble --scan` and `install-units`. Commands that change a device act
//! through its daemon where one runs (control socket, then signals), and on the driver
//! directly only when the daemon is gone. Every wait is bounded. Output for people goes to
//! stdout, errors to stderr as `error: <line>` plus `  caused by: <line>`s; the exit code is
//! the error's [`ErrorKind::exit_code`] (see docs/exit-codes.md).

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::control::{self, Command};
use crate::daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::target::TargetSpec;
use crate::ublk::{self, DevInfo, DevState, DeviceConfig, Start};

/// How long `del` waits for a daemon to stop and delete its device after being asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `del` waits for a killed daemon to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The polling step of those waits.
const POLL_STEP: Duration = Duration::from_millis(50);

/// A userspace device-mapper served through Linux ublk.
#[derive(Debug, Parser)]
#[command(name = "ublkdm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Create a device served by a new daemon; prints the block device (e.g. /dev/ublkb0).
    Add {
        #[command(subcommand)]
        target: AddTarget,
    },
    /// List ublk devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a device, its daemon and its target.
    Status {
        /// Device id, ublkbN or /dev/ublkbN.
        #[arg(value_parser = parse_id)]
        id: u32,
        /// Print JSON.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Follow resync, scrub and merge progress with live progress bars until they end.
        #[arg(long)]
        watch: bool,
    },
    /// Mirror commands: leg failure and replacement, scrub.
    Mirror {
        #[command(subcommand)]
        command: MirrorCommand,
    },
    /// Snapshots of an origin: create, list, delete, merge (roll the origin back).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Stop and delete devices (an orderly stop through the daemon where one runs).
    Del {
        /// Device id, ublkbN or /dev/ublkbN.
        #[arg(value_parser = parse_id, required_unless_present = "all", conflicts_with = "all")]
        id: Option<u32>,
        /// Every ublk device.
        #[arg(long)]
        all: bool,
    },
    /// Take over a QUIESCED device whose daemon died, with a new daemon.
    Recover {
        /// Device id, ublkbN or /dev/ublkbN.
        #[arg(value_parser = parse_id)]
        id: u32,
        /// Stay attached and log to stderr.
        #[arg(long)]
        foreground: bool,
    },
    /// Find every mirror on the machine's block devices by its superblocks and bring each up
    /// (degraded where a leg is missing); one already served is left alone, one whose daemon
    /// died is recovered. Prints one line per mirror.
    Assemble {
        /// Probe the machine's block devices (the only mode).
        #[arg(long, required = true)]
        scan: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install the systemd unit that runs `ublkdm assemble --scan` at boot.
    InstallUnits {
        /// The directory to write the unit to (default /etc/systemd/system).
        #[arg(long, value_name = "DIR")]
        prefix: Option<PathBuf>,
    },
}

/// The targets `add` can create.
#[derive(Debug, Subcommand)]
pub enum AddTarget {
    /// Pass-through onto one block device or file.
    Linear {
        /// The backing block device (or regular file).
        device: PathBuf,
        #[command(flatten)]
        options: AddOptions,
    },
    /// An N-way mirror (RAID1) with a persistent write-intent bitmap; running the same command
    /// again assembles an existing mirror from its legs.
    Mirror {
        #[command(flatten)]
        mirror: MirrorArgs,
        #[command(flatten)]
        options: AddOptions,
    },
    /// A snapshot origin: DEVICE served with copy-on-write snapshots kept on the COW device.
    /// Running the same command again reassembles the origin and all of its snapshots.
    Origin {
        /// The origin's block device (or file); every write to it must go through ublkdm.
        device: PathBuf,
        /// The COW store: a blank device gets a new store, one holding a store is reopened.
        #[arg(long, value_name = "DEV")]
        cow: PathBuf,
        /// Chunk size of a new store: the unit of copy-on-write (a power of two, at least 4K).
        #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
        chunk_size: Option<u64>,
        /// Create a store on a COW device that carries a file system or other metadata (it is
        /// overwritten).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        options: AddOptions,
    },
}

/// The commands on an origin's snapshots.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot now and serve it as a new device; prints its block device.
    Create {
        /// The origin's device id.
        #[arg(value_parser = parse_id)]
        id: u32,
        /// The snapshot's name (default snapN).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the snapshots of an origin.
    List {
        #[arg(value_parser = parse_id)]
        id: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (its device must not be in use).
    Delete {
        #[arg(value_parser = parse_id)]
        id: u32,
        name: String,
    },
    /// Roll the origin back to a snapshot, in the background; the origin reads as the snapshot
    /// at once, and the snapshot is gone when the merge ends.
    Merge {
        #[arg(value_parser = parse_id)]
        id: u32,
        name: String,
    },
}

/// Arguments of `add mirror`.
#[derive(Debug, Args)]
pub struct MirrorArgs {
    /// A leg: a block device or file. Give 2 to 8, each once.
    #[arg(long = "leg", required = true, value_name = "DEV")]
    pub legs: Vec<PathBuf>,
    /// Region size: the unit of the write-intent bitmap and of resync (a power of two, at
    /// least 4K), e.g. 512K or 2M.
    #[arg(long, value_name = "SIZE", default_value = "512K", value_parser = parse_region_size)]
    pub region_size: u64,
    /// Trust that the legs already hold the same data: skip the initial copy.
    #[arg(long)]
    pub nosync: bool,
    /// Create over legs that carry foreign metadata (a file system, LVM, md; it is
    /// overwritten). Never over a leg that carries a mirror superblock, and no part of an
    /// assembly: legs of the mirror assemble it, degraded if some are missing.
    #[arg(long)]
    pub force: bool,
    /// Resync bandwidth kept while foreground I/O is active, in MB/s (default: the ceiling).
    #[arg(long, value_name = "MB/s")]
    pub resync_min_mbps: Option<u64>,
    /// Resync bandwidth when the mirror is otherwise idle, in MB/s (default: unlimited).
    #[arg(long, value_name = "MB/s")]
    pub resync_max_mbps: Option<u64>,
}

/// The runtime commands of a mirror.
#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Mark a leg failed: it is no longer read or written (its dirty regions are kept).
    FailLeg {
        #[arg(value_parser = parse_id)]
        id: u32,
        slot: u32,
    },
    /// Remove a leg from the mirror (it must not be the last in-sync leg).
    RemoveLeg {
        #[arg(value_parser = parse_id)]
        id: u32,
        slot: u32,
    },
    /// Add a leg: a returning leg resyncs what changed, a new one everything.
    AddLeg {
        #[arg(value_parser = parse_id)]
        id: u32,
        device: PathBuf,
        /// Use a device that carries foreign metadata.
        #[arg(long)]
        force: bool,
    },
    /// Replace the leg in SLOT with DEVICE (fully resynced).
    ReplaceLeg {
        #[arg(value_parser = parse_id)]
        id: u32,
        slot: u32,
        device: PathBuf,
        /// Use a device that carries foreign metadata.
        #[arg(long)]
        force: bool,
    },
    /// Compare the legs region by region and count mismatches (in the background).
    Scrub {
        #[arg(value_parser = parse_id)]
        id: u32,
        /// Rewrite mismatched regions from an in-sync leg.
        #[arg(long)]
        repair: bool,
    },
}

/// Options of every `add`.
#[derive(Debug, Args)]
pub struct AddOptions {
    /// Hardware queues (one daemon thread each).
    #[arg(long, default_value_t = ublk::DEFAULT_QUEUES)]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = ublk::DEFAULT_DEPTH)]
    pub depth: u16,
    /// Stay attached and log to stderr.
    #[arg(long)]
    pub foreground: bool,
}

/// Accepts `N`, `ublkbN` and `/dev/ublkbN`.
fn parse_id(text: &str) -> std::result::Result<u32, String> {
    let digits = text.strip_prefix("/dev/").unwrap_or(text);
    let digits = digits.strip_prefix("ublkb").unwrap_or(digits);
    digits
        .parse::<u32>()
        .ok()
        .filter(|&id| i32::try_from(id).is_ok())
        .ok_or_else(|| format!("'{text}' is not a device id (N, ublkbN or /dev/ublkbN)"))
}

/// A region size in bytes: a power of two, at least 4 KiB.
fn parse_region_size(text: &str) -> std::result::Result<u64, String> {
    parse_pow2_size("region size", text)
}

/// A chunk size in bytes: a power of two, at least 4 KiB.
fn parse_chunk_size(text: &str) -> std::result::Result<u64, String> {
    parse_pow2_size("chunk size", text)
}

/// `text` as bytes, which must be a power of two of at least 4 KiB; `what` names it.
fn parse_pow2_size(what: &str, text: &str) -> std::result::Result<u64, String> {
    let bytes = crate::units::parse_size_bytes(text)?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!(
            "{what} '{text}' is not a power of two of at least 4K"
        ));
    }
    Ok(bytes)
}

/// Parses the command line, runs it, reports: the process exit code.
pub fn main() -> i32 {
    // Rust ignores SIGPIPE, which turns `ublkdm list | head` into a panic; a command line tool
    // should simply end instead.
    // SAFETY: installs the default disposition; no handler code runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(err) => {
            report(&err);
            err.kind().exit_code()
        }
    }
}

/// Prints `err` as `error: ...` and its causes.
pub fn report(err: &Error) {
    let mut lines = err.chain().into_iter();
    if let Some(first) = lines.next() {
        eprintln!("error: {first}");
    }
    for line in lines {
        eprintln!("  caused by: {line}");
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        CliCommand::Add { target } => add(target),
        CliCommand::List { json } => list(json),
        CliCommand::Status { id, json, watch } if watch => {
            debug_assert!(!json);
            crate::watch::watch(id)
        }
        CliCommand::Status { id, json, .. } => status(id, json),
        CliCommand::Mirror { command } => mirror_command(command),
        CliCommand::Snapshot { command } => snapshot_command(command),
        CliCommand::Del { id, all } => del(id, all),
        CliCommand::Recover { id, foreground } => recover(id, foreground),
        CliCommand::Assemble { scan, json } => {
            debug_assert!(scan, "clap requires --scan");
            assemble_scan(json)
        }
        CliCommand::InstallUnits { prefix } => install_units(prefix),
    }
}

/// Logging for commands that do not become daemons: warnings only.
fn init_cli_logging() {
    let env = env_logger::Env::default().default_filter_or("warn");
    let _ = env_logger::Builder::from_env(env).try_init();
}

// ---------------------------------------------------------------------------------------------
// add / recover

fn add(target: AddTarget) -> Result<()> {
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

fn recover(id: u32, foreground: bool) -> Result<()> {
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

fn start_daemon(start: Start, spec: TargetSpec, foreground: bool) -> Result<()> {
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

// ---------------------------------------------------------------------------------------------
// assemble --scan / install-units

/// What `assemble --scan` did with one thing it found.
#[derive(Debug, serde::Serialize)]
struct Assembled {
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

fn assemble_scan(json: bool) -> Result<()> {
    init_cli_logging();
    ublk::require_driver()?;
    let devices: Vec<DevInfo> = ublk::device_ids()
        .into_iter()
        .filter_map(|id| ublk::query(id).ok())
        .collect();
    // Probing runs an io_uring on its own thread, gone before any daemon is forked.
    let report = thread::spawn(crate::targets::scan)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let mut results = Vec::new();
    let mut failures = 0usize;
    let mut first_kind = None;
    for found in report.found {
        let (outcome, id, device, error) = bring_up(&devices, found.spec, &found.identity);
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
fn bring_up(
    devices: &[DevInfo],
    spec: Result<TargetSpec>,
    identity: &str,
) -> (&'static str, Option<u32>, Option<PathBuf>, Option<Error>) {
    let spec = match spec {
        Ok(spec) => spec,
        Err(err) => return ("refused", None, None, Some(err)),
    };
    let served = devices
        .iter()
        .find(|d| d.spec.as_ref().and_then(TargetSpec::identity).as_deref() == Some(identity));
    let (start, outcome) = match served {
        Some(d) if d.state == DevState::Quiesced && !daemon::process_alive(d.daemon_pid) => {
            let stored = d.spec.clone().expect("matched by its spec");
            (Start::Recover(d.id), ("recovered", stored))
        }
        Some(d) => return ("served", Some(d.id), Some(d.block_device.clone()), None),
        None => (Start::Add(DeviceConfig::default()), ("started", spec)),
    };
    let (outcome, spec) = outcome;
    match daemon::launch(start, spec) {
        Ok(path) => {
            let id = path.to_str().and_then(|p| parse_id(p).ok());
            (outcome, id, Some(path), None)
        }
        Err(err) => ("failed", None, None, Some(err)),
    }
}

fn print_assembled(results: &[Assembled], probed: usize, json: bool) {
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
const UNIT_DIR: &str = "/etc/systemd/system";
/// The unit's file name.
const UNIT_NAME: &str = "ublkdm-assemble.service";
/// The unit as shipped in the repository.
const UNIT_TEXT: &str = include_str!("../scripts/systemd/ublkdm-assemble.service");
/// The binary the shipped unit names; `install-units` puts its own path there.
const UNIT_BINARY: &str = "/usr/local/sbin/ublkdm";

/// The unit with ExecStart pointing at `exe`.
fn unit_text(exe: &std::path::Path) -> String {
    UNIT_TEXT.replace(UNIT_BINARY, &exe.to_string_lossy())
}

fn install_units(prefix: Option<PathBuf>) -> Result<()> {
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

/// Prints a warning for every leg a mirror's daemon started without (and every leg given
/// that is not a member), from its status.
fn warn_degraded(path: &std::path::Path) {
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
fn mirror_spec(args: MirrorArgs) -> Result<TargetSpec> {
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

/// Sends a mirror command to the device's daemon and prints its answer.
fn mirror_command(command: MirrorCommand) -> Result<()> {
    init_cli_logging();
    let (id, name, args) = match command {
        MirrorCommand::FailLeg { id, slot } => {
            (id, "fail-leg", serde_json::json!({ "slot": slot }))
        }
        MirrorCommand::RemoveLeg { id, slot } => {
            (id, "remove-leg", serde_json::json!({ "slot": slot }))
        }
        MirrorCommand::AddLeg { id, device, force } => {
            let device = absolute(device)?;
            (
                id,
                "add-leg",
                serde_json::json!({ "device": device, "force": force }),
            )
        }
        MirrorCommand::ReplaceLeg {
            id,
            slot,
            device,
            force,
        } => {
            let device = absolute(device)?;
            let args = serde_json::json!({ "slot": slot, "device": device, "force": force });
            (id, "replace-leg", args)
        }
        MirrorCommand::Scrub { id, repair } => {
            (id, "scrub", serde_json::json!({ "repair": repair }))
        }
    };
    let info = ublk::query(id)?;
    if !matches!(info.spec, Some(TargetSpec::Mirror { .. })) {
        return Err(Error::invalid(format!(
            "device {id} is not a mirror ({})",
            describe(info.spec.as_ref())
        )));
    }
    let command = Command::Target {
        name: name.to_owned(),
        args,
    };
    let reply = control::request(id, command)?;
    println!("{}", serde_json::to_string(&reply).expect("json"));
    Ok(())
}

/// Sends a snapshot command to the origin's daemon and prints its answer.
fn snapshot_command(command: SnapshotCommand) -> Result<()> {
    init_cli_logging();
    let (id, name, args) = match command {
        SnapshotCommand::Create { id, name } => {
            (id, "snapshot-create", serde_json::json!({ "name": name }))
        }
        SnapshotCommand::List { id, json } => return snapshot_list(id, json),
        SnapshotCommand::Delete { id, name } => {
            (id, "snapshot-delete", serde_json::json!({ "name": name }))
        }
        SnapshotCommand::Merge { id, name } => (id, "merge", serde_json::json!({ "name": name })),
    };
    require_origin(id)?;
    let command = Command::Target {
        name: name.to_owned(),
        args,
    };
    let reply = control::request(id, command)?;
    match name {
        "snapshot-create" => println!("{}", reply["device"].as_str().unwrap_or("-")),
        "snapshot-delete" => println!("deleted snapshot {}", text(&reply["deleted"])),
        _ => println!(
            "merging snapshot {} into device {id}: {} chunks; follow with 'ublkdm status {id} \
             --watch'",
            text(&reply["merging"]),
            reply["total"]
        ),
    }
    Ok(())
}

/// One element of a status list: `name: key value, ...` for a named object.
fn list_item(item: &serde_json::Value) -> String {
    let Some(fields) = item.as_object() else {
        return text(item);
    };
    let rest: Vec<_> = fields
        .iter()
        .filter(|(key, _)| *key != "name")
        .map(|(key, value)| format!("{key} {}", text(value)))
        .collect();
    match fields.get("name") {
        Some(name) => format!("{}: {}", text(name), rest.join(", ")),
        None => rest.join(", "),
    }
}

/// A JSON string without its quotes (anything else as JSON).
fn text(value: &serde_json::Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

/// Fails unless device `id` is a snapshot origin (pointing a snapshot's id at its origin).
fn require_origin(id: u32) -> Result<()> {
    let info = ublk::query(id)?;
    match info.spec.as_ref() {
        Some(TargetSpec::Origin { .. }) => Ok(()),
        Some(TargetSpec::Child { parent, name, .. }) => Err(Error::invalid(format!(
            "device {id} is snapshot '{name}'; give its origin, device {parent}"
        ))),
        other => Err(Error::invalid(format!(
            "device {id} is not a snapshot origin ({})",
            describe(other)
        ))),
    }
}

/// The snapshots of origin `id` with the devices serving them.
fn snapshot_rows(id: u32) -> Result<Vec<serde_json::Value>> {
    require_origin(id)?;
    let status = control::request(id, Command::Status)?;
    let children = status["children"].as_array().cloned().unwrap_or_default();
    let snapshots = status["target"]["status"]["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(snapshots
        .into_iter()
        .map(|mut snap| {
            let child = children.iter().find(|c| c["name"] == snap["name"]);
            snap["id"] = child.map_or(serde_json::Value::Null, |c| c["id"].clone());
            snap["device"] = child.map_or(serde_json::Value::Null, |c| c["device"].clone());
            snap
        })
        .collect())
}

fn snapshot_list(id: u32, json: bool) -> Result<()> {
    let rows = snapshot_rows(id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(());
    }
    println!(
        "{:<20} {:<9} {:<13} {:>10}  REASON",
        "NAME", "STATE", "DEVICE", "EXCEPTIONS"
    );
    for row in &rows {
        println!(
            "{:<20} {:<9} {:<13} {:>10}  {}",
            row["name"].as_str().unwrap_or("?"),
            row["state"].as_str().unwrap_or("?"),
            row["device"].as_str().unwrap_or("-"),
            row["exceptions"],
            row["reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `path` made absolute (the daemon runs in `/`, and `recover` may run from anywhere).
fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path)
        .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))
}

// ---------------------------------------------------------------------------------------------
// list / status

fn list(json: bool) -> Result<()> {
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
            describe(d.spec.as_ref())
        );
    }
    Ok(())
}

fn status(id: u32, json: bool) -> Result<()> {
    init_cli_logging();
    let info = ublk::query(id)?;
    let alive = daemon::process_alive(info.daemon_pid);
    let reply = alive.then(|| match &info.spec {
        Some(TargetSpec::Child { parent, kind, name }) => {
            control::request(*parent, Command::Status)
                .map(|group| child_status(&info, &group, kind, name))
        }
        _ => control::request(id, Command::Status),
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
    print_status(&info, alive, reply.as_ref());
    Ok(())
}

/// A child's share of its parent daemon's status, shaped like a daemon status of its own.
fn child_status(
    info: &DevInfo,
    group: &serde_json::Value,
    kind: &str,
    name: &str,
) -> serde_json::Value {
    let named = |list: &serde_json::Value| {
        list.as_array()
            .and_then(|items| items.iter().find(|item| item["name"] == name).cloned())
            .unwrap_or(serde_json::Value::Null)
    };
    let child = named(&group["children"]);
    let target = match named(&group["target"]["status"]["snapshots"]) {
        serde_json::Value::Null => serde_json::json!({ "name": name, "state": "deleted" }),
        found => found,
    };
    serde_json::json!({
        "device": info,
        "daemon": group["daemon"],
        "target": { "kind": kind, "status": target },
        "io": child["io"],
    })
}

fn device_json(info: &DevInfo) -> serde_json::Value {
    let mut value = serde_json::to_value(info).expect("json");
    value["daemon_alive"] = daemon::process_alive(info.daemon_pid).into();
    value
}

fn print_status(info: &DevInfo, alive: bool, reply: Option<&Result<serde_json::Value>>) {
    println!(
        "{} (ublk device {}): {}",
        info.block_device.display(),
        info.id,
        info.state
    );
    if alive {
        let daemon_id = match &info.spec {
            Some(TargetSpec::Child { parent, .. }) => *parent,
            _ => info.id,
        };
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
    println!("  target:  {}", describe(info.spec.as_ref()));
    match reply {
        Some(Ok(status)) => print_daemon_status(status),
        Some(Err(err)) => println!("  (no answer from the daemon: {})", err.chain().join(": ")),
        None => {}
    }
}

fn print_daemon_status(status: &serde_json::Value) {
    if let Some(fields) = status["target"]["status"].as_object() {
        for (key, value) in fields {
            match value {
                serde_json::Value::Array(items) => {
                    println!("    {key}: {}", items.len());
                    items
                        .iter()
                        .for_each(|item| println!("      {}", list_item(item)));
                }
                _ => println!("    {key}: {}", text(value)),
            }
        }
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
    println!("  io flusher threads: {}", io["io_flusher"]);
}

fn daemon_column(pid: i32) -> String {
    if daemon::process_alive(pid) {
        pid.to_string()
    } else {
        format!("{pid} (dead)")
    }
}

pub(crate) fn describe(spec: Option<&TargetSpec>) -> String {
    match spec {
        Some(TargetSpec::Linear { device }) => format!("linear {}", device.display()),
        Some(TargetSpec::Mirror { legs, uuid, .. }) => {
            let legs: Vec<_> = legs.iter().map(|l| l.display().to_string()).collect();
            match uuid {
                Some(uuid) => format!("mirror {} ({uuid})", legs.join(" ")),
                None => format!("mirror {}", legs.join(" ")),
            }
        }
        Some(TargetSpec::Origin { device, cow, .. }) => {
            format!("snapshot-origin {} cow {}", device.display(), cow.display())
        }
        Some(TargetSpec::Child { parent, kind, name }) => {
            format!("{kind} '{name}' of device {parent}")
        }
        None => "-".to_owned(),
    }
}

/// `bytes` in the largest binary unit that keeps it at or above 1.
fn human_bytes(bytes: u64) -> String {
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

// ---------------------------------------------------------------------------------------------
// del

fn del(id: Option<u32>, all: bool) -> Result<()> {
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
fn parents_first(mut ids: Vec<u32>) -> Vec<u32> {
    let is_child =
        |id: &u32| ublk::query(*id).is_ok_and(|i| matches!(i.spec, Some(TargetSpec::Child { .. })));
    ids.sort_by_key(|id| (is_child(id), *id));
    ids
}

/// Deletes one device and its children: through its daemon if it runs (socket, then SIGTERM,
/// then SIGKILL), then on the driver directly. A child goes only with its parent, unless the
/// parent is gone. Every step is bounded.
fn del_one(id: u32) -> Result<()> {
    let info = ublk::query(id)?;
    if let Some(TargetSpec::Child { parent, kind, name }) = &info.spec {
        if ublk::device_exists(*parent) {
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

fn del_parent(info: &DevInfo) -> Result<()> {
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
fn remove_device(id: u32) -> Result<()> {
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
fn stop_daemon(id: u32, pid: i32) -> bool {
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
fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ids_parse_in_every_form() {
        assert_eq!(parse_id("3"), Ok(3));
        assert_eq!(parse_id("ublkb3"), Ok(3));
        assert_eq!(parse_id("/dev/ublkb12"), Ok(12));
        assert!(parse_id("/dev/vda").is_err());
        assert!(parse_id("4294967295").is_err());
    }

    #[test]
    fn add_takes_its_options_after_the_device() {
        let cli = Cli::try_parse_from([
            "ublkdm",
            "add",
            "linear",
            "/dev/vda",
            "--queues",
            "4",
            "--foreground",
        ])
        .expect("parse");
        let CliCommand::Add {
            target: AddTarget::Linear { device, options },
        } = cli.command
        else {
            panic!("not add")
        };
        assert_eq!(device, PathBuf::from("/dev/vda"));
        assert_eq!(
            (options.queues, options.depth, options.foreground),
            (4, ublk::DEFAULT_DEPTH, true)
        );
        assert!(Cli::try_parse_from(["ublkdm", "add", "linear", "/dev/vda", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["ublkdm", "del"]).is_err());
        assert!(Cli::try_parse_from(["ublkdm", "del", "1", "--all"]).is_err());
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_of_at_least_4k() {
        assert_eq!(parse_chunk_size("16K"), Ok(16384));
        assert!(parse_chunk_size("12K").is_err());
        assert!(parse_chunk_size("2K").is_err());
        let cli = Cli::try_parse_from(["ublkdm", "add", "origin", "/dev/vda", "--cow", "/dev/vdb"])
            .expect("parse");
        assert!(matches!(
            cli.command,
            CliCommand::Add {
                target: AddTarget::Origin {
                    chunk_size: None,
                    ..
                }
            }
        ));
        assert!(Cli::try_parse_from(["ublkdm", "add", "origin", "/dev/vda"]).is_err());
    }

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

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100), "100 B");
    }
}
