//! The free COW data chunks: one bit per chunk below the highest chunk ever handed out (the
//! *frontier*), and every chunk from the frontier up to the data area's end.
//!
//! A chunk costs one bit, however many are free (a set of free chunk numbers cost 16 bytes
//! or more each), and allocation takes the lowest free chunk, so a store fills from its start
//! and the frontier (the bitmap's length) grows only when nothing below it is free.
//!
//! Invariants: `count` is the number of set bits; no bit below `hint` is set; the frontier
//! never passes `limit` (the data area's chunk count). A chunk is released only when it is not
//! free, and a chunk is handed out only once until released (both asserted).

use bitvec::prelude::{BitVec, Lsb0};

/// Free chunks of a data area of `limit` chunks (see the module doc).
#[derive(Debug)]
pub struct FreeChunks {
    /// Bit `c` set: chunk `c` (below the frontier) is free.
    bits: BitVec<u64, Lsb0>,
    /// Set bits.
    count: u64,
    /// No free chunk lies below this index.
    hint: usize,
    limit: u64,
}

impl FreeChunks {
    /// A data area of `limit` chunks, all free.
    pub fn new(limit: u64) -> FreeChunks {
        FreeChunks {
            bits: BitVec::new(),
            count: 0,
            hint: 0,
            limit,
        }
    }

    /// The free set of an area where exactly the chunks of `used` are in use: every chunk
    /// below the highest used one that is not used is free. Every chunk must lie below the
    /// area's end (the caller checked records read from disk against it).
    #[cfg(test)]
    pub fn with_used(limit: u64, used: impl Iterator<Item = u64> + Clone) -> FreeChunks {
        let frontier = used.clone().max().map_or(0, |m| m + 1);
        assert!(frontier <= limit, "a used chunk lies past the data area");
        let len = usize::try_from(frontier).expect("a frontier within the device fits memory");
        let mut bits = BitVec::repeat(true, len);
        for c in used {
            bits.set(c as usize, false);
        }
        let count = bits.count_ones() as u64;
        FreeChunks {
            bits,
            count,
            hint: 0,
            limit,
        }
    }

    /// The lowest free chunk, now taken; `None` when every chunk of the area is taken.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.count > 0 {
            let offset = self.bits[self.hint..]
                .first_one()
                .expect("a counted free chunk lies at or past the hint");
            let c = self.hint + offset;
            self.bits.set(c, false);
            self.count -= 1;
            self.hint = c + 1;
            return Some(c as u64);
        }
        let frontier = self.frontier();
        if frontier < self.limit {
            self.bits.push(false);
            self.hint = self.bits.len();
            return Some(frontier);
        }
        None
    }

    /// Takes chunk `chunk`, which must be free (or past the frontier, which moves past it):
    /// a replay marks the chunks its records use.
    pub fn take(&mut self, chunk: u64) {
        assert!(chunk < self.limit, "chunk {chunk} lies past the data area");
        let c = usize::try_from(chunk).expect("a chunk within the device fits memory");
        if c >= self.bits.len() {
            let grown = c + 1 - self.bits.len();
            self.bits.resize(c + 1, true);
            self.count += grown as u64;
        }
        assert!(self.bits[c], "chunk {chunk} taken twice");
        self.bits.set(c, false);
        self.count -= 1;
    }

    /// Whether `chunk` is taken (handed out or marked, and not released).
    pub fn is_taken(&self, chunk: u64) -> bool {
        usize::try_from(chunk)
            .ok()
            .and_then(|c| self.bits.get(c).map(|b| !*b))
            .unwrap_or(false)
    }

    /// Makes a taken chunk free again.
    pub fn release(&mut self, chunk: u64) {
        let c = usize::try_from(chunk).expect("a chunk below the frontier fits memory");
        assert!(c < self.bits.len(), "chunk {chunk} was never handed out");
        assert!(!self.bits[c], "chunk {chunk} released twice");
        self.bits.set(c, true);
        self.count += 1;
        self.hint = self.hint.min(c);
    }

    /// Whether `chunk` is free below the frontier.
    #[cfg(test)]
    pub fn is_free(&self, chunk: u64) -> bool {
        usize::try_from(chunk)
            .ok()
            .and_then(|c| self.bits.get(c).map(|b| *b))
            .unwrap_or(false)
    }

    /// One past the highest chunk ever handed out.
    pub fn frontier(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Free chunks below the frontier.
    #[cfg(test)]
    pub fn count_below_frontier(&self) -> u64 {
        self.count
    }

    /// Free chunks in all: those below the frontier and every one from it to the end.
    pub fn free_count(&self) -> u64 {
        self.count + (self.limit - self.frontier())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hands_out_the_lowest_free_chunk_then_grows() {
        let mut free = FreeChunks::with_used(10, [1u64, 4].into_iter());
        assert_eq!(free.frontier(), 5);
        assert_eq!(free.count_below_frontier(), 3);
        assert_eq!(free.alloc(), Some(0));
        assert_eq!(free.alloc(), Some(2));
        assert_eq!(free.alloc(), Some(3));
        assert_eq!(free.alloc(), Some(5));
        free.release(2);
        assert!(free.is_free(2));
        assert_eq!(free.alloc(), Some(2));
        assert!(!free.is_free(2));
    }

    #[test]
    fn a_full_area_hands_out_nothing() {
        let mut free = FreeChunks::new(2);
        assert_eq!(free.alloc(), Some(0));
        assert_eq!(free.alloc(), Some(1));
        assert_eq!(free.alloc(), None);
        free.release(0);
        assert_eq!(free.alloc(), Some(0));
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn releasing_a_free_chunk_is_a_bug() {
        let mut free = FreeChunks::new(4);
        free.alloc();
        free.release(0);
        free.release(0);
    }

    proptest! {
        /// Any run of allocations and releases hands out what a set of free chunk numbers
        /// (the structure this replaced) would: the lowest free chunk, then a fresh one.
        #[test]
        fn behaves_as_an_ordered_set(limit in 1u64..200, ops in prop::collection::vec(any::<(bool, u16)>(), 0..400)) {
            let mut free = FreeChunks::new(limit);
            let mut model_free = BTreeSet::new();
            let mut model_next = 0u64;
            let mut taken = Vec::new();
            for (alloc, pick) in ops {
                if alloc || taken.is_empty() {
                    let want = model_free.pop_first().or_else(|| {
                        (model_next < limit).then(|| { model_next += 1; model_next - 1 })
                    });
                    prop_assert_eq!(free.alloc(), want);
                    taken.extend(want);
                } else {
                    let c = taken.swap_remove(pick as usize % taken.len());
                    free.release(c);
                    model_free.insert(c);
                }
                prop_assert_eq!(free.count_below_frontier(), model_free.len() as u64);
                prop_assert_eq!(free.frontier(), model_next);
            }
        }
    }
}
