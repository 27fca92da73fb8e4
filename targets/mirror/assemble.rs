//! Creating a mirror, assembling one from its legs, and changing its legs at run time.
//!
//! Assembly trusts the freshest superblock (the highest event counter) for the slot table.
//! A present leg is in sync if that table says so and its own counter is at most one behind
//! (a crash can cut one superblock update short; every write acknowledged after a leg failed
//! waited for the update recording it, so one update behind means nothing acknowledged was
//! missed). Any other present leg is returning: resynced from the bitmap if its counter is at
//! least `events_cleared` (no bit was cleared since it left), else fully. Slots whose legs are
//! absent become stale, and the mirror runs degraded.
//!
//! Ordering rules that make creation and leg changes crash-safe:
//! - create: wipe the old superblocks, write the log, mark every region dirty (unless
//!   `nosync`), and only then write the superblocks: a crash before leaves blank legs;
//! - a joining leg gets a copy of the log area before it joins the metadata set; its regions
//!   are marked out of sync (map, then log) under the same lock that adds it to the writers;
//!   its superblock says "recovering" only after those bits are durable.

use std::sync::Arc;

use uuid::Uuid;

use super::meta::MetaDevice;
use super::state::{Leg, LegStats, State};
use super::superblock::{
    probe, refuse, wipe_superblocks, Layout, LegState, Probe, Superblock, MAX_LEGS, MIN_LEGS,
};
use super::{AddLegOptions, CreateOptions, Inner, MirrorEnv, Notify};
use crate::copy::Completions;
use crate::device::{DeviceInfo, DeviceRef};
use crate::error::{Error, ErrorKind, Result};
use crate::region::{DirtyLog, RegionBitmap, RegionMap, RegionRange};

/// Probes every leg.
pub async fn probe_all(legs: &[DeviceRef]) -> Result<Vec<Probe>> {
    let mut probes = Vec::with_capacity(legs.len());
    for leg in legs {
        probes.push(probe(leg).await?);
    }
    Ok(probes)
}

fn check_leg_count(n: usize) -> Result<()> {
    if !(MIN_LEGS..=MAX_LEGS).contains(&n) {
        return Err(Error::invalid(format!(
            "a mirror needs {MIN_LEGS} to {MAX_LEGS} legs, not {n}"
        )));
    }
    Ok(())
}

/// Creates or assembles (see [`super::MirrorTarget::open`]).
pub async fn open(
    legs: Vec<DeviceRef>,
    options: &CreateOptions,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    check_leg_count(legs.len())?;
    let probes = probe_all(&legs).await?;
    let mirror = probes.iter().find_map(|p| match p {
        Probe::Ours(sb) => Some(sb.uuid),
        _ => None,
    });
    let all_ours = mirror.is_some_and(|uuid| {
        probes
            .iter()
            .all(|p| matches!(p, Probe::Ours(sb) if sb.uuid == uuid))
    });
    if all_ours {
        return assemble(legs, probes, options.force, env).await;
    }
    if let (Some(uuid), false) = (mirror, options.force) {
        let (dev, _) = legs
            .iter()
            .zip(&probes)
            .find(|(_, p)| !matches!(p, Probe::Ours(sb) if sb.uuid == uuid))
            .expect("not all legs belong to the mirror");
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} is not a leg of mirror {uuid} like the others; assemble the mirror from \
                 its own legs and add this one with add-leg, or use force to create a new mirror",
                dev.info().name
            ),
        ));
    }
    create_probed(legs, probes, options, env).await
}

/// Creates a new mirror over `legs`.
pub async fn create(
    legs: Vec<DeviceRef>,
    options: &CreateOptions,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    check_leg_count(legs.len())?;
    let probes = probe_all(&legs).await?;
    create_probed(legs, probes, options, env).await
}

