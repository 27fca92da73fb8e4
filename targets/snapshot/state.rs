//! The in-memory state of a snapshot group: the snapshot table, every snapshot's images
//! (the exception index, `exceptions.rs`: an origin copy shared by any number of snapshots is
//! one entry), the merge's pending chunks, and the free chunks (a bitmap, `free.rs`). It
//! changes only by applying log records once they are durable ([`Store::apply`]), so it always
//! equals what a replay of the log after a crash would build; except that a failed metadata
//! write invalidates snapshots at once ([`Store::fail_metadata`]), until a checkpoint records
//! it.
//!
//! A replayed record is untrusted: [`Store::check_replay`] refuses one that this state could
//! not have been given by a commit (a chunk outside the data area or the origin, a COW chunk
//! in use mapped again, a record for an empty slot, a second merge, a name or creation number
//! taken, an origin copy out of order) before [`Store::apply`] runs, which therefore never
//! panics on disk content. So at every step of a replay: each used COW chunk is below
//! `data_chunks` and holds one origin chunk below the origin's chunk count, names and
//! creation numbers are distinct, and at most one snapshot merges, with no more exceptions
//! than its `merge_total` ([`Store::check_replayed`]).
//!
//! Records of format 1 (a store written by an older build) map onto the same state: a `Map`
//! is a private image of each valid snapshot in its mask, in one COW chunk.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::exceptions::{
    Entry, EntryCursor, ExceptionIndex, Image, MAX_CREATION, MAX_ORIGIN_CHUNKS, MERGED,
};
use super::format::{
    valid_name, Reason, Record, SnapState, FORMAT1_SNAPSHOTS, MAX_SNAPSHOTS, MERGED_CHUNK,
};
use super::free::FreeChunks;

const _: () = assert!(MERGED == MERGED_CHUNK, "one mark for a merged chunk");

/// The most times a store's origin grows (each a `Grow` record every checkpoint carries).
pub const MAX_GROWTHS: usize = 64;

/// One snapshot.
#[derive(Clone, Debug)]
pub struct Snap {
    pub name: String,
    /// Creation order; also tells incarnations of one slot apart.
    pub seq: u64,
    pub state: SnapState,
    /// Exceptions when its merge started.
    pub merge_total: u64,
}

/// Where a checkpoint being taken stands (see [`Store::checkpoint_piece`]).
#[derive(Debug)]
pub struct CheckpointCursor {
    next_growth: usize,
    next_slot: usize,
    entries: EntryCursor,
    /// The store's generation when the checkpoint started.
    generation: u64,
}

pub struct Store {
    /// Snapshots by slot; as many slots as the store's log areas have room for.
    pub slots: Vec<Option<Snap>>,
    /// Slot by creation number, of every snapshot in `slots`.
    by_seq: BTreeMap<u64, usize>,
    index: ExceptionIndex,
    /// The merging snapshot's images not merged yet: origin chunk -> COW chunk.
    pending: BTreeMap<u64, u64>,
    /// The free chunks, one bit each (a replay takes the chunks its records use).
    free: FreeChunks,
    data_chunks: u64,
    /// Chunks allocated to a copy not yet committed.
    pub reserved: usize,
    /// In-place snapshot writes in flight per COW chunk, and chunks freed meanwhile (they are
    /// reusable only once those writes are done).
    inflight: HashMap<u64, u32>,
    zombies: HashSet<u64>,
    /// Chunks of records whose commit failed: reusable only once a checkpoint makes sure
    /// those records are never replayed.
    held: Vec<u64>,
    pub next_seq: u64,
    /// The chunk size and the origin's size at the store's creation, in sectors.
    chunk: u64,
    base_size: u64,
    /// The origin's growths, oldest first (`Grow` records): `(since, size)`, sizes growing,
    /// each from a whole number of chunks, `since` not decreasing. Snapshots of creation
    /// number `since` on have `size` sectors (until the next growth).
    growths: Vec<(u64, u64)>,
    /// Counts changes to what a checkpoint records (snapshots, their states and images).
    generation: u64,
}

