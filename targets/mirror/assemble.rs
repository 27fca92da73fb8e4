//! Creating a mirror, assembling one from its legs, and changing its legs at run time.
//!
//! Creating and assembling are kept apart: a request where any leg carries a superblock of
//! the mirror (or where a mirror UUID is expected) is an assembly, which writes only to the
//! legs it takes in; a create needs every leg present and blank (`force`: or holding foreign
//! metadata) and never writes over a leg that carries a mirror superblock.
//!
//! Assembly (the rules are in `survey.rs`) trusts the freshest superblock (the highest event
//! counter) for the slot table. A present leg is in sync if that table says so and its own
//! counter is at most one behind (a crash can cut one superblock update short; every write
//! acknowledged after a leg failed waited for the update recording it, so one update behind
//! means nothing acknowledged was missed); a leg the table calls recovering resumes its
//! recovery. Slots whose legs are missing, unreadable or stale are left out (stale or failed
//! in the new table, with the reason kept for `status`) and the mirror runs degraded; a stale
//! leg comes back with `add-leg`, resynced from the bitmap if its counter is at least
//! `events_cleared` (no bit was cleared since it left), else fully.
//!
//! Metadata read from the legs is untrusted (each superblock is checked alone by
//! `Superblock::decode`); here it is checked against the devices and the other legs: a member
//! smaller than the layout's legs is left out, members whose layouts differ are refused
//! (`ErrorKind::Corrupt`, naming the field and both legs), and a dirty log of another UUID
//! or geometry is refused naming the field; a log that cannot be read at all is recreated
//! with every region out of sync. An assembly that finds no usable copy because the legs'
//! superblocks are damaged (and none is merely missing) is refused as corrupt metadata
//! (exit 7), naming each leg and why, rather than as not found (exit 3).
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
    probe, refuse, wipe_superblocks, Layout, LegState, Probe, Superblock, MAX_LEGS,
    MAX_OPEN_EVENTS, MIN_LEGS,
};
use super::survey::{
    name_absent_slots, not_member_note, plan, root_cause, survey, AssemblyReport, GivenLeg, LegSet,
    Surveyed, Verdict,
};
use super::{AddLegOptions, CreateOptions, Inner, MirrorEnv, Notify};
use crate::copy::Completions;
use crate::device::{DeviceInfo, DeviceRef};
use crate::error::{Error, ErrorKind, Result};
use crate::region::{DirtyLog, RegionBitmap, RegionGeometry, RegionIndex, RegionMap, RegionRange};

fn check_leg_count(n: usize) -> Result<()> {
    if !(MIN_LEGS..=MAX_LEGS).contains(&n) {
        return Err(Error::invalid(format!(
            "a mirror needs {MIN_LEGS} to {MAX_LEGS} legs, not {n}"
        )));
    }
    Ok(())
}

fn check_given_count(n: usize) -> Result<()> {
    if !(1..=MAX_LEGS).contains(&n) {
        return Err(Error::invalid(format!(
            "a mirror is opened from 1 to {MAX_LEGS} legs, not {n}"
        )));
    }
    Ok(())
}

/// Assembles the mirror the legs carry, or creates one when none carries a mirror superblock
/// and no mirror is expected (see [`super::MirrorTarget::open_set`]).
pub async fn open(set: LegSet, options: &CreateOptions, env: MirrorEnv) -> Result<Arc<Inner>> {
    check_given_count(set.legs.len())?;
    let expected = set.uuid;
    let given = survey(set.legs).await;
    let any_member = given.iter().any(|g| matches!(g, Surveyed::Member { .. }));
    if any_member || expected.is_some() {
        return assemble_surveyed(given, expected, env).await;
    }
    create_surveyed(given, options, env).await
}

/// Assembles the mirror the legs carry; never creates (see
/// [`super::MirrorTarget::assemble_set`]).
pub async fn assemble(set: LegSet, env: MirrorEnv) -> Result<Arc<Inner>> {
    check_given_count(set.legs.len())?;
    let expected = set.uuid;
    let given = survey(set.legs).await;
    assemble_surveyed(given, expected, env).await
}

