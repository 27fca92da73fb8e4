//! [`PackedMap`]: an ordered map of `u64` keys to `u64` values kept in sorted blocks, for the
//! exception index, where it holds one entry per exception and its memory is what a
//! snapshot's exceptions cost.
//!
//! Why not `std::collections::BTreeMap`: its nodes hold 11 entries and keep 6 of them when
//! they split, so keys inserted in ascending order (an origin written front to back, the
//! common case) leave every node about half full, near 34 bytes per 16-byte entry. Here an
//! entry costs its 16 bytes in a block of up to [`BLOCK_ENTRIES`], and the blocks sit in a
//! `BTreeMap` by first key, a few bytes per entry more:
//! - a full block split by an append at its end keeps its entries and starts a new block,
//!   so ascending inserts fill every block (about 17 bytes per entry);
//! - any other split halves the block, and a removal that leaves a block under a quarter
//!   full joins it to a neighbour when both fit in three quarters of one, so blocks stay
//!   about half full or more whatever the order (at most about 34 bytes per entry, about 23
//!   for random inserts).
//!
//! Invariants (checked by [`PackedMap::check`]): every block is non-empty, sorted, holds at
//! most [`BLOCK_ENTRIES`] entries with capacity exactly [`BLOCK_ENTRIES`], is keyed by its
//! first key, and its last key is below the next block's first; `len` counts the entries.

use std::collections::BTreeMap;

/// Entries per block (16 bytes each: 1 KiB blocks).
pub const BLOCK_ENTRIES: usize = 64;

/// A block under this many entries after a removal is joined to a neighbour if they fit.
const SPARSE: usize = BLOCK_ENTRIES / 4;

/// The most entries a join may leave in one block, so that the next inserts do not split it
/// at once.
const JOINED_MAX: usize = BLOCK_ENTRIES * 3 / 4;

/// A sorted block of entries.
type Block = Vec<(u64, u64)>;

/// An ordered `u64 -> u64` map in sorted blocks (see the module doc).
#[derive(Debug, Default)]
pub struct PackedMap {
    /// First key of each block -> the block.
    blocks: BTreeMap<u64, Block>,
    /// Entries in all blocks.
    len: usize,
}

