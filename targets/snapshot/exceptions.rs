//! Work in progress (store format v2, issue 11 sections 3 and 4; not used yet): the exception
//! index, in which an origin copy shared by any number of snapshots costs one entry.
//!
//! Snapshots are named by their creation number `seq` (increasing, never reused). An origin
//! copy of origin chunk `c`, made when the newest snapshot was `t`, serves every snapshot
//! created after the previous origin copy of `c` (at `t_prev`) and up to `t`: those still read
//! `c` from the origin when it was about to change. It is kept once, as `shared[(c, t)]`. A
//! snapshot's own image of `c` (written through the snapshot) is `private[(seq, c)]`, and
//! overrides the shared one.
//!
//! Lookup for `seq` at `c`: its private image, else the first shared entry `(c, t)` with
//! `t >= seq` (the entry before it has `t_prev < seq`, so its range holds `seq`), else the
//! origin. Both are one B-tree search.
//!
//! Invariants (checked by [`ExceptionIndex::check`]): per chunk, shared entries have distinct,
//! increasing `t`; every COW chunk appears in at most one entry; every shared entry serves at
//! least one live snapshot without a private image of its chunk (one that serves none is
//! removed and its COW chunk handed back).

use std::collections::{BTreeMap, BTreeSet};

/// Where a snapshot's image of a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// The origin's chunk.
    Origin,
    /// A COW chunk.
    Cow(u64),
}

/// The exceptions of every snapshot of a store (see the module doc).
#[derive(Debug, Default)]
pub struct ExceptionIndex {
    /// Live snapshots' creation numbers.
    live: BTreeSet<u64>,
    /// (origin chunk, newest snapshot served) -> COW chunk.
    shared: BTreeMap<(u64, u64), u64>,
    /// (snapshot, origin chunk) -> COW chunk.
    private: BTreeMap<(u64, u64), u64>,
}

impl ExceptionIndex {
    /// A snapshot is taken; it is newer than every other.
    pub fn add_snapshot(&mut self, seq: u64) {
        assert!(
            self.live.last().is_none_or(|&newest| newest < seq),
            "snapshot {seq} is not the newest"
        );
        self.live.insert(seq);
    }

    /// Where snapshot `seq` reads chunk `c`.
    pub fn lookup(&self, seq: u64, c: u64) -> Image {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        if let Some(&k) = self.private.get(&(seq, c)) {
            return Image::Cow(k);
        }
        match self.shared.range((c, seq)..(c, u64::MAX)).next() {
            Some((_, &k)) => Image::Cow(k),
            None => Image::Origin,
        }
    }

    /// The newest snapshot served by chunk `c`'s last origin copy (0: none).
    fn last_copy(&self, c: u64) -> u64 {
        self.shared
            .range((c, 0)..=(c, u64::MAX))
            .next_back()
            .map_or(0, |(&(_, t), _)| t)
    }

    /// The snapshots an origin write to `c` must copy it for first: the newest such, if any
    /// (a copy made now serves all of them). Newest first, so the usual answer is one step.
    pub fn needs_copy(&self, c: u64) -> Option<u64> {
        let after = self.last_copy(c);
        self.live
            .range(after + 1..)
            .rev()
            .find(|&&s| !self.private.contains_key(&(s, c)))
            .copied()
    }

    /// Origin chunk `c` was copied to COW chunk `k` before the origin changed it: it serves
    /// the snapshots [`ExceptionIndex::needs_copy`] named (up to `newest`).
    pub fn add_origin_copy(&mut self, c: u64, newest: u64, k: u64) {
        assert!(
            newest > self.last_copy(c),
            "origin copy of chunk {c} out of order"
        );
        assert!(self.live.contains(&newest), "snapshot {newest} is not live");
        self.shared.insert((c, newest), k);
    }

    /// Snapshot `seq` has its own image of `c` in `k` now; returns the COW chunks no longer
    /// used (its previous private image, or a shared one it alone still used).
    pub fn set_private(&mut self, seq: u64, c: u64, k: u64) -> Vec<u64> {
        assert!(self.live.contains(&seq), "snapshot {seq} is not live");
        let mut freed: Vec<u64> = self.private.insert((seq, c), k).into_iter().collect();
        freed.extend(self.collect_shared(c, seq));
        freed
    }

    /// Snapshot `seq` is gone: returns the COW chunks only it used.
    pub fn remove_snapshot(&mut self, seq: u64) -> Vec<u64> {
        assert!(self.live.remove(&seq), "snapshot {seq} is not live");
        let mine: Vec<(u64, u64)> = self
            .private
            .range((seq, 0)..=(seq, u64::MAX))
            .map(|(&key, _)| key)
            .collect();
        let mut freed: Vec<u64> = mine
            .iter()
            .filter_map(|key| self.private.remove(key))
            .collect();
        // Every shared entry whose range held it (one scan: deletes are rare).
        let covering: Vec<(u64, u64)> = self
            .shared
            .keys()
            .filter(|&&(c, t)| t >= seq && self.range_start(c, t) < seq)
            .copied()
            .collect();
        for (c, t) in covering {
            freed.extend(self.collect_entry(c, t));
        }
        freed
    }

