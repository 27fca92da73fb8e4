//! I/O paths: origin and snapshot reads and writes, copy-on-write, merge steps, and the
//! per-chunk locks that order them (see the module doc of [`super`]).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use smol::lock::{RwLock, RwLockReadGuardArc, RwLockWriteGuardArc};

use super::format::{Reason, Record};
use super::Inner;
use crate::copy::{CopyJob, Location, Priority};
use crate::device::{errno, AlignedBuf, ReadDone, WriteFlags};
use crate::units::{Extent, Sector, SectorCount};

/// Reader/writer locks per chunk, created on demand and dropped when unused.
#[derive(Default)]
pub struct ChunkLocks {
    map: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

enum Held {
    Shared(#[allow(dead_code)] RwLockReadGuardArc<()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuardArc<()>),
}

/// A held chunk lock.
pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    chunk: u64,
    lock: Arc<RwLock<()>>,
    held: Option<Held>,
}

impl ChunkLocks {
    fn get(&self, chunk: u64) -> Arc<RwLock<()>> {
        let mut map = self.map.lock().expect("chunk locks");
        Arc::clone(map.entry(chunk).or_default())
    }

    pub async fn shared(&self, chunk: u64) -> ChunkGuard<'_> {
        let lock = self.get(chunk);
        let held = Held::Shared(lock.read_arc().await);
        ChunkGuard {
            locks: self,
            chunk,
            lock,
            held: Some(held),
        }
    }

    pub async fn exclusive(&self, chunk: u64) -> ChunkGuard<'_> {
        let lock = self.get(chunk);
        let held = Held::Exclusive(lock.write_arc().await);
        ChunkGuard {
            locks: self,
            chunk,
            lock,
            held: Some(held),
        }
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut map = self.locks.map.lock().expect("chunk locks");
        // The map's reference and ours: nobody else holds or waits for this lock.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.chunk);
        }
    }
}

/// One chunk's part of a request.
struct Piece {
    chunk: u64,
    /// Offset in the chunk and length.
    offset: SectorCount,
    len: SectorCount,
    /// Offset in the request's buffer, bytes.
    buf_at: usize,
}

/// What a snapshot write to a chunk has to do.
enum WritePlan {
    InPlace(u64),
    /// Take a chunk of its own, copying the image from `source` (origin chunk if `None`).
    Fresh(Option<u64>),
}

fn eio() -> io::Error {
    errno(libc::EIO)
}

impl Inner {
    fn chunk_len(&self, c: u64) -> SectorCount {
        let chunk = self.layout.chunk.0;
        SectorCount(chunk.min(self.layout.origin_size.0 - c * chunk))
    }

    fn origin_chunk(&self, c: u64) -> Extent {
        Extent::new(Sector(c * self.layout.chunk.0), self.chunk_len(c))
    }

    fn cow_chunk(&self, k: u64, c: u64) -> Extent {
        let start = self.layout.data_start + SectorCount(k * self.layout.chunk.0);
        Extent::new(start, self.chunk_len(c))
    }

    /// Reads piece `p` into its place in `buf`: from COW chunk `cow` when the chunk is mapped
    /// there, else from the origin.
    async fn read_piece(
        &self,
        cow: Option<u64>,
        p: &Piece,
        buf: &mut AlignedBuf,
    ) -> io::Result<()> {
        let (dev, at) = match cow {
            Some(k) => (&self.cow, self.cow_chunk(k, p.chunk).start + p.offset),
            None => (&self.origin, self.origin_chunk(p.chunk).start + p.offset),
        };
        let (res, piece) = dev.read(at, AlignedBuf::for_sectors(p.len)).await;
        res?;
        let bytes = p.len.to_usize_bytes();
        buf.as_mut_slice()[p.buf_at..p.buf_at + bytes].copy_from_slice(piece.as_slice());
        Ok(())
    }

    fn pieces(&self, extent: Extent) -> Vec<Piece> {
        let chunk = self.layout.chunk.0;
        let mut out = Vec::new();
        let mut at = extent.start.0;
        while at < extent.end().0 {
            let c = at / chunk;
            let end = ((c + 1) * chunk).min(extent.end().0);
            out.push(Piece {
                chunk: c,
                offset: SectorCount(at - c * chunk),
                len: SectorCount(end - at),
                buf_at: ((at - extent.start.0) * 512) as usize,
            });
            at = end;
        }
        out
    }

    async fn copy(&self, from: Location, to: Location, priority: Priority, flush: bool) -> bool {
        let mut job = CopyJob::copy(from, vec![to]).with_priority(priority);
        if flush {
            job = job.flushing();
        }
        matches!(self.engine.copy(job).await, Ok(done) if done.is_ok())
    }

