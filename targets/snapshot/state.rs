//! The in-memory state of a snapshot group: the snapshot table, each snapshot's exception map,
//! the COW chunks with their sharers, and the free chunks (a bitmap, `free.rs`). It changes
//! only by applying log records once they are durable ([`Store::apply`]), so it always equals
//! what a replay of the log after a crash would build; except that a failed metadata write
//! invalidates snapshots at once ([`Store::fail_metadata`]), until a checkpoint records it.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::format::{Reason, Record, SnapState, MAX_SNAPSHOTS};
use super::free::FreeChunks;

const REPLAYED: &str = "the free set is built once the log is replayed";

/// One snapshot.
#[derive(Clone, Debug)]
pub struct Snap {
    pub name: String,
    /// Creation order; also tells incarnations of one slot apart.
    pub seq: u64,
    pub state: SnapState,
    /// Exceptions when its merge started.
    pub merge_total: u64,
    /// Origin chunk -> COW chunk.
    pub map: BTreeMap<u64, u64>,
}

/// A used COW chunk: the origin chunk it holds and the snapshots sharing it.
#[derive(Clone, Copy, Debug)]
pub struct CowChunk {
    pub origin: u64,
    pub mask: u64,
}

/// Where a checkpoint being taken stands (see [`Store::checkpoint_piece`]).
#[derive(Debug)]
pub struct CheckpointCursor {
    next_slot: usize,
    next_chunk: u64,
    /// The store's generation when the checkpoint started.
    generation: u64,
}

pub struct Store {
    pub slots: Vec<Option<Snap>>,
    pub chunks: HashMap<u64, CowChunk>,
    /// The free chunks, one bit each; `None` while the log is replayed (releases are not
    /// tracked then: [`Store::rebuild_free`] derives the set from the replayed maps).
    free: Option<FreeChunks>,
    data_chunks: u64,
    /// Chunks allocated to a copy not yet committed.
    pub reserved: usize,
    /// In-place snapshot writes in flight per COW chunk, and chunks freed meanwhile (they are
    /// reusable only once those writes are done).
    inflight: HashMap<u64, u32>,
    zombies: HashSet<u64>,
    /// Chunks of `Map` records whose commit failed: reusable only once a checkpoint makes
    /// sure those records are never replayed.
    held: Vec<u64>,
    pub next_seq: u64,
    /// Counts changes to what a checkpoint records (snapshots, their states and maps).
    generation: u64,
}

impl Store {
    pub fn new(data_chunks: u64) -> Store {
        Store {
            slots: vec![None; MAX_SNAPSHOTS],
            chunks: HashMap::new(),
            free: None,
            data_chunks,
            reserved: 0,
            inflight: HashMap::new(),
            zombies: HashSet::new(),
            held: Vec::new(),
            next_seq: 1,
            generation: 0,
        }
    }

    /// After replaying a log: every chunk below the highest used one that nothing uses is
    /// free (a chunk copied but never committed before a crash is free again: no leak).
    pub fn rebuild_free(&mut self) {
        let used = self.chunks.keys().copied();
        self.free = Some(FreeChunks::with_used(self.data_chunks, used));
    }

    fn free_set(&mut self) -> &mut FreeChunks {
        self.free.as_mut().expect(REPLAYED)
    }