impl Store {
    /// An empty store of `data_chunks` chunks with room for `capacity` snapshots, for an
    /// origin of `origin_size` sectors (at creation) in chunks of `chunk` sectors.
    pub fn new(data_chunks: u64, capacity: usize, chunk: u64, origin_size: u64) -> Store {
        assert!(chunk > 0 && origin_size > 0, "a layout checked");
        assert!(
            (FORMAT1_SNAPSHOTS..=MAX_SNAPSHOTS).contains(&capacity),
            "room for {capacity} snapshots"
        );
        Store {
            slots: vec![None; capacity],
            by_seq: BTreeMap::new(),
            index: ExceptionIndex::default(),
            pending: BTreeMap::new(),
            free: FreeChunks::new(data_chunks),
            data_chunks,
            reserved: 0,
            inflight: HashMap::new(),
            zombies: HashSet::new(),
            held: Vec::new(),
            next_seq: 1,
            chunk,
            base_size: origin_size,
            growths: Vec::new(),
            generation: 0,
        }
    }

    /// The origin's size now, in sectors.
    pub fn origin_size(&self) -> u64 {
        self.growths
            .last()
            .map_or(self.base_size, |&(_, size)| size)
    }

    /// The origin's chunks now (the last may be short).
    pub fn origin_chunks(&self) -> u64 {
        self.origin_size().div_ceil(self.chunk)
    }

    /// The size of snapshot `seq` in sectors: the origin's when it was taken.
    pub fn size_of(&self, seq: u64) -> u64 {
        self.growths
            .iter()
            .rev()
            .find(|&&(since, _)| since <= seq)
            .map_or(self.base_size, |&(_, size)| size)
    }

    /// The first creation number whose snapshots hold origin chunk `c` (those made before
    /// the growth that brought `c` in do not); `u64::MAX` for a chunk past the origin.
    fn holders_from(&self, c: u64) -> u64 {
        if c < self.base_size.div_ceil(self.chunk) {
            return 0;
        }
        self.growths
            .iter()
            .find(|&&(_, size)| c < size.div_ceil(self.chunk))
            .map_or(u64::MAX, |&(since, _)| since)
    }

    /// How many growths the store holds, for the limit [`MAX_GROWTHS`].
    pub fn growths(&self) -> usize {
        self.growths.len()
    }