/// Creates a new mirror over `legs`.
pub async fn create(
    legs: Vec<DeviceRef>,
    options: &CreateOptions,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    check_leg_count(legs.len())?;
    let given = survey(legs.into_iter().map(GivenLeg::Opened).collect()).await;
    create_surveyed(given, options, env).await
}

/// Checks that a create may write over every leg: all present and readable, blank or (with
/// `force`) foreign; never a leg carrying a mirror superblock.
fn creatable(given: Vec<Surveyed>, force: bool) -> Result<Vec<DeviceRef>> {
    let mut legs = Vec::with_capacity(given.len());
    for leg in given {
        match leg {
            Surveyed::Absent { name, error, .. } => {
                return Err(error.context(format!(
                    "cannot create a mirror: {name} cannot be used, and a create needs every \
                     leg (no leg carries a mirror superblock to assemble from)"
                )))
            }
            Surveyed::Member { dev, sb } => return Err(refuse_member(&dev, &sb)),
            Surveyed::Other {
                dev,
                probe: Probe::Blank,
            } => legs.push(dev),
            Surveyed::Other { dev, probe } if force => {
                log::warn!("overwriting {}, which held {probe:?}", dev.info().name);
                legs.push(dev);
            }
            Surveyed::Other { dev, probe } => return Err(refuse(&dev, &probe)),
        }
    }
    Ok(legs)
}

/// The refusal to create over a leg that carries a mirror superblock, force or not.
fn refuse_member(dev: &DeviceRef, sb: &Superblock) -> Error {
    let name = &dev.info().name;
    Error::new(
        ErrorKind::Busy,
        format!(
            "{name} is slot {} of mirror {}: a create never overwrites a mirror leg, even with \
             force; to reuse it, remove it from its mirror ('ublkdm mirror remove-leg') or wipe \
             its superblocks (dd if=/dev/zero of={name} bs=4096 count=2 oflag=direct)",
            sb.slot, sb.uuid
        ),
    )
}

async fn create_surveyed(
    given: Vec<Surveyed>,
    options: &CreateOptions,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    check_leg_count(given.len())?;
    let legs = creatable(given, options.force)?;
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
    let inner = build(
        uuid,
        layout,
        state,
        log,
        meta,
        env,
        AssemblyReport::default(),
    );
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

pub(super) fn present_leg(dev: &DeviceRef, state: LegState, uuid: Uuid, generation: u64) -> Leg {
    Leg {
        state,
        dev: Some(Arc::clone(dev)),
        uuid,
        generation,
        size: dev.info().size,
        name: dev.info().name.clone(),
        stats: Arc::new(LegStats::default()),
        link_epoch: super::remote::link_epoch(dev),
    }
}

/// The mirror an assembly brings up: `expected` if given, else the one mirror the members
/// carry (members of two mirrors are refused rather than guessed between).
fn chosen_mirror(given: &[Surveyed], expected: Option<Uuid>) -> Result<Uuid> {
    let mut found: Vec<(Uuid, String)> = Vec::new();
    for leg in given {
        if let Surveyed::Member { sb, .. } = leg {
            if !found.iter().any(|(u, _)| *u == sb.uuid) {
                found.push((sb.uuid, leg.name()));
            }
        }
    }
    let reasons = given.iter().map(|leg| match leg {
        Surveyed::Other {
            probe: Probe::Damaged(_),
            ..
        } => "damaged",
        Surveyed::Absent { .. } => "missing",
        _ => "",
    });
    let none_kind = no_copy_kind(reasons);
    match (expected, found.as_slice()) {
        (Some(uuid), _) if found.iter().any(|(u, _)| *u == uuid) => Ok(uuid),
        (Some(uuid), _) => Err(Error::new(
            none_kind,
            format!(
                "no leg given carries a superblock of mirror {uuid}: {}",
                given_summary(given)
            ),
        )),
        (None, [(uuid, _)]) => Ok(*uuid),
        (None, []) => Err(Error::new(
            none_kind,
            format!(
                "no leg given carries a mirror superblock: {}",
                given_summary(given)
            ),
        )),
        (None, [(a, an), (b, bn), ..]) => Err(Error::invalid(format!(
            "the legs belong to different mirrors ({an} to {a}, {bn} to {b}); give the legs \
             of one mirror (a create never overwrites a mirror leg)"
        ))),
    }
}

/// The kind of the error of an assembly that found no usable copy, from the reasons the
/// legs that could have been one are absent ("damaged: ...", "missing: ...", "unreadable:
/// ..."): `Corrupt` (exit 7) when damaged metadata stood in the way (our magic, no valid
/// superblock: an impossible field, a checksum) and no leg is merely missing or unreadable;
/// else `NotFound` (exit 3: the legs that hold the data are not there).
fn no_copy_kind<'a>(reasons: impl Iterator<Item = &'a str>) -> ErrorKind {
    let (mut damaged, mut missing) = (false, false);
    for why in reasons {
        damaged |= why.starts_with("damaged");
        missing |= why.starts_with("missing") || why.starts_with("unreadable");
    }
    if damaged && !missing {
        ErrorKind::Corrupt
    } else {
        ErrorKind::NotFound
    }
}

