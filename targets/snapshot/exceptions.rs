//! The exception index of store format 2: every snapshot's image of every origin chunk, in
//! which an origin copy shared by any number of snapshots costs one entry.
//!
//! Snapshots are named by their creation number `seq` (increasing, never reused). An origin
//! copy of origin chunk `c`, made when the newest snapshot needing it was `t`, serves every
//! snapshot created after the previous origin copy of `c` (at `t_prev`) and up to `t`: those
//! that still read `c` from the origin when it was about to change. It is kept once, as
//! `shared[(c, t)]`. A snapshot's own image of `c` (written through the snapshot) is
//! `private[(seq, c)]`, and overrides the shared one; so does [`MERGED`], the mark of a chunk
//! a merge has put into the origin.
//!
//! Lookup for `seq` at `c`: its private image, else the first shared entry `(c, t)` with
//! `t >= seq` (the entry before it has `t_prev < seq`, so its range holds `seq`), else the
//! origin. Both are one B-tree search, whatever the number of snapshots.
//!
//! A snapshot inside a range that has a private image of its chunk does not need the shared
//! one; a shared entry that serves no live snapshot is removed at once and its COW chunk
//! handed back. Removing it widens the next entry's range over snapshots that all have their
//! own image (or discarded theirs, when any image will do), so every lookup keeps its answer.
//!
//! Stores written by format 1 named an origin copy's sharers one by one; such a copy becomes a
//! private image of each sharer, all in one COW chunk (counted in `refs`), so that every
//! snapshot reads exactly what it read before the upgrade.
//!
//! Invariants (checked by [`ExceptionIndex::check`]): every COW chunk is held by one shared
//! entry, or by private entries of one origin chunk (more than one only when counted in
//! `refs`); every shared entry serves a live snapshot without a private image of its chunk;
//! private entries belong to live snapshots; only the merging snapshot has [`MERGED`] marks.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::packed::PackedMap;

/// The private "image" of a chunk a merge put into the origin: the snapshot reads the origin.
pub const MERGED: u64 = u64::MAX;

/// Origin chunks the index can name: 40 bits of a key, as dm-thin's block numbers (4 PiB of
/// origin in the smallest chunks).
pub const MAX_ORIGIN_CHUNKS: u64 = 1 << ORIGIN_BITS;

/// Creation numbers the index can name: they are below this, in 24 bits of a key, as
/// dm-thin's device ids and snapshot times.
pub const MAX_CREATION: u64 = 1 << CREATION_BITS;

const ORIGIN_BITS: u32 = 40;
const CREATION_BITS: u32 = 24;
const _: () = assert!(ORIGIN_BITS + CREATION_BITS == u64::BITS);

/// The key of shared entry `(c, t)`: by origin chunk, then by newest snapshot served.
fn shared_key(c: u64, t: u64) -> u64 {
    assert!(
        c < MAX_ORIGIN_CHUNKS && t < MAX_CREATION,
        "shared key ({c}, {t})"
    );
    (c << CREATION_BITS) | t
}

/// The `(c, t)` of a shared key.
fn shared_parts(key: u64) -> (u64, u64) {
    (key >> CREATION_BITS, key & (MAX_CREATION - 1))
}

/// The key of snapshot `seq`'s private image of `c`: by snapshot, then by origin chunk.
fn private_key(seq: u64, c: u64) -> u64 {
    assert!(
        c < MAX_ORIGIN_CHUNKS && seq < MAX_CREATION,
        "private key ({seq}, {c})"
    );
    (seq << ORIGIN_BITS) | c
}

/// The `(seq, c)` of a private key.
fn private_parts(key: u64) -> (u64, u64) {
    (key >> ORIGIN_BITS, key & (MAX_ORIGIN_CHUNKS - 1))
}

/// Where a snapshot's image of a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// The origin's chunk.
    Origin,
    /// A COW chunk.
    Cow(u64),
}

/// One entry of the index, as a checkpoint records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// COW chunk `cow` holds origin chunk `origin` for the snapshots up to `newest` that have
    /// no other image of it (see the module doc).
    Copy { cow: u64, origin: u64, newest: u64 },
    /// COW chunk `cow` (or [`MERGED`]) is snapshot `seq`'s own image of origin chunk `origin`.
    Private { cow: u64, origin: u64, seq: u64 },
    /// COW chunk `cow` is the own image of origin chunk `origin` of each snapshot of `seqs`
    /// (at least two: a format 1 origin copy).
    PrivateSet {
        cow: u64,
        origin: u64,
        seqs: Vec<u64>,
    },
}