    /// Snapshot `seq`'s images of the chunks it holds (a copy made for the snapshots taken
    /// after a growth may take in, by its range, older ones: they never read it).
    fn own_images(&self, seq: u64) -> BTreeMap<u64, u64> {
        let chunks = self.size_of(seq).div_ceil(self.chunk);
        let mut images = self.index.images_of(seq);
        images.retain(|&c, _| c < chunks);
        images
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

    /// The newest valid snapshot an origin write to chunk `c` must copy it for first (one
    /// copy serves every snapshot that needs it).
    pub fn needs_copy(&self, c: u64) -> Option<u64> {
        // The newest needing one: if it is older than `c`, so are the rest.
        let from = self.holders_from(c);
        self.index.needs_copy(c).filter(|&seq| seq >= from)
    }

    /// The merging snapshot's creation number if an origin copy of `c` for snapshots up to
    /// `newest` would take it in, though it reads `c` from the origin: the copy must say it
    /// does not serve it (its image of `c` is in the origin already), or a replay would list
    /// the copy as its image, to merge back over what the origin holds since.
    pub fn merging_excluded(&self, c: u64, newest: u64) -> Option<u64> {
        let m = self.merging()?;
        let seq = self.snap(m).expect("merging").seq;
        self.index.copy_would_serve(seq, c, newest).then_some(seq)
    }

    /// The slots of the valid snapshots an origin write to `c` must copy it for.
    pub fn needing_slots(&self, c: u64) -> Vec<usize> {
        let from = self.holders_from(c);
        let needing = self.index.needing(c);
        needing
            .iter()
            .filter(|&&seq| seq >= from)
            .map(|seq| self.by_seq[seq])
            .collect()
    }

    /// Whether an origin write to chunk `c` must first copy it for a snapshot or merge it.
    pub fn origin_needs_work(&self, c: u64) -> bool {
        self.needs_copy(c).is_some() || self.unmerged(c).is_some()
    }

    /// The COW chunk of the merging snapshot for origin chunk `c`, if it is not merged yet.
    pub fn unmerged(&self, c: u64) -> Option<u64> {
        self.pending.get(&c).copied()
    }

    /// The merging snapshot's next chunks not merged yet, in origin order.
    pub fn next_unmerged(&self, max: usize) -> Vec<u64> {
        self.pending.keys().take(max).copied().collect()
    }

    /// The merging snapshot's chunks not merged yet.
    pub fn unmerged_count(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Where valid snapshot `seq` reads origin chunk `c`: a COW chunk, or the origin.
    pub fn image(&self, seq: u64, c: u64) -> Option<u64> {
        match self.index.lookup(seq, c) {
            Image::Cow(k) => Some(k),
            Image::Origin => None,
        }
    }

    /// The COW chunk only snapshot `seq` reads `c` from, which a write through it may change
    /// in place.
    pub fn exclusive(&self, seq: u64, c: u64) -> Option<u64> {
        self.index.exclusive(seq, c)
    }

    /// How many COW images each snapshot has, by slot (one pass over the exceptions).
    pub fn exceptions(&self) -> BTreeMap<usize, u64> {
        let counts = self.index.counts();
        let now = self.origin_size();
        counts
            .into_iter()
            .map(|(seq, n)| {
                // A snapshot older than a growth is counted chunk by chunk: a copy made for
                // later ones may take it in by its range, in the area it does not hold.
                let n = if self.size_of(seq) < now {
                    self.own_images(seq).len() as u64
                } else {
                    n
                };
                (self.by_seq[&seq], n)
            })
            .collect()
    }

    /// How many COW images snapshot `slot` has (0 for an invalid one).
    pub fn exceptions_of(&self, slot: usize) -> u64 {
        match self.snap(slot) {
            Some(s) if self.index.is_live(s.seq) => self.own_images(s.seq).len() as u64,
            _ => 0,
        }
    }

    /// A free COW chunk, reserved; `None` when the store is full.
    pub fn alloc(&mut self) -> Option<u64> {
        let chunk = self.free.alloc()?;
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
                self.free.release(chunk);
            }
        }
    }

    fn release(&mut self, chunk: u64) {
        assert!(chunk != MERGED, "the merged mark is no chunk");
        if self.inflight.contains_key(&chunk) {
            self.zombies.insert(chunk);
        } else {
            self.free.release(chunk);
        }
    }

    fn release_all(&mut self, chunks: Vec<u64>) {
        for chunk in chunks {
            self.release(chunk);
        }
    }

    /// Whether COW chunk `k` is in use or reserved (for checking replayed records).
    fn taken(&self, k: u64) -> bool {
        self.free.is_taken(k)
    }

    /// The snapshot in `slot` leaves the index (deleted, invalid or replaced), releasing
    /// what only it used.
    fn drop_images(&mut self, slot: usize) {
        let Some(seq) = self.snap(slot).map(|s| s.seq) else {
            return;
        };
        if self.index.is_live(seq) {
            let freed = self.index.remove_snapshot(seq);
            self.release_all(freed);
        }
        if self.merging() == Some(slot) {
            self.pending.clear();
        }
    }
}