async fn create_probed(
    legs: Vec<DeviceRef>,
    probes: Vec<Probe>,
    options: &CreateOptions,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    check_leg_count(legs.len())?;
    if !options.force {
        if let Some((dev, p)) = legs.iter().zip(&probes).find(|(_, p)| **p != Probe::Blank) {
            return Err(refuse(dev, p));
        }
    }
    check_sizes(&legs)?;
    let smallest = legs.iter().map(|l| l.info().size).min().expect("legs");
    let layout = Layout::compute(smallest, options.region_size)?;
    let uuid = Uuid::new_v4();
    for leg in &legs {
        wipe_superblocks(leg).await?;
    }
    let mut table = vec![Leg::empty(); MAX_LEGS];
    for (slot, dev) in legs.iter().enumerate() {
        let state = if slot == 0 || options.nosync {
            LegState::InSync
        } else {
            LegState::Recovering
        };
        table[slot] = present_leg(dev, state, Uuid::new_v4(), slot as u64 + 1);
    }
    let members = legs
        .iter()
        .enumerate()
        .map(|(slot, dev)| (slot, slot as u64 + 1, Arc::clone(dev)))
        .collect();
    let meta = MetaDevice::new(layout.log_area, members, 0);
    let area = crate::units::Extent::new(crate::units::Sector(0), layout.log_area.len);
    let meta_dev: DeviceRef = meta.clone();
    let log = DirtyLog::create(meta_dev, area, layout.geometry(), uuid).await?;
    let mut map = RegionMap::new(layout.geometry());
    if !options.nosync {
        map.mark_out_of_sync(layout.geometry().all());
        log.mark_range(layout.geometry().all())
            .await
            .map_err(|e| Error::io("cannot mark the new mirror's regions for resync", e))?;
    }
    let state = State::new(map, table, 0, 0);
    let inner = build(uuid, layout, state, log, meta, env);
    inner
        .persist()
        .await
        .map_err(|e| Error::io("cannot write the new mirror's superblocks", e))?;
    log::info!(
        "mirror {uuid}: created over {} legs, {} regions of {} sectors{}",
        legs.len(),
        layout.geometry().count().0,
        layout.region_size.0,
        if options.nosync {
            ", no initial sync"
        } else {
            ""
        }
    );
    inner.kick();
    Ok(inner)
}

/// Refuses legs of wildly different sizes: the mirror would waste most of the big one.
fn check_sizes(legs: &[DeviceRef]) -> Result<()> {
    let smallest = legs.iter().min_by_key(|l| l.info().size).expect("legs");
    let largest = legs.iter().max_by_key(|l| l.info().size).expect("legs");
    let (s, l) = (smallest.info().size.0, largest.info().size.0);
    if l > 2 * s {
        return Err(Error::invalid(format!(
            "leg sizes differ too much: {} has {l} sectors, more than twice the {s} of {}",
            largest.info().name,
            smallest.info().name
        )));
    }
    Ok(())
}

fn present_leg(dev: &DeviceRef, state: LegState, uuid: Uuid, generation: u64) -> Leg {
    Leg {
        state,
        dev: Some(Arc::clone(dev)),
        uuid,
        generation,
        size: dev.info().size,
        name: dev.info().name.clone(),
        stats: Arc::new(LegStats::default()),
    }
}

/// What assembly decided for one present leg.
enum Plan {
    InSync,
    Resume,
    Returning { full: bool },
}