    async fn invalidate(&self, mask: u64, reason: Reason) -> io::Result<()> {
        let records = (0..64u8)
            .filter(|i| mask & (1 << i) != 0)
            .map(|slot| Record::Invalidate { slot, reason })
            .collect();
        self.commit(records).await
    }

    /// Whether an origin write to chunk `c` must first copy or merge it.
    fn origin_needs_work(&self, c: u64) -> bool {
        let store = self.store();
        store.needing(c) != 0 || store.unmerged(c).is_some()
    }

    /// Copies origin chunk `c` for every valid snapshot that still reads it from the origin
    /// (one copy, one record for all). Call with the chunk locked exclusively. Errors only
    /// when the metadata cannot be written.
    async fn preserve(&self, c: u64, priority: Priority) -> io::Result<()> {
        let (mask, k) = {
            let mut store = self.store();
            let mask = store.needing(c);
            if mask == 0 {
                return Ok(());
            }
            (mask, store.alloc())
        };
        let Some(k) = k else {
            return self.invalidate(mask, Reason::Overflow).await;
        };
        let from = Location::new(&self.origin, self.origin_chunk(c));
        let to = Location::new(&self.cow, self.cow_chunk(k, c));
        if !self.copy(from, to, priority, false).await {
            self.store().unreserve(k);
            return self.invalidate(mask, Reason::CopyError).await;
        }
        self.commit(vec![Record::Map {
            cow: k,
            origin: c,
            mask,
        }])
        .await
    }

    /// Merges chunk `c` (held in COW chunk `k` by merging snapshot `m`) into the origin.
    /// Call with the chunk locked exclusively.
    pub(super) async fn merge_chunk(
        &self,
        c: u64,
        m: usize,
        k: u64,
        priority: Priority,
    ) -> io::Result<()> {
        self.preserve(c, priority).await?;
        self.catch_up().await?;
        let from = Location::new(&self.cow, self.cow_chunk(k, c));
        let to = Location::new(&self.origin, self.origin_chunk(c));
        if !self.copy(from, to, priority, true).await {
            *self.merge_error.lock().expect("merge error") =
                Some(format!("copying chunk {c} back to the origin failed"));
            return Err(eio());
        }
        self.commit(vec![Record::Unmap {
            slot: m as u8,
            origin: c,
        }])
        .await
    }