/// Replay checks: why a record read from the log cannot follow this state.
impl Store {
    /// Why `record`, read from the log, cannot follow this state (a commit never writes it):
    /// the text completes "log record N ...". `origin_chunks` bounds the origin chunks.
    pub fn check_replay(&self, record: &Record, origin_chunks: u64) -> Result<(), String> {
        match record {
            Record::Create {
                slot,
                seq,
                state,
                name,
                ..
            } => self.check_create(usize::from(*slot), *seq, *state, name),
            Record::Map { cow, origin, mask } => {
                self.check_chunk(*cow, *origin, origin_chunks)?;
                self.check_mask(*cow, *mask)
            }
            Record::Copy {
                cow,
                origin,
                newest,
                ..
            } => {
                self.check_chunk(*cow, *origin, origin_chunks)?;
                self.check_copy(*origin, *newest)
            }
            Record::Private { cow, origin, slot } => {
                self.check_private(*cow, *origin, usize::from(*slot), origin_chunks)
            }
            Record::MergeStart { slot, total } => {
                self.check_merge_start(usize::from(*slot), *total)
            }
            Record::Unmap { slot, origin } => {
                self.check_unmap(usize::from(*slot), *origin, origin_chunks)
            }
            Record::Delete { slot } => self.check_slot(usize::from(*slot), "deletes"),
            Record::Invalidate { slot, .. } => self.check_slot(usize::from(*slot), "invalidates"),
            Record::Grow { size, since } => self.check_grow(*size, *since),
        }
    }

    /// A growth: at most [`MAX_GROWTHS`], from a whole number of chunks to more sectors, no
    /// more chunks than the index names, and for snapshots not made yet (in log order; a
    /// checkpoint writes its growths first) nor before an earlier growth's.
    pub fn check_grow(&self, size: u64, since: u64) -> Result<(), String> {
        let now = self.origin_size();
        if self.growths.len() >= MAX_GROWTHS {
            return Err(format!(
                "grows the origin past the {MAX_GROWTHS} growths a store holds"
            ));
        }
        if size <= now || now % self.chunk != 0 {
            return Err(format!(
                "grows the origin from {now} sectors to {size}: not more, or not from whole chunks"
            ));
        }
        if size.div_ceil(self.chunk) > MAX_ORIGIN_CHUNKS {
            return Err(format!(
                "grows the origin to {size} sectors, more than {MAX_ORIGIN_CHUNKS} chunks"
            ));
        }
        let after = self.growths.last().map_or(0, |&(s, _)| s);
        let why = if since < after {
            format!("before an earlier growth's ({after})")
        } else if since < self.next_seq {
            format!("before the next one ({})", self.next_seq)
        } else if since >= MAX_CREATION {
            format!("past the last ({})", MAX_CREATION - 1)
        } else {
            return Ok(());
        };
        Err(format!(
            "grows the origin for snapshots from creation number {since}, {why}"
        ))
    }

    fn check_slot(&self, slot: usize, verb: &str) -> Result<(), String> {
        match self.snap(slot) {
            Some(_) => Ok(()),
            None => Err(format!("{verb} snapshot slot {slot}, which is empty")),
        }
    }

    fn check_create(
        &self,
        slot: usize,
        seq: u64,
        state: SnapState,
        name: &str,
    ) -> Result<(), String> {
        if slot >= self.slots.len() {
            return Err(format!(
                "creates snapshot slot {slot}, beyond the {} this store has room for",
                self.slots.len()
            ));
        }
        if seq >= MAX_CREATION {
            return Err(format!(
                "gives snapshot slot {slot} creation number {seq}, not below {MAX_CREATION}"
            ));
        }
        if state != SnapState::Valid && !matches!(state, SnapState::Invalid(_)) {
            if let Some(m) = self.merging().filter(|&m| m != slot) {
                return Err(format!(
                    "creates snapshot slot {slot} merging while slot {m} is merging"
                ));
            }
        }
        if !matches!(state, SnapState::Invalid(_)) && !self.index.may_add_snapshot(seq) {
            return Err(format!(
                "gives snapshot slot {slot} creation number {seq}, not after the snapshots an \
                 origin copy already serves"
            ));
        }
        self.check_unique(slot, seq, name)
    }

    fn check_unique(&self, slot: usize, seq: u64, name: &str) -> Result<(), String> {
        for (other, s) in self.slots.iter().enumerate() {
            let Some(s) = s.as_ref().filter(|_| other != slot) else {
                continue;
            };
            if s.name == name {
                return Err(format!(
                    "names snapshot slot {slot} {name:?}, the name of slot {other}"
                ));
            }
            if s.seq == seq {
                return Err(format!(
                    "gives snapshot slot {slot} creation number {seq}, that of slot {other}"
                ));
            }
        }
        Ok(())
    }