/// "NAME is blank, NAME: Input/output error" for messages.
fn given_summary(given: &[Surveyed]) -> String {
    let parts: Vec<String> = given
        .iter()
        .map(|leg| match leg {
            Surveyed::Member { sb, .. } => format!("{} is a leg of mirror {}", leg.name(), sb.uuid),
            Surveyed::Other { probe, .. } => format!("{} {}", leg.name(), probe_words(probe)),
            Surveyed::Absent { error, .. } => format!("{}: {}", leg.name(), root_cause(error)),
        })
        .collect();
    parts.join(", ")
}

fn probe_words(probe: &Probe) -> String {
    match probe {
        Probe::Blank => "is blank".to_owned(),
        Probe::Foreign(kind) => format!("holds {kind}"),
        Probe::Damaged(why) => format!("has a damaged mirror superblock ({why})"),
        Probe::Ours(sb) => format!("is a leg of mirror {}", sb.uuid),
    }
}

/// The given legs sorted for an assembly of mirror `uuid`.
struct Sorted {
    /// `(index given, device, superblock)` of the members.
    members: Vec<(usize, DeviceRef, Box<Superblock>)>,
    /// `(index given, name, reason)` of legs that could not be read: missing, unreadable or
    /// with a damaged superblock; they may be the missing slots.
    unknown: Vec<(usize, String, String)>,
    /// `(name, note)` of legs that are not members.
    notes: Vec<(String, String)>,
}

fn sort_given(given: Vec<Surveyed>, uuid: Uuid) -> Sorted {
    let mut sorted = Sorted {
        members: Vec::new(),
        unknown: Vec::new(),
        notes: Vec::new(),
    };
    for (index, leg) in given.into_iter().enumerate() {
        let name = leg.name();
        match leg {
            Surveyed::Member { dev, sb } if sb.uuid == uuid => {
                sorted.members.push((index, dev, sb));
            }
            Surveyed::Other {
                probe: Probe::Damaged(why),
                ..
            } => sorted.unknown.push((
                index,
                name,
                format!("damaged: a mirror superblock that {why}"),
            )),
            Surveyed::Member { sb, .. } => {
                let note = not_member_note(&name, &format!("a leg of mirror {}", sb.uuid));
                sorted.notes.push((name, note));
            }
            Surveyed::Other { probe, .. } => {
                let words = probe_words(&probe);
                let what = words.strip_prefix("is ").unwrap_or(&words);
                let note = not_member_note(&name, what);
                sorted.notes.push((name, note));
            }
            Surveyed::Absent {
                error,
                opened: true,
                ..
            } => sorted
                .unknown
                .push((index, name, format!("unreadable: {}", root_cause(&error)))),
            Surveyed::Absent { error, .. } => sorted.unknown.push((
                index,
                name,
                format!("missing: cannot open: {}", root_cause(&error)),
            )),
        }
    }
    sorted
}

/// What an assembly brings up: per slot the present leg and whether it is in sync (else it
/// resumes its recovery), and the absent slots with their names and reasons.
struct Slots {
    present: Vec<Option<(DeviceRef, bool)>>,
    absent: Vec<(usize, String, String)>,
}