/// Where a checkpoint walk of the index stands (see [`ExceptionIndex::entries_from`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryCursor {
    /// Past every shared entry: the private ones are being walked.
    in_private: bool,
    /// The next key to look at, in the map being walked.
    next: u64,
    done: bool,
}

/// The exceptions of every snapshot of a store (see the module doc).
#[derive(Debug, Default)]
pub struct ExceptionIndex {
    /// Live snapshots' creation numbers (valid ones and a merging one).
    live: BTreeSet<u64>,
    /// The merging snapshot: it needs no more origin copies.
    merging: Option<u64>,
    /// Live snapshots that need no more origin copies: the merging one, and those invalid
    /// in memory whose images stay until a checkpoint records them gone.
    frozen: BTreeSet<u64>,
    /// [`shared_key`] (origin chunk, newest snapshot served) -> COW chunk.
    shared: PackedMap,
    /// [`private_key`] (snapshot, origin chunk) -> COW chunk or [`MERGED`].
    private: PackedMap,
    /// COW chunks held by more than one private entry, and by how many.
    refs: HashMap<u64, u32>,
    /// The newest snapshot any origin copy has served.
    newest_served: u64,
    /// [`MERGED`] marks among the private entries.
    marks: usize,
}

impl ExceptionIndex {
    /// Snapshot `seq` is live, with no image of its own. It must be newer than every snapshot
    /// an origin copy serves (a checkpoint's snapshots come before its entries), which
    /// [`ExceptionIndex::may_add_snapshot`] tells.
    pub fn add_snapshot(&mut self, seq: u64) {
        assert!(seq < MAX_CREATION, "creation number {seq}");
        assert!(
            self.may_add_snapshot(seq),
            "snapshot {seq} added inside a range"
        );
        assert!(self.live.insert(seq), "snapshot {seq} added twice");
    }

    /// Whether snapshot `seq` may be added: no origin copy ever served a snapshot at or after
    /// it (else it would read an image older than itself).
    pub fn may_add_snapshot(&self, seq: u64) -> bool {
        seq > self.newest_served
    }

    /// Whether snapshot `seq` is live.
    pub fn is_live(&self, seq: u64) -> bool {
        self.live.contains(&seq)
    }

    /// Snapshot `seq` is being merged: it reads as before, but needs no more origin copies.
    pub fn set_merging(&mut self, seq: u64) {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        assert!(self.merging.is_none(), "two snapshots merge");
        self.merging = Some(seq);
        self.frozen.insert(seq);
    }

    /// Snapshot `seq` needs no more origin copies (it is invalid, but its images stay until
    /// that is durable).
    pub fn freeze(&mut self, seq: u64) {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        self.frozen.insert(seq);
    }

    /// Where snapshot `seq` reads chunk `c`.
    pub fn lookup(&self, seq: u64, c: u64) -> Image {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        match self.private.get(private_key(seq, c)) {
            Some(MERGED) => Image::Origin,
            Some(k) => Image::Cow(k),
            None => match self.covering(seq, c) {
                Some((_, k)) => Image::Cow(k),
                None => Image::Origin,
            },
        }
    }

    /// The shared entry whose range holds `seq` at `c`: its `t` and COW chunk.
    fn covering(&self, seq: u64, c: u64) -> Option<(u64, u64)> {
        let (key, k) = self.shared.first_from(shared_key(c, seq))?;
        let (at, t) = shared_parts(key);
        (at == c).then_some((t, k))
    }

    /// The newest snapshot served by chunk `c`'s last origin copy (0: none).
    fn last_copy(&self, c: u64) -> u64 {
        self.shared
            .last_at_most(shared_key(c, MAX_CREATION - 1))
            .map(|(key, _)| shared_parts(key))
            .filter(|&(at, _)| at == c)
            .map_or(0, |(_, t)| t)
    }

    /// The snapshots an origin write to `c` must copy it for first: the newest such, if any
    /// (a copy made now serves all of them). Newest first, so the usual answer is one step.
    pub fn needs_copy(&self, c: u64) -> Option<u64> {
        let after = self.last_copy(c);
        self.live
            .range(after + 1..)
            .rev()
            .filter(|&&s| !self.frozen.contains(&s))
            .find(|&&s| !self.has_private(s, c))
            .copied()
    }

