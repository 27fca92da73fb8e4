//! Growing the origin (`Target::resize` of the origin target): the origin takes the size its
//! device now has (or a given one it holds), and its snapshots keep theirs.
//!
//! A growth is one `Grow { size, since }` record (see `format.rs`): durable before the group
//! serves the new size, so after a crash the store replays to the old size or the new one,
//! never between. `since` is the next creation number: every snapshot made before keeps the
//! size the origin had when it was taken, every later one has the new size
//! ([`Store::size_of`](super::state::Store::size_of)). An origin write to a chunk of the new
//! area copies nothing for the older snapshots (they do not hold it), and a merge of one rolls
//! back only its own range.
//!
//! Limits, each refused with one line (InvalidArgument) and nothing changed: shrinking; an
//! origin that ends inside a chunk (its last chunk's images would be shorter than the chunk
//! the snapshots after the growth share); growing while a merge runs; more than
//! [`MAX_GROWTHS`] growths over the store's life (each is a record every checkpoint carries);
//! more chunks than the exception index names ([`MAX_ORIGIN_CHUNKS`]). The COW store's own
//! layout does not depend on the origin's size (its log areas are planned for its data chunks),
//! so nothing else bounds a growth.

use std::sync::atomic::Ordering;

use super::exceptions::MAX_ORIGIN_CHUNKS;
use super::format::Record;
use super::state::MAX_GROWTHS;
use super::Inner;
use crate::error::{Error, ErrorKind, Result};
use crate::units::SectorCount;

fn refuse(message: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, message)
}

impl Inner {
    /// Grows the origin to `to`, or to its device's present size (read again), between
    /// requests; returns the origin's size in sectors (unchanged when it already is that).
    pub(super) async fn grow(&self, to: Option<SectorCount>) -> Result<u64> {
        let present = self
            .origin
            .refresh_size()
            .map_err(|e| Error::io("cannot read the origin device's size", e))?;
        let target = match to {
            Some(n) if n > present => {
                return Err(refuse(format!(
                    "the origin device holds {} sectors, not {}",
                    present.0, n.0
                )))
            }
            Some(n) => n.0,
            None => present.0,
        };
        let _gate = self.gate.write().await;
        let since = self.check_growth(target)?;
        let Some(since) = since else {
            return Ok(target);
        };
        self.commit(vec![Record::Grow {
            size: target,
            since,
        }])
        .await
        .map_err(|e| Error::io("cannot record the origin's growth", e))?;
        assert_eq!(self.store().origin_size(), target, "the growth was applied");
        self.size.store(target, Ordering::Release);
        log::info!("the origin grew to {target} sectors (snapshots from number {since} on)");
        Ok(target)
    }

    /// Whether the origin may grow to `target` sectors now: `None` when it has that size
    /// already, else the creation number the new size starts at. Call under the gate.
    fn check_growth(&self, target: u64) -> Result<Option<u64>> {
        let store = self.store();
        let now = store.origin_size();
        if target < now {
            return Err(refuse(format!(
                "the origin cannot shrink (from {now} sectors to {target})"
            )));
        }
        if target == now {
            return Ok(None);
        }
        let chunk = self.layout.chunk.0;
        if now % chunk != 0 {
            return Err(refuse(format!(
                "the origin ({now} sectors) ends inside a chunk of {chunk} sectors: it cannot grow"
            )));
        }
        if store.merging().is_some() {
            return Err(refuse(
                "the origin cannot grow while a merge runs".to_owned(),
            ));
        }
        if store.growths() >= MAX_GROWTHS {
            return Err(refuse(format!(
                "the origin grew {MAX_GROWTHS} times, the most its COW store records"
            )));
        }
        if target.div_ceil(chunk) > MAX_ORIGIN_CHUNKS {
            return Err(refuse(format!(
                "{target} sectors are more than the {MAX_ORIGIN_CHUNKS} chunks of {} bytes the \
                 COW store can index",
                self.layout.chunk.to_bytes()
            )));
        }
        let since = store.next_seq;
        store
            .check_grow(target, since)
            .map_err(|what| refuse(format!("the growth {what}")))?;
        Ok(Some(since))
    }
}