fn decide_slots(sorted: Sorted, auth: &Superblock) -> Result<(Slots, Vec<(String, String)>)> {
    let Sorted {
        members,
        unknown,
        mut notes,
    } = sorted;
    let view: Vec<(String, u64, &Superblock)> = members
        .iter()
        .map(|(_, dev, sb)| (dev.info().name.clone(), dev.info().size.0, &**sb))
        .collect();
    let at = members
        .iter()
        .position(|(_, _, sb)| **sb == *auth)
        .expect("the freshest superblock is a member's");
    let verdicts = plan(&view, at)?;
    check_layouts(&view, at, &verdicts)?;
    let mut present: Vec<Option<(DeviceRef, bool)>> = (0..MAX_LEGS).map(|_| None).collect();
    let mut left_out = Vec::new();
    for ((_, dev, sb), verdict) in members.iter().zip(verdicts) {
        let name = dev.info().name.clone();
        match verdict {
            Verdict::InSync => present[sb.slot] = Some((Arc::clone(dev), true)),
            Verdict::Resume => present[sb.slot] = Some((Arc::clone(dev), false)),
            Verdict::LeftOut(why) => left_out.push((sb.slot, name, why)),
            Verdict::NotMember(why) => {
                let note = not_member_note(&name, &why);
                notes.push((name, note));
            }
        }
    }
    let absent_slots: Vec<usize> = (0..MAX_LEGS)
        .filter(|&s| auth.table[s].state != LegState::Empty && present[s].is_none())
        .collect();
    let (absent, extra) = name_absent_slots(&absent_slots, &left_out, &unknown);
    for k in extra {
        let (_, name, why) = &unknown[k];
        notes.push((name.clone(), not_member_note(name, why)));
    }
    Ok((Slots { present, absent }, notes))
}

/// Refuses members the freshest table names whose layout differs from the freshest
/// superblock's (`members[auth]`). The layout is fixed when the mirror is created, so one of
/// the two superblocks is corrupt or crafted, and the data would be read at the wrong place:
/// never guessed between (mdadm refuses superblocks that do not match the others too).
fn check_layouts(
    members: &[(String, u64, &Superblock)],
    auth: usize,
    verdicts: &[Verdict],
) -> Result<()> {
    let (auth_name, _, a) = &members[auth];
    for ((name, _, sb), verdict) in members.iter().zip(verdicts) {
        if matches!(verdict, Verdict::NotMember(_)) {
            continue;
        }
        // A power cut during a grow: this member missed the update with the grown layout.
        if sb.events < a.events && super::grow::grown_from(&a.layout, &sb.layout) {
            continue;
        }
        if let Some(field) = a.layout.difference(&sb.layout) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "mirror {}: the superblocks of {auth_name} (slot {}, event {}) and {name} \
                     (slot {}, event {}) disagree on {field}, which is fixed at creation: one is \
                     corrupt; refusing to assemble (give only the legs of one side)",
                    a.uuid, a.slot, a.events, sb.slot, sb.events
                ),
            ));
        }
    }
    Ok(())
}

/// "slot 1 (/dev/vdb): missing: cannot open: No such device"
fn absent_line(slot: usize, name: &str, why: &str, leg_uuid: Uuid) -> String {
    if name.is_empty() {
        format!("slot {slot} (leg {leg_uuid}): {why}")
    } else {
        format!("slot {slot} ({name}): {why}")
    }
}

