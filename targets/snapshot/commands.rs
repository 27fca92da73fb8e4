//! The group's commands and status report.
//!
//! [`SnapshotCommand`] is the one schema of every command (clap, control socket, daemon). A
//! command either takes effect (its
//! record is durable when it returns) or fails with a one-line [`Error`] and changes nothing.

use std::sync::Arc;

use serde_json::{json, Value};

use super::format::{Record, SnapState, MAX_NAME};
use super::Inner;
use crate::cli::parse_id;
use crate::control::Command;
use crate::error::{Error, ErrorKind, Result};

/// A slot as its records carry it.
fn slot_number(slot: usize) -> u16 {
    u16::try_from(slot).expect("a slot number fits its record")
}

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
    /// Take a snapshot now and serve it as a new device; prints its block device.
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
        /// Print the daemon's JSON reply instead of the device.
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

impl SnapshotCommand {
    /// The commands' names on the control socket.
    pub const NAMES: [&'static str; 5] = [
        "snapshot-create",
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

    /// The snapshot a command deletes or merges: its device must be stopped first.
    pub fn releases(&self) -> Option<&str> {
        match self {
            SnapshotCommand::Delete { name, .. } | SnapshotCommand::Merge { name, .. } => {
                Some(name)
            }
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

    /// Runs one parsed command (see the module doc).
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
        }
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
            // A creation number of u64::MAX would leave none for the next (a store holding
            // one is refused on open).
            if store.next_seq == u64::MAX {
                return Err(Error::new(
                    ErrorKind::Busy,
                    "the store has used up its creation numbers",
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
            "origin_sectors": self.layout.origin_size.0,
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
}
