//! The command line: parsing (clap) and the core's commands.
//!
//! `ublkdm add`, `list`, `status`, `del`, `recover`, `resize`, `assemble --scan`,
//! `install-units` and `features`.
//! Commands that change a device act through its daemon where one runs (control socket,
//! then signals), and on the driver directly only when the daemon is gone. Every wait is bounded. Output for people goes to
//! stdout, errors to stderr as `error: <line>` plus `  caused by: <line>`s; the exit code is
//! the error's [`ErrorKind::exit_code`] (see docs/exit-codes.md).
//!
//! Files: this one holds the argument tree and the entry point; `add.rs` (add, recover),
//! `status.rs` (list, status), `del.rs`, `resize.rs`, `assemble.rs` (assemble --scan, install-units) and
//! `features.rs` hold one command family each. The targets' own arguments come from the [`Registry`] that
//! `main` passes in: `ublkdm add KIND` and `ublkdm KIND CMD` are each kind's clap arguments,
//! parsed and run by the kind.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::control::{self, Command};
use crate::daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::Registry;
use crate::target::TargetSpec;
use crate::ublk::{self, DevInfo, DevState, DeviceConfig, Start};

mod add;
mod assemble;
mod del;
mod features;
mod resize;
mod status;

use add::{add, recover};
use assemble::{assemble_scan, install_units};
use del::del;
use features::features;
use resize::{parse_resize, resize};
use status::{list, status};

/// A userspace device-mapper served through Linux ublk.
#[derive(Debug, Parser)]
#[command(name = "ublkdm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

/// The core's commands; `add KIND` and the targets' command trees come from the registry.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
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
    /// Grow a live device: to all that its target now holds (a backing device that was
    /// extended; a mirror's legs all replaced by bigger ones), or to SIZE. Needs a kernel that
    /// can resize a live device (UPDATE_SIZE, Linux 6.16+); shrinking is refused.
    Resize {
        /// Device id, ublkbN or /dev/ublkbN.
        #[arg(value_parser = parse_id)]
        id: u32,
        /// The new size (e.g. 2G, 1536M), a whole number of the device's logical blocks;
        /// default: all that the target holds.
        #[arg(value_parser = parse_resize)]
        size: Option<u64>,
        /// Print the daemon's reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the ublk features this kernel offers (GET_FEATURES) and which ublkdm uses.
    Features {
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    /// Serve in copy mode even where zero copy is possible (Linux 6.16+, for a target that never reads the data).
    #[arg(long)]
    pub copy: bool,
}

/// Accepts `N`, `ublkbN` and `/dev/ublkbN`.
pub fn parse_id(text: &str) -> std::result::Result<u32, String> {
    let digits = text.strip_prefix("/dev/").unwrap_or(text);
    let digits = digits.strip_prefix("ublkb").unwrap_or(digits);
    digits
        .parse::<u32>()
        .ok()
        .filter(|&id| i32::try_from(id).is_ok())
        .ok_or_else(|| format!("'{text}' is not a device id (N, ublkbN or /dev/ublkbN)"))
}

/// `text` as bytes, which must be a power of two of at least 4 KiB; `what` names it.
pub fn parse_pow2_size(what: &str, text: &str) -> std::result::Result<u64, String> {
    let bytes = crate::units::parse_size_bytes(text)?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!(
            "{what} '{text}' is not a power of two of at least 4K"
        ));
    }
    Ok(bytes)
}