/// Assembles mirror `uuid` (or the one mirror the members carry) from the surveyed legs:
/// the freshest member decides; missing, unreadable and stale legs are left out and the
/// mirror runs degraded (see `survey.rs` for the rules and the refusals).
async fn assemble_surveyed(
    given: Vec<Surveyed>,
    expected: Option<Uuid>,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    let uuid = chosen_mirror(&given, expected)?;
    let sorted = sort_given(given, uuid);
    let (_, auth_dev, auth) = sorted
        .members
        .iter()
        .max_by_key(|(_, _, sb)| (sb.events, std::cmp::Reverse(sb.slot)))
        .expect("a member of the chosen mirror");
    if auth.events > MAX_OPEN_EVENTS {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "mirror {uuid}: the superblock of {} has an event counter of {}, more than the \
                 {MAX_OPEN_EVENTS} any mirror reaches",
                auth_dev.info().name,
                auth.events
            ),
        ));
    }
    let auth = auth.as_ref().clone();
    let (slots, notes) = decide_slots(sorted, &auth)?;
    let lines: Vec<String> = slots
        .absent
        .iter()
        .map(|(slot, name, why)| absent_line(*slot, name, why, auth.table[*slot].leg_uuid))
        .collect();
    let in_sync: Vec<usize> = (0..MAX_LEGS)
        .filter(|&s| matches!(slots.present[s], Some((_, true))))
        .collect();
    if in_sync.is_empty() {
        let reasons = slots.absent.iter().map(|(_, _, why)| why.as_str());
        return Err(Error::new(
            no_copy_kind(reasons),
            format!(
                "no leg given holds a complete copy of mirror {uuid} (none is a current in-sync \
                 leg): {}",
                lines.join("; ")
            ),
        ));
    }
    for line in &lines {
        log::warn!("mirror {uuid}: running degraded without {line}");
    }
    for (_, note) in &notes {
        log::warn!("mirror {uuid}: {note}");
    }
    start_assembled(auth, slots, lines, notes, env).await
}

/// The slot table of an assembly: present legs as planned, absent ones stale (or failed, if
/// the freshest table says so), named as well as the legs given allow.
fn assembled_table(auth: &Superblock, slots: &Slots) -> Vec<Leg> {
    let mut table = vec![Leg::empty(); MAX_LEGS];
    for (slot, leg) in table.iter_mut().enumerate() {
        let entry = auth.table[slot];
        let generation = slot as u64 + 1;
        *leg = match &slots.present[slot] {
            Some((dev, in_sync)) => {
                let state = if *in_sync {
                    LegState::InSync
                } else {
                    LegState::Recovering
                };
                present_leg(dev, state, entry.leg_uuid, generation)
            }
            None if entry.state == LegState::Empty => Leg::empty(),
            None => {
                let name = slots
                    .absent
                    .iter()
                    .find(|(s, name, _)| *s == slot && !name.is_empty())
                    .map_or_else(
                        || format!("(missing leg {})", entry.leg_uuid),
                        |(_, name, _)| name.clone(),
                    );
                Leg {
                    state: match entry.state {
                        LegState::Failed => LegState::Failed,
                        _ => LegState::Stale,
                    },
                    dev: None,
                    uuid: entry.leg_uuid,
                    generation,
                    size: entry.leg_size,
                    name,
                    stats: Arc::new(LegStats::default()),
                    link_epoch: 0,
                }
            }
        };
    }
    table
}

/// Opens the dirty log over the in-sync legs (recreating it, all regions out of sync, if
/// it cannot be read); returns it with its bits and whether it was lost.
async fn open_log(
    uuid: Uuid,
    layout: Layout,
    meta: &Arc<MetaDevice>,
) -> Result<(DirtyLog, RegionBitmap, bool)> {
    let meta_dev: DeviceRef = meta.clone();
    let area = crate::units::Extent::new(crate::units::Sector(0), layout.log_area.len);
    let geometry = layout.geometry();
    // The image of the superblock's geometry: after a power cut in a grow, the other slot
    // may hold the image of the geometry the superblocks did not reach (`grow.rs`).
    match DirtyLog::open_for(Arc::clone(&meta_dev), area, Some(&geometry)).await {
        Ok((log, bits)) if log.uuid() == uuid && log.geometry() == &geometry => {
            Ok((log, bits, false))
        }
        Ok((log, _)) => Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "the dirty log of mirror {uuid} {}",
                log_mismatch(&log, uuid, &geometry)
            ),
        )),
        Err(err) if err.kind() == ErrorKind::Corrupt => {
            // Invariant 7: a log that cannot be read means every region is out of sync.
            log::error!("mirror {uuid}: {err}; resyncing everything");
            let log = DirtyLog::create(meta_dev, area, geometry, uuid).await?;
            Ok((log, RegionBitmap::new(geometry.count()), true))
        }
        Err(err) => Err(err),
    }
}