impl PackedMap {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The value of `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        let (_, block) = self.blocks.range(..=key).next_back()?;
        let i = block.binary_search_by_key(&key, |&(k, _)| k).ok()?;
        Some(block[i].1)
    }

    /// Whether `key` is held.
    pub fn contains_key(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: u64, value: u64) -> Option<u64> {
        let Some(first) = self.block_for(key) else {
            self.blocks.insert(key, new_block(&[(key, value)]));
            self.len += 1;
            return None;
        };
        let block = self.blocks.get_mut(&first).expect("found");
        let at = match block.binary_search_by_key(&key, |&(k, _)| k) {
            Ok(i) => return Some(std::mem::replace(&mut block[i].1, value)),
            Err(at) => at,
        };
        self.len += 1;
        if block.len() == BLOCK_ENTRIES {
            self.split_insert(first, at, (key, value));
        } else {
            block.insert(at, (key, value));
            self.rekey(first);
        }
        None
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: u64) -> Option<u64> {
        let (&first, block) = self.blocks.range_mut(..=key).next_back()?;
        let i = block.binary_search_by_key(&key, |&(k, _)| k).ok()?;
        let (_, value) = block.remove(i);
        self.len -= 1;
        if block.is_empty() {
            self.blocks.remove(&first);
            return Some(value);
        }
        let first = self.rekey(first);
        if self.blocks[&first].len() < SPARSE {
            self.join_sparse(first);
        }
        Some(value)
    }

    /// The first entry whose key is at least `key`.
    pub fn first_from(&self, key: u64) -> Option<(u64, u64)> {
        self.iter_from(key).next()
    }

    /// The last entry whose key is below `key`.
    pub fn last_before(&self, key: u64) -> Option<(u64, u64)> {
        let (_, block) = self.blocks.range(..key).next_back()?;
        let at = block.partition_point(|&(k, _)| k < key);
        Some(block[at - 1])
    }

    /// The last entry whose key is at most `key`.
    pub fn last_at_most(&self, key: u64) -> Option<(u64, u64)> {
        let (_, block) = self.blocks.range(..=key).next_back()?;
        let at = block.partition_point(|&(k, _)| k <= key);
        Some(block[at - 1])
    }

    /// Every entry whose key is at least `key`, in key order.
    pub fn iter_from(&self, key: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let start = self
            .blocks
            .range(..=key)
            .next_back()
            .map_or(key, |(&first, _)| first);
        self.blocks
            .range(start..)
            .flat_map(|(_, block)| block.iter().copied())
            .skip_while(move |&(k, _)| k < key)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.blocks.values().flat_map(|block| block.iter().copied())
    }

    /// Panics unless the invariants of the module doc hold.
    pub fn check(&self) {
        let mut previous_last = None;
        let mut len = 0;
        for (&first, block) in &self.blocks {
            assert!(!block.is_empty(), "an empty block at {first}");
            assert!(block.len() <= BLOCK_ENTRIES, "block {first} overfull");
            assert_eq!(block.capacity(), BLOCK_ENTRIES, "block {first}'s capacity");
            assert_eq!(block[0].0, first, "block keyed by {first}");
            assert!(
                block.windows(2).all(|w| w[0].0 < w[1].0),
                "block {first} unsorted"
            );
            assert!(
                previous_last.is_none_or(|last| last < first),
                "blocks overlap at {first}"
            );
            previous_last = Some(block[block.len() - 1].0);
            len += block.len();
        }
        assert_eq!(len, self.len, "entries counted");
    }

    /// The first key of the block `key` belongs in: the last block starting at or before it,
    /// else the first block (a key below every block joins the first).
    fn block_for(&self, key: u64) -> Option<u64> {
        self.blocks
            .range(..=key)
            .next_back()
            .or_else(|| self.blocks.iter().next())
            .map(|(&first, _)| first)
    }

    /// Puts `entry` at index `at` of full block `first`: an append at its end starts the
    /// next block; anything else halves it first.
    fn split_insert(&mut self, first: u64, at: usize, entry: (u64, u64)) {
        if at == BLOCK_ENTRIES {
            self.blocks.insert(entry.0, new_block(&[entry]));
            return;
        }
        let half = BLOCK_ENTRIES / 2;
        let block = self.blocks.get_mut(&first).expect("full");
        let mut upper = new_block(&block[half..]);
        block.truncate(half);
        if at <= half {
            block.insert(at, entry);
        } else {
            upper.insert(at - half, entry);
        }
        self.blocks.insert(upper[0].0, upper);
        self.rekey(first);
    }

    /// Keys block `first` by its first entry again (an insert or removal at its front
    /// changed it); returns the key.
    fn rekey(&mut self, first: u64) -> u64 {
        let now = self.blocks[&first][0].0;
        if now != first {
            let block = self.blocks.remove(&first).expect("keyed");
            self.blocks.insert(now, block);
        }
        now
    }

    /// Joins sparse block `first` to its next neighbour (else its previous one) if both fit
    /// in [`JOINED_MAX`] entries.
    fn join_sparse(&mut self, first: u64) {
        let len = self.blocks[&first].len();
        let next = self.blocks.range(first + 1..).next();
        let prev = self.blocks.range(..first).next_back();
        let pair = match (next, prev) {
            (Some((&n, b)), _) if len + b.len() <= JOINED_MAX => (first, n),
            (_, Some((&p, b))) if len + b.len() <= JOINED_MAX => (p, first),
            _ => return,
        };
        let upper = self.blocks.remove(&pair.1).expect("neighbour");
        self.blocks
            .get_mut(&pair.0)
            .expect("neighbour")
            .extend_from_slice(&upper);
    }
}

/// A block holding `entries`, with the capacity every block has (so that its memory is
/// known: a `Vec` grown by pushes would double past it).
fn new_block(entries: &[(u64, u64)]) -> Block {
    assert!(
        entries.len() <= BLOCK_ENTRIES,
        "a block of {}",
        entries.len()
    );
    let mut block = Vec::with_capacity(BLOCK_ENTRIES);
    block.extend_from_slice(entries);
    block
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
    }

    /// Keys from a small space (so that removals and replacements hit) or anywhere.
    fn key() -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0u64..400, 1 => any::<u64>()]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (key(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => key().prop_map(Op::Remove),
        ]
    }

    fn agree(map: &PackedMap, model: &BTreeMap<u64, u64>, probes: &[u64]) {
        map.check();
        assert_eq!(map.len(), model.len());
        assert!(map.iter().eq(model.iter().map(|(&k, &v)| (k, v))));
        for &p in probes {
            assert_eq!(map.get(p), model.get(&p).copied(), "get {p}");
            let want = model.range(p..).next().map(|(&k, &v)| (k, v));
            assert_eq!(map.first_from(p), want, "first_from {p}");
            let want = model.range(..p).next_back().map(|(&k, &v)| (k, v));
            assert_eq!(map.last_before(p), want, "last_before {p}");
            let want = model.range(..=p).next_back().map(|(&k, &v)| (k, v));
            assert_eq!(map.last_at_most(p), want, "last_at_most {p}");
            let want: Vec<_> = model.range(p..).take(3).map(|(&k, &v)| (k, v)).collect();
            assert_eq!(map.iter_from(p).take(3).collect::<Vec<_>>(), want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn agrees_with_a_btree_map(ops in prop::collection::vec(op(), 0..600)) {
            let mut map = PackedMap::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(map.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(map.remove(k), model.remove(&k)),
                }
            }
            let probes: Vec<u64> = (0..410).chain([u64::MAX, u64::MAX - 1]).collect();
            agree(&map, &model, &probes);
        }
    }

    #[test]
    fn ascending_inserts_fill_every_block() {
        let mut map = PackedMap::default();
        for k in 0..10 * BLOCK_ENTRIES as u64 {
            map.insert(k * 3, k);
        }
        map.check();
        assert_eq!(map.blocks.len(), 10);
    }

    #[test]
    fn removals_keep_blocks_from_thinning_out() {
        let mut map = PackedMap::default();
        let n = 20 * BLOCK_ENTRIES as u64;
        for k in 0..n {
            map.insert(k, k);
        }
        // Remove seven of every eight: without joins every block would stay, an eighth full.
        for k in (0..n).filter(|k| k % 8 != 0) {
            map.remove(k);
        }
        map.check();
        assert_eq!(map.len(), (n / 8) as usize);
        assert!(
            map.blocks.len() <= 20 / 2 + 1,
            "{} blocks for {} entries",
            map.blocks.len(),
            map.len()
        );
    }
}
