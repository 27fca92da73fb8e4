//! The mirror kind: its spec (persisted for `recover`), its `add mirror` arguments and its
//! `ublkdm mirror CMD` tree, run through the device's daemon (each command prints one line
//! worded from its reply and the mirror's status, or the reply itself with `--json`), and its
//! part of `ublkdm status` (`report.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, FromArgMatches, Subcommand};

use super::behind::LegOptions;
use super::commands::MirrorCommand;
use crate::cli::{clap_error, parse_pow2_size, text};
use crate::control::{self, Command};
use crate::copy::ThrottleConfig;
use crate::error::{Error, Result};
use crate::registry::{Progress, Registry, ScanReport, TargetKind};
use crate::target::{Target, TargetSpec};
use crate::ublk;

/// The kind's name (in specs, `add mirror` and `ublkdm mirror`).
pub const NAME: &str = "mirror";

/// An N-way mirror: created on blank legs, assembled from legs that already hold it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MirrorSpec {
    /// The mirror's identity, once it exists: legs are found by the superblocks that carry
    /// it, wherever their paths now point (`legs` are then only hints). Absent in specs
    /// stored before identities were recorded, and in a new `add mirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
    /// The legs' paths: what `add` was given, then the legs the mirror has now.
    pub legs: Vec<PathBuf>,
    /// Region size in sectors; 0 picks the default.
    #[serde(default)]
    pub region_size_sectors: u64,
    /// Skip the initial copy of a new mirror.
    #[serde(default)]
    pub nosync: bool,
    /// Overwrite legs that carry other metadata.
    #[serde(default)]
    pub force: bool,
    /// Resync bandwidth: the floor kept under foreground I/O and the ceiling when idle.
    #[serde(default)]
    pub resync_throttle: ThrottleConfig,
    /// Write-mostly and write-behind legs, by slot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub leg_options: BTreeMap<usize, LegOptions>,
}

impl From<MirrorSpec> for TargetSpec {
    fn from(spec: MirrorSpec) -> TargetSpec {
        TargetSpec::new(NAME, &spec)
    }
}

/// `ublkdm add mirror`.
#[derive(Debug, Args)]
pub struct AddMirror {
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
    /// Options of the leg in SLOT (the place of its --leg, from 0): write-mostly (read only
    /// when no other leg can be), write-behind=N (write-mostly, and a write is acknowledged
    /// with up to N writes still on their way to this leg). Repeat for several legs.
    #[arg(long = "leg-options", value_name = "SLOT=OPTIONS", value_parser = LegOptions::parse_for_slot)]
    pub leg_options: Vec<(usize, LegOptions)>,
}

/// A region size in bytes: a power of two, at least 4 KiB.
fn parse_region_size(text: &str) -> std::result::Result<u64, String> {
    parse_pow2_size("region size", text)
}