/// What in an opened dirty log disagrees with the superblock's mirror `uuid` and geometry,
/// naming the field.
fn log_mismatch(log: &DirtyLog, uuid: Uuid, geometry: &RegionGeometry) -> String {
    let g = log.geometry();
    if log.uuid() != uuid {
        format!("belongs to another mirror (its UUID is {})", log.uuid())
    } else if g.region_size() != geometry.region_size() {
        format!(
            "has a region size of {} sectors, not the superblock's {}",
            g.region_size().0,
            geometry.region_size().0
        )
    } else {
        format!(
            "has a device size of {}, not the superblock's data size of {}",
            g.device_size(),
            geometry.device_size()
        )
    }
}

/// Starts the assembled mirror: the log over the in-sync legs, recovering legs joining it,
/// one log commit and one superblock update.
async fn start_assembled(
    auth: Superblock,
    slots: Slots,
    lines: Vec<String>,
    notes: Vec<(String, String)>,
    env: MirrorEnv,
) -> Result<Arc<Inner>> {
    let (uuid, layout, geometry) = (auth.uuid, auth.layout, auth.layout.geometry());
    let table = assembled_table(&auth, &slots);
    let in_sync = |s: usize| matches!(slots.present[s], Some((_, true)));
    let reader = (0..MAX_LEGS).find(|&s| in_sync(s)).expect("an in-sync leg");
    let members = (0..MAX_LEGS)
        .filter(|&s| in_sync(s))
        .map(|s| {
            (
                s,
                table[s].generation,
                table[s].dev.clone().expect("present"),
            )
        })
        .collect();
    let meta = MetaDevice::new(layout.log_area, members, reader);
    let (log, bits, log_lost) = open_log(uuid, layout, &meta).await?;
    // Legs resuming a recovery were not log members: they get a copy of the area first.
    for slot in (0..MAX_LEGS).filter(|&s| matches!(slots.present[s], Some((_, false)))) {
        let dev = table[slot].dev.clone().expect("present");
        meta.add_member(slot, table[slot].generation, Arc::clone(&dev))
            .await
            .map_err(|e| {
                Error::io(
                    format!("cannot copy the dirty log to {}", dev.info().name),
                    e,
                )
            })?;
    }
    // A power cut during a log commit can leave the newest image on some legs and not on
    // others. One commit now, before any I/O, makes the newest image the same on every
    // member, so a later assembly reads the bits this one acts on whichever leg it reads.
    log.bump_event()
        .await
        .map_err(|e| Error::io(format!("cannot rewrite the dirty log of mirror {uuid}"), e))?;
    let mut map = RegionMap::new(geometry);
    map.load_dirty_log(&bits);
    if log_lost {
        map.mark_out_of_sync(geometry.all());
    }
    let report = AssemblyReport {
        absent: slots
            .absent
            .iter()
            .zip(&lines)
            .map(|((slot, _, why), line)| {
                (*slot, table[*slot].generation, why.clone(), line.clone())
            })
            .collect(),
        not_members: notes,
    };
    let state = State::new(map, table, auth.events, auth.events_cleared);
    let inner = build(uuid, layout, state, log, meta, env, report);
    if log_lost {
        inner
            .log()
            .mark_range(geometry.all())
            .await
            .map_err(|e| Error::io("cannot mark the mirror's regions for resync", e))?;
    }
    inner
        .persist()
        .await
        .map_err(|e| Error::io(format!("cannot update the superblocks of mirror {uuid}"), e))?;
    log::info!(
        "mirror {uuid}: assembled at event {} with {} in-sync legs{}",
        auth.events,
        (0..MAX_LEGS).filter(|&s| in_sync(s)).count(),
        if lines.is_empty() { "" } else { ", degraded" }
    );
    inner.kick();
    Ok(inner)
}

