//! The snapshot origin's kind: its spec (persisted for `recover`), its `add origin` arguments,
//! its `ublkdm snapshot CMD` tree, run through the origin's daemon, and its part of `ublkdm
//! status` (made in `report.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, FromArgMatches, Subcommand};

use super::commands::SnapshotCommand;
use super::report;
use crate::cli::{absolute, clap_error, parse_pow2_size, text};
use crate::control::{self, Command};
use crate::error::{Error, Result};
use crate::registry::{Progress, Registry, TargetKind};
use crate::target::{Target, TargetSpec};
use crate::ublk;

/// The kind's name (in specs and `add origin`).
pub const NAME: &str = "origin";
/// The name of its command tree, `ublkdm snapshot CMD`.
pub const COMMANDS: &str = "snapshot";

/// A snapshot origin with its COW store: the store is created on a blank COW device and
/// reassembled from one that holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OriginSpec {
    pub device: PathBuf,
    pub cow: PathBuf,
    /// Chunk size in sectors for a new store; 0 picks the default (16 KiB).
    #[serde(default)]
    pub chunk_size_sectors: u64,
    /// Create a store on a COW device that carries foreign metadata.
    #[serde(default)]
    pub force: bool,
    /// The snapshots served as devices, by name (the daemon keeps it up to date). Absent
    /// from a spec stored by older code, which served every snapshot: then every one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<Vec<String>>,
}

impl From<OriginSpec> for TargetSpec {
    fn from(spec: OriginSpec) -> TargetSpec {
        TargetSpec::new(NAME, &spec)
    }
}

/// `ublkdm add origin`.
#[derive(Debug, Args)]
pub struct AddOrigin {
    /// The origin's block device (or file); every write to it must go through ublkdm.
    pub device: PathBuf,
    /// The COW store: a blank device gets a new store, one holding a store is reopened.
    #[arg(long, value_name = "DEV")]
    pub cow: PathBuf,
    /// Chunk size of a new store: the unit of copy-on-write (a power of two, at least 4K).
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
    pub chunk_size: Option<u64>,
    /// Create a store on a COW device that carries a file system or other metadata (it is
    /// overwritten).
    #[arg(long)]
    pub force: bool,
}

/// A chunk size in bytes: a power of two, at least 4 KiB.
pub fn parse_chunk_size(text: &str) -> std::result::Result<u64, String> {
    parse_pow2_size("chunk size", text)
}

/// The snapshot origin's [`TargetKind`].
pub struct OriginKind;

impl TargetKind for OriginKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn add_command(&self) -> clap::Command {
        AddOrigin::augment_args(clap::Command::new(NAME).about(
            "A snapshot origin: DEVICE served with copy-on-write snapshots kept on the COW \
             device. Running the same command again reassembles the origin and all of its \
             snapshots.",
        ))
    }

    fn add_spec(&self, args: &clap::ArgMatches) -> Result<TargetSpec> {
        let args = AddOrigin::from_arg_matches(args).map_err(clap_error)?;
        Ok(OriginSpec {
            device: absolute(args.device)?,
            cow: absolute(args.cow)?,
            chunk_size_sectors: args
                .chunk_size
                .map_or(0, |b| b >> crate::units::SECTOR_SHIFT),
            force: args.force,
            // A new origin, and one reassembled by `add origin` (after a reboot or `del`),
            // serves no snapshot until `snapshot activate`.
            active: Some(Vec::new()),
        }
        .into())
    }

    fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>> {
        let spec: OriginSpec = spec.parse()?;
        Ok(super::open_group(&spec)?.origin_serving(spec.active))
    }

    fn describe(&self, spec: &TargetSpec) -> String {
        match spec.parse::<OriginSpec>() {
            Ok(spec) => format!(
                "snapshot-origin {} cow {}",
                spec.device.display(),
                spec.cow.display()
            ),
            Err(_) => "snapshot-origin (unreadable spec)".to_owned(),
        }
    }

    fn commands(&self) -> Option<clap::Command> {
        // The about after the subcommands: they would set the enum's doc as the about.
        Some(
            SnapshotCommand::augment_subcommands(clap::Command::new(COMMANDS)).about(
                "Snapshots of an origin: create (in metadata), activate and deactivate (serve \
                 one as a device or stop it), list, delete, merge (roll the origin back).",
            ),
        )
    }

    fn run_command(&self, registry: &Registry, args: &clap::ArgMatches) -> Result<()> {
        let command = SnapshotCommand::from_arg_matches(args).map_err(clap_error)?;
        run(registry, command)
    }

    fn child_status(&self, group: &serde_json::Value, name: &str) -> serde_json::Value {
        group["snapshots"]
            .as_array()
            .and_then(|items| items.iter().find(|item| item["name"] == name).cloned())
            .unwrap_or_else(|| serde_json::json!({ "name": name, "state": "deleted" }))
    }

    fn status_lines(&self, status: &serde_json::Value) -> Vec<String> {
        super::report::status_lines(status)
    }

    fn progress(&self, status: &serde_json::Value) -> Vec<Progress> {
        merge_progress(status).into_iter().collect()
    }
}

