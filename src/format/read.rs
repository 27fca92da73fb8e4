//! The one way on-disk metadata is read: `len` sectors at a sector, into a new aligned buffer,
//! through the device layer.
//!
//! Invariant: a read is never larger than the maximum its caller names. A length that came
//! from disk and exceeds it is corrupt metadata (an error), never a huge allocation.

use crate::device::{AlignedBuf, DeviceRef};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::units::{Sector, SectorCount};

/// Reads `len` sectors at `at` of `dev` into a new buffer. `len` above `max` is a `Corrupt`
/// error; an I/O error carries `what()` as its message.
pub async fn read_at(
    dev: &DeviceRef,
    at: Sector,
    len: SectorCount,
    max: SectorCount,
    what: impl FnOnce() -> String,
) -> Result<AlignedBuf> {
    if len > max {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: {} sectors is more than the limit of {}",
                what(),
                len.0,
                max.0
            ),
        ));
    }
    let (res, buf) = dev.read(at, AlignedBuf::for_sectors(len)).await;
    res.context(what)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use crate::device::MemDevice;
    use crate::units::SECTOR_BYTES;

    #[test]
    fn reads_are_bounded() {
        let mem = MemDevice::new("m", SectorCount(64));
        mem.poke(Sector(8), &[7u8; SECTOR_BYTES as usize]);
        let dev: DeviceRef = mem;
        let d = dev.clone();
        let buf = run_local(async move {
            read_at(&d, Sector(8), SectorCount(2), SectorCount(2), || "x".into()).await
        })
        .expect("read");
        assert_eq!(buf.len(), 1024);
        assert!(buf.as_slice()[..SECTOR_BYTES as usize]
            .iter()
            .all(|&b| b == 7));
        let err = run_local(async move {
            read_at(&dev, Sector(0), SectorCount(9), SectorCount(8), || {
                "the test area".into()
            })
            .await
        })
        .expect_err("too long");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("the test area"), "{err}");
    }
}