/// The shared state of a running mirror, with the metadata device's failure hook installed.
fn build(
    uuid: Uuid,
    layout: Layout,
    state: State,
    log: DirtyLog,
    meta: Arc<MetaDevice>,
    env: MirrorEnv,
    report: AssemblyReport,
) -> Arc<Inner> {
    let mut state = state;
    for (&slot, &options) in &env.tuning.leg_options {
        assert!(slot < MAX_LEGS, "leg options of slot {slot}");
        state.options[slot] = options;
    }
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
        shape: std::sync::RwLock::new(super::Shape::new(layout, log)),
        gate: smol::lock::RwLock::new(()),
        growing: std::sync::atomic::AtomicBool::new(false),
        info,
        state: std::sync::Mutex::new(state),
        meta: Arc::clone(&meta),
        engine: env.engine,
        completions: Completions::new(),
        tuning: env.tuning,
        kick: Notify::default(),
        recovered: Notify::default(),
        sb_lock: smol::lock::Mutex::new(()),
        stopping: std::sync::atomic::AtomicBool::new(false),
        ticks: std::sync::atomic::AtomicU64::new(0),
        report,
        behind: super::behind::BehindLedger::new(super::behind::BEHIND_BYTES_MAX),
        remotes: Default::default(),
        held: Default::default(),
    });
    let weak = Arc::downgrade(&inner);
    meta.set_failure_hook(Box::new(move |slot, generation| {
        if let Some(inner) = weak.upgrade() {
            inner.fail_leg(slot, generation, "its metadata write failed");
        }
    }));
    inner
}

/// A device that was a leg of this mirror before, as its own superblock says.
#[derive(Clone, Copy, Debug)]
struct Former {
    slot: usize,
    leg_uuid: Uuid,
    events: u64,
}

/// Where and how a leg joins, decided under the state lock.
#[derive(Clone, Copy, Debug)]
struct Joining {
    slot: usize,
    generation: u64,
    /// The leg's own UUID: kept for a former leg, new otherwise.
    uuid: Uuid,
    /// Every region resyncs (a new leg, or a former one that left before a bit was cleared).
    full: bool,
}

impl Inner {
    /// Adds a leg (see [`super::MirrorTarget::add_leg`]): checks it, decides its slot and
    /// how much resyncs, copies the dirty log to it, then lets it join (its regions marked
    /// out of sync) and records it in the superblocks.
    pub(crate) async fn add_leg(
        self: Arc<Self>,
        dev: DeviceRef,
        options: AddLegOptions,
    ) -> Result<usize> {
        let name = dev.info().name.clone();
        self.check_leg_size(&dev)?;
        let former = self.identify_leg(&dev, options).await?;
        let mut joining = self.plan_join(&name, former, options.slot)?;
        // A side of a split brain the user chose to overwrite: every region resyncs.
        joining.full |= options.discard_theirs;
        if former.is_none() {
            wipe_superblocks(&dev).await?;
        }
        self.meta
            .add_member(joining.slot, joining.generation, Arc::clone(&dev))
            .await
            .map_err(|e| Error::io(format!("cannot copy the dirty log to {name}"), e))?;
        let marks = self.join_leg(&dev, &joining)?;
        let marked = match marks {
            None => self.log().mark_range(self.geometry().all()).await,
            Some(regions) => self.log().mark(&regions).await,
        };
        marked.map_err(|e| Error::io("cannot mark the new leg's regions in the dirty log", e))?;
        if !self.meta.has_member(joining.slot, joining.generation) {
            self.fail_leg(
                joining.slot,
                joining.generation,
                "its metadata write failed",
            );
        }
        self.kick();
        self.persist()
            .await
            .map_err(|e| Error::io("cannot update the superblocks", e))?;
        log::info!(
            "mirror {}: {name} added in slot {} ({} resync)",
            self.uuid,
            joining.slot,
            if joining.full { "full" } else { "incremental" }
        );
        Ok(joining.slot)
    }

    /// Refuses a device too small for the mirror's legs.
    fn check_leg_size(&self, dev: &DeviceRef) -> Result<()> {
        if dev.info().size < self.layout().leg_sectors() {
            return Err(Error::invalid(format!(
                "{} ({}) is smaller than the mirror's legs need ({})",
                dev.info().name,
                dev.info().size,
                self.layout().leg_sectors()
            )));
        }
        Ok(())
    }