    /// Every snapshot [`ExceptionIndex::needs_copy`] would copy `c` for, oldest first (for
    /// invalidating them when the copy cannot be made).
    pub fn needing(&self, c: u64) -> Vec<u64> {
        let after = self.last_copy(c);
        self.live
            .range(after + 1..)
            .filter(|&&s| !self.frozen.contains(&s) && !self.has_private(s, c))
            .copied()
            .collect()
    }

    /// Puts origin copy `(c, newest) -> k` in if it serves a live snapshot (a snapshot it
    /// was made for may have become invalid meanwhile); whether it did. It must be `c`'s
    /// newest copy.
    pub fn insert_copy(&mut self, c: u64, newest: u64, k: u64) -> bool {
        assert!(k != MERGED, "COW chunk {k}");
        assert!(
            newest > self.last_copy(c),
            "origin copy of chunk {c} out of order"
        );
        self.shared.insert(shared_key(c, newest), k);
        if !self.serves(c, newest) {
            self.shared.remove(shared_key(c, newest));
            return false;
        }
        self.newest_served = self.newest_served.max(newest);
        true
    }

    /// Whether an origin copy of `c` for snapshots up to `newest` would serve snapshot `seq`
    /// (its range holds it and it has no private image of `c`).
    pub fn copy_would_serve(&self, seq: u64, c: u64, newest: u64) -> bool {
        self.last_copy(c) < seq && seq <= newest && !self.has_private(seq, c)
    }

    /// Whether an origin copy of `c` for snapshots up to `newest` may follow `c`'s copies.
    pub fn copy_in_order(&self, c: u64, newest: u64) -> bool {
        newest > self.last_copy(c)
    }

    /// The COW chunk snapshot `seq` alone reads `c` from, if any: a write through it may
    /// change that chunk in place. (Its private image; or a shared one every other snapshot
    /// in whose range has an image of its own, which a later snapshot never joins.)
    pub fn exclusive(&self, seq: u64, c: u64) -> Option<u64> {
        match self.private.get(private_key(seq, c)) {
            Some(MERGED) => None,
            Some(k) => (!self.refs.contains_key(&k)).then_some(k),
            None => {
                let (t, k) = self.covering(seq, c)?;
                (!self.serves_besides(c, t, Some(seq))).then_some(k)
            }
        }
    }

    /// Snapshot `seq` has its own image of `c` in `k` now (or [`MERGED`]); returns the COW
    /// chunks no longer used (its previous private image, or a shared one only it used).
    pub fn set_private(&mut self, seq: u64, c: u64, k: u64) -> Vec<u64> {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        assert!(
            k != MERGED || self.merging == Some(seq),
            "only the merging snapshot has merged chunks"
        );
        let mut freed: Vec<u64> = self.put_private(seq, c, k).into_iter().collect();
        freed.retain(|&old| self.unref_private(old));
        freed.extend(self.collect_covering(c, seq));
        freed
    }

    /// COW chunk `k` is the own image of `c` of every snapshot of `seqs` (a format 1 origin
    /// copy with several sharers: their previous images of `c` are replaced). Returns the
    /// COW chunks no longer used.
    pub fn add_private_set(&mut self, seqs: &[u64], c: u64, k: u64) -> Vec<u64> {
        assert!(
            seqs.len() >= 2 && k != MERGED,
            "a private set of {seqs:?} in {k}"
        );
        let mut freed = Vec::new();
        for &s in seqs {
            assert!(self.live.contains(&s), "snapshot {s} is not live");
            if let Some(old) = self.put_private(s, c, k) {
                assert!(old != k, "snapshot {s} listed twice");
                if self.unref_private(old) {
                    freed.push(old);
                }
            }
        }
        self.refs
            .insert(k, u32::try_from(seqs.len()).expect("sharers fit"));
        freed.extend(seqs.iter().filter_map(|&s| self.collect_covering(c, s)));
        freed
    }

    /// Removes every shared entry that serves nobody; returns their COW chunks.
    pub fn collect_unserved(&mut self) -> Vec<u64> {
        let unserved: Vec<u64> = self
            .shared
            .iter()
            .map(|(key, _)| key)
            .filter(|&key| {
                let (c, t) = shared_parts(key);
                !self.serves(c, t)
            })
            .collect();
        unserved
            .into_iter()
            .filter_map(|key| self.shared.remove(key))
            .collect()
    }