    /// A record putting origin chunk `origin` in COW chunk `cow`: both in range, `cow` unused.
    fn check_chunk(&self, cow: u64, origin: u64, origin_chunks: u64) -> Result<(), String> {
        if cow >= self.data_chunks {
            return Err(format!(
                "maps COW chunk {cow} beyond the {} data chunks",
                self.data_chunks
            ));
        }
        if origin >= origin_chunks {
            return Err(format!(
                "maps origin chunk {origin} beyond the origin's {origin_chunks} chunks"
            ));
        }
        if self.taken(cow) {
            return Err(format!(
                "maps COW chunk {cow} to origin chunk {origin}, yet it is in use"
            ));
        }
        Ok(())
    }

    fn check_mask(&self, cow: u64, mask: u64) -> Result<(), String> {
        if mask == 0 {
            return Err(format!("maps COW chunk {cow} for no snapshot"));
        }
        match (0..FORMAT1_SNAPSHOTS).find(|&i| mask & (1 << i) != 0 && self.snap(i).is_none()) {
            Some(i) => Err(format!(
                "maps COW chunk {cow} for snapshot slot {i}, which is empty"
            )),
            None => Ok(()),
        }
    }

    fn check_copy(&self, origin: u64, newest: u64) -> Result<(), String> {
        if newest >= MAX_CREATION {
            return Err(format!(
                "copies origin chunk {origin} for snapshots up to creation number {newest}, \
                 not below {MAX_CREATION}"
            ));
        }
        if !self.index.copy_in_order(origin, newest) {
            return Err(format!(
                "copies origin chunk {origin} for snapshots up to creation number {newest}, \
                 not after its last copy"
            ));
        }
        Ok(())
    }

    fn check_private(
        &self,
        cow: u64,
        origin: u64,
        slot: usize,
        origin_chunks: u64,
    ) -> Result<(), String> {
        self.check_slot(slot, "gives an image to")?;
        if cow != MERGED_CHUNK {
            return self.check_chunk(cow, origin, origin_chunks);
        }
        if self.merging() != Some(slot) {
            return Err(format!(
                "marks origin chunk {origin} of snapshot slot {slot} merged, which is not merging"
            ));
        }
        self.check_unmap(slot, origin, origin_chunks)
    }

    fn check_merge_start(&self, slot: usize, total: u64) -> Result<(), String> {
        let Some(s) = self.snap(slot) else {
            return Err(format!("merges snapshot slot {slot}, which is empty"));
        };
        if let Some(m) = self.merging() {
            return Err(format!(
                "merges snapshot slot {slot} while slot {m} is being merged"
            ));
        }
        if matches!(s.state, SnapState::Invalid(_)) {
            return Err(format!("merges snapshot slot {slot}, which is invalid"));
        }
        let exceptions = self.exceptions_of(slot);
        if total < exceptions {
            return Err(format!(
                "merges snapshot slot {slot} with a merge_total of {total}, below its \
                 {exceptions} exceptions"
            ));
        }
        Ok(())
    }

    /// An `Unmap` drops a merged or discarded chunk. It may name a chunk the snapshot has no
    /// image of: a discard's record can follow the snapshot's invalidation (which dropped its
    /// images), committed between the discard's look-up and its commit. Applying it changes
    /// nothing then, so only an empty slot or a chunk past the origin is impossible.
    fn check_unmap(&self, slot: usize, origin: u64, origin_chunks: u64) -> Result<(), String> {
        let what = format!("unmaps origin chunk {origin} of snapshot slot {slot}");
        match self.snap(slot) {
            None => Err(format!("{what}, which is empty")),
            Some(_) if origin >= origin_chunks => Err(format!(
                "{what}, beyond the origin's {origin_chunks} chunks"
            )),
            Some(_) => Ok(()),
        }
    }

