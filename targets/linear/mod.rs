//! The linear target: a pass-through onto one backing device.
//!
//! Every request goes unchanged to the backing [`UringDevice`], opened `O_DIRECT` and `O_EXCL`
//! so that no other user (a mount, dm, another ublkdm device) can write under it. It never
//! looks at the data, so it serves registered buffers as they come (zero copy, where the
//! kernel offers it: fixed-buffer I/O on the queue's ring) and owned ones in copy mode. The target
//! advertises the backing device's geometry and capabilities as its own, so the kernel sends
//! only what the backing device can do (discard, write-zeroes, FUA, flushes). Its spec and
//! `add` arguments are in `kind.rs`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{
    AlignedBuf, BlockDevice, DeviceInfo, IoBuf, IoFuture, IoReadDone, OpenOptions, ReadDone,
    UringDevice, WriteBuf, WriteFlags,
};
use crate::error::Result;
use crate::target::Target;
use crate::units::{Extent, Sector};

mod kind;
pub use kind::{LinearKind, LinearSpec};

/// The kind, for the registry.
pub fn kind() -> Box<dyn crate::registry::TargetKind> {
    Box::new(LinearKind)
}

/// A linear mapping of a whole backing device.
pub struct Linear {
    backing: UringDevice,
    path: PathBuf,
}

impl Linear {
    /// Opens `device` exclusively; fails with `Busy` when another user holds it.
    pub fn open(device: &Path) -> Result<Linear> {
        let backing = UringDevice::open(
            device,
            OpenOptions {
                exclusive: true,
                read_only: false,
            },
        )?;
        Ok(Linear {
            backing,
            path: device.to_owned(),
        })
    }
}

impl BlockDevice for Linear {
    fn info(&self) -> &DeviceInfo {
        self.backing.info()
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        self.backing.read(offset, buf)
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        self.backing.write(offset, buf, flags)
    }

    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        self.backing.read_buf(offset, buf)
    }

    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        self.backing.write_buf(offset, buf, flags)
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        self.backing.flush()
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.backing.discard(extent)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.backing.write_zeroes(extent)
    }
}

impl Target for Linear {
    fn kind(&self) -> &'static str {
        "linear"
    }

    /// A pass-through never looks at the data: zero copy wherever the kernel offers it.
    fn zero_copy(&self) -> bool {
        true
    }

    fn status(&self) -> serde_json::Value {
        let info = self.backing.info();
        serde_json::json!({
            "device": self.path,
            "size_sectors": info.size.0,
            "logical_block_bytes": info.logical_block_bytes,
            "physical_block_bytes": info.physical_block_bytes,
            "discard": info.discard,
            "write_zeroes": info.write_zeroes,
            "volatile_cache": info.volatile_cache,
            "fua": info.fua,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::block_on;
    use crate::error::ErrorKind;

    #[test]
    fn passes_requests_through_to_a_file() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(1 << 20).expect("size");
        let linear = Arc::new(Linear::open(file.path()).expect("open"));
        assert_eq!(linear.kind(), "linear");
        let data = AlignedBuf::from_slice(&[0x5a; 8192]);
        let dev = Arc::clone(&linear);
        let back = block_on(async move {
            dev.write(Sector(16), Arc::new(data), WriteFlags::FUA)
                .await
                .expect("write");
            dev.flush().await.expect("flush");
            let (res, buf) = dev.read(Sector(16), AlignedBuf::new(8192)).await;
            res.expect("read");
            buf
        });
        assert!(back.as_slice().iter().all(|&b| b == 0x5a));
        assert_eq!(linear.status()["size_sectors"], 2048);
    }

    /// A linear target passes registered buffers to its backing device (zero copy), which
    /// reads and writes them with fixed-buffer I/O on the calling thread's ring.
    #[test]
    fn passes_registered_buffers_through() {
        use crate::device::reactor::block_on_registered;
        use crate::device::IoBuf;
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(1 << 20).expect("size");
        let linear = Arc::new(Linear::open(file.path()).expect("open"));
        assert!(linear.zero_copy(), "linear asks for zero copy");
        let bufs = vec![AlignedBuf::from_slice(&[0xc3; 8192]), AlignedBuf::new(8192)];
        let dev = Arc::clone(&linear);
        let (res, bufs) = block_on_registered(bufs, move |regs| async move {
            let w = dev
                .write_buf(
                    Sector(32),
                    IoBuf::Registered(regs[0].clone()),
                    WriteFlags::FUA,
                )
                .await;
            let (r, _) = dev
                .read_buf(Sector(32), IoBuf::Registered(regs[1].clone()))
                .await;
            (w, r)
        });
        assert!(res.0.is_ok() && res.1.is_ok(), "{res:?}");
        assert!(bufs[1].as_slice().iter().all(|&b| b == 0xc3));
        let on_disk = std::fs::read(file.path()).expect("read the file");
        assert!(on_disk[32 * 512..32 * 512 + 8192]
            .iter()
            .all(|&b| b == 0xc3));
    }

    #[test]
    fn missing_and_empty_devices_are_refused() {
        let err = Linear::open(Path::new("/nonexistent/ublkdm-test"))
            .err()
            .expect("missing");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let empty = tempfile::NamedTempFile::new().expect("temp file");
        let err = Linear::open(empty.path()).err().expect("empty");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
}
