//! The in-memory state of every region of a mirror: which are in sync, which are being
//! recovered, which have writes in flight, and which dirty-log bits may be set.
//!
//! [`RegionMap`] is plain data with a `&mut self` API; the mirror wraps it in a mutex and does
//! the I/O (dirty log, legs, copies) itself. It never blocks and never fails: a transition that
//! the state does not allow is a bug and asserts.
//!
//! A region's [`RegionState`] is derived from a few bitsets (one bit per region each, so the
//! map costs a few times `count / 8` bytes) and a map of pending-write counts that holds only
//! regions with writes in flight:
//! - `out_of_sync`: the legs may differ; `recovering` (a subset): a resync copy is running;
//! - `dirty`: the region's dirty-log bit may be set, so it must be cleared some day;
//! - `marked` (a subset of `dirty`): the bit is known durable, so writes need not mark it;
//! - `clearing` (a subset of `dirty`, disjoint from `marked`): handed out by
//!   [`RegionMap::regions_to_clear`] and not yet confirmed;
//! - `written_since_pass`: a write began since the last clearing pass.
//!
//! Invariants, asserted where they are relied on: a recovering region has no writes in flight
//! (writes wait while it recovers); a region with writes in flight or out of sync is `dirty`
//! (its bit was marked before its legs were written, or it was loaded from the log); a region
//! is offered for clearing only when in sync, idle, and the set is not degraded.
//!
//! **Aging.** A bit is cleared only once its region has gone a whole clearing pass without a
//! write (md clears a bitmap chunk only after a whole daemon period without one): a region
//! written all the time keeps its bit, instead of costing a clear and then a mark (a metadata
//! write on every leg, a round trip for a remote one, in a write's path) at every pass.
//!
//! The clearing protocol, which keeps the on-disk bit set while any write may be in flight:
//! 1. under the map's lock, take [`RegionMap::regions_to_clear`] and pass them at once to
//!    `DirtyLog::clear` (still under the lock, so that a write that starts afterwards marks
//!    the bit again after the clear and so cancels it);
//! 2. `DirtyLog::commit_clears` with the legs' flush;
//! 3. [`RegionMap::cleared`] on success, [`RegionMap::clear_failed`] on error.

use std::collections::BTreeMap;

use super::bitmap::RegionBitmap;
use super::geometry::{RegionCount, RegionGeometry, RegionIndex, RegionRange};

/// What a region is, as the mirror sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionState {
    /// In sync, no write in flight, and its dirty-log bit is clear.
    Clean,
    /// In sync, but writes are in flight or its dirty-log bit is still set (cleared lazily).
    Dirty,
    /// A resync copy is running; new writes wait.
    Recovering,
    /// The legs may differ (a leg write failed, or the region was never synced): reads go to
    /// the default leg only, and resync will copy it.
    OutOfSync,
}

/// Whether a write may start on a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAdmission {
    /// The write is counted as pending. When `needs_mark`, the caller must make the region's
    /// dirty-log bit durable (`DirtyLog::mark`), then call [`RegionMap::marked`], before it
    /// writes any leg.
    Proceed { needs_mark: bool },
    /// The region is being recovered: retry after its `recovery_done`.
    Wait,
}

/// How many regions are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub clean: RegionCount,
    pub dirty: RegionCount,
    pub recovering: RegionCount,
    pub out_of_sync: RegionCount,
}

/// The state of every region of one mirror (see the module doc).
#[derive(Clone, Debug)]
pub struct RegionMap {
    geometry: RegionGeometry,
    out_of_sync: RegionBitmap,
    recovering: RegionBitmap,
    /// Recovering regions marked out of sync again while their copy ran: the copy may have
    /// read data that is stale by now, so success must not make them in sync.
    resync_again: RegionBitmap,
    dirty: RegionBitmap,
    marked: RegionBitmap,
    clearing: RegionBitmap,
    /// Regions a write began on since the last [`RegionMap::regions_to_clear`] (aging).
    written_since_pass: RegionBitmap,
    /// Writes in flight, only for regions that have any (never a zero entry).
    pending: BTreeMap<RegionIndex, u32>,
    /// Where the next search for resync work starts: resync walks the disk in order.
    cursor: RegionIndex,
    degraded: bool,
}

