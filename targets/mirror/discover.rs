//! Finding a mirror's legs by identity, not by path: the superblocks on the machine's block
//! devices say which device is which slot of which mirror, wherever its path now points
//! (`mdadm --assemble --scan`'s idea).
//!
//! - [`leg_paths`]: the legs to assemble a spec that records the mirror's UUID from: the
//!   stored paths are hints, tried first, then every block device is probed.
//! - [`scan`]: every mirror on the machine, for `ublkdm assemble --scan`.
//! - [`MirrorTarget::current_spec`]: the spec that rebuilds the running mirror (its UUID and
//!   the legs it has now), stored by the daemon after every command.
//!
//! Invariants and why:
//! - probing is read-only and shared (no `O_EXCL`): a device in use (a leg of a running
//!   mirror, a mounted disk) is read, never disturbed; the chosen legs are then opened
//!   exclusively by the normal path, which refuses a device someone else holds;
//! - the scan is bounded ([`MAX_SCAN_DEVICES`]) and skips what cannot be a leg or would show a
//!   leg twice: ublk devices (ours), loop devices with no backing file, read-only and empty
//!   devices, and devices held by a device stacked on them (dm, md: the upper device is
//!   probed instead);
//! - one device found under two paths counts once (by device number, or inode for files);
//! - two devices claiming the same slot and leg UUID (a cloned disk), or two sets of legs
//!   with one mirror UUID and no leg in common, are refused with one line naming both
//!   devices: never merged, since either may hold writes the other lacks;
//! - a stored path whose device carries our magic but no valid superblock (an impossible
//!   field, a checksum) is named with why; when it stands in the way of the assembly, that is
//!   corrupt metadata (exit 7), not a leg not found;
//! - the freshest superblock's table decides membership: a device that carries an older leg
//!   of a slot (replaced or removed since) is left out and said so.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::superblock::{probe, LegState, Probe, Superblock};
use super::MirrorSpec;
use super::MirrorTarget;
use crate::device::reactor;
use crate::device::{DeviceRef, OpenOptions, UringDevice};
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{Discovered, ScanReport};
use crate::target::TargetSpec;

/// The most block devices one scan probes (a bound on the work of one `assemble --scan` or
/// one assembly; the rest are skipped with a warning).
pub const MAX_SCAN_DEVICES: usize = 4096;
/// Where the kernel lists block devices: whole disks and partitions.
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";
/// Where their nodes are.
pub const DEV_DIR: &str = "/dev";

/// Where a scan looks (the machine's, or a test's fake sysfs).
#[derive(Clone, Debug)]
pub struct ScanRoots {
    pub sys_class_block: PathBuf,
    pub dev: PathBuf,
    pub max_devices: usize,
}

impl Default for ScanRoots {
    fn default() -> Self {
        ScanRoots {
            sys_class_block: PathBuf::from(SYS_CLASS_BLOCK),
            dev: PathBuf::from(DEV_DIR),
            max_devices: MAX_SCAN_DEVICES,
        }
    }
}

/// Why the block device `name` (its sysfs directory `dir`) is not worth probing, if it is not.
fn skip_reason(dir: &Path, name: &str) -> Option<String> {
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).map(|s| s.trim().to_owned());
    if name.starts_with("ublkb") {
        return Some("a ublk device".into());
    }
    if name.starts_with("loop") && !dir.join("loop/backing_file").exists() {
        return Some("a loop device with no backing file".into());
    }
    match read("size").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(0) | None => return Some("empty".into()),
        Some(_) => {}
    }
    if read("ro").is_ok_and(|ro| ro == "1") {
        return Some("read-only".into());
    }
    let holders: Vec<String> = std::fs::read_dir(dir.join("holders"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(holder) = holders.first() {
        return Some(format!("held by {holder}, which is probed instead"));
    }
    None
}

/// The block devices a scan probes, by path, in name order; at most `roots.max_devices`.
pub fn block_devices(roots: &ScanRoots) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&roots.sys_class_block) else {
        log::warn!("cannot list {}", roots.sys_class_block.display());
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut devices = Vec::new();
    for name in names {
        if let Some(why) = skip_reason(&roots.sys_class_block.join(&name), &name) {
            log::debug!("scan: skipping {name}: {why}");
            continue;
        }
        if devices.len() == roots.max_devices {
            log::warn!(
                "scan: more than {} block devices; the rest are not probed",
                roots.max_devices
            );
            break;
        }
        devices.push(roots.dev.join(&name));
    }
    devices
}

