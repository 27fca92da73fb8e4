//! Every magic number ublkdm writes, in one place, and the recognition of our own metadata at
//! a device's start.
//!
//! Both the mirror and the snapshot store begin a device with two 4 KiB superblock slots
//! (sectors 0..8 and 8..16) whose first 8 bytes are their magic; the dirty log and the
//! snapshot log begin their images and blocks with theirs. Another program's signatures are
//! libblkid's to recognise (`crate::device::probe`); this file knows only ours.
//!
//! Invariant: the magics are distinct, so no structure is taken for another.

use crate::device::DeviceRef;
use crate::error::Result;
use crate::units::{Sector, SectorCount, BLOCK_SECTORS};

use super::read::read_at;

/// Eight bytes at the start of a structure, naming it.
pub type Magic = [u8; 8];

/// A mirror leg's superblock slot.
pub const MIRROR_SUPERBLOCK: Magic = *b"UBDMMIRR";
/// A dirty log image (the mirror's write-intent bitmap).
pub const DIRTY_LOG: Magic = *b"UBDMDLOG";
/// A snapshot COW store's superblock slot.
pub const SNAPSHOT_SUPERBLOCK: Magic = *b"UBDMSNAP";
/// A snapshot COW store's log block.
pub const SNAPSHOT_LOG: Magic = *b"UBDMSLOG";

/// Where the two superblock slots of a device begin (A, then B), each [`BLOCK_SECTORS`] long.
pub const SUPERBLOCK_SLOTS: [Sector; 2] = [Sector(0), Sector(BLOCK_SECTORS.0)];

/// Which of our structures a superblock slot's magic names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    MirrorLeg,
    SnapshotStore,
}

impl Owner {
    /// What a device holding it is, for messages.
    pub fn description(self) -> &'static str {
        match self {
            Owner::MirrorLeg => "a ublkdm mirror leg",
            Owner::SnapshotStore => "a ublkdm COW store",
        }
    }

    fn of(slot: &[u8]) -> Option<Owner> {
        match slot.get(..8)? {
            m if m == MIRROR_SUPERBLOCK => Some(Owner::MirrorLeg),
            m if m == SNAPSHOT_SUPERBLOCK => Some(Owner::SnapshotStore),
            _ => None,
        }
    }
}

/// What our magic at the start of each superblock slot of `dev` names: `[slot A, slot B]`.
/// Only the magic is looked at; a damaged or torn superblock still names its owner. A device
/// too small for both slots holds none.
pub async fn own_superblocks(dev: &DeviceRef) -> Result<[Option<Owner>; 2]> {
    let len = SectorCount(BLOCK_SECTORS.0 * 2);
    if dev.info().size < len {
        return Ok([None, None]);
    }
    let head = read_at(dev, Sector(0), len, len, || {
        format!("cannot read the metadata of {}", dev.info().name)
    })
    .await?;
    let (a, b) = head.as_slice().split_at(BLOCK_SECTORS.to_usize_bytes());
    Ok([Owner::of(a), Owner::of(b)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use crate::device::MemDevice;

    #[test]
    fn magics_are_distinct() {
        let all = [
            MIRROR_SUPERBLOCK,
            DIRTY_LOG,
            SNAPSHOT_SUPERBLOCK,
            SNAPSHOT_LOG,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|b| a != b));
        }
    }

    #[test]
    fn own_superblocks_are_recognised_by_slot() {
        let mem = MemDevice::new("m", SectorCount(64));
        mem.poke(Sector(8), &[MIRROR_SUPERBLOCK, [0; 8]].concat().repeat(32));
        let dev: DeviceRef = mem.clone();
        let found = run_local(async move { own_superblocks(&dev).await }).expect("probe");
        assert_eq!(found, [None, Some(Owner::MirrorLeg)]);
        mem.poke(
            Sector(0),
            &[SNAPSHOT_SUPERBLOCK, [0; 8]].concat().repeat(32),
        );
        let dev: DeviceRef = mem;
        let found = run_local(async move { own_superblocks(&dev).await }).expect("probe");
        assert_eq!(found, [Some(Owner::SnapshotStore), Some(Owner::MirrorLeg)]);
        let small: DeviceRef = MemDevice::new("s", SectorCount(8));
        let found = run_local(async move { own_superblocks(&small).await }).expect("probe");
        assert_eq!(found, [None, None]);
    }
}
