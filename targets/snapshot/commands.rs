//! The group's commands and status report.
//!
//! Arguments are JSON objects: `{"name": "nightly"}`. A command either takes effect (its
//! record is durable when it returns) or fails with a one-line [`Error`] and changes nothing.

use std::sync::Arc;

use serde_json::{json, Value};

use super::format::{Record, SnapState, MAX_NAME, MAX_SNAPSHOTS};
use super::Inner;
use crate::error::{Error, ErrorKind, Result};

fn name_arg(args: &Value) -> Result<&str> {
    args.get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid("give the snapshot's name as \"name\""))
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

impl Inner {
    /// Runs one command (see the module doc).
    pub(super) async fn command(self: Arc<Self>, name: &str, args: &Value) -> Result<Value> {
        match name {
            "status" => Ok(self.status()),
            "snapshot-list" => Ok(self.status()["snapshots"].clone()),
            "snapshot-create" => {
                let name = match args.get("name") {
                    None | Some(Value::Null) => self.default_name(),
                    Some(_) => name_arg(args)?.to_owned(),
                };
                self.create(&name).await
            }
            "snapshot-delete" => self.delete(name_arg(args)?).await,
            "merge" => self.start_merge(name_arg(args)?).await,
            _ => Err(Error::invalid(format!(
                "the snapshot-origin target has no command '{name}' (try snapshot-create, \
                 snapshot-delete, snapshot-list, merge, status)"
            ))),
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
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
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
                        format!("the group already has {MAX_SNAPSHOTS} snapshots"),
                    )
                })?;
            (slot, store.next_seq)
        };
        self.origin
            .flush()
            .await
            .map_err(io_err("flush the origin"))?;
        self.commit(vec![Record::Create {
            slot: slot as u8,
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
        self.commit(vec![Record::Delete { slot: slot as u8 }])
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
            snap.map.len() as u64
        };
        // The origin is about to read as the snapshot: its in-place writes become durable.
        self.cow
            .flush()
            .await
            .map_err(io_err("flush the COW device"))?;
        self.commit(vec![Record::MergeStart {
            slot: slot as u8,
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
        let mut snaps: Vec<_> = store
            .slots
            .iter()
            .flatten()
            .map(|s| {
                let (state, reason) = state_json(s.state);
                let mut v = json!({
                    "name": s.name,
                    "state": state,
                    "exceptions": s.map.len(),
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
                    "done": total.saturating_sub(s.map.len() as u64),
                    "total": total,
                    "error": *self.merge_error.lock().expect("merge error"),
                })
            }
            None => json!({ "active": false, "done": 0, "total": 0 }),
        };
        let exceptions: usize = store.slots.iter().flatten().map(|s| s.map.len()).sum();
        let chunk_bytes = self.layout.chunk.to_bytes();
        json!({
            "target": "snapshot-origin",
            "uuid": self.layout.uuid.to_string(),
            "chunk_sectors": self.layout.chunk.0,
            "origin_sectors": self.layout.origin_size.0,
            "cow": {
                "chunks": self.layout.data_chunks,
                "used": store.used(),
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