/// A size that is a power of two (a region, a chunk) in the largest binary unit that keeps it
/// whole, e.g. `512 KiB`, `4 MiB`: the reverse of [`parse_pow2_size`].
pub fn pow2_size_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024 && value % 1024 == 0 && unit + 1 < UNITS.len() {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

/// The whole command tree: the core's commands, `add` with one subcommand per registered
/// kind (its own arguments plus [`AddOptions`]), and each kind's command tree.
pub fn command(registry: &Registry) -> clap::Command {
    let mut add = clap::Command::new("add")
        .about(
            "Create a device served by a new daemon; prints the block device (e.g. /dev/ublkb0).",
        )
        .subcommand_required(true)
        .arg_required_else_help(true);
    for kind in registry.kinds() {
        add = add.subcommand(AddOptions::augment_args(kind.add_command()));
    }
    let mut cli = Cli::command().subcommand(add);
    for tree in registry.kinds().filter_map(|k| k.commands()) {
        cli = cli.subcommand(tree.subcommand_required(true).arg_required_else_help(true));
    }
    cli
}

/// A parse error of clap's, for arguments clap already checked (a bug if it happens).
pub fn clap_error(err: clap::Error) -> Error {
    Error::invalid(err.to_string().trim_end().to_owned())
}

/// Parses the command line, runs it, reports: the process exit code.
pub fn main(registry: &Registry) -> i32 {
    // Rust ignores SIGPIPE, which turns `ublkdm list | head` into a panic; a command line tool
    // should simply end instead.
    // SAFETY: installs the default disposition; no handler code runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let matches = command(registry).get_matches();
    match run(registry, &matches) {
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

/// Runs parsed arguments (of [`command`]).
pub fn run(registry: &Registry, matches: &clap::ArgMatches) -> Result<()> {
    match matches.subcommand() {
        Some(("add", add_args)) => {
            let (name, args) = add_args.subcommand().expect("clap requires a kind");
            let kind = registry
                .find(name)
                .expect("clap knows only registered kinds");
            let spec = kind.add_spec(args)?;
            let options = AddOptions::from_arg_matches(args).map_err(clap_error)?;
            add(registry, spec, options)
        }
        Some((name, args)) if registry.find_commands(name).is_some() => {
            init_cli_logging();
            let kind = registry.find_commands(name).expect("checked");
            kind.run_command(registry, args)
        }
        _ => {
            let cli = Cli::from_arg_matches(matches).map_err(clap_error)?;
            run_core(registry, cli.command)
        }
    }
}

fn run_core(registry: &Registry, command: CliCommand) -> Result<()> {
    match command {
        CliCommand::List { json } => list(registry, json),
        CliCommand::Status { id, json, watch } if watch => {
            debug_assert!(!json);
            crate::watch::watch(registry, id)
        }
        CliCommand::Status { id, json, .. } => status(registry, id, json),
        CliCommand::Del { id, all } => del(id, all),
        CliCommand::Recover { id, foreground } => recover(registry, id, foreground),
        CliCommand::Assemble { scan, json } => {
            debug_assert!(scan, "clap requires --scan");
            assemble_scan(registry, json)
        }
        CliCommand::InstallUnits { prefix } => install_units(prefix),
        CliCommand::Resize { id, size, json } => resize(id, size, json),
        CliCommand::Features { json } => features(json),
    }
}

/// Logging for commands that do not become daemons: warnings only.
pub fn init_cli_logging() {
    let env = env_logger::Env::default().default_filter_or("warn");
    let _ = env_logger::Builder::from_env(env).try_init();
}

/// `path` made absolute (the daemon runs in `/`, and `recover` may run from anywhere).
pub fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path)
        .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))
}

/// A JSON string without its quotes (anything else as JSON).
pub fn text(value: &serde_json::Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_core_commands_parse_without_targets() {
        let registry = Registry::new();
        command(&registry).debug_assert();
        let parse = |args: &[&str]| command(&registry).try_get_matches_from(args);
        assert!(parse(&["ublkdm", "del"]).is_err());
        assert!(parse(&["ublkdm", "del", "1", "--all"]).is_err());
        assert!(parse(&["ublkdm", "add"]).is_err(), "add needs a kind");
        let matches = parse(&["ublkdm", "status", "ublkb3", "--json"]).expect("parse");
        let cli = Cli::from_arg_matches(&matches).expect("core command");
        assert!(matches!(
            cli.command,
            CliCommand::Status {
                id: 3,
                json: true,
                watch: false
            }
        ));
    }
}