/// A device that carries a superblock of one of our mirrors.
#[derive(Clone, Debug)]
pub struct Found {
    pub path: PathBuf,
    /// What makes the device one device under any of its names.
    key: (u64, u64),
    pub sb: Superblock,
}

/// What probing found: the devices with a mirror superblock, and the hints that could not
/// be read (with why).
#[derive(Debug, Default)]
pub struct Survey {
    pub legs: Vec<Found>,
    pub unreadable: Vec<(PathBuf, String)>,
    /// The hints that carry our magic but no valid superblock, and why (the field).
    pub damaged: Vec<(PathBuf, String)>,
    /// Devices probed (hints included).
    pub probed: usize,
}

/// The identity of the device at `path`: its device number, or its file's inode; a remote
/// leg's is its URL's hash.
fn device_key(path: &Path) -> Result<(u64, u64)> {
    if super::is_remote(path) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        path.hash(&mut hasher);
        return Ok((u64::MAX - 1, hasher.finish()));
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    Ok(if meta.file_type().is_block_device() {
        (u64::MAX, meta.rdev())
    } else {
        (meta.dev(), meta.ino())
    })
}

/// Reads what `path` holds, read-only and shared (a remote leg: over a connection of its
/// own, closed after).
async fn read_leg(path: &Path) -> Result<Probe> {
    if super::is_remote(path) {
        let dev = super::remote::open_remote(path)?;
        return probe(&dev).await;
    }
    let options = OpenOptions {
        exclusive: false,
        read_only: true,
    };
    let dev: DeviceRef = std::sync::Arc::new(UringDevice::open(path, options)?);
    probe(&dev).await
}

/// Probes `hints` (any path: block devices or files), then the block devices of `roots`. An
/// unreadable device is noted in the survey; only a ring that cannot be created is an error.
pub fn survey(hints: &[PathBuf], roots: &ScanRoots) -> Result<Survey> {
    let scanned = block_devices(roots);
    let hints = hints.to_vec();
    reactor::try_block_on(async move {
        let mut survey = Survey::default();
        let mut seen = Vec::new();
        let paths = hints.iter().map(|p| (p, true));
        for (path, is_hint) in paths.chain(scanned.iter().map(|p| (p, false))) {
            let probed = match device_key(path) {
                Ok(key) if seen.contains(&key) => continue,
                Ok(key) => {
                    seen.push(key);
                    read_leg(path).await.map(|probe| (key, probe))
                }
                Err(err) => Err(err),
            };
            survey.probed += 1;
            match probed {
                Ok((key, Probe::Ours(sb))) => survey.legs.push(Found {
                    path: path.clone(),
                    key,
                    sb: *sb,
                }),
                Ok((_, Probe::Damaged(why))) if is_hint => {
                    let why = format!("a damaged mirror superblock ({why})");
                    survey.damaged.push((path.clone(), why));
                }
                Ok(_) => {}
                Err(err) if is_hint => survey
                    .unreadable
                    .push((path.clone(), err.chain().join(": "))),
                Err(err) => log::debug!("scan: {}", err.chain().join(": ")),
            }
        }
        survey
    })
}

/// The legs of one mirror, chosen from the devices that carry its UUID.
#[derive(Debug)]
pub struct Members {
    pub uuid: Uuid,
    /// The freshest superblock: its table says which legs belong.
    pub newest: Superblock,
    /// The member legs, by slot.
    pub legs: Vec<Found>,
    /// The slots of the table with no leg found, and their recorded state.
    pub missing: Vec<(usize, LegState)>,
    /// Devices that carry the UUID but are not members (an older leg of a slot), and why.
    pub ignored: Vec<(PathBuf, String)>,
}