impl RegionMap {
    /// A map of `geometry`'s regions, all clean and in sync.
    pub fn new(geometry: RegionGeometry) -> RegionMap {
        let bitmap = RegionBitmap::new(geometry.count());
        RegionMap {
            geometry,
            out_of_sync: bitmap.clone(),
            recovering: bitmap.clone(),
            resync_again: bitmap.clone(),
            dirty: bitmap.clone(),
            marked: bitmap.clone(),
            clearing: bitmap.clone(),
            written_since_pass: bitmap,
            pending: BTreeMap::new(),
            cursor: RegionIndex(0),
            degraded: false,
        }
    }

    /// Takes in the bits a dirty log held when it was opened: each such region may have been
    /// written on some legs and not others before a crash, so it becomes out of sync; its bit
    /// is durable, so writes need not mark it again.
    pub fn load_dirty_log(&mut self, bits: &RegionBitmap) {
        assert_eq!(
            bits.len(),
            self.geometry.count(),
            "dirty log of another geometry"
        );
        assert!(
            self.pending.is_empty(),
            "loading a dirty log with writes in flight"
        );
        for region in bits.iter_ones() {
            self.out_of_sync.set(region, true);
            self.dirty.set(region, true);
            self.marked.set(region, true);
        }
    }

    pub fn geometry(&self) -> &RegionGeometry {
        &self.geometry
    }

    pub fn state(&self, region: RegionIndex) -> RegionState {
        if self.recovering.get(region) {
            RegionState::Recovering
        } else if self.out_of_sync.get(region) {
            RegionState::OutOfSync
        } else if self.dirty.get(region) {
            RegionState::Dirty
        } else {
            RegionState::Clean
        }
    }