    pub fn snap(&self, slot: usize) -> Option<&Snap> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// The slot of a snapshot named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.name == name))
    }

    /// Whether `slot` still holds incarnation `seq` and it is valid.
    pub fn is_valid(&self, slot: usize, seq: u64) -> bool {
        self.snap(slot)
            .is_some_and(|s| s.seq == seq && s.state == SnapState::Valid)
    }

    pub fn merging(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.state == SnapState::Merging))
    }

    /// Valid snapshots that read origin chunk `c` from the origin: those an origin write to
    /// `c` must copy it for first.
    pub fn needing(&self, c: u64) -> u64 {
        let mut mask = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if s.state == SnapState::Valid && !s.map.contains_key(&c) {
                    mask |= 1 << i;
                }
            }
        }
        mask
    }

    /// Whether an origin write to chunk `c` must first copy it for a snapshot or merge it.
    pub fn origin_needs_work(&self, c: u64) -> bool {
        self.needing(c) != 0 || self.unmerged(c).is_some()
    }

    /// The COW chunk of the merging snapshot for origin chunk `c`, if it is not merged yet.
    pub fn unmerged(&self, c: u64) -> Option<u64> {
        let m = self.merging()?;
        self.slots[m].as_ref()?.map.get(&c).copied()
    }

    /// A free COW chunk, reserved; `None` when the store is full.
    pub fn alloc(&mut self) -> Option<u64> {
        let chunk = self.free_set().alloc()?;
        self.reserved += 1;
        Some(chunk)
    }

    /// Returns a reserved chunk that will not be committed.
    pub fn unreserve(&mut self, chunk: u64) {
        self.reserved -= 1;
        self.release(chunk);
    }

    pub fn begin_inplace(&mut self, chunk: u64) {
        *self.inflight.entry(chunk).or_default() += 1;
    }

    pub fn end_inplace(&mut self, chunk: u64) {
        let n = self
            .inflight
            .get_mut(&chunk)
            .expect("in-place write counted");
        *n -= 1;
        if *n == 0 {
            self.inflight.remove(&chunk);
            if self.zombies.remove(&chunk) {
                self.free_set().release(chunk);
            }
        }
    }

    fn release(&mut self, chunk: u64) {
        if self.inflight.contains_key(&chunk) {
            self.zombies.insert(chunk);
        } else if let Some(free) = self.free.as_mut() {
            free.release(chunk);
        }
    }

    fn unref(&mut self, chunk: u64, slot: usize) {
        let entry = self.chunks.get_mut(&chunk).expect("mapped chunk is used");
        entry.mask &= !(1 << slot);
        if entry.mask == 0 {
            self.chunks.remove(&chunk);
            self.release(chunk);
        }
    }

    fn drop_map(&mut self, slot: usize) {
        let map = match self.slots[slot].as_mut() {
            Some(s) => std::mem::take(&mut s.map),
            None => return,
        };
        for chunk in map.into_values() {
            self.unref(chunk, slot);
        }
    }

    /// Applies a durable record. `live` records were reserved by this process (their Map
    /// chunks are counted in `reserved`); replayed ones were not.
    pub fn apply(&mut self, record: &Record, live: bool) {
        self.generation += 1;
        match record {
            Record::Create {
                slot,
                seq,
                state,
                merge_total,
                name,
            } => {
                let slot = *slot as usize;
                self.drop_map(slot);
                self.slots[slot] = Some(Snap {
                    name: name.clone(),
                    seq: *seq,
                    state: *state,
                    merge_total: *merge_total,
                    map: BTreeMap::new(),
                });
                self.next_seq = self.next_seq.max(seq + 1);
            }
            Record::Delete { slot } => {
                self.drop_map(*slot as usize);
                self.slots[*slot as usize] = None;
            }
            Record::Invalidate { slot, reason } => {
                let slot = *slot as usize;
                self.drop_map(slot);
                if let Some(s) = self.slots[slot].as_mut() {
                    s.state = SnapState::Invalid(*reason);
                }
            }
            Record::MergeStart { slot, total } => {
                if let Some(s) = self.slots[*slot as usize].as_mut() {
                    s.state = SnapState::Merging;
                    s.merge_total = *total;
                }
            }
            Record::Map { cow, origin, mask } => self.apply_map(*cow, *origin, *mask, live),
            Record::Unmap { slot, origin } => {
                let slot = *slot as usize;
                let old = self.slots[slot].as_mut().and_then(|s| s.map.remove(origin));
                if let Some(old) = old {
                    self.unref(old, slot);
                }
            }
        }
    }

    /// Applies a `Map` record: COW chunk `cow` holds origin chunk `origin` for the snapshots
    /// of `mask` that are still valid (the others lost their maps when invalidated).
    fn apply_map(&mut self, cow: u64, origin: u64, mask: u64, live: bool) {
        if live {
            self.reserved -= 1;
        }
        let effective = self.effective_mask(mask);
        if effective == 0 {
            if live {
                self.release(cow);
            }
            return;
        }
        self.chunks.insert(
            cow,
            CowChunk {
                origin,
                mask: effective,
            },
        );
        for i in 0..MAX_SNAPSHOTS {
            if effective & (1 << i) != 0 {
                let old = self.slots[i]
                    .as_mut()
                    .expect("effective slot exists")
                    .map
                    .insert(origin, cow);
                if let Some(old) = old {
                    self.unref(old, i);
                }
            }
        }
    }

    /// The slots of `mask` that hold a snapshot that is not invalid.
    fn effective_mask(&self, mask: u64) -> u64 {
        let mut effective = 0u64;
        for (i, s) in self.slots.iter().enumerate() {
            let wanted = mask & (1 << i) != 0;
            if wanted
                && s.as_ref()
                    .is_some_and(|s| !matches!(s.state, SnapState::Invalid(_)))
            {
                effective |= 1 << i;
            }
        }
        effective
    }

    /// The commit of `lost` failed: every valid snapshot is invalid from now on. Its chunks
    /// stay held until a checkpoint records that. A merging snapshot stays merging: the
    /// origin reads as it.
    pub fn fail_metadata(&mut self, lost: &[Record]) {
        self.generation += 1;
        for s in self.slots.iter_mut().flatten() {
            if s.state == SnapState::Valid {
                s.state = SnapState::Invalid(Reason::MetadataError);
            }
        }
        for record in lost {
            if let Record::Map { cow, .. } = record {
                self.reserved -= 1;
                self.held.push(*cow);
            }
        }
    }

    /// A checkpoint of this state is durable: what only it released is free now.
    pub fn compacted(&mut self) {
        self.generation += 1;
        for slot in 0..self.slots.len() {
            if self.slots[slot]
                .as_ref()
                .is_some_and(|s| matches!(s.state, SnapState::Invalid(_)))
            {
                self.drop_map(slot);
            }
        }
        for chunk in std::mem::take(&mut self.held) {
            self.release(chunk);
        }
    }

    /// Starts a checkpoint: the records that rebuild this state from nothing, taken a piece
    /// at a time ([`Store::checkpoint_piece`]).
    pub fn checkpoint_cursor(&self) -> CheckpointCursor {
        CheckpointCursor {
            next_slot: 0,
            next_chunk: 0,
            generation: self.generation,
        }
    }

    /// The next at most `max` records of the checkpoint `cursor` walks: every snapshot's
    /// `Create`, then a `Map` per used COW chunk in chunk order. Empty once all are taken.
    /// The durable state must not change meanwhile: the caller holds the log writer, the
    /// only route by which it changes (asserted).
    pub fn checkpoint_piece(&self, cursor: &mut CheckpointCursor, max: usize) -> Vec<Record> {
        assert_eq!(
            cursor.generation, self.generation,
            "the store changed while a checkpoint of it was written"
        );
        let mut records = Vec::new();
        while records.len() < max && cursor.next_slot < self.slots.len() {
            let i = cursor.next_slot;
            cursor.next_slot += 1;
            if let Some(s) = &self.slots[i] {
                records.push(Record::Create {
                    slot: u8::try_from(i).expect("a slot number fits its record"),
                    seq: s.seq,
                    state: s.state,
                    merge_total: s.merge_total,
                    name: s.name.clone(),
                });
            }
        }
        let frontier = self.free.as_ref().expect(REPLAYED).frontier();
        while records.len() < max && cursor.next_chunk < frontier {
            let cow = cursor.next_chunk;
            cursor.next_chunk += 1;
            if let Some(c) = self.chunks.get(&cow) {
                records.push(Record::Map {
                    cow,
                    origin: c.origin,
                    mask: c.mask,
                });
            }
        }
        records
    }

    /// COW chunks holding data.
    pub fn used(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Chunks neither used nor reserved.
    pub fn free_count(&self) -> u64 {
        self.data_chunks
            - self.used()
            - self.reserved as u64
            - self.zombies.len() as u64
            - self.held.len() as u64
    }

    /// Panics unless the maps, the chunk table and the free set agree (for tests).
    pub fn check(&self) {
        let mut seen: HashMap<u64, u64> = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            let Some(s) = s else { continue };
            // One invalidated by a failed metadata write holds them until that is durable.
            if matches!(s.state, SnapState::Invalid(r) if r != Reason::MetadataError) {
                assert!(s.map.is_empty(), "an invalid snapshot holds chunks");
            }
            for (&origin, &cow) in &s.map {
                let c = self.chunks.get(&cow).expect("a mapped chunk is used");
                assert_eq!(c.origin, origin, "chunk {cow} holds another origin chunk");
                *seen.entry(cow).or_default() |= 1 << i;
            }
        }
        for (cow, c) in &self.chunks {
            assert_eq!(seen.get(cow), Some(&c.mask), "chunk {cow}'s sharers");
            let free = self.free.as_ref().is_some_and(|f| f.is_free(*cow));
            assert!(!free, "chunk {cow} is used and free");
            assert!(*cow < self.data_chunks);
        }
    }
}