/// One line for two devices that cannot both be legs of mirror `uuid`.
fn duplicate(uuid: Uuid, a: &Found, b: &Found, what: String) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "mirror {uuid}: {} and {} {what}; refusing to assemble either (wipe the superblocks \
             of the one that should not be a leg)",
            a.path.display(),
            b.path.display()
        ),
    )
}

/// Chooses the legs of mirror `uuid` among `found` (devices of other mirrors are ignored).
pub fn members(uuid: Uuid, found: &[Found]) -> Result<Members> {
    let mut seen = Vec::new();
    let mut ours: Vec<&Found> = found
        .iter()
        .filter(|f| f.sb.uuid == uuid)
        .filter(|f| {
            let first = !seen.contains(&f.key);
            seen.push(f.key);
            first
        })
        .collect();
    ours.sort_by_key(|f| (f.sb.slot, f.sb.own().leg_uuid));
    for pair in ours.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if (a.sb.slot, a.sb.own().leg_uuid) == (b.sb.slot, b.sb.own().leg_uuid) {
            let what = format!(
                "both carry slot {} (leg {}): a cloned disk?",
                a.sb.slot,
                a.sb.own().leg_uuid
            );
            return Err(duplicate(uuid, a, b, what));
        }
    }
    let newest = *ours.iter().max_by_key(|f| f.sb.events).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no leg of mirror {uuid} found"),
        )
    })?;
    let table_of = |f: &Found| {
        f.sb.table
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state != LegState::Empty)
            .map(|(slot, e)| (slot, e.leg_uuid))
            .collect::<Vec<_>>()
    };
    let newest_table = table_of(newest);
    let mut members = Members {
        uuid,
        newest: newest.sb.clone(),
        legs: Vec::new(),
        missing: Vec::new(),
        ignored: Vec::new(),
    };
    for f in ours {
        let own = (f.sb.slot, f.sb.own().leg_uuid);
        if newest_table.contains(&own) {
            members.legs.push(f.clone());
        } else if table_of(f).iter().any(|e| newest_table.contains(e)) {
            let why = format!("an older leg of slot {} (replaced or removed since)", own.0);
            members.ignored.push((f.path.clone(), why));
        } else {
            let what = "carry one mirror UUID but no leg in common: two mirrors with one \
                        identity (a cloned mirror?)"
                .to_owned();
            return Err(duplicate(uuid, newest, f, what));
        }
    }
    members.missing = newest_table
        .iter()
        .filter(|(slot, _)| !members.legs.iter().any(|l| l.sb.slot == *slot))
        .map(|&(slot, _)| (slot, newest.sb.table[slot].state))
        .collect();
    Ok(members)
}

/// The legs to open for `spec`. Without a UUID (a new mirror, or a spec stored before
/// identities), its paths as given. With one, the devices that carry the mirror's legs,
/// found by their superblocks (the stored paths are tried first); a stored path that could
/// not be read is passed on too while a slot is missing, so that the assembly says why.
pub fn leg_paths(spec: &MirrorSpec) -> Result<Vec<PathBuf>> {
    leg_paths_in(spec, &ScanRoots::default())
}