    /// The end of a replay: drops origin copies that serve nobody (a checkpoint written
    /// while snapshots were invalid in memory only may hold some), lists the merge's pending
    /// chunks, and says why the state a whole replay built cannot be: what no single record
    /// shows (the merging snapshot's `merge_total` is only known below its exceptions once
    /// its images, which follow its `Create` in a checkpoint, are in).
    pub fn finish_replay(&mut self) -> Result<(), String> {
        let unserved = self.index.collect_unserved();
        self.release_all(unserved);
        let Some(m) = self.merging() else {
            return Ok(());
        };
        let (seq, total) = {
            let s = self.snap(m).expect("merging");
            (s.seq, s.merge_total)
        };
        self.pending = self.own_images(seq);
        if total < self.pending.len() as u64 {
            return Err(format!(
                "snapshot slot {m} merges with a merge_total of {total}, below its {} exceptions",
                self.pending.len()
            ));
        }
        Ok(())
    }
}

/// Applying durable records.
impl Store {
    /// Applies a durable record. `live` records were reserved by this process (their chunks
    /// are counted in `reserved`); replayed ones were not, and take their chunks here.
    pub fn apply(&mut self, record: &Record, live: bool) {
        self.generation += 1;
        if let Some(cow) = record.cow_chunk() {
            if live {
                self.reserved -= 1;
            } else {
                self.free.take(cow);
            }
        }
        match record {
            Record::Create {
                slot,
                seq,
                state,
                merge_total,
                name,
            } => self.apply_create(usize::from(*slot), *seq, *state, *merge_total, name),
            Record::Delete { slot } => {
                let slot = usize::from(*slot);
                self.drop_images(slot);
                if let Some(s) = self.slots[slot].take() {
                    self.by_seq.remove(&s.seq);
                }
            }
            Record::Invalidate { slot, reason } => {
                let slot = usize::from(*slot);
                self.drop_images(slot);
                if let Some(s) = self.slots[slot].as_mut() {
                    s.state = SnapState::Invalid(*reason);
                }
            }
            Record::MergeStart { slot, total } => {
                self.apply_merge_start(usize::from(*slot), *total)
            }
            Record::Map { cow, origin, mask } => self.apply_map(*cow, *origin, *mask),
            Record::Copy {
                cow,
                origin,
                newest,
                merging,
            } => self.apply_copy(*cow, *origin, *newest, *merging),
            Record::Private { cow, origin, slot } => {
                self.apply_private(*cow, *origin, usize::from(*slot))
            }
            Record::Unmap { slot, origin } => self.apply_unmap(usize::from(*slot), *origin),
            Record::Grow { size, since } => {
                self.growths.push((*since, *size));
                self.next_seq = self.next_seq.max(*since);
            }
        }
    }

    fn apply_create(
        &mut self,
        slot: usize,
        seq: u64,
        state: SnapState,
        merge_total: u64,
        name: &str,
    ) {
        self.drop_images(slot);
        if let Some(old) = self.slots[slot].take() {
            self.by_seq.remove(&old.seq);
        }
        if !matches!(state, SnapState::Invalid(_)) {
            self.index.add_snapshot(seq);
        }
        if state == SnapState::Merging {
            // Its pending chunks are listed once its images are in (`finish_replay`).
            self.index.set_merging(seq);
        }
        self.slots[slot] = Some(Snap {
            name: name.to_owned(),
            seq,
            state,
            merge_total,
        });
        self.by_seq.insert(seq, slot);
        self.next_seq = self.next_seq.max(seq + 1);
    }

    fn apply_copy(&mut self, cow: u64, origin: u64, newest: u64, merging: Option<u64>) {
        // A snapshot made later must not fall in this copy's range, even if the snapshots it
        // served are gone.
        self.next_seq = self.next_seq.max(newest + 1);
        if let Some(m) = self.merging().filter(|_| merging.is_some()) {
            if Some(self.snap(m).expect("merging").seq) == merging {
                self.pending.remove(&origin);
                let freed = self
                    .index
                    .set_private(merging.expect("some"), origin, MERGED);
                self.release_all(freed);
            }
        }
        if !self.index.insert_copy(origin, newest, cow) {
            self.release(cow);
        }
    }

