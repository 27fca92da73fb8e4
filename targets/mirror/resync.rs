//! The resync driver: one future per mirror that submits region copies to the copy engine
//! and drains their completions, persists slot-table changes, clears dirty bits lazily on
//! ticks, runs scrub passes, and promotes recovering legs once every region is in sync.
//!
//! It runs either as a local task (simulations: [`crate::device::reactor::run_local`]) or on
//! a thread of its own with a ticker ([`super::MirrorTarget::start_resync_thread`]).
//!
//! Invariants:
//! - a region is copied from its source (the first in-sync leg, or a repair's good leg) to
//!   every other active leg; it counts as recovered only if the source was read, no
//!   destination that is still active failed, and no leg joined while the copy ran;
//! - a destination whose write failed is failed (never retried forever); a source whose read
//!   failed is tried again from another in-sync leg, and a region no leg can be read for is
//!   skipped until the next tick;
//! - a clear follows the clearing protocol: pick and hand to the log under the state lock,
//!   then commit with a flush of every active leg, then confirm or undo in the map; the
//!   clear commits only if the active legs after the flush are those of the pick (a leg that
//!   failed in between was not flushed, and its return must still resync those regions).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use smol::future::{or, yield_now};

use super::state::{LegStats, Scrub, ScrubReport};
use super::superblock::LegState;
use super::{join_all, Inner};
use crate::copy::{CopyDone, CopyJob, Location};
use crate::device::AlignedBuf;
use crate::region::{RegionIndex, RegionRange};

/// A copy in flight, by its token (the region index).
struct Job {
    source: (usize, u64),
    dests: Vec<(usize, u64)>,
}

/// What [`Inner::next_copy`] found for the walk over out-of-sync regions.
enum NextCopy {
    /// Nothing (more) can be copied now.
    Stop,
    /// A stuck region, stepped past without a copy.
    Skipped,
    /// A region in sync without a copy (the source is the only active leg).
    Settled,
    /// A copy to submit.
    Copy {
        region: RegionIndex,
        copy: CopyJob,
        job: Job,
    },
}

/// How many times a region is re-read while scrubbing before it is skipped as too busy.
const SCRUB_RETRIES: u32 = 3;

/// The driver's own bookkeeping across iterations.
#[derive(Default)]
struct Driver {
    jobs: HashMap<u64, Job>,
    ticks_seen: u64,
    writes_at_last_tick: u64,
    ticks_since_clean: u64,
}

impl Inner {
    /// The driver loop (see the module doc).
    pub(crate) async fn drive(self: Arc<Self>) {
        let mut d = Driver {
            ticks_seen: self.ticks.load(Ordering::Relaxed),
            ..Driver::default()
        };
        // The grow gate, held shared while the driver works or has copies in flight (their
        // regions' writes wait for them: a grow must never hold back a copy it waits for);
        // let go when idle, or when a grow waits and no copy is in flight.
        let mut gate = None;
        loop {
            if d.jobs.is_empty() && self.growing.load(Ordering::Acquire) {
                gate = None;
            }
            if gate.is_none() {
                gate = Some(self.gate.read().await);
            }
            let seen = self.kick.generation();
            let stopping = self.stopping.load(Ordering::Relaxed);
            let mut busy = false;
            if let Err(err) = self.await_persisted().await {
                log::error!("mirror {}: superblock update failed: {err}", self.uuid);
            }
            if stopping && d.jobs.is_empty() {
                break;
            }
            let ticks = self.ticks.load(Ordering::Relaxed);
            if ticks != d.ticks_seen {
                d.ticks_seen = ticks;
                self.on_tick(&mut d).await;
                if !stopping {
                    self.watch_remotes();
                }
            }
            if !stopping {
                busy |= self.start_recoveries(&mut d).await;
            }
            while let Some(done) = self.completions.try_next() {
                self.finish_recovery(&mut d, done);
                busy = true;
            }
            if !stopping && self.lock().scrub.is_some() {
                self.scrub_step().await;
                busy = true;
            }
            busy |= self.promote_if_synced().await;
            if busy {
                yield_now().await;
                continue;
            }
            if d.jobs.is_empty() {
                gate = None;
                self.kick.wait(seen).await;
            } else {
                let done = or(async { Some(self.completions.next().await) }, async {
                    self.kick.wait(seen).await;
                    None
                })
                .await;
                if let Some(done) = done {
                    self.finish_recovery(&mut d, done);
                }
            }
        }
    }

    /// The ticker of the resync thread: ticks every `Tuning::tick` until the mirror stops.
    pub(crate) async fn ticker(self: Arc<Self>) {
        const STEPS: u32 = 10;
        let step = self.tuning.tick / STEPS;
        loop {
            for _ in 0..STEPS {
                if self.stopping.load(Ordering::Relaxed) {
                    return;
                }
                crate::device::reactor::sleep(step).await;
            }
            self.ticks.fetch_add(1, Ordering::Relaxed);
            self.kick();
        }
    }