/// [`leg_paths`], scanning `roots`.
fn leg_paths_in(spec: &MirrorSpec, roots: &ScanRoots) -> Result<Vec<PathBuf>> {
    let legs = &spec.legs;
    let Some(uuid) = spec.uuid else {
        return Ok(legs.clone());
    };
    let survey = survey(legs, roots)?;
    let chosen = members(uuid, &survey.legs).map_err(|err| {
        if err.kind() != ErrorKind::NotFound {
            return err;
        }
        let list = |what: &str, found: &[(PathBuf, String)]| {
            let named: Vec<String> = found
                .iter()
                .map(|(path, why)| format!("{} ({why})", path.display()))
                .collect();
            if named.is_empty() {
                String::new()
            } else {
                format!("; {what}: {}", named.join(", "))
            }
        };
        // Damaged metadata in the way, and nothing merely unreadable: corrupt, not absent.
        let kind = if !survey.damaged.is_empty() && survey.unreadable.is_empty() {
            ErrorKind::Corrupt
        } else {
            ErrorKind::NotFound
        };
        Error::new(
            kind,
            format!(
                "no leg of mirror {uuid} found on {} devices probed{}{}",
                survey.probed,
                list("unreadable", &survey.unreadable),
                list("damaged", &survey.damaged)
            ),
        )
    })?;
    for (path, why) in &chosen.ignored {
        log::warn!("mirror {uuid}: leaving out {}: {why}", path.display());
    }
    let mut paths: Vec<PathBuf> = chosen.legs.iter().map(|l| l.path.clone()).collect();
    if !chosen.missing.is_empty() {
        let named = survey.unreadable.iter().chain(&survey.damaged);
        paths.extend(named.map(|(path, _)| path.clone()));
    }
    log::info!(
        "mirror {uuid}: legs {:?}, missing slots {:?}",
        paths,
        chosen.missing
    );
    Ok(paths)
}

/// Every mirror whose legs are on the machine's block devices, with the spec to bring it up.
pub fn scan() -> Result<ScanReport> {
    scan_in(&ScanRoots::default())
}

/// [`scan`] over `roots`.
pub fn scan_in(roots: &ScanRoots) -> Result<ScanReport> {
    let survey = survey(&[], roots)?;
    let mut by_uuid: BTreeMap<Uuid, Vec<Found>> = BTreeMap::new();
    for found in survey.legs {
        by_uuid.entry(found.sb.uuid).or_default().push(found);
    }
    let found = by_uuid
        .into_iter()
        .map(|(uuid, legs)| discovered(uuid, &legs))
        .collect();
    Ok(ScanReport {
        probed: survey.probed,
        found,
    })
}

/// What `assemble --scan` reports and starts for the mirror `uuid` whose devices are `legs`.
fn discovered(uuid: Uuid, legs: &[Found]) -> Discovered {
    let describe = |f: &Found| (f.path.clone(), format!("slot {}", f.sb.slot));
    match members(uuid, legs) {
        Ok(m) => Discovered {
            kind: "mirror",
            identity: uuid.to_string(),
            found: m.legs.iter().map(describe).collect(),
            missing: m
                .missing
                .iter()
                .map(|(slot, state)| format!("slot {slot} (was {state:?})"))
                .collect(),
            left_out: m
                .ignored
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect(),
            spec: Ok(MirrorSpec {
                uuid: Some(uuid),
                legs: m.legs.iter().map(|l| l.path.clone()).collect(),
                region_size_sectors: m.newest.layout.region_size.0,
                nosync: false,
                force: false,
                resync_throttle: Default::default(),
                leg_options: Default::default(),
            }
            .into()),
        },
        Err(err) => Discovered {
            kind: "mirror",
            identity: uuid.to_string(),
            found: legs.iter().map(describe).collect(),
            missing: Vec::new(),
            left_out: Vec::new(),
            spec: Err(err),
        },
    }
}