    /// Snapshot `seq` discarded chunk `c`: any image will do for it now. Returns the COW
    /// chunks no longer used: its private image, or the shared one it alone still used.
    pub fn discard(&mut self, seq: u64, c: u64) -> Vec<u64> {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        if let Some(old) = self.take_private(seq, c) {
            return [old]
                .into_iter()
                .filter(|&k| k != MERGED && self.unref_private(k))
                .collect();
        }
        let Some((t, _)) = self.covering(seq, c) else {
            return Vec::new();
        };
        if self.serves_besides(c, t, Some(seq)) {
            return Vec::new();
        }
        self.shared.remove(shared_key(c, t)).into_iter().collect()
    }

    /// Snapshot `seq` is gone: returns the COW chunks only it used.
    pub fn remove_snapshot(&mut self, seq: u64) -> Vec<u64> {
        assert!(self.live.remove(&seq), "snapshot {seq} is not live");
        if self.merging == Some(seq) {
            self.merging = None;
        }
        self.frozen.remove(&seq);
        let mine: Vec<u64> = self.private_of(seq).map(|(c, _)| c).collect();
        let mut freed = Vec::new();
        for c in mine {
            let k = self.take_private(seq, c).expect("listed");
            if k != MERGED && self.unref_private(k) {
                freed.push(k);
            }
        }
        // Every shared entry whose range held it (one scan: deletes are rare).
        let covering: Vec<(u64, u64)> = self
            .shared
            .iter()
            .map(|(key, _)| shared_parts(key))
            .filter(|&(c, t)| t >= seq && self.range_start(c, t) < seq)
            .collect();
        for (c, t) in covering {
            freed.extend(self.collect_entry(c, t));
        }
        freed
    }

    /// Whether snapshot `seq` has a private image of `c` (or a [`MERGED`] mark).
    fn has_private(&self, seq: u64, c: u64) -> bool {
        self.private.contains_key(private_key(seq, c))
    }

    /// Snapshot `seq`'s private entries, `(c, k)` by origin chunk.
    fn private_of(&self, seq: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.private
            .iter_from(private_key(seq, 0))
            .map(|(key, k)| (private_parts(key), k))
            .take_while(move |&((s, _), _)| s == seq)
            .map(|((_, c), k)| (c, k))
    }

    /// Sets snapshot `seq`'s private entry of `c`, counting [`MERGED`] marks; returns the
    /// one it replaced.
    fn put_private(&mut self, seq: u64, c: u64, k: u64) -> Option<u64> {
        let old = self.private.insert(private_key(seq, c), k);
        self.marks += usize::from(k == MERGED);
        self.marks -= usize::from(old == Some(MERGED));
        old
    }

    /// Removes snapshot `seq`'s private entry of `c`, counting [`MERGED`] marks.
    fn take_private(&mut self, seq: u64, c: u64) -> Option<u64> {
        let old = self.private.remove(private_key(seq, c));
        self.marks -= usize::from(old == Some(MERGED));
        old
    }

    /// One private entry of COW chunk `k` is gone: whether `k` is free now.
    fn unref_private(&mut self, k: u64) -> bool {
        if k == MERGED {
            return false;
        }
        match self.refs.get_mut(&k) {
            None => true,
            Some(n) => {
                *n -= 1;
                if *n == 1 {
                    self.refs.remove(&k);
                }
                false
            }
        }
    }

    /// The creation number the range of shared entry `(c, t)` starts after.
    fn range_start(&self, c: u64, t: u64) -> u64 {
        self.shared
            .last_before(shared_key(c, t))
            .map(|(key, _)| shared_parts(key))
            .filter(|&(at, _)| at == c)
            .map_or(0, |(_, before)| before)
    }

    /// Removes the shared entry serving `seq` at `c` if no live snapshot needs it any more.
    fn collect_covering(&mut self, c: u64, seq: u64) -> Option<u64> {
        let (t, _) = self.covering(seq, c)?;
        self.collect_entry(c, t)
    }

    /// Removes shared entry `(c, t)` if it serves no live snapshot without a private image.
    fn collect_entry(&mut self, c: u64, t: u64) -> Option<u64> {
        if self.serves(c, t) {
            return None;
        }
        self.shared.remove(shared_key(c, t))
    }

    /// Whether shared entry `(c, t)` serves a live snapshot without a private image of `c`.
    fn serves(&self, c: u64, t: u64) -> bool {
        self.serves_besides(c, t, None)
    }

    /// Whether shared entry `(c, t)` serves a live snapshot other than `except` without a
    /// private image of `c`.
    fn serves_besides(&self, c: u64, t: u64, except: Option<u64>) -> bool {
        let start = self.range_start(c, t);
        self.live
            .range(start + 1..=t)
            .any(|&s| Some(s) != except && !self.has_private(s, c))
    }