    async fn on_tick(&self, d: &mut Driver) {
        let quiet = {
            let mut st = self.lock();
            st.stuck.clear();
            st.read_attempts.clear();
            let quiet = st.writes_started == d.writes_at_last_tick;
            d.writes_at_last_tick = st.writes_started;
            quiet
        };
        d.ticks_since_clean += 1;
        if quiet || d.ticks_since_clean >= self.tuning.clean_every_ticks {
            d.ticks_since_clean = 0;
            self.clean_pass().await;
        }
    }

    /// Clears the dirty bits of in-sync, idle regions (the clearing protocol).
    pub(crate) async fn clean_pass(&self) {
        let (regions, legs) = {
            let mut st = self.lock();
            let regions = st.map.regions_to_clear(self.tuning.clear_batch);
            self.log().clear(&regions);
            let legs: Vec<(usize, u64)> =
                st.active().iter().map(|l| (l.slot, l.generation)).collect();
            (regions, legs)
        };
        if regions.is_empty() {
            return;
        }
        log::debug!("mirror {}: clearing {regions:?}", self.uuid);
        let result = self.log().commit_clears(self.flush_for_clear(&legs)).await;
        let mut st = self.lock();
        match result {
            Ok(()) => st.map.cleared(&regions),
            Err(err) => {
                log::warn!("mirror {}: clearing dirty bits failed: {err}", self.uuid);
                st.map.clear_failed(&regions);
            }
        }
    }

    /// The data flush of a clear whose regions were picked when `legs` were the active legs.
    /// It succeeds only if, after flushing, the same legs are active and the set is still
    /// not degraded: a leg that failed (or left, or joined) since the pick was not flushed,
    /// so its copy of the picked regions may be lost with its cache; the bits then stay set,
    /// and a returning leg's incremental resync (from the log's bits) copies those regions.
    /// A leg that fails after this check was flushed, so its copy of them is durable.
    async fn flush_for_clear(&self, legs: &[(usize, u64)]) -> std::io::Result<()> {
        self.flush_active().await?;
        let st = self.lock();
        let now: Vec<(usize, u64)> = st.active().iter().map(|l| (l.slot, l.generation)).collect();
        if st.map.is_degraded() || now != legs {
            return Err(std::io::Error::other(
                "the legs changed between picking the regions and flushing them",
            ));
        }
        Ok(())
    }

    /// Submits copies while fewer than `resync_depth` run. True if anything changed.
    async fn start_recoveries(&self, d: &mut Driver) -> bool {
        let mut changed = false;
        let mut skipped = HashSet::new();
        while d.jobs.len() < self.tuning.resync_depth.max(1) {
            match self.next_copy(d, &mut skipped) {
                NextCopy::Stop => break,
                NextCopy::Skipped => {}
                NextCopy::Settled => {
                    changed = true;
                    self.recovered.notify_all();
                }
                NextCopy::Copy { region, copy, job } => {
                    changed = true;
                    if !self.submit_copy(d, region, copy, job).await {
                        break;
                    }
                }
            }
        }
        changed
    }

    /// Takes the next region to recover and decides, under the state lock, what becomes of
    /// it. `skipped` holds the stuck regions stepped past in this round: meeting one again
    /// means the walk went all the way round.
    fn next_copy(&self, d: &Driver, skipped: &mut HashSet<RegionIndex>) -> NextCopy {
        if self.growing.load(Ordering::Acquire) {
            // A grow waits for the copies in flight to end: start none.
            return NextCopy::Stop;
        }
        let mut st = self.lock();
        let Some(region) = st.map.next_to_recover() else {
            return NextCopy::Stop;
        };
        assert!(
            region.0 < self.geometry().count().0,
            "{region} past the mirror's end"
        );
        assert!(
            !d.jobs.contains_key(&region.0),
            "{region} copied twice at once"
        );
        let Some(source) = st.source_for(region) else {
            // No in-sync leg is present: nothing can be copied.
            return NextCopy::Stop;
        };
        if st.stuck.contains(&region) {
            if !skipped.insert(region) {
                return NextCopy::Stop;
            }
            // Step the walk past the region without copying it.
            st.map.begin_recovery(region);
            st.map.recovery_done(region, false);
            return NextCopy::Skipped;
        }
        let dests: Vec<_> = st
            .active()
            .into_iter()
            .filter(|l| l.slot != source)
            .collect();
        st.map.begin_recovery(region);
        if dests.is_empty() {
            // The source is the only active leg: trivially in sync.
            st.map.recovery_done(region, true);
            st.progress.done += 1;
            return NextCopy::Settled;
        }
        let source = st.leg_ref(source).expect("in-sync legs are present");
        let extent = self.geometry().extent_of(region);
        assert!(
            dests.len() <= crate::copy::MAX_DESTS,
            "more legs than a copy writes"
        );
        let at = crate::units::Extent::new(self.leg_sector(extent.start), extent.len);
        let copy = CopyJob::copy(
            Location::new(&source.dev, at),
            dests.iter().map(|l| Location::new(&l.dev, at)).collect(),
        )
        .ignoring_errors();
        let job = Job {
            source: (source.slot, source.generation),
            dests: dests.iter().map(|l| (l.slot, l.generation)).collect(),
        };
        NextCopy::Copy { region, copy, job }
    }