    /// Writes in flight on `region`.
    pub fn pending_writes(&self, region: RegionIndex) -> u32 {
        self.check(region);
        self.pending.get(&region).copied().unwrap_or(0)
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    /// Admits a write to `region` (see [`WriteAdmission`]). Every `Proceed` must be paired
    /// with one [`RegionMap::end_write`] or [`RegionMap::abort_write`].
    pub fn begin_write(&mut self, region: RegionIndex) -> WriteAdmission {
        if self.recovering.get(region) {
            return WriteAdmission::Wait;
        }
        let count = self.pending.entry(region).or_insert(0);
        *count = count.checked_add(1).expect("pending writes overflow");
        self.dirty.set(region, true);
        self.written_since_pass.set(region, true);
        // A clear in progress is cancelled: the caller's mark lands after the log's clear.
        self.clearing.set(region, false);
        WriteAdmission::Proceed {
            needs_mark: !self.marked.get(region),
        }
    }

    /// Records that the dirty-log bits of `regions`, each with a write in flight, are durable
    /// (`DirtyLog::mark` returned `Ok` after `begin_write` said `needs_mark`). Only a write in
    /// flight may confirm a mark: while it is pending the region cannot be cleared, so the
    /// confirmation cannot be stale.
    pub fn marked(&mut self, regions: &[RegionIndex]) {
        for &region in regions {
            assert!(
                self.pending.contains_key(&region),
                "{region} marked without a write in flight"
            );
            assert!(self.dirty.get(region) && !self.clearing.get(region));
            self.marked.set(region, true);
        }
    }

    /// Ends a write admitted by [`RegionMap::begin_write`]. `ok` is false when some leg did
    /// not get the data (a failed or missing leg): the region is then out of sync, never
    /// clean, until a resync copies it.
    pub fn end_write(&mut self, region: RegionIndex, ok: bool) {
        self.drop_pending(region);
        if !ok {
            self.set_out_of_sync(region);
        }
    }

    /// Ends an admitted write that wrote no leg (its mark failed, say): no state changes.
    pub fn abort_write(&mut self, region: RegionIndex) {
        self.drop_pending(region);
    }

    fn drop_pending(&mut self, region: RegionIndex) {
        assert!(
            self.dirty.get(region),
            "{region} has a write in flight but is not dirty"
        );
        let count = self
            .pending
            .get_mut(&region)
            .expect("end of a write that never began");
        *count -= 1;
        if *count == 0 {
            self.pending.remove(&region);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Resync

    /// The next out-of-sync region to resync: the first at or after the cursor (wrapping) that
    /// is not recovering and has no writes in flight. Resync thus walks the disk in order and
    /// resumes where it stopped. A region whose recovery failed is offered again only after
    /// the walk wraps.
    pub fn next_to_recover(&mut self) -> Option<RegionIndex> {
        let found = self
            .first_recoverable(self.cursor, self.geometry.all().end)
            .or_else(|| self.first_recoverable(RegionIndex(0), self.cursor))?;
        self.cursor = found;
        Some(found)
    }

    fn first_recoverable(&self, from: RegionIndex, to: RegionIndex) -> Option<RegionIndex> {
        self.out_of_sync
            .iter_ones_from(from)
            .take_while(|&region| region < to)
            .find(|&region| !self.recovering.get(region) && !self.pending.contains_key(&region))
    }

    /// Starts resyncing `region`: writes to it wait until [`RegionMap::recovery_done`].
    pub fn begin_recovery(&mut self, region: RegionIndex) {
        assert!(
            self.out_of_sync.get(region),
            "recovery of {region}, which is in sync"
        );
        assert!(
            !self.recovering.get(region),
            "{region} is already recovering"
        );
        assert_eq!(
            self.pending_writes(region),
            0,
            "recovery of {region} with writes in flight"
        );
        assert!(
            self.dirty.get(region),
            "{region} is out of sync but its log bit is clear"
        );
        self.recovering.set(region, true);
    }

    /// Ends a resync copy: on success the region is in sync (its log bit is then cleared
    /// lazily, like after a write); on failure it stays out of sync.
    pub fn recovery_done(&mut self, region: RegionIndex, ok: bool) {
        assert!(self.recovering.get(region), "{region} was not recovering");
        assert_eq!(
            self.pending_writes(region),
            0,
            "{region} got writes while recovering"
        );
        self.recovering.set(region, false);
        let again = self.resync_again.set(region, false);
        if ok && !again {
            self.out_of_sync.set(region, false);
        }
        // Recoveries complete out of order when several are in flight: the cursor only moves
        // forward here (the walk wraps in `next_to_recover`), or an early region finishing
        // late would send the walk back to a region that just failed.
        self.cursor = self.cursor.max(region.next());
    }

    /// Marks `range` out of sync (a leg was replaced, or a resync was asked for). Then, in
    /// this order, the caller must `DirtyLog::mark_range` the same range, so that the fact
    /// survives a crash: marking the log after the map cancels any clear of these regions
    /// already handed to the log. Until that mark is durable a crash forgets the range.
    pub fn mark_out_of_sync(&mut self, range: RegionRange) {
        assert!(
            range.end.0 <= self.geometry.count().0,
            "{range:?} is past the last region"
        );
        for region in range {
            self.set_out_of_sync(region);
        }
    }

    fn set_out_of_sync(&mut self, region: RegionIndex) {
        self.out_of_sync.set(region, true);
        self.dirty.set(region, true);
        self.clearing.set(region, false);
        if self.recovering.get(region) {
            self.resync_again.set(region, true);
        }
    }

    /// Marks out of sync every region written while a leg was missing, for that leg's
    /// return: those whose bits are durable (nothing is cleared while degraded) and those
    /// with writes in flight (their marks are in flight too). Returns how many regions the
    /// resync will copy.
    pub fn resync_dirty(&mut self) -> RegionCount {
        let mut written: Vec<RegionIndex> = self.marked.iter_ones().collect();
        written.extend(self.pending.keys().copied());
        for region in written {
            self.set_out_of_sync(region);
        }
        self.out_of_sync.count_ones()
    }

    /// Declares every region in sync (a mirror created with `nosync`). Dirty-log bits stay
    /// set until cleared lazily.
    pub fn set_all_in_sync(&mut self) {
        assert!(self.recovering.none(), "set_all_in_sync during a recovery");
        self.out_of_sync.fill(false);
    }

    pub fn in_sync(&self, region: RegionIndex) -> bool {
        !self.out_of_sync.get(region)
    }

    /// The number of regions in sync.
    pub fn sync_count(&self) -> RegionCount {
        RegionCount(self.geometry.count().0 - self.out_of_sync.count_ones().0)
    }

    pub fn counts(&self) -> StateCounts {
        let out_of_sync = self.out_of_sync.count_ones();
        let recovering = self.recovering.count_ones();
        let dirty = self.dirty.count_and_not(&self.out_of_sync);
        let clean = RegionCount(self.geometry.count().0 - out_of_sync.0 - dirty.0);
        let out_of_sync = RegionCount(out_of_sync.0 - recovering.0);
        StateCounts {
            clean,
            dirty,
            recovering,
            out_of_sync,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Lazy clearing

    /// A clearing pass: hands out up to `max` regions whose dirty-log bits may now be
    /// cleared: in sync, no write in flight, not already being cleared, and no write begun
    /// since the previous pass (aging, see the module doc); then starts the next period.
    /// None while degraded. See the module doc for the protocol; the regions stop being
    /// `marked`, so a write that starts before [`RegionMap::cleared`] marks the bit again.
    pub fn regions_to_clear(&mut self, max: usize) -> Vec<RegionIndex> {
        if self.degraded {
            return Vec::new();
        }
        let picked: Vec<RegionIndex> = self
            .dirty
            .iter_ones()
            .filter(|&region| self.clearable(region))
            .take(max)
            .collect();
        for &region in &picked {
            assert!(
                !self.written_since_pass.get(region),
                "{region} cleared in the pass it was written in"
            );
            self.marked.set(region, false);
            self.clearing.set(region, true);
        }
        self.written_since_pass.fill(false);
        picked
    }

    fn clearable(&self, region: RegionIndex) -> bool {
        !self.out_of_sync.get(region)
            && !self.clearing.get(region)
            && !self.pending.contains_key(&region)
            && !self.written_since_pass.get(region)
    }

    /// Confirms that the dirty-log bits of `regions` (from `regions_to_clear`) are durably
    /// clear. Regions written or marked out of sync meanwhile stay dirty.
    pub fn cleared(&mut self, regions: &[RegionIndex]) {
        for &region in regions {
            if self.clearing.set(region, false) {
                assert!(
                    !self.out_of_sync.get(region),
                    "{region} cleared while out of sync"
                );
                self.dirty.set(region, false);
            }
        }
    }

    /// Records that clearing `regions` failed: they stay dirty (their bits may or may not be
    /// set on disk, so a write marks them again) and are offered again later.
    pub fn clear_failed(&mut self, regions: &[RegionIndex]) {
        for &region in regions {
            self.clearing.set(region, false);
        }
    }

    /// Sets degraded mode: while a leg is missing no bit is cleared, so that when it returns
    /// [`RegionMap::resync_dirty`] finds every region written in its absence.
    pub fn set_degraded(&mut self, degraded: bool) {
        self.degraded = degraded;
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded
    }

    fn check(&self, region: RegionIndex) {
        assert!(
            self.geometry.count().contains(region),
            "{region} is past the last region"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::SectorCount;
    use proptest::prelude::*;

    fn map(regions: u64) -> RegionMap {
        let geometry = RegionGeometry::new(SectorCount(regions * 8), SectorCount(8));
        RegionMap::new(geometry.expect("geometry"))
    }

    const R: RegionIndex = RegionIndex(3);

    #[test]
    fn write_marks_once_then_clears_lazily() {
        let mut m = map(8);
        assert_eq!(
            m.begin_write(R),
            WriteAdmission::Proceed { needs_mark: true }
        );
        m.marked(&[R]);
        assert_eq!(
            m.begin_write(R),
            WriteAdmission::Proceed { needs_mark: false }
        );
        assert_eq!(m.state(R), RegionState::Dirty);
        m.end_write(R, true);
        assert!(
            m.regions_to_clear(8).is_empty(),
            "a write is still in flight"
        );
        m.end_write(R, true);
        assert_eq!(m.pending_writes(R), 0);
        assert_eq!(m.regions_to_clear(8), vec![R]);
        assert!(m.regions_to_clear(8).is_empty(), "already handed out");
        m.cleared(&[R]);
        assert_eq!(m.state(R), RegionState::Clean);
        assert_eq!(m.counts().clean, RegionCount(8));
    }

    #[test]
    fn a_write_during_clearing_keeps_the_region_dirty() {
        let mut m = map(8);
        m.begin_write(R);
        m.marked(&[R]);
        m.end_write(R, true);
        assert!(m.regions_to_clear(8).is_empty(), "written in this pass");
        assert_eq!(m.regions_to_clear(8), vec![R]);
        assert_eq!(
            m.begin_write(R),
            WriteAdmission::Proceed { needs_mark: true }
        );
        m.marked(&[R]);
        m.cleared(&[R]);
        assert_eq!(m.state(R), RegionState::Dirty);
        m.end_write(R, true);
        assert!(m.regions_to_clear(8).is_empty(), "written in this pass");
        assert_eq!(m.regions_to_clear(8), vec![R]);
        m.clear_failed(&[R]);
        assert_eq!(m.state(R), RegionState::Dirty);
        assert_eq!(
            m.begin_write(R),
            WriteAdmission::Proceed { needs_mark: true }
        );
    }

    #[test]
    fn a_region_written_in_every_pass_keeps_its_bit() {
        let mut m = map(8);
        let other = RegionIndex(5);
        for r in [R, other] {
            m.begin_write(r);
            m.marked(&[r]);
            m.end_write(r, true);
        }
        for pass in 0..4 {
            // R is written in every pass, `other` never again.
            assert_eq!(
                m.begin_write(R),
                WriteAdmission::Proceed { needs_mark: false },
                "pass {pass}: R kept its mark"
            );
            m.end_write(R, true);
            let picked = m.regions_to_clear(8);
            assert!(!picked.contains(&R), "pass {pass}: {picked:?}");
            if pass == 1 {
                assert_eq!(picked, vec![other], "idle for a whole pass");
                m.cleared(&picked);
            } else {
                assert!(picked.is_empty(), "pass {pass}: {picked:?}");
            }
        }
        assert_eq!(m.state(other), RegionState::Clean);
        assert_eq!(m.state(R), RegionState::Dirty);
    }

    #[test]
    fn failed_leg_write_makes_the_region_out_of_sync() {
        let mut m = map(8);
        m.begin_write(R);
        m.marked(&[R]);
        m.end_write(R, false);
        assert_eq!(m.state(R), RegionState::OutOfSync);
        assert!(!m.in_sync(R));
        assert!(m.regions_to_clear(8).is_empty());
        assert_eq!(m.sync_count(), RegionCount(7));
    }

    #[test]
    fn recovery_waits_for_writes_and_blocks_new_ones() {
        let mut m = map(8);
        m.mark_out_of_sync(RegionRange::new(RegionIndex(2), RegionIndex(4)));
        m.begin_write(RegionIndex(2));
        assert_eq!(
            m.next_to_recover(),
            Some(R),
            "region 2 has a write in flight"
        );
        m.begin_recovery(R);
        assert_eq!(m.begin_write(R), WriteAdmission::Wait);
        assert_eq!(m.counts().recovering, RegionCount(1));
        m.recovery_done(R, true);
        assert_eq!(m.state(R), RegionState::Dirty, "in sync, log bit still set");
        assert_eq!(m.next_to_recover(), None, "region 2 is still busy");
        m.end_write(RegionIndex(2), true);
        assert_eq!(m.next_to_recover(), Some(RegionIndex(2)));
    }

    #[test]
    fn resync_walks_in_disk_order_and_resumes() {
        let mut m = map(8);
        m.mark_out_of_sync(m.geometry().all());
        let mut order = Vec::new();
        while let Some(region) = m.next_to_recover() {
            m.begin_recovery(region);
            // Region 5 fails once; the walk carries on and comes back to it after wrapping.
            let ok = region != RegionIndex(5) || order.contains(&region);
            m.recovery_done(region, ok);
            order.push(region);
        }
        let expect: Vec<u64> = vec![0, 1, 2, 3, 4, 5, 6, 7, 5];
        assert_eq!(order.iter().map(|r| r.0).collect::<Vec<_>>(), expect);
        assert_eq!(m.sync_count(), RegionCount(8));
    }

    /// Regression: with recoveries in flight, a late completion of an earlier region must not
    /// move the walk back onto a region that just failed.
    #[test]
    fn out_of_order_completions_do_not_rewind_the_walk() {
        let mut m = map(8);
        m.mark_out_of_sync(m.geometry().all());
        let started: Vec<_> = (0..3)
            .map(|_| {
                let r = m.next_to_recover().expect("region");
                m.begin_recovery(r);
                r
            })
            .collect();
        assert_eq!(
            started,
            vec![RegionIndex(0), RegionIndex(1), RegionIndex(2)]
        );
        m.recovery_done(RegionIndex(1), false);
        m.recovery_done(RegionIndex(2), true);
        m.recovery_done(RegionIndex(0), true);
        assert_eq!(
            m.next_to_recover(),
            Some(RegionIndex(3)),
            "the failed region 1 waits for the wrap"
        );
    }

    #[test]
    fn out_of_sync_during_recovery_stays_out_of_sync() {
        let mut m = map(8);
        m.mark_out_of_sync(RegionRange::one(R));
        m.begin_recovery(R);
        m.mark_out_of_sync(RegionRange::one(R));
        m.recovery_done(R, true);
        assert_eq!(m.state(R), RegionState::OutOfSync);
    }

    #[test]
    fn degraded_never_clears_and_resyncs_what_changed() {
        let mut m = map(8);
        m.set_degraded(true);
        for region in [RegionIndex(1), RegionIndex(6)] {
            m.begin_write(region);
            m.marked(&[region]);
            m.end_write(region, true);
        }
        assert!(m.regions_to_clear(8).is_empty());
        m.set_degraded(false);
        assert_eq!(m.resync_dirty(), RegionCount(2));
        assert_eq!(m.next_to_recover(), Some(RegionIndex(1)));
    }

    #[test]
    fn loaded_log_bits_are_out_of_sync_and_marked() {
        let mut m = map(8);
        let mut bits = RegionBitmap::new(RegionCount(8));
        bits.set(R, true);
        m.load_dirty_log(&bits);
        assert_eq!(m.state(R), RegionState::OutOfSync);
        m.set_all_in_sync();
        assert_eq!(
            m.begin_write(R),
            WriteAdmission::Proceed { needs_mark: false }
        );
    }

    #[test]
    #[should_panic]
    fn recovery_with_writes_in_flight_is_a_bug() {
        let mut m = map(8);
        m.mark_out_of_sync(RegionRange::one(R));
        m.begin_write(R);
        m.begin_recovery(R);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64),
        EndWrite(bool),
        Recover(bool),
        OutOfSync(u64),
        Clear(bool),
        Degraded(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..16u64).prop_map(Op::Write),
            any::<bool>().prop_map(Op::EndWrite),
            any::<bool>().prop_map(Op::Recover),
            (0..16u64).prop_map(Op::OutOfSync),
            any::<bool>().prop_map(Op::Clear),
            any::<bool>().prop_map(Op::Degraded),
        ]
    }

    /// The log bits a well-behaved mirror would have on disk, next to the map it drives.
    struct Harness {
        map: RegionMap,
        on_disk: RegionBitmap,
        in_flight: Vec<RegionIndex>,
    }

    impl Harness {
        fn apply(&mut self, op: Op) {
            match op {
                Op::Write(r) => {
                    let r = RegionIndex(r);
                    if let WriteAdmission::Proceed { needs_mark } = self.map.begin_write(r) {
                        if needs_mark {
                            self.on_disk.set(r, true);
                            self.map.marked(&[r]);
                        }
                        self.in_flight.push(r);
                    }
                }
                Op::EndWrite(ok) => {
                    if let Some(r) = self.in_flight.pop() {
                        self.map.end_write(r, ok);
                    }
                }
                Op::Recover(ok) => {
                    if let Some(r) = self.map.next_to_recover() {
                        self.map.begin_recovery(r);
                        self.map.recovery_done(r, ok);
                    }
                }
                Op::OutOfSync(r) => {
                    self.on_disk.set(RegionIndex(r), true);
                    self.map.mark_out_of_sync(RegionRange::one(RegionIndex(r)));
                }
                Op::Clear(ok) => {
                    let regions = self.map.regions_to_clear(4);
                    if ok {
                        regions.iter().for_each(|&r| _ = self.on_disk.set(r, false));
                        self.map.cleared(&regions);
                    } else {
                        self.map.clear_failed(&regions);
                    }
                }
                Op::Degraded(on) => self.map.set_degraded(on),
            }
        }

        /// The mirror's safety rule: a region whose legs may differ has its bit on disk.
        fn check(&self) {
            let m = &self.map;
            for r in m.geometry().all() {
                let risky = !m.in_sync(r) || m.pending_writes(r) > 0;
                assert!(
                    !risky || self.on_disk.get(r),
                    "{r} at risk with a clear bit"
                );
                assert!(
                    !m.marked.get(r) || self.on_disk.get(r),
                    "{r} marked but clear"
                );
                assert!(m.state(r) != RegionState::Recovering || m.pending_writes(r) == 0);
            }
            let c = m.counts();
            let total = c.clean.0 + c.dirty.0 + c.recovering.0 + c.out_of_sync.0;
            assert_eq!(total, m.geometry().count().0);
        }
    }

    proptest! {
        #[test]
        fn random_ops_keep_the_safety_rule(ops in proptest::collection::vec(op(), 1..200)) {
            let m = map(16);
            let on_disk = RegionBitmap::new(m.geometry().count());
            let mut h = Harness { map: m, on_disk, in_flight: Vec::new() };
            for op in ops {
                h.apply(op);
                h.check();
            }
        }
    }
}
