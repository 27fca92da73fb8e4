//! A fixed-length set of regions, one bit each.
//!
//! [`RegionBitmap`] backs every per-region flag in the region map and the dirty log, so their
//! memory is `count / 8` bytes each, whatever the device size. It converts to and from the
//! dirty log's on-disk bit order: bit `i` is bit `i % 8` (least significant first) of byte
//! `i / 8`.
//!
//! Invariant: the storage bits past `len` are always zero. Word-at-a-time operations
//! (intersection, counting, serialising) rely on it, so only per-bit setters and range fills
//! touch the live bits, and deserialising rejects stray bits past the end.

use bitvec::prelude::{BitVec, Lsb0};

use super::geometry::{RegionCount, RegionIndex, RegionRange};

const WORD_BYTES: usize = std::mem::size_of::<u64>();

/// One bit per region of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionBitmap {
    bits: BitVec<u64, Lsb0>,
}

impl RegionBitmap {
    /// A bitmap of `count` regions, all clear.
    pub fn new(count: RegionCount) -> RegionBitmap {
        RegionBitmap {
            bits: BitVec::repeat(false, count.to_usize()),
        }
    }

    /// The number of regions the bitmap covers.
    pub fn len(&self) -> RegionCount {
        RegionCount(self.bits.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    pub fn get(&self, region: RegionIndex) -> bool {
        self.bits[self.index(region)]
    }

    /// Sets `region`'s bit to `value` and returns its previous value.
    pub fn set(&mut self, region: RegionIndex, value: bool) -> bool {
        let i = self.index(region);
        self.bits.replace(i, value)
    }

    /// Sets every bit in `range` to `value`.
    pub fn set_range(&mut self, range: RegionRange, value: bool) {
        assert!(
            range.end.0 <= self.len().0,
            "{range:?} is past the end of the bitmap"
        );
        self.bits[range.start.to_usize()..range.end.to_usize()].fill(value);
    }

    /// Sets every bit to `value`.
    pub fn fill(&mut self, value: bool) {
        self.bits.fill(value);
    }

    /// The number of set bits.
    pub fn count_ones(&self) -> RegionCount {
        RegionCount(self.bits.count_ones() as u64)
    }

    /// Whether no bit is set.
    pub fn none(&self) -> bool {
        self.bits.not_any()
    }

    /// The set regions, in order.
    pub fn iter_ones(&self) -> impl Iterator<Item = RegionIndex> + '_ {
        self.iter_ones_from(RegionIndex(0))
    }

    /// The set regions at or after `start`, in order.
    pub fn iter_ones_from(&self, start: RegionIndex) -> impl Iterator<Item = RegionIndex> + '_ {
        let start = start.to_usize().min(self.bits.len());
        self.bits[start..]
            .iter_ones()
            .map(move |i| RegionIndex((start + i) as u64))
    }

    /// Clears every bit that is clear in `other` (set intersection).
    pub fn and_assign(&mut self, other: &RegionBitmap) {
        assert_eq!(self.len(), other.len(), "bitmaps of different lengths");
        let ours = self.bits.as_raw_mut_slice();
        for (word, theirs) in ours.iter_mut().zip(other.bits.as_raw_slice()) {
            *word &= *theirs;
        }
    }

    /// Copies `other`'s bits into this bitmap, which must be as long.
    pub fn copy_from(&mut self, other: &RegionBitmap) {
        assert_eq!(self.len(), other.len(), "bitmaps of different lengths");
        self.bits
            .as_raw_mut_slice()
            .copy_from_slice(other.bits.as_raw_slice());
    }

    /// Whether every bit set here is also set in `other`.
    pub fn is_subset_of(&self, other: &RegionBitmap) -> bool {
        assert_eq!(self.len(), other.len(), "bitmaps of different lengths");
        let pairs = self
            .bits
            .as_raw_slice()
            .iter()
            .zip(other.bits.as_raw_slice());
        pairs.into_iter().all(|(ours, theirs)| ours & !theirs == 0)
    }

    /// The number of regions set here and clear in `other`.
    pub fn count_and_not(&self, other: &RegionBitmap) -> RegionCount {
        assert_eq!(self.len(), other.len(), "bitmaps of different lengths");
        let pairs = self
            .bits
            .as_raw_slice()
            .iter()
            .zip(other.bits.as_raw_slice());
        RegionCount(
            pairs
                .map(|(ours, theirs)| u64::from((ours & !theirs).count_ones()))
                .sum(),
        )
    }