    fn apply_merge_start(&mut self, slot: usize, total: u64) {
        let Some(s) = self.slots[slot].as_mut() else {
            return;
        };
        s.state = SnapState::Merging;
        s.merge_total = total;
        let seq = s.seq;
        self.index.set_merging(seq);
        self.pending = self.own_images(seq);
    }

    /// A format 1 origin copy: COW chunk `cow` is the own image of `origin` of every snapshot
    /// of `mask` that is not invalid (the others lost their images when invalidated).
    fn apply_map(&mut self, cow: u64, origin: u64, mask: u64) {
        let seqs: Vec<u64> = (0..FORMAT1_SNAPSHOTS)
            .filter(|&i| mask & (1 << i) != 0)
            .filter_map(|i| self.snap(i))
            .map(|s| s.seq)
            .filter(|&seq| self.index.is_live(seq))
            .collect();
        let freed = match seqs.len() {
            0 => vec![cow],
            1 => self.index.set_private(seqs[0], origin, cow),
            _ => self.index.add_private_set(&seqs, origin, cow),
        };
        self.release_all(freed);
    }

    fn apply_private(&mut self, cow: u64, origin: u64, slot: usize) {
        if cow == MERGED_CHUNK {
            return self.apply_unmap(slot, origin);
        }
        let seq = self.snap(slot).map(|s| s.seq);
        match seq.filter(|&seq| self.index.is_live(seq)) {
            Some(seq) => {
                let freed = self.index.set_private(seq, origin, cow);
                self.release_all(freed);
            }
            // Invalid since its write was planned.
            None => self.release(cow),
        }
    }

    /// Snapshot `slot`'s chunk `origin` was merged (it reads the origin now) or discarded.
    fn apply_unmap(&mut self, slot: usize, origin: u64) {
        let Some(s) = self.snap(slot) else { return };
        let seq = s.seq;
        let freed = match s.state {
            SnapState::Merging => {
                self.pending.remove(&origin);
                self.index.set_private(seq, origin, MERGED)
            }
            SnapState::Valid => self.index.discard(seq, origin),
            SnapState::Invalid(_) => Vec::new(),
        };
        self.release_all(freed);
    }

    /// The commit of `lost` failed: every valid snapshot is invalid from now on. Its images
    /// (and the chunks of `lost`) stay held until a checkpoint records that. A merging
    /// snapshot stays merging: the origin reads as it.
    pub fn fail_metadata(&mut self, lost: &[Record]) {
        self.generation += 1;
        for s in self.slots.iter_mut().flatten() {
            if s.state == SnapState::Valid {
                s.state = SnapState::Invalid(Reason::MetadataError);
                self.index.freeze(s.seq);
            }
        }
        for record in lost {
            if let Some(cow) = record.cow_chunk() {
                self.reserved -= 1;
                self.held.push(cow);
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
                self.drop_images(slot);
            }
        }
        for chunk in std::mem::take(&mut self.held) {
            self.release(chunk);
        }
    }
}

/// Checkpoints and reports.
impl Store {
    /// Starts a checkpoint: the records that rebuild this state from nothing, taken a piece
    /// at a time ([`Store::checkpoint_piece`]).
    pub fn checkpoint_cursor(&self) -> CheckpointCursor {
        CheckpointCursor {
            next_growth: 0,
            next_slot: 0,
            entries: EntryCursor::default(),
            generation: self.generation,
        }
    }