/// Assembles the mirror that every probe says `legs` belong to. Without `force`, every leg
/// the freshest slot table calls in sync must be among them: a leg left out may hold writes
/// the others missed, and starting without it would bring back old data (mdadm asks for
/// `--run` in the same case).
pub async fn assemble(
    legs: Vec<DeviceRef>,
    probes: Vec<Probe>,
    force: bool,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    if legs.is_empty() || legs.len() > MAX_LEGS {
        return Err(Error::invalid(format!(
            "a mirror is assembled from 1 to {MAX_LEGS} legs, not {}",
            legs.len()
        )));
    }
    let mut sbs: Vec<Superblock> = Vec::new();
    for (dev, p) in legs.iter().zip(probes) {
        match p {
            Probe::Ours(sb) => sbs.push(*sb),
            other => return Err(refuse_for_assembly(dev, &other)),
        }
    }
    let uuid = sbs[0].uuid;
    if let Some((dev, sb)) = legs.iter().zip(&sbs).find(|(_, sb)| sb.uuid != uuid) {
        return Err(Error::invalid(format!(
            "{} belongs to mirror {}, the other legs to mirror {uuid}",
            dev.info().name,
            sb.uuid
        )));
    }
    let auth = sbs.iter().max_by_key(|sb| sb.events).expect("legs").clone();
    let layout = auth.layout;
    let mut present: Vec<Option<(DeviceRef, Plan, u64)>> = (0..MAX_LEGS).map(|_| None).collect();
    for (dev, sb) in legs.iter().zip(&sbs) {
        let entry = auth.table[sb.slot];
        if present[sb.slot].is_some() {
            return Err(Error::invalid(format!(
                "two of the legs given are slot {} of mirror {uuid} ({} is one)",
                sb.slot,
                dev.info().name
            )));
        }
        if entry.state == LegState::Empty || entry.leg_uuid != sb.own().leg_uuid {
            return Err(Error::invalid(format!(
                "{} was slot {} of mirror {uuid} but has been removed or replaced; assemble \
                 without it and add it with add-leg",
                dev.info().name,
                sb.slot
            )));
        }
        if dev.info().size < layout.leg_sectors() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} is smaller ({}) than the mirror's legs need ({})",
                    dev.info().name,
                    dev.info().size,
                    layout.leg_sectors()
                ),
            ));
        }
        let current = sb.events + 1 >= auth.events;
        let plan = match entry.state {
            LegState::InSync if current => Plan::InSync,
            LegState::Recovering if current => Plan::Resume,
            _ => Plan::Returning {
                full: sb.events < auth.events_cleared,
            },
        };
        log::debug!(
            "mirror {uuid}: slot {} ({}) at event {} of {}: {}",
            sb.slot,
            dev.info().name,
            sb.events,
            auth.events,
            match plan {
                Plan::InSync => "in sync".to_owned(),
                Plan::Resume => "resumes its recovery".to_owned(),
                Plan::Returning { full } => format!("returning, full resync {full}"),
            }
        );
        present[sb.slot] = Some((Arc::clone(dev), plan, sb.events));
    }
    if !force {
        if let Some(slot) =
            (0..MAX_LEGS).find(|&s| auth.table[s].state == LegState::InSync && present[s].is_none())
        {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "the in-sync leg in slot {slot} of mirror {uuid} (leg {}) is missing; give \
                     every leg, or force to start degraded without it",
                    auth.table[slot].leg_uuid
                ),
            ));
        }
    }
    let in_sync: Vec<usize> = (0..MAX_LEGS)
        .filter(|&s| matches!(present[s], Some((_, Plan::InSync, _))))
        .collect();
    let Some(&reader) = in_sync
        .iter()
        .max_by_key(|&&s| (present[s].as_ref().map(|p| p.2), std::cmp::Reverse(s)))
    else {
        return Err(Error::invalid(format!(
            "no leg given holds a complete copy of mirror {uuid}; give its in-sync legs"
        )));
    };
    // The table: present legs as planned, absent ones stale (missing).
    let mut table = vec![Leg::empty(); MAX_LEGS];
    let mut generation = 0;
    for slot in 0..MAX_LEGS {
        let entry = auth.table[slot];
        generation += 1;
        table[slot] = match &present[slot] {
            Some((dev, plan, _)) => {
                let state = match plan {
                    Plan::InSync => LegState::InSync,
                    _ => LegState::Recovering,
                };
                let mut leg = present_leg(dev, state, entry.leg_uuid, generation);
                leg.size = dev.info().size;
                leg
            }
            None if entry.state == LegState::Empty => Leg::empty(),
            None => Leg {
                state: match entry.state {
                    LegState::Failed => LegState::Failed,
                    _ => LegState::Stale,
                },
                dev: None,
                uuid: entry.leg_uuid,
                generation,
                size: entry.leg_size,
                name: format!("(missing leg {})", entry.leg_uuid),
                stats: Arc::new(LegStats::default()),
            },
        };
    }
    let members = in_sync
        .iter()
        .map(|&s| {
            let dev = Arc::clone(&present[s].as_ref().expect("present").0);
            (s, table[s].generation, dev)
        })
        .collect();
    let meta = MetaDevice::new(layout.log_area, members, reader);
    let meta_dev: DeviceRef = meta.clone();
    let area = crate::units::Extent::new(crate::units::Sector(0), layout.log_area.len);
    let geometry = layout.geometry();
    let (log, bits, log_lost) = match DirtyLog::open(Arc::clone(&meta_dev), area).await {
        Ok((log, bits)) if log.uuid() == uuid && log.geometry() == &geometry => (log, bits, false),
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("the dirty log of mirror {uuid} belongs to another mirror or geometry"),
            ))
        }
        Err(err) if err.kind() == ErrorKind::Corrupt => {
            // Invariant 7: a log that cannot be read means every region is out of sync.
            log::error!("mirror {uuid}: {err}; resyncing everything");
            let log = DirtyLog::create(meta_dev, area, geometry, uuid).await?;
            (log, RegionBitmap::new(geometry.count()), true)
        }
        Err(err) => return Err(err),
    };
    // Legs that were not log members get a copy of the area before they join.
    for slot in 0..MAX_LEGS {
        if let Some((dev, Plan::Resume | Plan::Returning { .. }, _)) = &present[slot] {
            meta.add_member(slot, table[slot].generation, Arc::clone(dev))
                .await
                .map_err(|e| {
                    Error::io(
                        format!("cannot copy the dirty log to {}", dev.info().name),
                        e,
                    )
                })?;
        }
    }
    // A power cut during a log commit can leave the newest image on some legs and not on
    // others. One commit now, before any I/O, makes the newest image the same on every
    // member, so a later assembly reads the bits this one acts on whichever leg it reads.
    log.bump_event()
        .await
        .map_err(|e| Error::io(format!("cannot rewrite the dirty log of mirror {uuid}"), e))?;
    let mut map = RegionMap::new(geometry);
    log::debug!(
        "mirror {uuid}: dirty regions {:?}",
        bits.iter_ones().collect::<Vec<_>>()
    );
    map.load_dirty_log(&bits);
    let full = log_lost
        || present
            .iter()
            .any(|p| matches!(p, Some((_, Plan::Returning { full: true }, _))));
    if full {
        map.mark_out_of_sync(geometry.all());
    }
    let state = State::new(map, table, auth.events, auth.events_cleared);
    let inner = build(uuid, layout, state, log, meta, env);
    if full {
        inner
            .log
            .mark_range(geometry.all())
            .await
            .map_err(|e| Error::io("cannot mark the mirror's regions for resync", e))?;
    }
    inner
        .persist()
        .await
        .map_err(|e| Error::io(format!("cannot update the superblocks of mirror {uuid}"), e))?;
    log::info!(
        "mirror {uuid}: assembled from {} legs at event {}",
        legs.len(),
        auth.events
    );
    inner.kick();
    Ok(inner)
}