    /// The creation number the range of shared entry `(c, t)` starts after.
    fn range_start(&self, c: u64, t: u64) -> u64 {
        self.shared
            .range((c, 0)..(c, t))
            .next_back()
            .map_or(0, |(&(_, before), _)| before)
    }

    /// Removes the shared entry serving `seq` at `c` if no live snapshot needs it any more.
    fn collect_shared(&mut self, c: u64, seq: u64) -> Option<u64> {
        let (&(_, t), _) = self.shared.range((c, seq)..=(c, u64::MAX)).next()?;
        self.collect_entry(c, t)
    }

    /// Removes shared entry `(c, t)` if it serves no live snapshot without a private image.
    fn collect_entry(&mut self, c: u64, t: u64) -> Option<u64> {
        let start = self.range_start(c, t);
        let needed = self
            .live
            .range(start + 1..=t)
            .any(|&s| !self.private.contains_key(&(s, c)));
        if needed {
            return None;
        }
        self.shared.remove(&(c, t))
    }

    /// Entries held (shared and private).
    pub fn len(&self) -> usize {
        self.shared.len() + self.private.len()
    }

    /// Panics unless the invariants of the module doc hold.
    pub fn check(&self) {
        let mut cows = BTreeSet::new();
        for (&(c, t), &k) in &self.shared {
            assert!(cows.insert(k), "COW chunk {k} in two entries");
            let start = self.range_start(c, t);
            let serves = self
                .live
                .range(start + 1..=t)
                .any(|&s| !self.private.contains_key(&(s, c)));
            assert!(serves, "shared entry ({c}, {t}) serves nobody");
        }
        for (&(s, _), &k) in &self.private {
            assert!(cows.insert(k), "COW chunk {k} in two entries");
            assert!(
                self.live.contains(&s),
                "private image of a gone snapshot {s}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// The obvious model: every snapshot's own map (what v1 keeps), with the images' contents
    /// named by the COW chunk or the origin generation they were copied from.
    #[derive(Default)]
    struct Model {
        maps: BTreeMap<u64, HashMap<u64, u64>>,
    }

    #[derive(Clone, Debug)]
    enum Op {
        Snapshot,
        OriginWrite(u64),
        SnapWrite(usize, u64),
        Delete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Snapshot),
            4 => (0u64..8).prop_map(Op::OriginWrite),
            2 => (any::<usize>(), 0u64..8).prop_map(|(s, c)| Op::SnapWrite(s, c)),
            1 => any::<usize>().prop_map(Op::Delete),
        ]
    }

    proptest! {
        /// Any run of snapshots, origin writes, snapshot writes and deletes: every snapshot
        /// reads each chunk from where the per-snapshot model says, an origin write copies at
        /// most once, and exactly the COW chunks nobody reads are handed back.
        #[test]
        fn agrees_with_one_map_per_snapshot(ops in prop::collection::vec(op(), 0..200)) {
            let mut index = ExceptionIndex::default();
            let mut model = Model::default();
            let (mut next_seq, mut next_cow) = (1u64, 0u64);
            let mut used = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Snapshot => {
                        index.add_snapshot(next_seq);
                        model.maps.insert(next_seq, HashMap::new());
                        next_seq += 1;
                    }
                    Op::OriginWrite(c) => {
                        let needing: Vec<u64> = model.maps.iter()
                            .filter(|(_, m)| !m.contains_key(&c)).map(|(&s, _)| s).collect();
                        let newest = index.needs_copy(c);
                        prop_assert_eq!(newest, needing.last().copied());
                        if let Some(newest) = newest {
                            index.add_origin_copy(c, newest, next_cow);
                            for s in needing { model.maps.get_mut(&s).unwrap().insert(c, next_cow); }
                            used.insert(next_cow);
                            next_cow += 1;
                        }
                    }
                    Op::SnapWrite(i, c) => {
                        let Some(&s) = model.maps.keys().nth(i % model.maps.len().max(1)) else { continue };
                        let freed = index.set_private(s, c, next_cow);
                        model.maps.get_mut(&s).unwrap().insert(c, next_cow);
                        used.insert(next_cow);
                        next_cow += 1;
                        for k in freed { prop_assert!(used.remove(&k), "chunk {} freed twice", k); }
                    }
                    Op::Delete(i) => {
                        let Some(&s) = model.maps.keys().nth(i % model.maps.len().max(1)) else { continue };
                        model.maps.remove(&s);
                        for k in index.remove_snapshot(s) { prop_assert!(used.remove(&k), "chunk {} freed twice", k); }
                    }
                }
                index.check();
                let mut read = BTreeSet::new();
                for (&s, m) in &model.maps {
                    for c in 0..8 {
                        let want = m.get(&c).map_or(Image::Origin, |&k| Image::Cow(k));
                        prop_assert_eq!(index.lookup(s, c), want, "snapshot {} chunk {}", s, c);
                        if let Image::Cow(k) = want { read.insert(k); }
                    }
                }
                prop_assert_eq!(&read, &used, "COW chunks in use");
            }
        }
    }
}