    /// The next at most `max` records of the checkpoint `cursor` walks: every snapshot's
    /// `Create`, then every image (one record per used COW chunk, plus a merged mark per
    /// chunk merged). Empty once all are taken. The durable state must not change
    /// meanwhile: the caller holds the log writer, the only route by which it changes
    /// (asserted).
    pub fn checkpoint_piece(&self, cursor: &mut CheckpointCursor, max: usize) -> Vec<Record> {
        assert_eq!(
            cursor.generation, self.generation,
            "the store changed while a checkpoint of it was written"
        );
        let mut records = Vec::new();
        // The growths first: they bound the chunks the records after them may name.
        while records.len() < max && cursor.next_growth < self.growths.len() {
            let (since, size) = self.growths[cursor.next_growth];
            cursor.next_growth += 1;
            records.push(Record::Grow { size, since });
        }
        while records.len() < max && cursor.next_slot < self.slots.len() {
            let i = cursor.next_slot;
            cursor.next_slot += 1;
            if let Some(s) = &self.slots[i] {
                records.push(Record::Create {
                    slot: u16::try_from(i).expect("a slot number fits its record"),
                    seq: s.seq,
                    state: s.state,
                    merge_total: s.merge_total,
                    name: s.name.clone(),
                });
            }
        }
        if records.len() < max {
            let entries = self
                .index
                .entries_from(&mut cursor.entries, max - records.len());
            records.extend(entries.into_iter().map(|e| self.entry_record(e)));
        }
        records
    }

    /// The record of one index entry.
    fn entry_record(&self, entry: Entry) -> Record {
        let slot_of = |seq: &u64| u16::try_from(self.by_seq[seq]).expect("a slot fits");
        match entry {
            Entry::Copy {
                cow,
                origin,
                newest,
            } => Record::Copy {
                cow,
                origin,
                newest,
                merging: None,
            },
            Entry::Private { cow, origin, seq } => Record::Private {
                cow,
                origin,
                slot: slot_of(&seq),
            },
            Entry::PrivateSet { cow, origin, seqs } => {
                let mask = seqs.iter().fold(0u64, |mask, seq| {
                    let slot = self.by_seq[seq];
                    assert!(
                        slot < FORMAT1_SNAPSHOTS,
                        "a private set of format 1 snapshots"
                    );
                    mask | 1 << slot
                });
                Record::Map { cow, origin, mask }
            }
        }
    }

    /// COW chunks holding data.
    pub fn used(&self) -> u64 {
        self.index.cow_chunks()
    }

    /// Chunks neither used nor reserved (nor waiting to be given back).
    pub fn free_count(&self) -> u64 {
        self.free.free_count()
    }

    /// Entries of the exception index (shared and own images).
    pub fn index_entries(&self) -> usize {
        self.index.len()
    }

    /// Panics unless the index, the snapshot table and the free set agree, and the
    /// snapshots' names, creation numbers and merge are as a replay may leave them (for
    /// tests).
    pub fn check(&self) {
        self.index.check();
        let live: Vec<&Snap> = self.slots.iter().flatten().collect();
        let merging = live.iter().filter(|s| s.state == SnapState::Merging);
        assert!(merging.count() <= 1, "two snapshots merge");
        let names: HashSet<&str> = live.iter().map(|s| s.name.as_str()).collect();
        let seqs: HashSet<u64> = live.iter().map(|s| s.seq).collect();
        assert_eq!(
            (names.len(), seqs.len(), self.by_seq.len()),
            (live.len(), live.len(), live.len()),
            "taken twice"
        );
        assert!(live
            .iter()
            .all(|s| valid_name(&s.name) && s.seq < self.next_seq));
        for (slot, s) in self.slots.iter().enumerate() {
            let Some(s) = s else { continue };
            assert_eq!(self.by_seq.get(&s.seq), Some(&slot), "slot of {}", s.seq);
            // One invalidated by a failed metadata write holds its images until that is
            // durable.
            let holds = !matches!(s.state, SnapState::Invalid(r) if r != Reason::MetadataError);
            assert!(
                holds || !self.index.is_live(s.seq),
                "an invalid snapshot holds chunks"
            );
        }
        if let Some(m) = self.merging() {
            let images = self.own_images(self.slots[m].as_ref().expect("merging").seq);
            for (c, k) in &self.pending {
                assert_eq!(images.get(c), Some(k), "pending chunk {c}");
            }
        }
        let taken =
            self.used() + self.reserved as u64 + self.zombies.len() as u64 + self.held.len() as u64;
        assert_eq!(
            self.data_chunks.checked_sub(taken),
            Some(self.free_count()),
            "free chunks: {taken} taken of {}",
            self.data_chunks
        );
    }
}