fn refuse_for_assembly(dev: &DeviceRef, probe: &Probe) -> Error {
    match probe {
        Probe::Blank => Error::invalid(format!("{} is not a mirror leg", dev.info().name)),
        other => refuse(dev, other),
    }
}

/// The shared state of a running mirror, with the metadata device's failure hook installed.
fn build(
    uuid: Uuid,
    layout: Layout,
    state: State,
    log: DirtyLog,
    meta: Arc<MetaDevice>,
    env: MirrorEnv,
) -> Arc<Inner> {
    let present: Vec<&DeviceRef> = state.legs.iter().filter_map(|l| l.dev.as_ref()).collect();
    let all = |f: fn(&DeviceInfo) -> bool| present.iter().all(|d| f(d.info()));
    let any = |f: fn(&DeviceInfo) -> bool| present.iter().any(|d| f(d.info()));
    let info = DeviceInfo {
        name: format!("mirror-{}", &uuid.simple().to_string()[..8]),
        size: layout.data_size,
        logical_block_bytes: present
            .iter()
            .map(|d| d.info().logical_block_bytes)
            .max()
            .unwrap_or(512),
        physical_block_bytes: present
            .iter()
            .map(|d| d.info().physical_block_bytes)
            .max()
            .unwrap_or(4096),
        discard: all(|i| i.discard),
        write_zeroes: all(|i| i.write_zeroes),
        volatile_cache: any(|i| i.volatile_cache),
        fua: true,
        rotational: any(|i| i.rotational),
    };
    let inner = Arc::new(Inner {
        uuid,
        layout,
        geometry: layout.geometry(),
        info,
        state: std::sync::Mutex::new(state),
        log,
        meta: Arc::clone(&meta),
        engine: env.engine,
        completions: Completions::new(),
        tuning: env.tuning,
        kick: Notify::default(),
        recovered: Notify::default(),
        sb_lock: smol::lock::Mutex::new(()),
        stopping: std::sync::atomic::AtomicBool::new(false),
        ticks: std::sync::atomic::AtomicU64::new(0),
    });
    let weak = Arc::downgrade(&inner);
    meta.set_failure_hook(Box::new(move |slot, generation| {
        if let Some(inner) = weak.upgrade() {
            inner.fail_leg(slot, generation, "its metadata write failed");
        }
    }));
    inner
}

