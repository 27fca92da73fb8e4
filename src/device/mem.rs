//! An in-memory block device with an optional volatile write cache.
//!
//! With a volatile cache, every sector written since the last flush remembers each version it
//! has held (the durable one first). [`MemDevice::crash`] then picks, per sector, one of those
//! versions at random: unflushed writes are lost, kept, or torn at sector granularity, which is
//! what a real disk may do on power loss. A FUA write or a flush makes data durable. Requests
//! complete at once; [`super::FaultyDevice`] adds delays and errors.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::{
    check_buf_request, AlignedBuf, BlockDevice, DeviceInfo, IoFuture, ReadDone, WriteFlags,
};
use crate::units::{Extent, Sector, SectorCount, SECTOR_BYTES};

const SECTOR: usize = SECTOR_BYTES as usize;

/// A device held in memory. Cheap to share; clones of the `Arc` see one content.
pub struct MemDevice {
    info: DeviceInfo,
    state: Mutex<MemState>,
}

struct MemState {
    data: Vec<u8>,
    /// Per unflushed sector: its versions since the last flush, the durable one first.
    /// Empty when the device has no volatile cache.
    history: HashMap<u64, Vec<[u8; SECTOR]>>,
}

impl MemDevice {
    /// A zeroed device of `size` sectors whose writes are durable at once.
    pub fn new(name: &str, size: SectorCount) -> Arc<MemDevice> {
        MemDevice::build(name, size, false, true)
    }

    /// A device that does not offload write-zeroes (callers must write zero buffers).
    pub fn new_without_write_zeroes(name: &str, size: SectorCount) -> Arc<MemDevice> {
        MemDevice::build(name, size, false, false)
    }

    /// A zeroed device of `size` sectors with a volatile cache (see [`MemDevice::crash`]).
    pub fn new_volatile(name: &str, size: SectorCount) -> Arc<MemDevice> {
        MemDevice::build(name, size, true, true)
    }

    /// A device with logical blocks of `logical_block_bytes` (a power of two from 512; `size`
    /// is a whole number of them), with or without a volatile cache: for targets that must
    /// respect the geometry of the devices under them.
    pub fn with_geometry(
        name: &str,
        size: SectorCount,
        logical_block_bytes: u32,
        volatile_cache: bool,
    ) -> Arc<MemDevice> {
        assert!(
            logical_block_bytes.is_power_of_two() && logical_block_bytes >= 512,
            "a logical block of {logical_block_bytes} bytes"
        );
        let mut dev = MemDevice::build(name, size, volatile_cache, true);
        let info = &mut Arc::get_mut(&mut dev).expect("just built").info;
        info.logical_block_bytes = logical_block_bytes;
        info.physical_block_bytes = info.physical_block_bytes.max(logical_block_bytes);
        assert_eq!(
            size.0 % info.logical_block_sectors().0,
            0,
            "{name}: a size of whole blocks"
        );
        dev
    }

    fn build(
        name: &str,
        size: SectorCount,
        volatile_cache: bool,
        write_zeroes: bool,
    ) -> Arc<MemDevice> {
        let info = DeviceInfo {
            name: name.to_owned(),
            size,
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            discard: true,
            write_zeroes,
            volatile_cache,
            fua: true,
            rotational: false,
        };
        let state = MemState {
            data: vec![0; size.to_usize_bytes()],
            history: HashMap::new(),
        };
        Arc::new(MemDevice {
            info,
            state: Mutex::new(state),
        })
    }

    /// A copy of `extent`'s current content (what a read would return).
    pub fn snapshot(&self, extent: Extent) -> Vec<u8> {
        let state = self.state.lock().expect("mem device");
        state.data[byte_range(extent)].to_vec()
    }