    /// Snapshot `seq`'s images in the COW store, by origin chunk (one scan of the shared
    /// entries: for a merge's start and for reports).
    pub fn images_of(&self, seq: u64) -> BTreeMap<u64, u64> {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        let mut images = BTreeMap::new();
        let mut last_c = None;
        for (key, k) in self.shared.iter() {
            let (c, t) = shared_parts(key);
            if t >= seq && last_c != Some(c) {
                last_c = Some(c);
                images.insert(c, k);
            }
        }
        for (c, k) in self.private_of(seq) {
            if k == MERGED {
                images.remove(&c);
            } else {
                images.insert(c, k);
            }
        }
        images
    }

    /// How many COW images each live snapshot has (one pass over the entries).
    pub fn counts(&self) -> BTreeMap<u64, u64> {
        let seqs: Vec<u64> = self.live.iter().copied().collect();
        // Shared ranges as +1/-1 at positions of `seqs`, summed once. Neighbouring chunks
        // mostly have the same ranges: runs of one range are counted before they are placed.
        let mut diff = vec![0i64; seqs.len() + 1];
        let mut place = |(start, t): (u64, u64), n: i64| {
            diff[seqs.partition_point(|&s| s <= start)] += n;
            diff[seqs.partition_point(|&s| s <= t)] -= n;
        };
        let mut prev = (u64::MAX, 0);
        let mut streak = ((0, 0), 0i64);
        for (c, t) in self.shared.iter().map(|(key, _)| shared_parts(key)) {
            let start = if prev.0 == c { prev.1 } else { 0 };
            prev = (c, t);
            if streak.0 != (start, t) {
                place(streak.0, streak.1);
                streak = ((start, t), 0);
            }
            streak.1 += 1;
        }
        place(streak.0, streak.1);
        let mut counts = BTreeMap::new();
        let mut run = 0i64;
        for (i, &s) in seqs.iter().enumerate() {
            run += diff[i];
            counts.insert(s, run as u64);
        }
        // A private image replaces the shared one where a range holds the snapshot.
        for (key, k) in self.private.iter() {
            let (s, c) = private_parts(key);
            let n = counts.get_mut(&s).expect("private entries are live");
            let covered = self.covering(s, c).is_some();
            match (k == MERGED, covered) {
                (false, false) => *n += 1,
                (true, true) => *n -= 1,
                _ => {}
            }
        }
        counts
    }

    /// The next at most `max` entries of a checkpoint walk: shared entries by origin chunk,
    /// then private ones by snapshot (a private set once, at its first sharer). Empty at the
    /// end.
    pub fn entries_from(&self, cursor: &mut EntryCursor, max: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        if !cursor.in_private && !cursor.done {
            for (key, k) in self.shared.iter_from(cursor.next).take(max) {
                let (c, t) = shared_parts(key);
                out.push(Entry::Copy {
                    cow: k,
                    origin: c,
                    newest: t,
                });
                cursor.next = key.wrapping_add(1);
            }
            // (A walk that stopped at the last possible key wrapped to 0: it is over.)
            if out.len() == max && cursor.next != 0 {
                return out;
            }
            *cursor = EntryCursor {
                in_private: true,
                next: 0,
                done: false,
            };
        }
        while out.len() < max && !cursor.done {
            let Some((key, k)) = self.private.first_from(cursor.next) else {
                cursor.done = true;
                break;
            };
            let (s, c) = private_parts(key);
            match key.checked_add(1) {
                Some(next) => cursor.next = next,
                None => cursor.done = true,
            }
            out.extend(self.private_entry(s, c, k));
        }
        out
    }

    /// The checkpoint entry of private image `(s, c) -> k`: none for a private set's later
    /// sharers (its first one carries the set).
    fn private_entry(&self, s: u64, c: u64, k: u64) -> Option<Entry> {
        if k == MERGED || !self.refs.contains_key(&k) {
            return Some(Entry::Private {
                cow: k,
                origin: c,
                seq: s,
            });
        }
        let seqs: Vec<u64> = self
            .live
            .iter()
            .copied()
            .filter(|&other| self.private.get(private_key(other, c)) == Some(k))
            .collect();
        (seqs[0] == s).then_some(Entry::PrivateSet {
            cow: k,
            origin: c,
            seqs,
        })
    }

    /// Entries held (shared and private).
    pub fn len(&self) -> usize {
        self.shared.len() + self.private.len()
    }