    /// What the device is to this mirror: a former leg, or a newcomer (blank, or holding
    /// foreign metadata that `force` lets us overwrite).
    async fn identify_leg(
        &self,
        dev: &DeviceRef,
        options: AddLegOptions,
    ) -> Result<Option<Former>> {
        let force = options.force;
        let probed = probe(dev).await?;
        Ok(match &probed {
            Probe::Ours(sb) if sb.uuid == self.uuid => {
                if !options.discard_theirs {
                    self.check_no_split_brain(dev, sb)?;
                }
                Some(Former {
                    slot: sb.slot,
                    leg_uuid: sb.own().leg_uuid,
                    events: sb.events,
                })
            }
            Probe::Blank => None,
            other if force => {
                log::warn!(
                    "mirror {}: overwriting {}, which held {other:?}",
                    self.uuid,
                    dev.info().name
                );
                None
            }
            other => return Err(refuse(dev, other)),
        })
    }

    /// Decides the joining leg's slot, generation and resync under the state lock: a former
    /// leg that is still active is refused, one whose slot is missing takes it back.
    fn plan_join(
        &self,
        name: &str,
        former: Option<Former>,
        asked: Option<usize>,
    ) -> Result<Joining> {
        let mut st = self.lock();
        if let Some(f) = former {
            if let Some(s) =
                (0..MAX_LEGS).find(|&s| st.legs[s].uuid == f.leg_uuid && st.legs[s].is_active())
            {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("{name} is already slot {s} of mirror {}", self.uuid),
                ));
            }
        }
        let own_slot = former.and_then(|f| {
            (st.legs[f.slot].uuid == f.leg_uuid && st.legs[f.slot].state.is_missing())
                .then_some(f.slot)
        });
        let slot = self.choose_slot(&st, asked, own_slot)?;
        if st.primary().is_none() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("mirror {} has no in-sync leg to copy from", self.uuid),
            ));
        }
        Ok(Joining {
            slot,
            generation: st.new_generation(),
            uuid: former.map_or_else(Uuid::new_v4, |f| f.leg_uuid),
            full: former.is_none_or(|f| f.events < st.events_cleared),
        })
    }

    /// The slot a leg joins: the one asked for (empty, or the leg's own), else its own, else
    /// the first empty one.
    fn choose_slot(
        &self,
        st: &State,
        asked: Option<usize>,
        own_slot: Option<usize>,
    ) -> Result<usize> {
        match (asked, own_slot) {
            (Some(s), _) if s >= MAX_LEGS => Err(Error::invalid(format!("there is no slot {s}"))),
            (Some(s), _) if st.legs[s].state != LegState::Empty && own_slot != Some(s) => Err(
                Error::new(ErrorKind::Busy, format!("slot {s} is not empty")),
            ),
            (Some(s), _) | (None, Some(s)) => Ok(s),
            (None, None) => (0..MAX_LEGS)
                .find(|&s| st.legs[s].state == LegState::Empty)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Busy,
                        format!("mirror {} already has {MAX_LEGS} legs", self.uuid),
                    )
                }),
        }
    }

    /// Puts the leg in its slot as recovering, with its regions marked out of sync in the
    /// map (all of them, or those the log says were written while it was away), under one
    /// lock. Returns the regions to mark in the log (`None`: all).
    fn join_leg(&self, dev: &DeviceRef, joining: &Joining) -> Result<Option<Vec<RegionIndex>>> {
        let Joining {
            slot,
            generation,
            uuid,
            full,
        } = *joining;
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
            ..present_leg(dev, LegState::Recovering, uuid, generation)
        };
        st.repair_source.clear();
        st.stuck.clear();
        let marks = if full {
            st.map.mark_out_of_sync(self.geometry().all());
            None
        } else {
            // Every region written while the leg was away: bits are never cleared while
            // a leg is missing, so the log's bits and the writes in flight cover them.
            st.map.resync_dirty();
            let dirty = self.log().dirty_regions();
            for &region in &dirty {
                st.map.mark_out_of_sync(RegionRange::one(region));
            }
            Some(dirty)
        };
        st.update_degraded();
        st.state_gen += 1;
        Ok(marks)
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
                discard_theirs: false,
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