/// The merge that an origin status shows running.
fn merge_progress(status: &serde_json::Value) -> Option<Progress> {
    let merge = &status["merge"];
    (merge["active"].as_bool() == Some(true)).then(|| Progress {
        label: "merge",
        unit: "chunks",
        done: merge["done"].as_u64().unwrap_or(0),
        total: merge["total"].as_u64().unwrap_or(0),
        detail: String::new(),
    })
}

/// Sends a snapshot command to the origin's daemon and prints its answer: a line a person
/// reads (`create` prints only the name, or the device when it activates, and `activate` the
/// device, for scripts), or the reply with `--json`.
fn run(registry: &Registry, command: SnapshotCommand) -> Result<()> {
    let (id, json) = match &command {
        SnapshotCommand::List { id, json } => return list(registry, *id, *json),
        SnapshotCommand::Create { id, json, .. }
        | SnapshotCommand::Activate { id, json, .. }
        | SnapshotCommand::Deactivate { id, json, .. }
        | SnapshotCommand::Delete { id, json, .. }
        | SnapshotCommand::Merge { id, json, .. } => (*id, *json),
        SnapshotCommand::Status {} => unreachable!("not a CLI command"),
    };
    // The device a deactivated, deleted or merged snapshot had: it is gone once the command
    // ran.
    let released = match command.releases() {
        Some(name) if !json => device_of(registry, id, name)?,
        _ => {
            require_origin(registry, id)?;
            None
        }
    };
    let reply = control::request(id, command.to_wire())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply).expect("json"));
        return Ok(());
    }
    println!("{}", reply_line(&command, &reply, released.as_deref(), id));
    Ok(())
}

/// The line a command prints from the daemon's `reply` (`device`: the one the snapshot had
/// before a command that releases it).
fn reply_line(
    command: &SnapshotCommand,
    reply: &serde_json::Value,
    device: Option<&str>,
    id: u32,
) -> String {
    let served = || reply["device"].as_str().unwrap_or("-").to_owned();
    match command {
        SnapshotCommand::Create {
            activate: false, ..
        } => text(&reply["name"]),
        SnapshotCommand::Create { .. } | SnapshotCommand::Activate { .. } => served(),
        SnapshotCommand::Deactivate { .. } => {
            report::deactivated_line(&text(&reply["name"]), device, id)
        }
        SnapshotCommand::Delete { .. } => {
            report::deleted_line(&text(&reply["deleted"]), device, id)
        }
        _ => report::merging_line(reply, device, id),
    }
}

/// The device serving snapshot `name` of origin `id`, if one does (fails unless `id` is an
/// origin).
fn device_of(registry: &Registry, id: u32, name: &str) -> Result<Option<String>> {
    Ok(rows(registry, id)?
        .into_iter()
        .find(|row| row["name"] == name)
        .and_then(|row| row["device"].as_str().map(str::to_owned)))
}

/// Fails unless device `id` is a snapshot origin (pointing a snapshot's id at its origin).
fn require_origin(registry: &Registry, id: u32) -> Result<()> {
    let info = ublk::query(id)?;
    match info.spec.as_ref() {
        Some(spec) if spec.kind() == NAME => Ok(()),
        Some(spec) if spec.as_child().is_some() => {
            let child = spec.as_child().expect("checked");
            Err(Error::invalid(format!(
                "device {id} is snapshot '{}'; give its origin, device {}",
                child.name, child.parent
            )))
        }
        other => Err(Error::invalid(format!(
            "device {id} is not a snapshot origin ({})",
            registry.describe(other)
        ))),
    }
}