impl Inner {
    /// Adds a leg (see [`super::MirrorTarget::add_leg`]).
    pub(crate) async fn add_leg(
        self: Arc<Self>,
        dev: DeviceRef,
        options: AddLegOptions,
    ) -> Result<usize> {
        let name = dev.info().name.clone();
        if dev.info().size < self.layout.leg_sectors() {
            return Err(Error::invalid(format!(
                "{name} ({}) is smaller than the mirror's legs need ({})",
                dev.info().size,
                self.layout.leg_sectors()
            )));
        }
        let probed = probe(&dev).await?;
        // A former leg of this mirror: (its slot, its uuid, its event counter).
        let former = match &probed {
            Probe::Ours(sb) if sb.uuid == self.uuid => {
                Some((sb.slot, sb.own().leg_uuid, sb.events))
            }
            Probe::Blank => None,
            other if options.force => {
                log::warn!(
                    "mirror {}: overwriting {name}, which held {other:?}",
                    self.uuid
                );
                None
            }
            other => return Err(refuse(&dev, other)),
        };
        let (slot, generation, uuid, full) = {
            let mut st = self.lock();
            if let Some((_, leg_uuid, _)) = former {
                if let Some(s) =
                    (0..MAX_LEGS).find(|&s| st.legs[s].uuid == leg_uuid && st.legs[s].is_active())
                {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("{name} is already slot {s} of mirror {}", self.uuid),
                    ));
                }
            }
            let own_slot = former.and_then(|(s, leg_uuid, _)| {
                (st.legs[s].uuid == leg_uuid && st.legs[s].state.is_missing()).then_some(s)
            });
            let slot = match (options.slot, own_slot) {
                (Some(s), _) if s >= MAX_LEGS => {
                    return Err(Error::invalid(format!("there is no slot {s}")))
                }
                (Some(s), _) if st.legs[s].state != LegState::Empty && own_slot != Some(s) => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("slot {s} is not empty"),
                    ))
                }
                (Some(s), _) => s,
                (None, Some(s)) => s,
                (None, None) => (0..MAX_LEGS)
                    .find(|&s| st.legs[s].state == LegState::Empty)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Busy,
                            format!("mirror {} already has {MAX_LEGS} legs", self.uuid),
                        )
                    })?,
            };
            if st.primary().is_none() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("mirror {} has no in-sync leg to copy from", self.uuid),
                ));
            }
            let full = match former {
                Some((_, _, events)) => events < st.events_cleared,
                None => true,
            };
            let uuid = former.map_or_else(Uuid::new_v4, |f| f.1);
            (slot, st.new_generation(), uuid, full)
        };
        if former.is_none() {
            wipe_superblocks(&dev).await?;
        }
        self.meta
            .add_member(slot, generation, Arc::clone(&dev))
            .await
            .map_err(|e| Error::io(format!("cannot copy the dirty log to {name}"), e))?;
        let marks = {
            let mut st = self.lock();
            if st.legs[slot].state.is_active() {
                drop(st);
                self.meta.remove_member(slot);
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {slot} was taken meanwhile"),
                ));
            }
            st.legs[slot] = Leg {
                uuid,
                generation,
                ..present_leg(&dev, LegState::Recovering, uuid, generation)
            };
            st.repair_source.clear();
            st.stuck.clear();
            let marks = if full {
                st.map.mark_out_of_sync(self.geometry.all());
                None
            } else {
                // Every region written while the leg was away: bits are never cleared while
                // a leg is missing, so the log's bits and the writes in flight cover them.
                st.map.resync_dirty();
                let dirty = self.log.dirty_regions();
                for &region in &dirty {
                    st.map.mark_out_of_sync(RegionRange::one(region));
                }
                Some(dirty)
            };
            st.update_degraded();
            st.state_gen += 1;
            marks
        };
        let marked = match marks {
            None => self.log.mark_range(self.geometry.all()).await,
            Some(regions) => self.log.mark(&regions).await,
        };
        marked.map_err(|e| Error::io("cannot mark the new leg's regions in the dirty log", e))?;
        if !self.meta.has_member(slot, generation) {
            self.fail_leg(slot, generation, "its metadata write failed");
        }
        self.kick();
        self.persist()
            .await
            .map_err(|e| Error::io("cannot update the superblocks", e))?;
        log::info!(
            "mirror {}: {name} added in slot {slot} ({} resync)",
            self.uuid,
            if full { "full" } else { "incremental" }
        );
        Ok(slot)
    }

    /// Fails a leg on request; the last in-sync leg cannot be failed.
    pub(crate) async fn fail_leg_command(&self, slot: usize) -> Result<()> {
        let generation = {
            let st = self.lock();
            self.check_slot(&st, slot)?;
            if !st.legs[slot].is_active() {
                return Err(Error::invalid(format!("slot {slot} is not an active leg")));
            }
            if st.in_sync_slots() == [slot] {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {slot} is the last in-sync leg; it cannot be failed"),
                ));
            }
            st.legs[slot].generation
        };
        self.fail_leg(slot, generation, "failed on request");
        self.persist()
            .await
            .map_err(|e| Error::io("cannot update the superblocks", e))
    }

    /// Removes a leg from the table; an active leg is failed first.
    pub(crate) async fn remove_leg(&self, slot: usize) -> Result<()> {
        {
            let mut st = self.lock();
            self.check_slot(&st, slot)?;
            if st.legs[slot].state == LegState::Empty {
                return Err(Error::invalid(format!("slot {slot} is empty")));
            }
            if st.in_sync_slots() == [slot] {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {slot} is the last in-sync leg; it cannot be removed"),
                ));
            }
            st.legs[slot] = Leg::empty();
            st.update_degraded();
            st.state_gen += 1;
        }
        self.meta.remove_member(slot);
        self.recovered.notify_all();
        self.kick();
        self.persist()
            .await
            .map_err(|e| Error::io("cannot update the superblocks", e))
    }

    /// Replaces the leg in `slot` by `dev` (a full resync unless it is that very leg).
    pub(crate) async fn replace_leg(
        self: Arc<Self>,
        slot: usize,
        dev: DeviceRef,
        force: bool,
    ) -> Result<usize> {
        self.remove_leg(slot).await?;
        self.add_leg(
            dev,
            AddLegOptions {
                force,
                slot: Some(slot),
            },
        )
        .await
    }

    fn check_slot(&self, _st: &State, slot: usize) -> Result<()> {
        if slot >= MAX_LEGS {
            return Err(Error::invalid(format!(
                "there is no slot {slot} (slots are 0 to {})",
                MAX_LEGS - 1
            )));
        }
        Ok(())
    }
}
