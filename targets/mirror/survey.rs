//! What the legs given to `add mirror` (or `recover`, or a scan) are, and the assembly plan
//! that follows from their superblocks: which legs run, which slots are missing and why, and
//! when to refuse. `mdadm --assemble --run` is the model.
//!
//! # Rules
//! - A given leg is *missing* (it could not be opened), *unreadable* (reading its superblock
//!   failed), a *member* (it carries a valid mirror superblock), or *other* (blank, foreign
//!   metadata, a damaged mirror superblock).
//! - One member makes the request an assembly; an assembly never writes over a leg that is
//!   not a member. Blank and foreign legs beside members are *not members*: they are left
//!   alone (the user adds them with `mirror add-leg` once the mirror is up).
//! - The freshest member (the highest event counter; equal counters are the same
//!   generation) decides the slot table. A member that table names is in sync when the table
//!   says so and its counter is at most one behind (a crash can cut one superblock update
//!   short), resumes its recovery when the table says recovering, and is otherwise *stale*:
//!   left out, so the mirror runs degraded until it is added back (from the bitmap when the
//!   bitmap covers what it missed). A member the table no longer names (removed or replaced)
//!   is not a member.
//! - Split brain: a member left out (stale in the freshest table) that was in sync in its own
//!   superblock and whose own table records every leg the mirror would run from as gone
//!   (failed, stale, removed or replaced) was written as a complete copy while they were
//!   away, and they while it was away: each side may hold acknowledged writes the other
//!   lacks, and starting would resync one side's away, so assembly refuses. A leg that names
//!   one of the running legs as still active shares its history through that leg (it took
//!   every write the left-out leg took), and a leg that was recovering holds no write of its
//!   own (an in-sync leg took every acknowledged write): neither is split brain.
//! - Assembly refuses when no present leg is a current in-sync copy.
//!
//! Invariant: every slot the freshest table names either holds a present leg (in sync or
//! recovering) or is reported absent with a reason; every given leg is a member, absent, or
//! listed as not a member.

use std::path::PathBuf;

use uuid::Uuid;

use super::superblock::{probe, LegState, Probe, Superblock, MAX_LEGS};
use crate::device::DeviceRef;
use crate::error::{Error, ErrorKind, Result};

/// What an assembly left out, kept for `status`.
#[derive(Clone, Debug, Default)]
pub(crate) struct AssemblyReport {
    /// `(slot, generation, reason, line)` of the slots absent at assembly: the reason holds
    /// while the slot keeps that generation (a leg added there later replaces it).
    pub absent: Vec<(usize, u64, String, String)>,
    /// `(device name, note)` of the given legs that are not members.
    pub not_members: Vec<(String, String)>,
}

/// One leg as given to open or assemble a mirror.
pub enum GivenLeg {
    /// The device opened.
    Opened(DeviceRef),
    /// The device could not be opened (it does not exist, is in use, is not a device...).
    Unopened { path: PathBuf, error: Error },
}

/// The legs given to open or assemble a mirror, in the order given: a create puts the i-th
/// leg in slot i, and an assembly names the slot of a leg that could not be read by that
/// order when it can.
pub struct LegSet {
    pub legs: Vec<GivenLeg>,
    /// The mirror these legs must belong to (from a stored spec or a scan). With it, legs of
    /// other mirrors are not members and nothing is ever created.
    pub uuid: Option<Uuid>,
}

impl LegSet {
    /// Devices that all opened, with no expected mirror.
    pub fn opened(devs: Vec<DeviceRef>) -> LegSet {
        LegSet {
            legs: devs.into_iter().map(GivenLeg::Opened).collect(),
            uuid: None,
        }
    }
}

/// What one given leg turned out to be.
pub(super) enum Surveyed {
    /// Carries a valid mirror superblock.
    Member { dev: DeviceRef, sb: Box<Superblock> },
    /// Readable, without a valid mirror superblock: blank, foreign or damaged.
    Other { dev: DeviceRef, probe: Probe },
    /// Could not be opened, or its superblock could not be read.
    Absent {
        name: String,
        error: Error,
        opened: bool,
    },
}

impl Surveyed {
    pub(super) fn name(&self) -> String {
        match self {
            Surveyed::Member { dev, .. } | Surveyed::Other { dev, .. } => dev.info().name.clone(),
            Surveyed::Absent { name, .. } => name.clone(),
        }
    }
}

