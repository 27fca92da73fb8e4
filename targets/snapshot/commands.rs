//! The group's commands and status report, and the origin's set of active snapshots.
//!
//! [`SnapshotCommand`] is the one schema of every command (clap, control socket, daemon). A
//! command either takes effect (its
//! record is durable when it returns) or fails with a one-line [`Error`] and changes nothing.
//!
//! # Activation
//! A snapshot is made in metadata only; it is served as a device (`/dev/ublkbM`) while it is
//! *active*, as LVM thin snapshots with activation skip are. Which snapshots are active is
//! the origin target's business, not the store's ([`Activation`]): `snapshot-create` with
//! `activate`, `snapshot-activate` and `snapshot-deactivate` change the set, a deleted or
//! merged snapshot leaves it, and the daemon serves the set ([`Target::child_names`]) and
//! stores it in the origin's spec after every command, so that `recover` brings back the
//! same devices. A spec without the set (stored by older code) makes every snapshot active;
//! `add origin` makes none. Deactivating, deleting or merging a snapshot stops its device
//! first (the daemon refuses while it is open: [`Target::command_releases`]).
//!
//! [`Target::child_names`]: crate::target::Target::child_names
//! [`Target::command_releases`]: crate::target::Target::command_releases

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::exceptions::MAX_CREATION;
use super::format::{slot_number, Record, SnapState, MAX_NAME};
use super::state::Store;
use super::Inner;
use crate::cli::parse_id;
use crate::control::Command;
use crate::error::{Error, ErrorKind, Result};

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("cannot {what}"), e)
}

fn state_json(state: SnapState) -> (&'static str, Option<&'static str>) {
    match state {
        SnapState::Valid => ("valid", None),
        SnapState::Invalid(r) => ("invalid", Some(r.text())),
        SnapState::Merging => ("merging", None),
    }
}

