//! Reads and writes of a whole target from a test thread: each runs on a ring of its own
//! (`block_on`); writes are FUA, so what a test wrote is on the legs when it returns.

use std::sync::Arc;

use ublkdm::device::reactor::block_on;
use ublkdm::device::{AlignedBuf, WriteFlags};
use ublkdm::target::Target;
use ublkdm::units::{Sector, SectorCount};

/// Writes `data` at `sector` of `target` (FUA); panics if the write fails.
pub fn write(target: &Arc<dyn Target>, sector: u64, data: &[u8]) {
    let t = Arc::clone(target);
    let buf = Arc::new(AlignedBuf::from_slice(data));
    block_on(async move { t.write(Sector(sector), buf, WriteFlags::FUA).await }).expect("write");
}

/// Reads `sectors` sectors at `sector` of `target`; panics if the read fails.
pub fn read(target: &Arc<dyn Target>, sector: u64, sectors: u64) -> Vec<u8> {
    let t = Arc::clone(target);
    block_on(async move {
        let (res, buf) = t
            .read(
                Sector(sector),
                AlignedBuf::for_sectors(SectorCount(sectors)),
            )
            .await;
        res.map(|()| buf.as_slice().to_vec())
    })
    .expect("read")
}