    /// COW chunks in use.
    pub fn cow_chunks(&self) -> u64 {
        let extra: u64 = self.refs.values().map(|&n| u64::from(n) - 1).sum();
        (self.shared.len() + self.private.len() - self.marks) as u64 - extra
    }

    /// Panics unless the invariants of the module doc hold.
    pub fn check(&self) {
        let mut shared_chunks = BTreeSet::new();
        self.shared.check();
        self.private.check();
        for (key, k) in self.shared.iter() {
            let (c, t) = shared_parts(key);
            assert!(
                shared_chunks.insert(k),
                "COW chunk {k} in two shared entries"
            );
            assert!(
                t <= self.newest_served,
                "shared entry ({c}, {t}) past the newest served"
            );
            assert!(self.serves(c, t), "shared entry ({c}, {t}) serves nobody");
        }
        let mut holders: HashMap<u64, (u64, u32)> = HashMap::new();
        for (key, k) in self.private.iter() {
            let (s, c) = private_parts(key);
            assert!(
                self.live.contains(&s),
                "private image of a gone snapshot {s}"
            );
            if k == MERGED {
                assert_eq!(self.merging, Some(s), "a merged mark of snapshot {s}");
                continue;
            }
            assert!(
                !shared_chunks.contains(&k),
                "COW chunk {k} shared and private"
            );
            let (held_c, n) = holders.entry(k).or_insert((c, 0));
            assert_eq!(*held_c, c, "COW chunk {k} holds two origin chunks");
            *n += 1;
        }
        let distinct = holders.len();
        for (k, (_, n)) in holders {
            let want = self.refs.get(&k).copied().unwrap_or(1);
            assert_eq!(n, want, "COW chunk {k}'s private holders");
        }
        if let Some(m) = self.merging {
            assert!(self.live.contains(&m), "the merging snapshot is not live");
        }
        let marks = self.private.iter().filter(|&(_, k)| k == MERGED).count();
        assert_eq!(marks, self.marks, "merged marks counted");
        assert!(
            self.frozen.iter().all(|s| self.live.contains(s)),
            "a gone snapshot frozen"
        );
        assert_eq!(
            self.cow_chunks(),
            (shared_chunks.len() + distinct) as u64,
            "COW chunks"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// What a snapshot must read at a chunk, in the obvious model (one map per snapshot, as
    /// format 1 kept): a COW chunk, the origin, or anything (it discarded the chunk).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Want {
        Cow(u64),
        Origin,
        Any,
    }

    const CHUNKS: u64 = 6;

    #[derive(Clone, Debug)]
    enum Op {
        Snapshot,
        OriginWrite(u64),
        SnapWrite(usize, u64),
        Discard(usize, u64),
        FormatOneCopy(u64),
        Delete(usize),
        MergeStart(usize),
        MergeChunk(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Snapshot),
            5 => (0..CHUNKS).prop_map(Op::OriginWrite),
            2 => (any::<usize>(), 0..CHUNKS).prop_map(|(s, c)| Op::SnapWrite(s, c)),
            1 => (any::<usize>(), 0..CHUNKS).prop_map(|(s, c)| Op::Discard(s, c)),
            1 => (0..CHUNKS).prop_map(Op::FormatOneCopy),
            1 => any::<usize>().prop_map(Op::Delete),
            1 => any::<usize>().prop_map(Op::MergeStart),
            2 => any::<usize>().prop_map(Op::MergeChunk),
        ]
    }

    /// The index under test, the model, and the COW chunks handed out and not given back.
    #[derive(Default)]
    struct Run {
        index: ExceptionIndex,
        /// Snapshot -> chunk -> what it must read (absent: the origin, as it is now).
        model: BTreeMap<u64, HashMap<u64, Want>>,
        merging: Option<u64>,
        pending: BTreeMap<u64, u64>,
        used: BTreeSet<u64>,
        next_seq: u64,
        next_cow: u64,
    }

    impl Run {
        fn pick(&self, i: usize) -> Option<u64> {
            let valid: Vec<u64> = self
                .model
                .keys()
                .copied()
                .filter(|&s| Some(s) != self.merging)
                .collect();
            (!valid.is_empty()).then(|| valid[i % valid.len()])
        }

        fn alloc(&mut self) -> u64 {
            self.next_cow += 1;
            assert!(self.used.insert(self.next_cow));
            self.next_cow
        }

        fn free(&mut self, freed: Vec<u64>) {
            for k in freed {
                assert!(self.used.remove(&k), "chunk {k} freed but not in use");
            }
        }

