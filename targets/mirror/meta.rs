//! The replicated metadata device: one small virtual [`BlockDevice`] whose every write and
//! flush fans out to the dirty-log area of every live leg, and whose reads come from the
//! freshest leg. The mirror keeps one [`crate::region::DirtyLog`] on it.
//!
//! Why one log over a fan-out device rather than one log per leg: a single log has a single
//! set of bits, a single group-commit queue and a single clearing protocol, exactly as the
//! region module specifies them; the log's two-slot atomic commit then holds on every leg at
//! once because every leg receives the same image at the same offset (so the slot a commit
//! goes to is the same on every leg). Per-leg logs would need N marks per write, N clearing
//! protocols kept in step, and a rule for legs whose logs disagree.
//!
//! Invariants:
//! - A write or flush succeeds when at least one member took it; a member that failed is
//!   dropped from the set at once and reported through the failure hook, so the mirror fails
//!   that leg (its log copy is no longer current, and nothing it holds is trusted again until
//!   it is resynced).
//! - A member joins ([`MetaDevice::add_member`]) only after the whole area was copied to it
//!   from a current member and flushed, under the same gate that writes and flushes take, so
//!   a member's area is always a copy of the others'.
//! - A power cut during a commit may leave members with different newest images (the commit
//!   landed on some). Assembly therefore commits once right after opening the log: the
//!   commit goes to the slot that holds the divergent image on every member, so afterwards
//!   all members agree again.

use std::io;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use smol::lock::Mutex as AsyncMutex;

use super::join_all;
use crate::device::{
    errno, AlignedBuf, BlockDevice, DeviceInfo, DeviceRef, IoFuture, ReadDone, WriteFlags,
};
use crate::units::{Extent, Sector};

/// Called with `(slot, generation)` of a member whose metadata I/O failed.
pub type FailureHook = Box<dyn Fn(usize, u64) + Send + Sync>;

#[derive(Clone)]
struct Member {
    slot: usize,
    generation: u64,
    dev: DeviceRef,
}

/// The fan-out device over every live leg's log area (see the module doc).
pub struct MetaDevice {
    info: DeviceInfo,
    /// Where the area starts on each leg.
    area_start: Sector,
    members: Mutex<Vec<Member>>,
    /// The member reads prefer: the freshest leg when the mirror was assembled.
    read_from: Mutex<Option<usize>>,
    /// Serialises writes and flushes against members joining.
    gate: AsyncMutex<()>,
    hook: OnceLock<FailureHook>,
    /// Failures seen before the hook was installed.
    early_failures: Mutex<Vec<(usize, u64)>>,
    weak: Weak<MetaDevice>,
}

impl MetaDevice {
    /// A device over `area` of every leg in `members` (`(slot, generation, device)`), reading
    /// from slot `read_from`.
    pub fn new(
        area: Extent,
        members: Vec<(usize, u64, DeviceRef)>,
        read_from: usize,
    ) -> Arc<MetaDevice> {
        let logical = members
            .iter()
            .map(|(_, _, d)| d.info().logical_block_bytes)
            .max()
            .unwrap_or(512);
        let info = DeviceInfo {
            name: "mirror metadata".into(),
            size: area.len,
            logical_block_bytes: logical,
            physical_block_bytes: 4096,
            discard: false,
            write_zeroes: false,
            volatile_cache: true,
            fua: true,
            rotational: false,
        };
        let members = members
            .into_iter()
            .map(|(slot, generation, dev)| Member {
                slot,
                generation,
                dev,
            })
            .collect();
        Arc::new_cyclic(|weak| MetaDevice {
            weak: weak.clone(),
            info,
            area_start: area.start,
            members: Mutex::new(members),
            read_from: Mutex::new(Some(read_from)),
            gate: AsyncMutex::new(()),
            hook: OnceLock::new(),
            early_failures: Mutex::new(Vec::new()),
        })
    }

    /// Installs the failure hook, and reports to it the failures seen so far.
    pub fn set_failure_hook(&self, hook: FailureHook) {
        let early = std::mem::take(&mut *self.early_failures.lock().expect("meta failures"));
        for (slot, generation) in early {
            hook(slot, generation);
        }
        if self.hook.set(hook).is_err() {
            panic!("the metadata failure hook is set twice");
        }
    }

    /// The slots currently receiving metadata.
    pub fn member_slots(&self) -> Vec<usize> {
        self.members().iter().map(|m| m.slot).collect()
    }

    pub fn has_member(&self, slot: usize, generation: u64) -> bool {
        self.members()
            .iter()
            .any(|m| m.slot == slot && m.generation == generation)
    }

    /// Stops writing metadata to `slot`.
    pub fn remove_member(&self, slot: usize) {
        self.members
            .lock()
            .expect("meta members")
            .retain(|m| m.slot != slot);
    }