    /// Hands a region's copy to the engine. False if the engine refused it (the region is
    /// given back to the walk and no more copies are started this round).
    async fn submit_copy(
        &self,
        d: &mut Driver,
        region: RegionIndex,
        copy: CopyJob,
        job: Job,
    ) -> bool {
        log::debug!(
            "mirror {}: copy {region} from slot {} to {:?}",
            self.uuid,
            job.source.0,
            job.dests
        );
        match self.engine.submit(copy, region.0, &self.completions).await {
            Ok(_) => {
                d.jobs.insert(region.0, job);
                assert!(
                    d.jobs.len() <= self.tuning.resync_depth.max(1),
                    "more copies in flight than the resync depth"
                );
                true
            }
            Err(err) => {
                log::error!("mirror {}: cannot submit a resync copy: {err}", self.uuid);
                self.lock().map.recovery_done(region, false);
                self.recovered.notify_all();
                false
            }
        }
    }

    /// Records a finished copy (see the module doc for when it counts).
    fn finish_recovery(&self, d: &mut Driver, done: CopyDone) {
        let region = RegionIndex(done.token);
        let job = d
            .jobs
            .remove(&done.token)
            .expect("a completion for a copy we submitted");
        assert!(
            region.0 < self.geometry().count().0,
            "{region} past the mirror's end"
        );
        for dest in done.write_errors.iter() {
            let (slot, generation) = job.dests[dest];
            if let Some(leg) = self.lock().leg_ref(slot) {
                LegStats::bump(&leg.stats.write_errors);
            }
            self.fail_leg(slot, generation, "a resync write failed");
        }
        {
            let mut st = self.lock();
            let (source, source_gen) = job.source;
            if done.read_error.is_some() {
                LegStats::bump(&st.legs[source].stats.read_errors);
                let tries = {
                    let t = st.read_attempts.entry(region).or_insert(0);
                    *t += 1;
                    *t
                };
                // Next time, copy from another in-sync leg; give up until the next tick once
                // every in-sync leg failed to be read.
                let others: Vec<usize> = st
                    .in_sync_slots()
                    .into_iter()
                    .filter(|&s| s != source)
                    .collect();
                match others.first() {
                    Some(&other) if (tries as usize) <= others.len() => {
                        st.repair_source.insert(region, other);
                    }
                    _ => {
                        st.stuck.insert(region);
                    }
                }
            }
            let source_ok =
                st.is_current(source, source_gen) && st.legs[source].state == LegState::InSync;
            let covered = st
                .active()
                .iter()
                .filter(|l| l.slot != source)
                .all(|l| job.dests.contains(&(l.slot, l.generation)));
            let ok = done.read_error.is_none() && !done.cancelled && source_ok && covered;
            log::debug!(
                "mirror {}: copy of {region} done: ok {ok} (read error {:?}, write errors {:?})",
                self.uuid,
                done.read_error,
                done.write_errors
            );
            st.map.recovery_done(region, ok);
            if ok {
                st.repair_source.remove(&region);
                st.read_attempts.remove(&region);
                st.progress.done += 1;
            }
            let in_sync = st.map.sync_count().0;
            assert!(
                in_sync <= self.geometry().count().0,
                "more regions in sync than exist"
            );
            let out_of_sync = self.geometry().count().0 - in_sync;
            st.progress
                .observe(out_of_sync, self.engine.stats().bytes_done);
        }
        self.recovered.notify_all();
    }