impl MirrorTarget {
    /// The spec that rebuilds this mirror as it is now: `built_from` with the mirror's UUID
    /// and the paths of the legs in its table (present ones; a missing leg is found by the
    /// scan if it comes back). Creating is over once the mirror exists: `nosync` is dropped.
    pub fn current_spec(&self, built_from: &TargetSpec) -> TargetSpec {
        let Ok(MirrorSpec {
            region_size_sectors,
            force,
            resync_throttle,
            ..
        }) = built_from.parse::<MirrorSpec>()
        else {
            return built_from.clone();
        };
        let st = self.inner.lock();
        let mut legs: Vec<PathBuf> = st
            .legs
            .iter()
            .filter(|l| l.state != LegState::Empty)
            .map(|l| (l.dev.is_some(), PathBuf::from(&l.name)))
            // A local leg away is found again by the scan; a remote one only by its URL.
            .filter(|(present, p)| (*present && p.is_absolute()) || super::is_remote(p))
            .map(|(_, p)| p)
            .chain(self.inner.remotes.pending_paths())
            .collect();
        // A remote leg absent at assembly is both a named slot and a pending connection.
        let mut seen = std::collections::HashSet::new();
        legs.retain(|leg| seen.insert(leg.clone()));
        let leg_options = (0..st.options.len())
            .filter(|&slot| st.options[slot] != Default::default())
            .map(|slot| (slot, st.options[slot]))
            .collect();
        MirrorSpec {
            uuid: Some(self.uuid()),
            legs,
            region_size_sectors,
            nosync: false,
            force,
            resync_throttle,
            leg_options,
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::mirror::superblock::{Layout, SlotEntry, MAX_LEGS};
    use crate::units::SectorCount;

    const MIRROR: Uuid = Uuid::from_u128(0xaaaa);

    fn sb(slot: usize, events: u64, table: &[(usize, u128)]) -> Superblock {
        let mut t = [SlotEntry::EMPTY; MAX_LEGS];
        for &(s, leg) in table {
            t[s] = SlotEntry {
                state: LegState::InSync,
                leg_uuid: Uuid::from_u128(leg),
                leg_size: SectorCount(8192),
            };
        }
        Superblock {
            uuid: MIRROR,
            slot,
            events,
            events_cleared: 0,
            layout: Layout::compute(SectorCount(8192), Some(SectorCount(64))).expect("layout"),
            table: t,
        }
    }

    fn found(path: &str, dev: u64, sb: Superblock) -> Found {
        Found {
            path: path.into(),
            key: (u64::MAX, dev),
            sb,
        }
    }

    #[test]
    fn members_follow_the_freshest_table() {
        // Slot 1 was replaced: leg 2 -> leg 3; the old leg 2 still carries the mirror.
        let old_table = [(0, 1), (1, 2)];
        let new_table = [(0, 1), (1, 3)];
        let legs = vec![
            found("/dev/a", 1, sb(0, 9, &new_table)),
            found("/dev/old", 2, sb(1, 5, &old_table)),
            found("/dev/new", 3, sb(1, 9, &new_table)),
        ];
        let m = members(MIRROR, &legs).expect("members");
        let paths: Vec<_> = m.legs.iter().map(|l| l.path.clone()).collect();
        assert_eq!(paths, [PathBuf::from("/dev/a"), PathBuf::from("/dev/new")]);
        assert!(m.missing.is_empty());
        assert_eq!(m.ignored.len(), 1);
        assert!(m.ignored[0].1.contains("older leg of slot 1"));
    }

    #[test]
    fn a_missing_slot_is_named() {
        let table = [(0, 1), (1, 2), (2, 3)];
        let legs = vec![
            found("/dev/a", 1, sb(0, 4, &table)),
            found("/dev/c", 3, sb(2, 4, &table)),
        ];
        let m = members(MIRROR, &legs).expect("members");
        assert_eq!(m.missing, [(1, LegState::InSync)]);
        assert_eq!(m.legs.len(), 2);
    }

    #[test]
    fn a_cloned_leg_is_refused_naming_both_devices() {
        let table = [(0, 1), (1, 2)];
        let legs = vec![
            found("/dev/a", 1, sb(0, 4, &table)),
            found("/dev/b", 2, sb(1, 4, &table)),
            found("/dev/clone", 9, sb(1, 4, &table)),
        ];
        let err = members(MIRROR, &legs).expect_err("a clone");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let line = err.to_string();
        assert!(
            line.contains("/dev/b") && line.contains("/dev/clone"),
            "{line}"
        );
        assert!(!line.contains('\n'), "one line: {line}");
        // The same device under two names is one device.
        let legs = vec![
            found("/dev/a", 1, sb(0, 4, &table)),
            found("/dev/b", 2, sb(1, 4, &table)),
            found("/dev/disk/by-id/b", 2, sb(1, 4, &table)),
        ];
        assert_eq!(members(MIRROR, &legs).expect("one device").legs.len(), 2);
    }

    #[test]
    fn two_mirrors_with_one_uuid_are_refused() {
        let legs = vec![
            found("/dev/a", 1, sb(0, 4, &[(0, 1), (1, 2)])),
            found("/dev/x", 7, sb(0, 6, &[(0, 7), (1, 8)])),
        ];
        let err = members(MIRROR, &legs).expect_err("two sets");
        assert!(err.to_string().contains("/dev/a"), "{err}");
        assert!(err.to_string().contains("/dev/x"), "{err}");
        assert!(members(Uuid::from_u128(5), &legs).is_err(), "no leg at all");
    }

    /// Stored legs whose superblocks carry an impossible field (behind a valid checksum)
    /// were dropped as "no leg found" (not found, exit 3): now corrupt metadata (exit 7),
    /// naming each device and the field.
    #[test]
    fn damaged_stored_legs_are_corrupt_not_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut crafted = sb(0, 4, &[(0, 1), (1, 2)]);
        crafted.layout.region_size = SectorCount(3);
        let mut image = vec![0u8; 8192 * 512];
        image[..4096].copy_from_slice(crafted.encode().as_slice());
        let legs: Vec<PathBuf> = ["a", "b"].iter().map(|n| dir.path().join(n)).collect();
        for leg in &legs {
            std::fs::write(leg, &image).expect("leg file");
        }
        let spec = MirrorSpec {
            uuid: Some(MIRROR),
            legs: legs.clone(),
            region_size_sectors: 64,
            nosync: false,
            force: false,
            resync_throttle: Default::default(),
            leg_options: Default::default(),
        };
        let roots = ScanRoots {
            sys_class_block: dir.path().join("no-sysfs"),
            dev: dir.path().to_owned(),
            max_devices: 0,
        };
        let err = leg_paths_in(&spec, &roots).expect_err("no valid leg");
        let line = err.to_string();
        if line.contains("O_DIRECT") {
            eprintln!("SKIP: this filesystem refuses O_DIRECT: {line}");
            return;
        }
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{line}");
        assert!(line.contains("region size"), "{line}");
        assert!(line.contains(&*legs[1].to_string_lossy()), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn the_scan_skips_what_cannot_be_a_leg() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sys = dir.path().join("sys");
        let dev = |name: &str, size: &str, ro: &str| {
            let d = sys.join(name);
            std::fs::create_dir_all(d.join("holders")).expect("mkdir");
            std::fs::write(d.join("size"), size).expect("size");
            std::fs::write(d.join("ro"), ro).expect("ro");
            d
        };
        dev("vda", "2048\n", "0\n");
        dev("vda1", "1024\n", "0\n");
        dev("ublkb0", "2048\n", "0\n");
        dev("loop0", "0\n", "0\n");
        let bound = dev("loop1", "2048\n", "0\n");
        std::fs::create_dir_all(bound.join("loop")).expect("mkdir");
        std::fs::write(bound.join("loop/backing_file"), "/tmp/leg\n").expect("backing");
        dev("sr0", "2048\n", "1\n");
        dev("zero", "0\n", "0\n");
        let held = dev("vdb", "2048\n", "0\n");
        std::fs::create_dir_all(held.join("holders/dm-0")).expect("holder");
        dev("dm-0", "2048\n", "0\n");
        let roots = ScanRoots {
            sys_class_block: sys.clone(),
            dev: "/dev".into(),
            max_devices: 10,
        };
        let names: Vec<String> = block_devices(&roots)
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["dm-0", "loop1", "vda", "vda1"]);
        let bounded = ScanRoots {
            max_devices: 2,
            ..roots
        };
        assert_eq!(block_devices(&bounded).len(), 2, "the scan is bounded");
    }
}