        fn apply(&mut self, op: Op) {
            match op {
                Op::Snapshot => {
                    self.next_seq += 1;
                    self.index.add_snapshot(self.next_seq);
                    self.model.insert(self.next_seq, HashMap::new());
                }
                Op::OriginWrite(c) => self.origin_write(c),
                Op::SnapWrite(i, c) => {
                    let Some(s) = self.pick(i) else { return };
                    let k = self.alloc();
                    let freed = self.index.set_private(s, c, k);
                    self.free(freed);
                    self.model.get_mut(&s).unwrap().insert(c, Want::Cow(k));
                }
                Op::Discard(i, c) => {
                    let Some(s) = self.pick(i) else { return };
                    let freed = self.index.discard(s, c);
                    self.free(freed);
                    self.model.get_mut(&s).unwrap().insert(c, Want::Any);
                }
                Op::FormatOneCopy(c) => self.format_one_copy(c),
                Op::Delete(i) => {
                    let Some(s) = self.pick(i) else { return };
                    self.model.remove(&s);
                    let freed = self.index.remove_snapshot(s);
                    self.free(freed);
                }
                Op::MergeStart(i) => self.merge_start(i),
                Op::MergeChunk(i) => self.merge_chunk(i),
            }
        }

        fn origin_write(&mut self, c: u64) {
            if let Some(m) = self.merging {
                if self.pending.contains_key(&c) {
                    self.merge_one(m, c);
                }
            }
            let needing: Vec<u64> = self
                .model
                .iter()
                .filter(|&(&s, m)| Some(s) != self.merging && !m.contains_key(&c))
                .map(|(&s, _)| s)
                .collect();
            let newest = self.index.needs_copy(c);
            assert_eq!(self.index.needing(c).last().copied(), newest, "needing {c}");
            if let Some(&last) = needing.last() {
                assert!(
                    newest >= Some(last),
                    "copy for {newest:?}, needed by {needing:?}"
                );
            }
            if let Some(newest) = newest {
                let k = self.alloc();
                self.index.insert_copy(c, newest, k);
                for s in needing {
                    self.model.get_mut(&s).unwrap().insert(c, Want::Cow(k));
                }
            }
            // The origin changed: a merging snapshot that read it reads anything now.
            if let Some(m) = self.merging {
                let map = self.model.get_mut(&m).unwrap();
                if matches!(map.get(&c), None | Some(Want::Origin)) {
                    map.insert(c, Want::Any);
                }
            }
        }

        /// A format 1 origin copy of `c` shared by the valid snapshots without an image of it.
        fn format_one_copy(&mut self, c: u64) {
            let seqs: Vec<u64> = self
                .model
                .iter()
                .filter(|&(&s, m)| Some(s) != self.merging && !m.contains_key(&c))
                .map(|(&s, _)| s)
                .filter(|&s| !self.index.has_private(s, c))
                .collect();
            if seqs.len() < 2 {
                return;
            }
            let k = self.alloc();
            let freed = self.index.add_private_set(&seqs, c, k);
            self.free(freed);
            for s in seqs {
                self.model.get_mut(&s).unwrap().insert(c, Want::Cow(k));
            }
        }

        fn merge_start(&mut self, i: usize) {
            let Some(s) = self.pick(i).filter(|_| self.merging.is_none()) else {
                return;
            };
            self.index.set_merging(s);
            self.merging = Some(s);
            self.pending = self.index.images_of(s);
            for (c, want) in &self.model[&s] {
                if let Want::Cow(k) = want {
                    assert_eq!(self.pending.get(c), Some(k), "merge of {s}: chunk {c}");
                }
            }
        }

        fn merge_chunk(&mut self, i: usize) {
            let Some(m) = self.merging else { return };
            if self.pending.is_empty() {
                let freed = self.index.remove_snapshot(m);
                self.free(freed);
                self.model.remove(&m);
                self.merging = None;
                return;
            }
            let c = *self.pending.keys().nth(i % self.pending.len()).unwrap();
            self.merge_one(m, c);
        }

        fn merge_one(&mut self, m: u64, c: u64) {
            self.pending.remove(&c);
            let freed = self.index.set_private(m, c, MERGED);
            self.free(freed);
            self.model.get_mut(&m).unwrap().insert(c, Want::Origin);
        }