    /// A copy of the whole device.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().expect("mem device").data.clone()
    }

    /// Overwrites `offset..` with `data` behind the device's back (no cache, no history): for
    /// planting corruption in tests.
    pub fn poke(&self, offset: Sector, data: &[u8]) {
        let mut state = self.state.lock().expect("mem device");
        let start = offset.to_bytes() as usize;
        state.data[start..start + data.len()].copy_from_slice(data);
    }

    /// Simulates power loss: each sector written since the last flush ends up holding one of
    /// the versions it had, chosen by `rng`. Returns how many sectors were at risk.
    pub fn crash(&self, rng: &mut impl Rng) -> usize {
        let mut state = self.state.lock().expect("mem device");
        let history = std::mem::take(&mut state.history);
        let mut sectors: Vec<_> = history.into_iter().collect();
        // HashMap order is random per process; sort so a seed replays exactly.
        sectors.sort_unstable_by_key(|(sector, _)| *sector);
        let at_risk = sectors.len();
        for (sector, versions) in sectors {
            let pick = rng.gen_range(0..versions.len());
            let start = sector as usize * SECTOR;
            state.data[start..start + SECTOR].copy_from_slice(&versions[pick]);
        }
        at_risk
    }

    /// Sectors whose content would be at risk in a crash now.
    pub fn unflushed_sectors(&self) -> usize {
        self.state.lock().expect("mem device").history.len()
    }

    fn apply_write(&self, offset: Sector, data: &[u8], durable: bool) {
        let mut state = self.state.lock().expect("mem device");
        let start = offset.to_bytes() as usize;
        if self.info.volatile_cache {
            state.remember(start, data, durable);
        }
        state.data[start..start + data.len()].copy_from_slice(data);
    }
}

impl MemState {
    /// Records the versions of the sectors that `data` at byte `start` overwrites.
    fn remember(&mut self, start: usize, data: &[u8], durable: bool) {
        for (i, chunk) in data.chunks_exact(SECTOR).enumerate() {
            let sector = (start / SECTOR + i) as u64;
            let new: [u8; SECTOR] = chunk.try_into().expect("sector sized chunk");
            if durable {
                self.history.remove(&sector);
                continue;
            }
            let old_at = start + i * SECTOR;
            let old: [u8; SECTOR] = self.data[old_at..old_at + SECTOR]
                .try_into()
                .expect("sector");
            self.history
                .entry(sector)
                .or_insert_with(|| vec![old])
                .push(new);
        }
    }
}

fn byte_range(extent: Extent) -> std::ops::Range<usize> {
    extent.start.to_bytes() as usize..extent.end().to_bytes() as usize
}

fn ready<T: 'static>(value: T) -> IoFuture<T> {
    Box::pin(std::future::ready(value))
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: Sector, mut buf: AlignedBuf) -> IoFuture<ReadDone> {
        if let Err(err) = check_buf_request(&self.info, offset, &buf) {
            return ready((Err(err), buf));
        }
        let extent = Extent::new(offset, buf.sectors());
        let state = self.state.lock().expect("mem device");
        buf.as_mut_slice()
            .copy_from_slice(&state.data[byte_range(extent)]);
        drop(state);
        ready((Ok(()), buf))
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        if let Err(err) = check_buf_request(&self.info, offset, &buf) {
            return ready(Err(err));
        }
        self.apply_write(offset, buf.as_slice(), flags.fua);
        ready(Ok(()))
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        self.state.lock().expect("mem device").history.clear();
        ready(Ok(()))
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        // Discarded sectors read back as zeroes, like a thinly provisioned device.
        self.write_zeroes(extent)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if let Err(err) = self.info.check_extent(extent) {
            return ready(Err(err));
        }
        let zeroes = vec![0u8; extent.len.to_usize_bytes()];
        self.apply_write(extent.start, &zeroes, false);
        ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use rand::SeedableRng;

    fn write(dev: &Arc<MemDevice>, sector: u64, byte: u8, flags: WriteFlags) {
        let buf = Arc::new(AlignedBuf::from_slice(&[byte; 1024]));
        let fut = dev.write(Sector(sector), buf, flags);
        run_local(fut).expect("write");
    }

    #[test]
    fn crash_keeps_flushed_and_fua_data() {
        let dev = MemDevice::new_volatile("m", SectorCount(16));
        write(&dev, 0, 1, WriteFlags::default());
        run_local(dev.flush()).expect("flush");
        write(&dev, 2, 2, WriteFlags::FUA);
        write(&dev, 4, 3, WriteFlags::default());
        assert_eq!(dev.unflushed_sectors(), 2);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        dev.crash(&mut rng);
        let data = dev.contents();
        assert!(data[..1024].iter().all(|&b| b == 1));
        assert!(data[1024..2048].iter().all(|&b| b == 2));
        // Each sector of the unflushed write is old (0) or new (3), never anything else.
        for sector in data[2048..3072].chunks(512) {
            assert!(sector.iter().all(|&b| b == 0) || sector.iter().all(|&b| b == 3));
        }
    }

    #[test]
    fn out_of_range_requests_fail_without_effect() {
        let dev = MemDevice::new("m", SectorCount(4));
        let buf = Arc::new(AlignedBuf::from_slice(&[9; 1024]));
        let err =
            run_local(dev.write(Sector(3), buf, WriteFlags::default())).expect_err("past the end");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(dev.contents().iter().all(|&b| b == 0));
    }
}