    /// The bytes of the on-disk form: `ceil(len / 8)` of them.
    pub fn byte_len(count: RegionCount) -> usize {
        count.to_usize().div_ceil(8)
    }

    /// Writes the on-disk form into `out`, which is [`RegionBitmap::byte_len`] long.
    pub fn write_le_bytes(&self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            RegionBitmap::byte_len(self.len()),
            "bitmap byte length"
        );
        let words = self.bits.as_raw_slice();
        for (chunk, word) in out.chunks_mut(WORD_BYTES).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
    }

    /// Reads the on-disk form of `count` regions from `bytes` ([`RegionBitmap::byte_len`]
    /// long); `None` when a bit past `count` is set (the invariant above).
    pub fn from_le_bytes(count: RegionCount, bytes: &[u8]) -> Option<RegionBitmap> {
        assert_eq!(
            bytes.len(),
            RegionBitmap::byte_len(count),
            "bitmap byte length"
        );
        let words: Vec<u64> = bytes.chunks(WORD_BYTES).map(word_from_le).collect();
        let mut bits = BitVec::from_vec(words);
        if bits[count.to_usize()..].any() {
            return None;
        }
        bits.truncate(count.to_usize());
        Some(RegionBitmap { bits })
    }

    fn index(&self, region: RegionIndex) -> usize {
        assert!(
            self.len().contains(region),
            "{region} is past the end of the bitmap"
        );
        region.to_usize()
    }
}

/// A little-endian word from up to eight bytes (the last word of a bitmap may be short).
fn word_from_le(chunk: &[u8]) -> u64 {
    let mut word = [0u8; WORD_BYTES];
    word[..chunk.len()].copy_from_slice(chunk);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn on_disk_bit_order_is_lsb_first() {
        let mut bits = RegionBitmap::new(RegionCount(12));
        bits.set(RegionIndex(0), true);
        bits.set(RegionIndex(9), true);
        let mut out = [0u8; 2];
        bits.write_le_bytes(&mut out);
        assert_eq!(out, [0b0000_0001, 0b0000_0010]);
    }

    #[test]
    fn stray_bits_past_the_end_are_rejected() {
        assert!(RegionBitmap::from_le_bytes(RegionCount(12), &[0, 0b0001_0000]).is_none());
        assert!(RegionBitmap::from_le_bytes(RegionCount(12), &[0, 0b0000_1000]).is_some());
    }

    #[test]
    fn ranges_and_counts() {
        let mut a = RegionBitmap::new(RegionCount(130));
        a.set_range(RegionRange::new(RegionIndex(60), RegionIndex(70)), true);
        assert_eq!(a.count_ones(), RegionCount(10));
        let mut b = RegionBitmap::new(RegionCount(130));
        b.set_range(RegionRange::new(RegionIndex(65), RegionIndex(130)), true);
        assert_eq!(a.count_and_not(&b), RegionCount(5));
        assert!(!a.is_subset_of(&b));
        a.and_assign(&b);
        assert_eq!(a.iter_ones().collect::<Vec<_>>().len(), 5);
        assert!(a.is_subset_of(&b));
        assert_eq!(b.iter_ones_from(RegionIndex(128)).count(), 2);
        assert_eq!(b.iter_ones_from(RegionIndex(130)).count(), 0);
    }

    proptest! {
        #[test]
        fn bytes_round_trip(bits in proptest::collection::vec(any::<bool>(), 1..300)) {
            let mut map = RegionBitmap::new(RegionCount(bits.len() as u64));
            for (i, &b) in bits.iter().enumerate() {
                map.set(RegionIndex(i as u64), b);
            }
            let mut bytes = vec![0u8; RegionBitmap::byte_len(map.len())];
            map.write_le_bytes(&mut bytes);
            for (i, &b) in bits.iter().enumerate() {
                prop_assert_eq!(bytes[i / 8] >> (i % 8) & 1 == 1, b);
            }
            let back = RegionBitmap::from_le_bytes(map.len(), &bytes).expect("valid bytes");
            prop_assert_eq!(back, map);
        }
    }
}