/// The origin's runtime commands: one schema for `ublkdm snapshot CMD` (clap), the control
/// socket (`{"name": "snapshot-create", "args": {"name": "nightly"}}`) and the daemon, which
/// parses it once ([`SnapshotCommand::parse`]). `id` and `json` belong to the CLI and are not
/// sent.
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand, serde::Serialize, serde::Deserialize)]
#[serde(tag = "name", content = "args")]
pub enum SnapshotCommand {
    /// Take a snapshot now, in metadata only (no device); prints its name. With --activate
    /// it is also served as a device at once, and the device is printed instead.
    #[command(name = "create")]
    #[serde(rename = "snapshot-create")]
    Create {
        /// The origin's device id.
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        /// The snapshot's name (default snapN).
        #[arg(long)]
        #[serde(default)]
        name: Option<String>,
        /// Serve the snapshot as a device at once (as `snapshot activate` does); prints the
        /// device.
        #[arg(long)]
        #[serde(default, skip_serializing_if = "is_false")]
        activate: bool,
        /// Print the daemon's JSON reply instead of the name or device.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Serve an existing snapshot as a device (/dev/ublkbM); prints the device. A snapshot
    /// already served prints its device.
    #[command(name = "activate")]
    #[serde(rename = "snapshot-activate")]
    Activate {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        name: String,
        /// Print the daemon's JSON reply.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Stop a snapshot's device (it must not be in use) and keep the snapshot.
    #[command(name = "deactivate")]
    #[serde(rename = "snapshot-deactivate")]
    Deactivate {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        name: String,
        /// Print the daemon's JSON reply.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// List the snapshots of an origin.
    #[command(name = "list")]
    #[serde(rename = "snapshot-list")]
    List {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        /// Print JSON.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Delete a snapshot (its device must not be in use).
    #[command(name = "delete")]
    #[serde(rename = "snapshot-delete")]
    Delete {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        name: String,
        /// Print the daemon's JSON reply.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// Roll the origin back to a snapshot, in the background; the origin reads as the snapshot
    /// at once, and the snapshot is gone when the merge ends.
    #[command(name = "merge")]
    #[serde(rename = "merge")]
    Merge {
        #[arg(value_parser = parse_id)]
        #[serde(skip)]
        id: u32,
        name: String,
        /// Print the daemon's JSON reply.
        #[arg(long)]
        #[serde(skip)]
        json: bool,
    },
    /// The status report (on the control socket only).
    #[command(skip)]
    #[serde(rename = "status")]
    Status {},
}

fn is_false(flag: &bool) -> bool {
    !*flag
}

/// Which snapshots the origin serves as devices. That is the origin's business, not the
/// store's: the set is kept in the origin's spec (`OriginSpec::active`), which the daemon
/// stores after every command and `recover` reads back. Names only ever of existing
/// snapshots: a deleted or merged one leaves it, and a created one enters it only when asked.
pub(super) struct Activation {
    /// `None`: every snapshot, whenever made (an origin built without a spec, as the library
    /// and older code had it); the first command through the origin fixes the set.
    names: Mutex<Option<BTreeSet<String>>>,
}

impl Activation {
    /// Every snapshot is active, including those made later (until a command fixes the set).
    pub(super) fn every() -> Activation {
        Activation {
            names: Mutex::new(None),
        }
    }

    /// The snapshots `names` are active (names of no snapshot are dropped at the next command).
    pub(super) fn of<I: IntoIterator<Item = String>>(names: I) -> Activation {
        Activation {
            names: Mutex::new(Some(names.into_iter().collect())),
        }
    }

    fn names(&self) -> MutexGuard<'_, Option<BTreeSet<String>>> {
        self.names.lock().expect("active snapshots")
    }

    /// The snapshots to serve: active and not merging (a merging one's I/O fails until it is
    /// gone), oldest first.
    pub(super) fn served(&self, store: &Store) -> Vec<String> {
        let names = self.names();
        let mut snaps: Vec<_> = store
            .slots
            .iter()
            .flatten()
            .filter(|s| s.state != SnapState::Merging)
            .filter(|s| names.as_ref().is_none_or(|set| set.contains(&s.name)))
            .map(|s| (s.seq, s.name.clone()))
            .collect();
        snaps.sort();
        snaps.into_iter().map(|(_, name)| name).collect()
    }

    /// Fixes the set to the snapshots it names now that exist (every one when it was
    /// `None`), so that a later snapshot of a stale name does not inherit it.
    fn settle(&self, store: &Store) {
        let mut names = self.names();
        let exists = |name: &String| store.find(name).is_some();
        *names = Some(match names.take() {
            None => store
                .slots
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect(),
            Some(set) => set.into_iter().filter(exists).collect(),
        });
    }

    fn set(&self, name: &str, active: bool) {
        let mut names = self.names();
        let set = names.get_or_insert_with(BTreeSet::new);
        if active {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    /// Adds `"active": bool` to each snapshot of an origin status (as [`Inner::status`] made it).
    pub(super) fn annotate(&self, store: &Store, status: &mut Value) {
        let served = self.served(store);
        if let Some(snaps) = status["snapshots"].as_array_mut() {
            for snap in snaps {
                let active = snap["name"]
                    .as_str()
                    .is_some_and(|n| served.iter().any(|s| s == n));
                snap["active"] = active.into();
            }
        }
    }
}

impl SnapshotCommand {
    /// The commands' names on the control socket.
    pub const NAMES: [&'static str; 7] = [
        "snapshot-create",
        "snapshot-activate",
        "snapshot-deactivate",
        "snapshot-delete",
        "snapshot-list",
        "merge",
        "status",
    ];

    /// The command `name` with its JSON arguments, as the control socket carries it.
    pub fn parse(name: &str, args: &Value) -> Result<SnapshotCommand> {
        Command::parse_target("snapshot-origin", &Self::NAMES, name, args)
    }

    /// What the CLI sends to the daemon.
    pub fn to_wire(&self) -> Command {
        Command::target(self)
    }

    /// The snapshot a command deactivates, deletes or merges: its device must be stopped
    /// first.
    pub fn releases(&self) -> Option<&str> {
        match self {
            SnapshotCommand::Deactivate { name, .. }
            | SnapshotCommand::Delete { name, .. }
            | SnapshotCommand::Merge { name, .. } => Some(name),
            _ => None,
        }
    }

    /// How to proceed when a command must not run while the origin's device is open: a merge
    /// makes the origin read as the snapshot at once, which would change the data under a
    /// mounted file system (LVM defers such a merge; we refuse it).
    pub fn needs_closed_origin(&self) -> Option<&'static str> {
        match self {
            SnapshotCommand::Merge { .. } => Some(
                "a merge would change the origin's data under its user; unmount it and close \
                 it everywhere, then merge again",
            ),
            _ => None,
        }
    }
}

impl Inner {
    /// Runs command `name` with its JSON arguments (as the control socket carries them).
    pub(super) async fn command(self: Arc<Self>, name: &str, args: &Value) -> Result<Value> {
        self.run(SnapshotCommand::parse(name, args)?).await
    }

    /// Runs one parsed command on the store (see the module doc). Activation is the origin
    /// target's ([`Inner::run_for_origin`]): here `snapshot-create` makes no device and
    /// `snapshot-activate`/`snapshot-deactivate` are refused.
    pub(super) async fn run(self: Arc<Self>, command: SnapshotCommand) -> Result<Value> {
        match command {
            SnapshotCommand::Status {} => Ok(self.status()),
            SnapshotCommand::List { .. } => Ok(self.status()["snapshots"].clone()),
            SnapshotCommand::Create { name, .. } => {
                let name = name.unwrap_or_else(|| self.default_name());
                self.create(&name).await
            }
            SnapshotCommand::Delete { name, .. } => self.delete(&name).await,
            SnapshotCommand::Merge { name, .. } => self.start_merge(&name).await,
            SnapshotCommand::Activate { .. } | SnapshotCommand::Deactivate { .. } => Err(
                Error::invalid("activation is the origin target's: send it to the origin's device"),
            ),
        }
    }

    /// Runs one parsed command for the origin target: the store's commands, with the
    /// origin's set of active snapshots kept beside them (a snapshot created, deleted or
    /// merged leaves it unless created with `activate`). The daemon serves the active ones
    /// ([`Activation::served`]) once the command returned.
    pub(super) async fn run_for_origin(
        self: Arc<Self>,
        active: &Activation,
        command: SnapshotCommand,
    ) -> Result<Value> {
        active.settle(&self.store());
        match command {
            SnapshotCommand::Activate { name, .. } => {
                self.check_activatable(&name)?;
                active.set(&name, true);
                Ok(json!({ "name": name, "active": true }))
            }
            SnapshotCommand::Deactivate { name, .. } => {
                self.find(&name)?;
                active.set(&name, false);
                Ok(json!({ "name": name, "active": false }))
            }
            SnapshotCommand::Create { name, activate, .. } => {
                let name = name.unwrap_or_else(|| self.default_name());
                let mut reply = self.create(&name).await?;
                active.set(&name, activate);
                reply["active"] = activate.into();
                Ok(reply)
            }
            SnapshotCommand::Delete { ref name, .. } | SnapshotCommand::Merge { ref name, .. } => {
                let name = name.clone();
                let reply = self.run(command).await?;
                active.set(&name, false);
                Ok(reply)
            }
            other => self.run(other).await,
        }
    }

    /// Fails unless snapshot `name` may be served: it exists and is not merging (its I/O
    /// would fail until the merge ends, and then it is gone). An invalid one may: its I/O
    /// fails, as it did before it was deactivated.
    fn check_activatable(&self, name: &str) -> Result<()> {
        let slot = self.find(name)?;
        if self.store().merging() == Some(slot) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "snapshot '{name}' is being merged into the origin; it cannot be activated"
                ),
            ));
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.store()
            .find(name)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no snapshot named '{name}'")))
    }

    /// `snapN`, N the creation number the next snapshot gets (bumped past taken names).
    fn default_name(&self) -> String {
        let store = self.store();
        (store.next_seq..)
            .map(|n| format!("snap{n}"))
            .find(|name| store.find(name).is_none())
            .expect("some name is free")
    }

    async fn create(&self, name: &str) -> Result<Value> {
        if !super::format::valid_name(name) {
            return Err(Error::invalid(format!(
                "a snapshot name is 1 to {MAX_NAME} bytes without control characters"
            )));
        }
        // Drain and hold every request: the snapshot is taken between requests.
        let _gate = self.gate.write().await;
        let (slot, seq) = {
            let store = self.store();
            if store.find(name).is_some() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("a snapshot named '{name}' exists"),
                ));
            }
            if store.merging().is_some() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    "a merge is running; create snapshots after it ends",
                ));
            }
            let slot = store
                .slots
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Busy,
                        format!(
                            "the group already has {} snapshots, as many as its COW store has \
                             room for",
                            store.slots.len()
                        ),
                    )
                })?;
            // The index names creation numbers in 24 bits (a store holding a larger one is
            // refused on open): numbers are never reused, so this is the store's lifetime.
            if store.next_seq >= MAX_CREATION {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the store has used up its {MAX_CREATION} creation numbers: make a new \
                         store to take more snapshots"
                    ),
                ));
            }
            (slot, store.next_seq)
        };
        self.origin
            .flush()
            .await
            .map_err(io_err("flush the origin"))?;
        self.commit(vec![Record::Create {
            slot: slot_number(slot),
            seq,
            state: SnapState::Valid,
            merge_total: 0,
            name: name.to_owned(),
        }])
        .await
        .map_err(io_err("record the snapshot"))?;
        Ok(json!({ "name": name }))
    }

    async fn delete(&self, name: &str) -> Result<Value> {
        let _gate = self.gate.write().await;
        let slot = self.find(name)?;
        if self.store().merging() == Some(slot) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("snapshot '{name}' is being merged"),
            ));
        }
        self.commit(vec![Record::Delete {
            slot: slot_number(slot),
        }])
        .await
        .map_err(io_err("record the deletion"))?;
        Ok(json!({ "deleted": name }))
    }

    async fn start_merge(&self, name: &str) -> Result<Value> {
        let _gate = self.gate.write().await;
        let slot = self.find(name)?;
        let total = {
            let store = self.store();
            if let Some(m) = store.merging() {
                let other = &store.snap(m).expect("merging").name;
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("snapshot '{other}' is being merged already"),
                ));
            }
            let snap = store.snap(slot).expect("found");
            if let SnapState::Invalid(r) = snap.state {
                return Err(Error::invalid(format!(
                    "snapshot '{name}' is invalid ({}); it cannot be merged",
                    r.text()
                )));
            }
            store.exceptions_of(slot)
        };
        // The origin is about to read as the snapshot: its in-place writes become durable.
        self.cow
            .flush()
            .await
            .map_err(io_err("flush the COW device"))?;
        self.commit(vec![Record::MergeStart {
            slot: slot_number(slot),
            total,
        }])
        .await
        .map_err(io_err("record the merge"))?;
        *self.merge_error.lock().expect("merge error") = None;
        self.kick.notify_all();
        Ok(json!({ "merging": name, "total": total }))
    }

    /// The status report: snapshots, COW usage, merge progress.
    pub(super) fn status(&self) -> Value {
        let store = self.store();
        let counts = store.exceptions();
        let mut snaps: Vec<_> = store
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| Some((slot, s.as_ref()?)))
            .map(|(slot, s)| {
                let (state, reason) = state_json(s.state);
                let mut v = json!({
                    "name": s.name,
                    "state": state,
                    "exceptions": counts.get(&slot).copied().unwrap_or(0),
                    "created": s.seq,
                });
                if let Some(reason) = reason {
                    v["reason"] = json!(reason);
                }
                v
            })
            .collect();
        snaps.sort_by_key(|s| s["created"].as_u64());
        let merge = match store.merging() {
            Some(m) => {
                let s = store.snap(m).expect("merging");
                let total = s.merge_total;
                json!({
                    "active": true,
                    "snapshot": s.name,
                    "done": total.saturating_sub(store.unmerged_count()),
                    "total": total,
                    "error": *self.merge_error.lock().expect("merge error"),
                })
            }
            None => json!({ "active": false, "done": 0, "total": 0 }),
        };
        let exceptions: u64 = counts.values().sum();
        let chunk_bytes = self.layout.chunk.to_bytes();
        json!({
            "target": "snapshot-origin",
            "uuid": self.layout.uuid.to_string(),
            "chunk_sectors": self.layout.chunk.0,
            "origin_sectors": store.origin_size(),
            "cow": {
                "chunks": self.layout.data_chunks,
                "used": store.used(),
                "index_entries": store.index_entries(),
                "free": store.free_count(),
                "used_bytes": chunk_bytes * store.used(),
                "free_bytes": chunk_bytes * store.free_count(),
            },
            "exceptions": exceptions,
            "metadata_failed": self.queue.lock().expect("commit queue").failed,
            "snapshots": snaps,
            "merge": merge,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Target;

    /// `--json` and the id stay on the CLI side: the control socket carries what it did.
    #[test]
    fn cli_only_fields_are_not_sent() {
        let wire = |command: SnapshotCommand| match command.to_wire() {
            Command::Target { name, args } => (name, args),
            other => panic!("a target command, not {other:?}"),
        };
        let create = SnapshotCommand::Create {
            id: 3,
            name: Some("nightly".into()),
            activate: false,
            json: true,
        };
        assert_eq!(
            wire(create),
            ("snapshot-create".into(), json!({ "name": "nightly" }))
        );
        let merge = SnapshotCommand::Merge {
            id: 3,
            name: "s1".into(),
            json: true,
        };
        assert_eq!(wire(merge), ("merge".into(), json!({ "name": "s1" })));
        let delete = SnapshotCommand::parse("snapshot-delete", &json!({ "name": "s1" }));
        assert_eq!(
            delete.expect("parses"),
            SnapshotCommand::Delete {
                id: 0,
                name: "s1".into(),
                json: false,
            }
        );
    }

    /// `--activate` is sent only when given, so the create of older clients is unchanged;
    /// activate and deactivate carry the name only.
    #[test]
    fn activation_commands_on_the_wire() {
        let wire = |command: SnapshotCommand| match command.to_wire() {
            Command::Target { name, args } => (name, args),
            other => panic!("a target command, not {other:?}"),
        };
        let create = |activate| SnapshotCommand::Create {
            id: 3,
            name: Some("n".into()),
            activate,
            json: false,
        };
        assert_eq!(wire(create(false)).1, json!({ "name": "n" }));
        assert_eq!(
            wire(create(true)),
            (
                "snapshot-create".into(),
                json!({ "name": "n", "activate": true })
            )
        );
        for (name, command) in [
            (
                "snapshot-activate",
                SnapshotCommand::Activate {
                    id: 3,
                    name: "s1".into(),
                    json: true,
                },
            ),
            (
                "snapshot-deactivate",
                SnapshotCommand::Deactivate {
                    id: 3,
                    name: "s1".into(),
                    json: true,
                },
            ),
        ] {
            let (sent, args) = wire(command.clone());
            assert_eq!((sent.as_str(), &args), (name, &json!({ "name": "s1" })));
            let back = SnapshotCommand::parse(name, &args).expect("parses");
            assert_eq!(back.releases(), command.releases());
        }
        let deactivate = SnapshotCommand::parse("snapshot-deactivate", &json!({ "name": "s1" }));
        assert_eq!(deactivate.expect("parses").releases(), Some("s1"));
        let activate = SnapshotCommand::parse("snapshot-activate", &json!({ "name": "s1" }));
        assert_eq!(activate.expect("parses").releases(), None);
        let err = SnapshotCommand::parse("snapshot-activate", &json!({})).expect_err("no name");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    /// The CLI: `snapshot create ID [--name N] [--activate]`, `snapshot activate ID NAME`,
    /// `snapshot deactivate ID NAME`.
    #[test]
    fn activation_commands_on_the_command_line() {
        use clap::{FromArgMatches, Subcommand};
        let cli = SnapshotCommand::augment_subcommands(clap::Command::new("snapshot"));
        let parse = |args: &[&str]| {
            let matches = cli
                .clone()
                .try_get_matches_from(std::iter::once("snapshot").chain(args.iter().copied()))
                .expect("parses");
            SnapshotCommand::from_arg_matches(&matches).expect("a command")
        };
        assert_eq!(
            parse(&["create", "3", "--name", "n", "--activate"]),
            SnapshotCommand::Create {
                id: 3,
                name: Some("n".into()),
                activate: true,
                json: false
            }
        );
        assert_eq!(
            parse(&["create", "3"]),
            SnapshotCommand::Create {
                id: 3,
                name: None,
                activate: false,
                json: false
            }
        );
        assert_eq!(
            parse(&["activate", "3", "s1"]),
            SnapshotCommand::Activate {
                id: 3,
                name: "s1".into(),
                json: false
            }
        );
        assert_eq!(
            parse(&["deactivate", "3", "s1", "--json"]),
            SnapshotCommand::Deactivate {
                id: 3,
                name: "s1".into(),
                json: true
            }
        );
        assert!(cli
            .try_get_matches_from(["snapshot", "activate", "3"])
            .is_err());
    }

    /// The spec keeps the active set; one stored by older code has none, which reads as
    /// every snapshot (see `origin_serving`).
    #[test]
    fn the_origin_spec_round_trips_with_and_without_the_active_set() {
        use super::super::OriginSpec;
        use crate::target::TargetSpec;
        let old = json!({ "target": "origin", "device": "/dev/vdb", "cow": "/dev/vdc",
                          "chunk_size_sectors": 0, "force": false });
        let stored: TargetSpec = serde_json::from_value(old.clone()).expect("parse");
        let spec: OriginSpec = stored.parse().expect("an origin spec");
        assert_eq!(spec.active, None, "older code stored no set");
        assert_eq!(
            serde_json::to_value(TargetSpec::from(spec.clone())).expect("json"),
            old
        );
        let now = OriginSpec {
            active: Some(vec!["s1".into(), "s3".into()]),
            ..spec
        };
        let json = serde_json::to_value(TargetSpec::from(now.clone())).expect("json");
        assert_eq!(json["active"], json!(["s1", "s3"]));
        let back: TargetSpec = serde_json::from_value(json).expect("parse");
        assert_eq!(back.parse::<OriginSpec>().expect("parse"), now);
    }

    use crate::copy::{CopyConfig, CopyEngine};
    use crate::device::reactor::{run_local, spawn};
    use crate::device::{DeviceRef, MemDevice};
    use crate::units::SectorCount;

    /// Runs `body` with a group on memory devices (a fresh store) and its merge driver.
    fn with_group<T: 'static>(
        body: impl AsyncFnOnce(Arc<super::super::SnapshotGroup>) -> T + 'static,
    ) -> T {
        let origin: DeviceRef = MemDevice::new("origin", SectorCount(1024));
        let cow: DeviceRef = MemDevice::new("cow", SectorCount(8192));
        run_local(async move {
            let (engine, run) = CopyEngine::new_local(CopyConfig::default()).expect("engine");
            let runner = spawn(run);
            let options = super::super::GroupOptions::default();
            let group = super::super::SnapshotGroup::open(origin, cow, &options, engine.clone())
                .await
                .expect("opens");
            drop(engine);
            let merger = spawn(group.merge_task());
            let out = body(Arc::clone(&group)).await;
            group.check_invariants();
            group.stop();
            merger.await;
            drop(group);
            runner.await;
            out
        })
    }

    /// Runs `command` (as the control socket carries it) through `origin`'s activation.
    async fn origin_command(
        origin: &super::super::OriginTarget,
        name: &str,
        args: Value,
    ) -> Result<Value> {
        let command = SnapshotCommand::parse(name, &args)?;
        let inner = Arc::clone(&origin.group().inner);
        inner.run_for_origin(&origin.active, command).await
    }

    /// What the daemon would store for `origin`: its spec's active set.
    fn stored_active(origin: &super::super::OriginTarget) -> Option<Vec<String>> {
        let built = TargetSpec::from(super::super::OriginSpec {
            device: "/dev/vdb".into(),
            cow: "/dev/vdc".into(),
            chunk_size_sectors: 0,
            force: false,
            active: Some(Vec::new()),
        });
        let spec: super::super::OriginSpec = origin.spec(&built).parse().expect("parse");
        spec.active
    }

    use crate::target::TargetSpec;

    #[test]
    fn child_names_follow_activation_delete_and_merge() {
        with_group(async |group| {
            let origin = group.origin_serving(Some(Vec::new()));
            let run = async |name: &str, args: Value| origin_command(&origin, name, args).await;
            let reply = run("snapshot-create", json!({ "name": "a" }))
                .await
                .expect("create");
            assert_eq!(reply, json!({ "name": "a", "active": false }));
            let reply = run("snapshot-create", json!({ "name": "b", "activate": true }))
                .await
                .expect("create --activate");
            assert_eq!(reply, json!({ "name": "b", "active": true }));
            run("snapshot-create", json!({ "name": "c" }))
                .await
                .expect("create");
            assert_eq!(origin.child_names(), ["b"], "only b was activated");
            assert_eq!(stored_active(&origin), Some(vec!["b".to_owned()]));

            let reply = run("snapshot-activate", json!({ "name": "a" }))
                .await
                .expect("activate");
            assert_eq!(reply, json!({ "name": "a", "active": true }));
            run("snapshot-activate", json!({ "name": "a" }))
                .await
                .expect("again: idempotent");
            assert_eq!(origin.child_names(), ["a", "b"], "oldest first");
            run("snapshot-deactivate", json!({ "name": "b" }))
                .await
                .expect("deactivate");
            run("snapshot-deactivate", json!({ "name": "c" }))
                .await
                .expect("inactive: no-op");
            assert_eq!(origin.child_names(), ["a"]);
            let status = origin.status();
            let active: Vec<_> = status["snapshots"]
                .as_array()
                .expect("snapshots")
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().expect("name").to_owned(),
                        s["active"].clone(),
                    )
                })
                .collect();
            assert_eq!(
                active,
                [
                    ("a".into(), json!(true)),
                    ("b".into(), json!(false)),
                    ("c".into(), json!(false))
                ]
            );

            let unknown = run("snapshot-activate", json!({ "name": "x" })).await;
            assert_eq!(unknown.expect_err("unknown").kind(), ErrorKind::NotFound);
            let unknown = run("snapshot-deactivate", json!({ "name": "x" })).await;
            assert_eq!(unknown.expect_err("unknown").kind(), ErrorKind::NotFound);
            assert_eq!(
                origin.command_releases("snapshot-deactivate", &json!({ "name": "a" })),
                ["a"]
            );
            assert!(origin
                .command_releases("snapshot-deactivate", &json!({ "name": "x" }))
                .is_empty());

            // An active snapshot deleted leaves the set: a new one of its name is inactive.
            run("snapshot-delete", json!({ "name": "a" }))
                .await
                .expect("delete");
            assert!(origin.child_names().is_empty());
            run("snapshot-create", json!({ "name": "a" }))
                .await
                .expect("create again");
            assert!(origin.child_names().is_empty(), "a new 'a' is not active");
            // An inactive snapshot is deleted too.
            run("snapshot-delete", json!({ "name": "c" }))
                .await
                .expect("delete inactive");

            // A merging snapshot cannot be activated, and is not served; merged, it is gone.
            run("snapshot-activate", json!({ "name": "b" }))
                .await
                .expect("activate");
            run("merge", json!({ "name": "b" })).await.expect("merge");
            assert!(
                origin.child_names().is_empty(),
                "a merging snapshot is not served"
            );
            let busy = run("snapshot-activate", json!({ "name": "b" })).await;
            assert_eq!(busy.expect_err("merging").kind(), ErrorKind::Busy);
            for _ in 0..10_000 {
                if group.status()["snapshots"].as_array().map(Vec::len) == Some(1) {
                    break;
                }
                smol::future::yield_now().await;
            }
            assert_eq!(
                group.status()["snapshots"].as_array().map(Vec::len),
                Some(1)
            );
            run("snapshot-create", json!({ "name": "b" }))
                .await
                .expect("create b again");
            assert!(origin.child_names().is_empty(), "a new 'b' is not active");
            assert_eq!(stored_active(&origin), Some(Vec::new()));
        });
    }

    /// An origin from a spec of older code (no set) serves every snapshot, and keeps them
    /// active when the set is fixed; a spec's stale names are dropped.
    #[test]
    fn a_spec_without_the_set_serves_every_snapshot() {
        with_group(async |group| {
            for name in ["s1", "s2", "s3"] {
                group
                    .command_async("snapshot-create", &json!({ "name": name }))
                    .await
                    .expect("create");
            }
            let old = group.origin_serving(None);
            assert_eq!(old.child_names(), ["s1", "s2", "s3"]);
            assert_eq!(
                stored_active(&old),
                Some(vec!["s1".to_owned(), "s2".to_owned(), "s3".to_owned()])
            );
            origin_command(&old, "snapshot-create", json!({ "name": "s4" }))
                .await
                .expect("create");
            assert_eq!(
                old.child_names(),
                ["s1", "s2", "s3"],
                "a new one is inactive"
            );
            let new = group.origin_serving(Some(vec!["s2".into(), "gone".into()]));
            assert_eq!(new.child_names(), ["s2"]);
            assert_eq!(stored_active(&new), Some(vec!["s2".to_owned()]));
        });
    }
}