        /// Every lookup agrees with the model, the COW chunks read are exactly those in use,
        /// and the counts, images and a checkpoint's copy agree with the lookups.
        fn check(&self) {
            self.index.check();
            let mut read = BTreeSet::new();
            let mut exclusive = Vec::new();
            for (&s, m) in &self.model {
                let mut images = BTreeMap::new();
                for c in 0..CHUNKS {
                    let got = self.index.lookup(s, c);
                    let want = m.get(&c).copied().unwrap_or(Want::Origin);
                    match (want, got) {
                        (Want::Any, _) => {}
                        (Want::Cow(k), Image::Cow(g)) => assert_eq!(k, g, "{s} at {c}"),
                        (Want::Origin, Image::Origin) => {}
                        _ => panic!("snapshot {s} chunk {c}: want {want:?}, got {got:?}"),
                    }
                    if let Image::Cow(k) = got {
                        read.insert(k);
                        images.insert(c, k);
                    }
                    if let Some(k) = self.index.exclusive(s, c) {
                        assert_eq!(got, Image::Cow(k), "{s}'s exclusive image of {c}");
                        exclusive.push((s, c, k));
                    }
                }
                assert_eq!(self.index.images_of(s), images, "images of {s}");
                assert_eq!(self.index.counts()[&s], images.len() as u64, "count of {s}");
            }
            assert_eq!(read, self.used, "COW chunks in use");
            assert_eq!(self.index.cow_chunks(), read.len() as u64);
            // A chunk one snapshot alone reads is read by no other (Any images aside).
            for (s, c, k) in exclusive {
                for (&other, m) in &self.model {
                    if other != s && m.get(&c) != Some(&Want::Any) {
                        assert_ne!(
                            self.index.lookup(other, c),
                            Image::Cow(k),
                            "{s} and {other} at {c}"
                        );
                    }
                }
            }
            self.check_checkpoint();
        }

        /// An index rebuilt from its checkpoint entries (walked 3 at a time) reads the same.
        fn check_checkpoint(&self) {
            let mut copy = ExceptionIndex::default();
            for &s in self.model.keys() {
                copy.add_snapshot(s);
            }
            if let Some(m) = self.merging {
                copy.set_merging(m);
            }
            let mut cursor = EntryCursor::default();
            loop {
                let entries = self.index.entries_from(&mut cursor, 3);
                if entries.is_empty() {
                    break;
                }
                for entry in &entries {
                    assert!(
                        restore(&mut copy, entry).is_empty(),
                        "{entry:?} freed a chunk"
                    );
                }
            }
            assert!(copy.collect_unserved().is_empty());
            copy.check();
            assert_eq!(copy.len(), self.index.len());
            for &s in self.model.keys() {
                for c in 0..CHUNKS {
                    assert_eq!(copy.lookup(s, c), self.index.lookup(s, c), "{s} at {c}");
                }
            }
        }
    }

    /// Puts back one checkpoint entry (what the store's replay of its record does).
    fn restore(index: &mut ExceptionIndex, entry: &Entry) -> Vec<u64> {
        match entry {
            Entry::Copy {
                cow,
                origin,
                newest,
            } => {
                if index.insert_copy(*origin, *newest, *cow) {
                    Vec::new()
                } else {
                    vec![*cow]
                }
            }
            Entry::Private { cow, origin, seq } => index.set_private(*seq, *origin, *cow),
            Entry::PrivateSet { cow, origin, seqs } => index.add_private_set(seqs, *origin, *cow),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any run of snapshots, origin writes, snapshot writes, discards, format 1 copies,
        /// deletes and merges: every snapshot reads each chunk from where one map per snapshot
        /// says, an origin write copies at most once, exactly the COW chunks nobody reads are
        /// handed back, and a checkpoint rebuilds the same index.
        #[test]
        fn agrees_with_one_map_per_snapshot(ops in prop::collection::vec(op(), 0..120)) {
            let mut run = Run::default();
            for op in ops {
                run.apply(op);
                run.check();
            }
        }
    }

    #[test]
    fn one_copy_serves_a_thousand_snapshots_in_one_entry() {
        let mut index = ExceptionIndex::default();
        for s in 1..=1024 {
            index.add_snapshot(s);
        }
        for c in 0..100 {
            assert_eq!(index.needs_copy(c), Some(1024));
            assert!(index.insert_copy(c, 1024, c));
            assert_eq!(index.needs_copy(c), None);
        }
        assert_eq!(index.len(), 100);
        assert_eq!(index.lookup(1, 7), Image::Cow(7));
        assert_eq!(index.lookup(1024, 7), Image::Cow(7));
        assert!(index.counts().values().all(|&n| n == 100));
    }
}