    pub(super) async fn origin_read(
        self: Arc<Self>,
        offset: Sector,
        mut buf: AlignedBuf,
    ) -> ReadDone {
        let extent = Extent::new(offset, buf.sectors());
        if let Err(e) = self.origin_info.check_extent(extent) {
            return (Err(e), buf);
        }
        let _gate = self.gate.read().await;
        if self.store().merging().is_none() {
            return self.origin.read(offset, buf).await;
        }
        // Merging: unmerged chunks read from the COW store.
        for p in self.pieces(extent) {
            let _lock = self.locks.shared(p.chunk).await;
            let source = self.store().unmerged(p.chunk);
            if let Err(e) = self.read_piece(source, &p, &mut buf).await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    pub(super) async fn origin_write(
        self: Arc<Self>,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let extent = Extent::new(offset, buf.sectors());
        self.origin_info.check_extent(extent)?;
        let _gate = self.gate.read().await;
        let mut guards = Vec::new();
        for p in self.pieces(extent) {
            let c = p.chunk;
            let shared = self.locks.shared(c).await;
            if !self.origin_needs_work(c) {
                guards.push(shared);
                continue;
            }
            drop(shared);
            let lock = self.locks.exclusive(c).await;
            let unmerged = {
                let store = self.store();
                store.merging().zip(store.unmerged(c))
            };
            if let Some((m, k)) = unmerged {
                self.merge_chunk(c, m, k, Priority::Foreground).await?;
            }
            if let Err(e) = self.preserve(c, Priority::Foreground).await {
                // The snapshots that needed it are invalid now (`catch_up` records that).
                log::warn!("an origin write goes on without copying chunk {c}: {e}");
            }
            guards.push(lock);
        }
        self.catch_up().await?;
        self.engine.note_foreground_io();
        self.origin.write(offset, buf, flags).await
    }

    pub(super) async fn snap_read(
        self: Arc<Self>,
        slot: usize,
        seq: u64,
        offset: Sector,
        mut buf: AlignedBuf,
    ) -> ReadDone {
        let extent = Extent::new(offset, buf.sectors());
        if let Err(e) = self.origin_info.check_extent(extent) {
            return (Err(e), buf);
        }
        let _gate = self.gate.read().await;
        for p in self.pieces(extent) {
            let _lock = self.locks.shared(p.chunk).await;
            let mapped = {
                let store = self.store();
                if !store.is_valid(slot, seq) {
                    return (Err(eio()), buf);
                }
                store.snap(slot).expect("valid").map.get(&p.chunk).copied()
            };
            if let Err(e) = self.read_piece(mapped, &p, &mut buf).await {
                return (Err(e), buf);
            }
        }
        // Invalidated meanwhile: what was read may come from a released chunk.
        if !self.store().is_valid(slot, seq) {
            return (Err(eio()), buf);
        }
        (Ok(()), buf)
    }

    pub(super) async fn snap_write(
        self: Arc<Self>,
        slot: usize,
        seq: u64,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let extent = Extent::new(offset, buf.sectors());
        self.origin_info.check_extent(extent)?;
        let _gate = self.gate.read().await;
        for p in self.pieces(extent) {
            let _lock = self.locks.exclusive(p.chunk).await;
            let bytes = p.len.to_usize_bytes();
            let data = Arc::new(AlignedBuf::from_slice(
                &buf.as_slice()[p.buf_at..p.buf_at + bytes],
            ));
            self.snap_write_piece(slot, seq, &p, data, flags).await?;
        }
        if !self.store().is_valid(slot, seq) {
            return Err(eio());
        }
        Ok(())
    }

    async fn snap_write_piece(
        &self,
        slot: usize,
        seq: u64,
        p: &Piece,
        data: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let c = p.chunk;
        let plan = {
            let mut store = self.store();
            if !store.is_valid(slot, seq) {
                return Err(eio());
            }
            match store.snap(slot).expect("valid").map.get(&c).copied() {
                Some(k) if store.chunks[&k].mask == 1 << slot => {
                    store.begin_inplace(k);
                    WritePlan::InPlace(k)
                }
                source => WritePlan::Fresh(source),
            }
        };
        match plan {
            WritePlan::InPlace(k) => {
                let at = self.cow_chunk(k, c).start + p.offset;
                let res = self.cow.write(at, data, flags).await;
                self.store().end_inplace(k);
                res
            }
            WritePlan::Fresh(source) => {
                let Some(k) = self.store().alloc() else {
                    self.invalidate(1 << slot, Reason::Overflow).await?;
                    return Err(eio());
                };
                if p.len != self.chunk_len(c) {
                    let from = match source {
                        Some(old) => Location::new(&self.cow, self.cow_chunk(old, c)),
                        None => Location::new(&self.origin, self.origin_chunk(c)),
                    };
                    let to = Location::new(&self.cow, self.cow_chunk(k, c));
                    if !self.copy(from, to, Priority::Foreground, false).await {
                        self.store().unreserve(k);
                        self.invalidate(1 << slot, Reason::CopyError).await?;
                        return Err(eio());
                    }
                }
                let at = self.cow_chunk(k, c).start + p.offset;
                if let Err(e) = self.cow.write(at, data, WriteFlags::default()).await {
                    self.store().unreserve(k);
                    return Err(e);
                }
                self.commit(vec![Record::Map {
                    cow: k,
                    origin: c,
                    mask: 1 << slot,
                }])
                .await
            }
        }
    }

    /// The merge driver (see [`super::SnapshotGroup::merge_task`]).
    pub(super) async fn merge_task(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let seen = self.kick.generation();
            let failed = self.merge_error.lock().expect("merge error").is_some();
            let step = {
                let store = self.store();
                store.merging().map(|m| {
                    let next = store.snap(m).expect("merging").map.first_key_value();
                    (m, next.map(|(c, k)| (*c, *k)))
                })
            };
            match step {
                Some(_) if failed => self.kick.wait(seen).await,
                None => self.kick.wait(seen).await,
                Some((m, None)) => {
                    let _gate = self.gate.read().await;
                    let still = self.store().merging() == Some(m);
                    if still
                        && self
                            .commit(vec![Record::Delete { slot: m as u8 }])
                            .await
                            .is_err()
                    {
                        self.set_merge_error("the merge could not be recorded");
                    }
                }
                Some((m, Some((c, _)))) => {
                    let _gate = self.gate.read().await;
                    let _lock = self.locks.exclusive(c).await;
                    let current = {
                        let store = self.store();
                        store.merging().filter(|&x| x == m).and(store.unmerged(c))
                    };
                    if let Some(k) = current {
                        if self
                            .merge_chunk(c, m, k, Priority::Background)
                            .await
                            .is_err()
                        {
                            self.set_merge_error("a merge step failed");
                        }
                    }
                }
            }
        }
    }

    fn set_merge_error(&self, text: &str) {
        let mut err = self.merge_error.lock().expect("merge error");
        err.get_or_insert_with(|| text.to_owned());
    }
}