/// The snapshots of origin `id` with the devices serving them.
fn rows(registry: &Registry, id: u32) -> Result<Vec<serde_json::Value>> {
    require_origin(registry, id)?;
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

fn list(registry: &Registry, id: u32, json: bool) -> Result<()> {
    let rows = rows(registry, id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(());
    }
    for line in list_lines(&rows) {
        println!("{line}");
    }
    Ok(())
}

/// `snapshot list`: a row per snapshot; an inactive one has no device (`-`), an active one
/// whose device is not up (it failed to start) shows `(none)`.
fn list_lines(rows: &[serde_json::Value]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<20} {:<9} {:<8} {:<13} {:>10}  REASON",
        "NAME", "STATE", "ACTIVE", "DEVICE", "EXCEPTIONS"
    )];
    for row in rows {
        let active = row["active"].as_bool();
        let device = match (row["device"].as_str(), active) {
            (Some(device), _) => device,
            (None, Some(true)) => "(none)",
            (None, _) => "-",
        };
        let line = format!(
            "{:<20} {:<9} {:<8} {:<13} {:>10}  {}",
            row["name"].as_str().unwrap_or("?"),
            row["state"].as_str().unwrap_or("?"),
            active.map_or("?", |a| if a { "yes" } else { "no" }),
            device,
            row["exceptions"].to_string(),
            row["reason"].as_str().unwrap_or("")
        );
        lines.push(line.trim_end().to_owned());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_merge_progress() {
        let status = json!({ "merge": { "active": true, "done": 4, "total": 9 } });
        let merge = merge_progress(&status).expect("a merge runs");
        assert_eq!((merge.label, merge.done, merge.total), ("merge", 4, 9));
        assert!(merge_progress(&json!({ "merge": { "active": false } })).is_none());
        assert!(merge_progress(&json!({})).is_none());
    }

    /// A daemon status as `ublkdm status` gets it: the origin's target calls itself
    /// `snapshot-origin`, its kind is `origin` (the spec's `target`); the registry must still
    /// find the kind, for the report and for `status --watch`.
    #[test]
    fn the_registry_finds_the_origin_from_its_status() {
        let registry = Registry::new().with(super::super::kind());
        let status = json!({
            "spec": { "target": NAME, "device": "/dev/vdb", "cow": "/dev/vdc" },
            "target": {
                "kind": "snapshot-origin",
                "status": {
                    "cow": { "chunks": 10, "used": 4, "free": 6 },
                    "chunk_sectors": 32,
                    "snapshots": [],
                    "merge": { "active": true, "snapshot": "s1", "done": 1, "total": 4 },
                },
            },
        });
        let lines = registry.status_lines(&status);
        assert!(
            lines[0].starts_with("store:     4 of 10 chunks used"),
            "{lines:?}"
        );
        let work = registry.progress(&status);
        assert_eq!(work.len(), 1, "the merge is followed");
    }

    /// What `snapshot create|activate|deactivate` print: the name of a snapshot made without a
    /// device, else the device, for scripts.
    #[test]
    fn activation_lines() {
        let create = |activate| SnapshotCommand::Create {
            id: 0,
            name: None,
            activate,
            json: false,
        };
        let made = json!({ "name": "s1", "active": false });
        assert_eq!(reply_line(&create(false), &made, None, 0), "s1");
        let served = json!({ "name": "s1", "active": true, "id": 3, "device": "/dev/ublkb3" });
        assert_eq!(reply_line(&create(true), &served, None, 0), "/dev/ublkb3");
        let activate = SnapshotCommand::Activate {
            id: 0,
            name: "s1".into(),
            json: false,
        };
        assert_eq!(reply_line(&activate, &served, None, 0), "/dev/ublkb3");
        let deactivate = SnapshotCommand::Deactivate {
            id: 0,
            name: "s1".into(),
            json: false,
        };
        assert_eq!(
            reply_line(&deactivate, &made, Some("/dev/ublkb3"), 0),
            "snapshot s1 (/dev/ublkb3) deactivated on origin 0; the snapshot is kept"
        );
        assert_eq!(
            reply_line(&deactivate, &made, None, 2),
            "snapshot s1 deactivated on origin 2; the snapshot is kept"
        );
    }

    #[test]
    fn the_list_shows_which_snapshots_are_active() {
        let rows = [
            json!({ "name": "s1", "state": "valid", "active": true, "device": "/dev/ublkb3",
                    "exceptions": 4 }),
            json!({ "name": "s2", "state": "valid", "active": false, "device": null,
                    "exceptions": 0 }),
            json!({ "name": "s3", "state": "invalid", "active": true, "device": null,
                    "exceptions": 0, "reason": "the COW store overflowed" }),
        ];
        assert_eq!(
            list_lines(&rows),
            [
                "NAME                 STATE     ACTIVE   DEVICE        EXCEPTIONS  REASON",
                "s1                   valid     yes      /dev/ublkb3            4",
                "s2                   valid     no       -                      0",
                "s3                   invalid   yes      (none)                 0  the COW store \
                 overflowed",
            ]
        );
    }
}