/// Probes every given leg; an I/O error makes that leg unreadable, not the whole request fail.
pub(super) async fn survey(legs: Vec<GivenLeg>) -> Vec<Surveyed> {
    let mut out = Vec::with_capacity(legs.len());
    for leg in legs {
        out.push(match leg {
            GivenLeg::Unopened { path, error } => Surveyed::Absent {
                name: path.display().to_string(),
                error,
                opened: false,
            },
            GivenLeg::Opened(dev) => match probe(&dev).await {
                Ok(Probe::Ours(sb)) => Surveyed::Member { dev, sb },
                Ok(probe) => Surveyed::Other { dev, probe },
                Err(error) => Surveyed::Absent {
                    name: dev.info().name.clone(),
                    error,
                    opened: true,
                },
            },
        });
    }
    out
}

/// The innermost cause of `err`, without the errno suffix: "No such file or directory".
pub(super) fn root_cause(err: &Error) -> String {
    let chain = err.chain();
    let last = chain.last().cloned().unwrap_or_default();
    match last.find(" (os error ") {
        Some(at) => last[..at].to_owned(),
        None => last,
    }
}

/// Why a given leg that is not a member is not one, for the status and the warnings.
pub(super) fn not_member_note(name: &str, what: &str) -> String {
    format!(
        "{name}: {what}, not a member (left untouched; add it with 'ublkdm mirror add-leg ID \
         {name}' once the mirror is up)"
    )
}

/// The plan for one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    InSync,
    /// Recovering in the freshest table: joins and resumes its recovery.
    Resume,
    /// Left out; its slot is absent for this reason.
    LeftOut(String),
    /// The freshest table does not name it: not a member, for this reason.
    NotMember(String),
}

/// Decides every member's part (see the module doc). `members` are `(name, size in sectors,
/// superblock)` of the chosen mirror; `auth` indexes the freshest. Refuses split brain and
/// two legs claiming one slot.
pub(super) fn plan(members: &[(String, u64, &Superblock)], auth: usize) -> Result<Vec<Verdict>> {
    let a = members[auth].2;
    let mut verdicts = Vec::with_capacity(members.len());
    for (name, size, sb) in members {
        let entry = a.table[sb.slot];
        let verdict = if entry.state == LegState::Empty || entry.leg_uuid != sb.own().leg_uuid {
            Verdict::NotMember(format!(
                "was slot {} of mirror {} but has been removed or replaced",
                sb.slot, a.uuid
            ))
        } else if *size < a.layout.leg_sectors().0 {
            Verdict::LeftOut(format!(
                "unusable: {size} sectors, smaller than the {} the mirror's legs need",
                a.layout.leg_sectors().0
            ))
        } else {
            let current = sb.events + 1 >= a.events;
            match entry.state {
                LegState::InSync if current => Verdict::InSync,
                LegState::Recovering if current => Verdict::Resume,
                _ if sb.events < a.events => {
                    Verdict::LeftOut(format!("stale: event {} < {}", sb.events, a.events))
                }
                state => Verdict::LeftOut(format!(
                    "stale: marked {} at event {}",
                    state_name(state),
                    a.events
                )),
            }
        };
        log::debug!(
            "mirror {}: {name}: slot {} at event {} of {}: {verdict:?}",
            a.uuid,
            sb.slot,
            sb.events,
            a.events
        );
        verdicts.push(verdict);
    }
    check_named_members(members, &verdicts)?;
    Ok(verdicts)
}

fn state_name(state: LegState) -> &'static str {
    match state {
        LegState::Empty => "empty",
        LegState::InSync => "in sync",
        LegState::Recovering => "recovering",
        LegState::Stale => "stale",
        LegState::Failed => "failed",
    }
}