    /// Once every region is in sync, recovering legs are complete copies: they are flushed
    /// (the copies to them are not durable before) and then promoted. True if any was.
    async fn promote_if_synced(&self) -> bool {
        let before = {
            let mut st = self.lock();
            let out_of_sync = self.geometry().count().0 - st.map.sync_count().0;
            st.progress
                .observe(out_of_sync, self.engine.stats().bytes_done);
            let recovering = st
                .legs
                .iter()
                .any(|l| l.state == LegState::Recovering && l.dev.is_some());
            if out_of_sync > 0 || !recovering {
                return false;
            }
            (st.state_gen, st.progress.done)
        };
        // A crash must not find a promoted leg whose copied data was still in its cache.
        if let Err(err) = self.flush_active().await {
            log::warn!(
                "mirror {}: flush before promoting legs failed: {err}",
                self.uuid
            );
            return true;
        }
        let mut st = self.lock();
        let unchanged = (st.state_gen, st.progress.done) == before;
        if !unchanged || st.map.sync_count() != self.geometry().count() {
            return true;
        }
        for leg in st.legs.iter_mut() {
            if leg.state == LegState::Recovering && leg.dev.is_some() {
                leg.state = LegState::InSync;
            }
        }
        st.state_gen += 1;
        log::info!("mirror {}: every leg is in sync", self.uuid);
        true
    }

    // -----------------------------------------------------------------------------------------
    // Scrub

    pub(crate) fn start_scrub(&self, repair: bool) -> crate::error::Result<()> {
        let mut st = self.lock();
        if st.scrub.is_some() {
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::Busy,
                "a scrub is already running",
            ));
        }
        st.scrub = Some(Scrub {
            repair,
            next: RegionIndex(0),
            checked: 0,
            skipped: 0,
            mismatches: 0,
            retries: 0,
        });
        drop(st);
        self.kick();
        Ok(())
    }

    /// Checks one region: reads it from every active leg and compares. A write that raced
    /// the reads (seen through the region's write epoch) makes the check count for nothing:
    /// it is retried, and skipped after a few tries.
    async fn scrub_step(&self) {
        let count = self.geometry().count();
        let (region, legs, epoch) = {
            let mut st = self.lock();
            let Some(scrub) = st.scrub.clone() else {
                return;
            };
            if !count.contains(scrub.next) {
                st.last_scrub = Some(ScrubReport {
                    repair: scrub.repair,
                    checked: scrub.checked,
                    skipped: scrub.skipped,
                    mismatches: scrub.mismatches,
                });
                st.mismatch_count = scrub.mismatches;
                st.scrub = None;
                return;
            }
            let region = scrub.next;
            let busy = !st.map.in_sync(region) || st.map.pending_writes(region) > 0;
            let legs = st.active();
            if busy || legs.len() < 2 {
                let s = st.scrub.as_mut().expect("scrub");
                s.next = region.next();
                s.skipped += 1;
                s.retries = 0;
                return;
            }
            (region, legs, st.write_epoch(region))
        };
        let extent = self.geometry().extent_of(region);
        let at = self.leg_sector(extent.start);
        let reads = legs
            .iter()
            .map(|l| l.dev.read(at, AlignedBuf::for_sectors(extent.len)))
            .collect();
        let results = join_all(reads).await;
        let mut copies = Vec::new();
        let mut read_failed = false;
        for (leg, (res, buf)) in legs.iter().zip(results) {
            match res {
                Ok(()) => copies.push((leg.slot, buf)),
                Err(_) => {
                    LegStats::bump(&leg.stats.read_errors);
                    read_failed = true;
                }
            }
        }
        let differ = copies
            .windows(2)
            .any(|w| w[0].1.as_slice() != w[1].1.as_slice());
        if self.record_scrub(region, epoch, differ, read_failed, &copies) {
            if let Err(err) = self.log().mark_range(RegionRange::one(region)).await {
                log::error!(
                    "mirror {}: cannot mark {region} for repair: {err}",
                    self.uuid
                );
            }
        }
    }

    /// Records one scrub check under the lock. True when the region was marked out of sync
    /// for a repair, so its dirty bit must be marked in the log.
    fn record_scrub(
        &self,
        region: RegionIndex,
        epoch: u64,
        differ: bool,
        read_failed: bool,
        copies: &[(usize, AlignedBuf)],
    ) -> bool {
        let mut st = self.lock();
        let valid = st.map.in_sync(region)
            && st.map.pending_writes(region) == 0
            && st.write_epoch(region) == epoch;
        let Some(scrub) = st.scrub.as_mut() else {
            return false;
        };
        if !valid && scrub.retries < SCRUB_RETRIES {
            scrub.retries += 1;
            return false;
        }
        scrub.next = region.next();
        scrub.retries = 0;
        if !valid {
            scrub.skipped += 1;
            return false;
        }
        scrub.checked += 1;
        if !(differ || read_failed) {
            return false;
        }
        scrub.mismatches += u64::from(differ);
        if !scrub.repair {
            return false;
        }
        // Resync the region from its source (a leg that answered, if the source did not).
        if let (true, Some(&(good, _))) = (read_failed, copies.first()) {
            if st.legs[good].state == LegState::InSync {
                st.repair_source.insert(region, good);
            }
        }
        st.map.mark_out_of_sync(RegionRange::one(region));
        true
    }
}
