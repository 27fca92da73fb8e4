//! Splitting a copy into sub-jobs: pure arithmetic, no I/O.
//!
//! A job of `len` sectors becomes `ceil(len / sub_job)` pieces, in order; every piece but the
//! last is exactly `sub_job` long; together they cover `[0, len)` exactly once.

use crate::units::SectorCount;

/// One piece of a job: `len` sectors starting `skip` sectors into every extent of the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub index: u64,
    pub skip: SectorCount,
    pub len: SectorCount,
}

/// The pieces of a job of `len` sectors with sub-jobs of `sub_job` sectors.
pub fn pieces(len: SectorCount, sub_job: SectorCount) -> impl Iterator<Item = Piece> {
    assert!(!sub_job.is_zero(), "sub-job size is zero");
    let count = piece_count(len, sub_job);
    (0..count).map(move |index| piece(len, sub_job, index))
}

/// How many pieces a job of `len` sectors has.
pub fn piece_count(len: SectorCount, sub_job: SectorCount) -> u64 {
    len.0.div_ceil(sub_job.0)
}

/// Piece number `index` of a job of `len` sectors.
pub fn piece(len: SectorCount, sub_job: SectorCount, index: u64) -> Piece {
    let skip = index.checked_mul(sub_job.0).expect("piece offset overflow");
    assert!(skip < len.0, "piece {index} is past the end of the job");
    Piece {
        index,
        skip: SectorCount(skip),
        len: SectorCount(sub_job.0.min(len.0 - skip)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Pieces cover the job exactly once, in order, each within the sub-job size.
        #[test]
        fn pieces_cover_exactly_once(len in 1u64..1_000_000, sub in 1u64..5000) {
            let mut next = 0u64;
            for (i, p) in pieces(SectorCount(len), SectorCount(sub)).enumerate() {
                prop_assert_eq!(p.index, i as u64);
                prop_assert_eq!(p.skip.0, next);
                prop_assert!(p.len.0 >= 1 && p.len.0 <= sub);
                next += p.len.0;
            }
            prop_assert_eq!(next, len);
            prop_assert_eq!(piece_count(SectorCount(len), SectorCount(sub)), len.div_ceil(sub));
        }
    }

    #[test]
    fn empty_job_has_no_pieces() {
        assert_eq!(pieces(SectorCount(0), SectorCount(8)).count(), 0);
    }
}