/// Refuses two named members in one slot (a cloned disk) and split brain.
fn check_named_members(members: &[(String, u64, &Superblock)], verdicts: &[Verdict]) -> Result<()> {
    let named: Vec<usize> = (0..members.len())
        .filter(|&i| !matches!(verdicts[i], Verdict::NotMember(_)))
        .collect();
    for (k, &p) in named.iter().enumerate() {
        for &q in &named[k + 1..] {
            let ((pn, _, ps), (qn, _, qs)) = (&members[p], &members[q]);
            if ps.slot == qs.slot {
                return Err(Error::invalid(format!(
                    "{pn} and {qn} both claim slot {} of mirror {} (a copied disk?); give one \
                     of them",
                    ps.slot, ps.uuid
                )));
            }
        }
    }
    let sources: Vec<&Superblock> = (0..members.len())
        .filter(|&i| verdicts[i] == Verdict::InSync)
        .map(|i| members[i].2)
        .collect();
    for &q in &named {
        let (qn, _, qs) = &members[q];
        if matches!(verdicts[q], Verdict::LeftOut(_)) && holds_writes_the_sources_lack(qs, &sources)
        {
            let names: Vec<&str> = (0..members.len())
                .filter(|&i| verdicts[i] == Verdict::InSync)
                .map(|i| members[i].0.as_str())
                .collect();
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "split brain in mirror {}: {qn} (event {}) was written as a complete copy \
                     while {} (event {}) was away, and the other way round; refusing to pick one \
                     (assemble from one side, then wipe the other and add it with add-leg)",
                    qs.uuid,
                    qs.events,
                    names.join(", "),
                    sources.iter().map(|sb| sb.events).max().unwrap_or(0)
                ),
            ));
        }
    }
    Ok(())
}

/// Whether the left-out leg `q` may hold acknowledged writes that none of `sources` (the
/// legs the mirror will run from) has: `q` was a complete copy (in sync in its own
/// superblock), and its own table says every source was gone (failed, stale, removed or
/// replaced) when it was last written. If it names one source as in sync or recovering, that
/// source took every write `q` took and is still current, so nothing `q` holds is lost. A leg
/// that was recovering holds no write of its own (an in-sync leg took every acknowledged
/// write), so it is never one side of a split brain.
pub(super) fn holds_writes_the_sources_lack(q: &Superblock, sources: &[&Superblock]) -> bool {
    q.own().state == LegState::InSync
        && !sources.is_empty()
        && sources.iter().all(|s| disowns(q, s))
}

/// Whether `p`'s own table knows `q` (the same leg in the same slot) and says it is gone
/// from the mirror (not written any more). A `q` that `p` does not know joined the mirror
/// after `p` was last written: `q` was copied from a later state of the mirror than `p`
/// recorded, so `p` is merely older, not the other side of a split (mirror_sim seed 80: a
/// leg failed, its slot-0 peer was replaced, and the replacement became the only source).
fn disowns(p: &Superblock, q: &Superblock) -> bool {
    let entry = p.table[q.slot];
    entry.leg_uuid == q.own().leg_uuid && !entry.state.is_active()
}

/// Names the absent slots: a member left out names its own slot; the given legs that could
/// not be read (missing, unreadable, damaged: `unknown`, `(index given, name, reason)`) are
/// matched to absent slots, first where the order given matches the slot (a create puts the
/// i-th leg in slot i), then in order. Returns `(slot, name, reason)` for every slot of
/// `absent` (the name empty when nothing is known), and the indices of `unknown` left over.
pub(super) fn name_absent_slots(
    absent: &[usize],
    left_out: &[(usize, String, String)],
    unknown: &[(usize, String, String)],
) -> (Vec<(usize, String, String)>, Vec<usize>) {
    let mut out: Vec<(usize, String, String)> = Vec::with_capacity(absent.len());
    let mut open: Vec<usize> = Vec::new();
    for &slot in absent {
        match left_out.iter().find(|(s, _, _)| *s == slot) {
            Some((_, name, why)) => out.push((slot, name.clone(), why.clone())),
            None => open.push(slot),
        }
    }
    let mut used = vec![false; unknown.len()];
    let mut unmatched = Vec::new();
    for &slot in &open {
        match unknown.iter().position(|(i, _, _)| *i == slot) {
            Some(k) if !used[k] => {
                used[k] = true;
                out.push((slot, unknown[k].1.clone(), unknown[k].2.clone()));
            }
            _ => unmatched.push(slot),
        }
    }
    let mut rest = (0..unknown.len()).filter(|&k| !used[k]);
    for slot in unmatched {
        match rest.next() {
            Some(k) => out.push((slot, unknown[k].1.clone(), unknown[k].2.clone())),
            None => out.push((slot, String::new(), "missing: not given".to_owned())),
        }
    }
    let extra = rest.collect();
    out.sort_by_key(|(slot, _, _)| *slot);
    assert!(out.len() == absent.len() && out.iter().all(|(s, _, _)| *s < MAX_LEGS));
    (out, extra)
}