impl AddMirror {
    /// The spec: local legs made absolute, remote ones checked, and every leg checked for
    /// repeats (the same device under two names included), the region size in sectors. A
    /// leg that does not exist is kept: the mirror may assemble degraded without it (a
    /// create refuses it).
    pub fn spec(self) -> Result<MirrorSpec> {
        let mut legs = Vec::with_capacity(self.legs.len());
        let mut seen = Vec::new();
        for leg in self.legs {
            let leg = super::leg_path(leg)?;
            // A remote leg is its URL; a local one the file it resolves to.
            let real = if super::is_remote(&leg) {
                leg.clone()
            } else if let Ok(real) = std::fs::canonicalize(&leg) {
                real
            } else {
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
        let resync_throttle = ThrottleConfig {
            floor_mbps: self.resync_min_mbps,
            ceiling_mbps: self.resync_max_mbps,
        };
        resync_throttle.validate().map_err(Error::invalid)?;
        let leg_options = leg_options_of(&self.leg_options, legs.len())?;
        Ok(MirrorSpec {
            uuid: None,
            legs,
            region_size_sectors: self.region_size >> crate::units::SECTOR_SHIFT,
            nosync: self.nosync,
            force: self.force,
            resync_throttle,
            leg_options,
        })
    }
}

/// The `--leg-options` as a map by slot: each slot names a given leg, once.
fn leg_options_of(
    given: &[(usize, LegOptions)],
    legs: usize,
) -> Result<BTreeMap<usize, LegOptions>> {
    let mut map = BTreeMap::new();
    for &(slot, options) in given {
        if slot >= legs {
            return Err(Error::invalid(format!(
                "--leg-options {slot}=...: there are {legs} legs, slots 0 to {}",
                legs - 1
            )));
        }
        if map.insert(slot, options).is_some() {
            return Err(Error::invalid(format!(
                "--leg-options: slot {slot} is given twice"
            )));
        }
    }
    Ok(map)
}

/// The mirror's [`TargetKind`].
pub struct MirrorKind;

impl TargetKind for MirrorKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn add_command(&self) -> clap::Command {
        AddMirror::augment_args(clap::Command::new(NAME).about(
            "An N-way mirror (RAID1) with a persistent write-intent bitmap; running the same \
             command again assembles an existing mirror from its legs.",
        ))
    }

    fn add_spec(&self, args: &clap::ArgMatches) -> Result<TargetSpec> {
        let args = AddMirror::from_arg_matches(args).map_err(clap_error)?;
        Ok(args.spec()?.into())
    }

    fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>> {
        super::open_mirror(&spec.parse()?)
    }

    fn describe(&self, spec: &TargetSpec) -> String {
        let Ok(spec) = spec.parse::<MirrorSpec>() else {
            return format!("{NAME} (unreadable spec)");
        };
        let legs: Vec<_> = spec.legs.iter().map(|l| l.display().to_string()).collect();
        match spec.uuid {
            Some(uuid) => format!("{NAME} {} ({uuid})", legs.join(" ")),
            None => format!("{NAME} {}", legs.join(" ")),
        }
    }

    fn identity(&self, spec: &TargetSpec) -> Option<String> {
        spec.parse::<MirrorSpec>().ok()?.uuid.map(|u| u.to_string())
    }

    fn commands(&self) -> Option<clap::Command> {
        Some(MirrorCommand::augment_subcommands(
            clap::Command::new(NAME).about("Mirror commands: leg failure and replacement, scrub."),
        ))
    }

    fn run_command(&self, registry: &Registry, args: &clap::ArgMatches) -> Result<()> {
        let mut command = MirrorCommand::from_arg_matches(args).map_err(clap_error)?;
        command.make_paths_absolute()?;
        let id = command.device_id();
        let info = ublk::query(id)?;
        if info.spec.as_ref().map(TargetSpec::kind) != Some(NAME) {
            return Err(Error::invalid(format!(
                "device {id} is not a mirror ({})",
                registry.describe(info.spec.as_ref())
            )));
        }
        if command.wants_json() {
            let reply = control::request(id, command.to_wire())?;
            println!("{}", serde_json::to_string(&reply).expect("json"));
            return Ok(());
        }
        let before = if command.needs_status_before() {
            target_status(id)
        } else {
            serde_json::Value::Null
        };
        let reply = control::request(id, command.to_wire())?;
        let after = target_status(id);
        println!(
            "{}",
            super::report::command_line(&command, &reply, &before, &after)
        );
        Ok(())
    }

    fn status_lines(&self, status: &serde_json::Value) -> Vec<String> {
        super::report::status_lines(status)
    }

    /// Prints a warning for every leg the daemon started without (and every leg given that
    /// is not a member), from its status.
    fn after_start(&self, id: u32) {
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

    fn scan(&self) -> Option<Result<ScanReport>> {
        Some(super::discover::scan())
    }

    fn progress(&self, status: &serde_json::Value) -> Vec<Progress> {
        background_work(status)
    }
}

/// The target status of mirror `id`, to word a command's line; `Null` if the daemon does not
/// answer (the line then says less, and the command has taken effect all the same).
fn target_status(id: u32) -> serde_json::Value {
    control::request(id, Command::Status)
        .map(|status| status["target"]["status"].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// The resync and the scrub that a mirror status shows running.
fn background_work(status: &serde_json::Value) -> Vec<Progress> {
    let mut work = Vec::new();
    let resync = &status["resync"];
    if resync["active"].as_bool() == Some(true) {
        let rate = resync["rate_bytes_per_sec"].as_u64().unwrap_or(0);
        let eta = resync["eta_seconds"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
        work.push(Progress {
            label: "resync",
            unit: "regions",
            done: resync["regions_done"].as_u64().unwrap_or(0),
            total: resync["regions_total"].as_u64().unwrap_or(0),
            detail: format!("{:.1} MB/s, eta {eta}", rate as f64 / 1e6),
        });
    }
    let scrub = &status["scrub"];
    if scrub.is_object() {
        work.push(Progress {
            label: "scrub",
            unit: "regions",
            done: scrub["next_region"].as_u64().unwrap_or(0),
            total: scrub["total"].as_u64().unwrap_or(0),
            detail: format!(
                "{}, {} mismatches",
                scrub["mode"].as_str().unwrap_or("check"),
                scrub["mismatches"].as_u64().unwrap_or(0)
            ),
        });
    }
    work
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_resync_and_scrub_progress() {
        let status = json!({
            "resync": { "active": true, "regions_done": 3, "regions_total": 10,
                        "rate_bytes_per_sec": 2_000_000, "eta_seconds": 7 },
            "scrub": { "mode": "repair", "next_region": 5, "total": 10, "mismatches": 1 },
        });
        let work = background_work(&status);
        assert_eq!(work.len(), 2);
        assert_eq!(
            (work[0].label, work[0].done, work[0].total),
            ("resync", 3, 10)
        );
        assert_eq!(work[0].detail, "2.0 MB/s, eta 7s");
        assert_eq!(work[1].detail, "repair, 1 mismatches");
    }

    #[test]
    fn every_command_takes_json_and_does_not_send_it() {
        let tree = MirrorKind.commands().expect("mirror commands");
        for argv in [
            &["mirror", "fail-leg", "0", "1", "--json"][..],
            &["mirror", "remove-leg", "0", "1", "--json"],
            &["mirror", "add-leg", "0", "/dev/vdd", "--json"],
            &["mirror", "replace-leg", "0", "1", "/dev/vdd", "--json"],
            &["mirror", "scrub", "0", "--json"],
        ] {
            let matches = tree.clone().try_get_matches_from(argv).expect("parses");
            let command = MirrorCommand::from_arg_matches(&matches).expect("a command");
            assert!(command.wants_json(), "{argv:?}");
            let Command::Target { args, .. } = command.to_wire() else {
                panic!("a target command")
            };
            assert!(args.get("json").is_none(), "{argv:?} sends {args}");
        }
        let matches = tree
            .try_get_matches_from(["mirror", "fail-leg", "0", "1"])
            .expect("parses");
        let command = MirrorCommand::from_arg_matches(&matches).expect("a command");
        assert!(!command.wants_json());
    }

    #[test]
    fn idle_status_has_no_work() {
        let status = json!({ "resync": { "active": false }, "scrub": null });
        assert!(background_work(&status).is_empty());
    }
}
