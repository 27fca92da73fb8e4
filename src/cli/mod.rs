//! The command line: parsing (clap derive) and the commands.
//!
//! `ublkdm add`, `list`, `status`, `del`, `recover`, `assemble --scan` and `install-units`. Commands that change a device act
//! through its daemon where one runs (control socket, then signals), and on the driver
//! directly only when the daemon is gone. Every wait is bounded. Output for people goes to
//! stdout, errors to stderr as `error: <line>` plus `  caused by: <line>`s; the exit code is
//! the error's [`ErrorKind::exit_code`] (see docs/exit-codes.md).
//!
//! Files: this one holds the argument tree and the entry point; `add.rs` (add, recover),
//! `status.rs` (list, status), `del.rs`, `assemble.rs` (assemble --scan, install-units) and
//! `target_commands.rs` hold one command family each.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::control::{self, Command};
use crate::daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::target::TargetSpec;
use crate::ublk::{self, DevInfo, DevState, DeviceConfig, Start};

mod add;
mod assemble;
mod del;
mod status;
mod target_commands;

use add::{add, recover};
use assemble::{assemble_scan, install_units};
use del::del;
use status::{describe, list, status};
use target_commands::{mirror_command, snapshot_command};

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
pub(super) fn parse_id(text: &str) -> std::result::Result<u32, String> {
    let digits = text.strip_prefix("/dev/").unwrap_or(text);
    let digits = digits.strip_prefix("ublkb").unwrap_or(digits);
    digits
        .parse::<u32>()
        .ok()
        .filter(|&id| i32::try_from(id).is_ok())
        .ok_or_else(|| format!("'{text}' is not a device id (N, ublkbN or /dev/ublkbN)"))
}

/// A region size in bytes: a power of two, at least 4 KiB.
pub(super) fn parse_region_size(text: &str) -> std::result::Result<u64, String> {
    parse_pow2_size("region size", text)
}

/// A chunk size in bytes: a power of two, at least 4 KiB.
pub(super) fn parse_chunk_size(text: &str) -> std::result::Result<u64, String> {
    parse_pow2_size("chunk size", text)
}

/// `text` as bytes, which must be a power of two of at least 4 KiB; `what` names it.
pub(super) fn parse_pow2_size(what: &str, text: &str) -> std::result::Result<u64, String> {
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
pub(super) fn init_cli_logging() {
    let env = env_logger::Env::default().default_filter_or("warn");
    let _ = env_logger::Builder::from_env(env).try_init();
}

/// `path` made absolute (the daemon runs in `/`, and `recover` may run from anywhere).
pub(super) fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path)
        .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))
}

/// A JSON string without its quotes (anything else as JSON).
pub(super) fn text(value: &serde_json::Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
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
}