    /// Copies the whole area from a current member to `dev`, flushes it, and makes it a
    /// member. Writes and flushes wait meanwhile, so the copy is current when it joins.
    pub async fn add_member(&self, slot: usize, generation: u64, dev: DeviceRef) -> io::Result<()> {
        let _gate = self.gate.lock().await;
        let area = Extent::new(self.area_start, self.info.size);
        let image = self.read_area().await?;
        dev.write(area.start, Arc::new(image), WriteFlags::default())
            .await?;
        dev.flush().await?;
        let mut members = self.members();
        members.retain(|m| m.slot != slot);
        members.push(Member {
            slot,
            generation,
            dev,
        });
        Ok(())
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().expect("meta members")
    }

    /// The members, the preferred reader first.
    fn read_order(&self) -> Vec<Member> {
        let preferred = *self.read_from.lock().expect("meta reader");
        let mut members = self.members().clone();
        members.sort_by_key(|m| Some(m.slot) != preferred);
        members
    }

    async fn read_area(&self) -> io::Result<AlignedBuf> {
        let (res, buf) = self
            .read_members(Sector(0), AlignedBuf::new(self.info.size.to_usize_bytes()))
            .await;
        res.map(|()| buf)
    }

    async fn read_members(&self, offset: Sector, mut buf: AlignedBuf) -> ReadDone {
        let mut last = errno(libc::EIO);
        for member in self.read_order() {
            let (res, back) = member
                .dev
                .read(self.area_start + sectors(offset), buf)
                .await;
            buf = back;
            match res {
                Ok(()) => return (Ok(()), buf),
                Err(err) => last = err,
            }
        }
        (Err(last), buf)
    }

    /// Drops the members that failed and reports them; the outcome is `Ok` if any succeeded.
    fn settle(&self, targets: &[Member], results: Vec<io::Result<()>>) -> io::Result<()> {
        let mut ok = false;
        let mut last = None;
        let mut failed = Vec::new();
        for (member, res) in targets.iter().zip(results) {
            match res {
                Ok(()) => ok = true,
                Err(err) => {
                    log::warn!(
                        "mirror metadata I/O failed on {} (slot {}): {err}",
                        member.dev.info().name,
                        member.slot
                    );
                    failed.push((member.slot, member.generation));
                    last = Some(err);
                }
            }
        }
        if !failed.is_empty() {
            self.members()
                .retain(|m| !failed.contains(&(m.slot, m.generation)));
            for (slot, generation) in failed {
                match self.hook.get() {
                    Some(hook) => hook(slot, generation),
                    None => self
                        .early_failures
                        .lock()
                        .expect("meta failures")
                        .push((slot, generation)),
                }
            }
        }
        if ok {
            Ok(())
        } else {
            Err(last.unwrap_or_else(|| errno(libc::EIO)))
        }
    }
}

fn sectors(offset: Sector) -> crate::units::SectorCount {
    offset - Sector(0)
}

impl BlockDevice for MetaDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        if let Err(err) = self.info.check_extent(Extent::new(offset, buf.sectors())) {
            return Box::pin(std::future::ready((Err(err), buf)));
        }
        let this = self.self_ref();
        Box::pin(async move { this.read_members(offset, buf).await })
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        if let Err(err) = self.info.check_extent(Extent::new(offset, buf.sectors())) {
            return Box::pin(std::future::ready(Err(err)));
        }
        let this = self.self_ref();
        Box::pin(async move {
            let _gate = this.gate.lock().await;
            let targets = this.members().clone();
            let at = this.area_start + sectors(offset);
            let writes = targets
                .iter()
                .map(|m| m.dev.write(at, Arc::clone(&buf), flags))
                .collect();
            let results = join_all(writes).await;
            this.settle(&targets, results)
        })
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        let this = self.self_ref();
        Box::pin(async move {
            let _gate = this.gate.lock().await;
            let targets = this.members().clone();
            let flushes = targets.iter().map(|m| m.dev.flush()).collect();
            let results = join_all(flushes).await;
            this.settle(&targets, results)
        })
    }

    fn discard(&self, _extent: Extent) -> IoFuture<io::Result<()>> {
        Box::pin(std::future::ready(Err(errno(libc::EOPNOTSUPP))))
    }

    fn write_zeroes(&self, _extent: Extent) -> IoFuture<io::Result<()>> {
        Box::pin(std::future::ready(Err(errno(libc::EOPNOTSUPP))))
    }
}

impl MetaDevice {
    /// A `'static` handle for futures: the device always lives in the `Arc` made by `new`.
    fn self_ref(&self) -> Arc<MetaDevice> {
        self.weak
            .upgrade()
            .expect("a MetaDevice lives in the Arc made by MetaDevice::new")
    }
}
