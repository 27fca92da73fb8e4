//! The linear target: a pass-through onto one backing device.
//!
//! Every request goes unchanged to the backing [`UringDevice`], opened `O_DIRECT` and `O_EXCL`
//! so that no other user (a mount, dm, another ublkdm device) can write under it. It never
//! looks at the data, so it serves registered buffers as they come (zero copy, where the
//! kernel offers it: fixed-buffer I/O on the queue's ring) and owned ones in copy mode. The target
//! advertises the backing device's geometry and capabilities as its own, so the kernel sends
//! only what the backing device can do (discard, write-zeroes, FUA, flushes). Its spec and
//! `add` arguments are in `kind.rs`.
//!
//! Online resize ([`Target::resize`]): the target serves `size` sectors of its backing device,
//! all of it unless its spec says less. Growing re-reads the backing device's size
//! ([`UringDevice::refresh_size`]) and serves all of it, or the size asked for if it fits;
//! the served size never shrinks, and every request is checked against it. A size asked for
//! is kept in the spec (so `recover` serves the same), and a backing device found smaller than
//! the spec's size is refused (it shrank: data was promised up to that size).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::device::errno;
use crate::device::{
    AlignedBuf, BlockDevice, DeviceInfo, IoBuf, IoFuture, IoReadDone, OpenOptions, ReadDone,
    UringDevice, WriteBuf, WriteFlags,
};
use crate::error::{Error, ErrorKind, Result};
use crate::target::{Target, TargetSpec};
use crate::units::{Extent, Sector, SectorCount};

mod kind;
pub use kind::{LinearKind, LinearSpec};

/// The kind, for the registry.
pub fn kind() -> Box<dyn crate::registry::TargetKind> {
    Box::new(LinearKind)
}

/// A linear mapping of the start (all, unless resized to less) of a backing device.
pub struct Linear {
    backing: UringDevice,
    path: PathBuf,
    /// The served size in sectors: at most the backing device's, never shrinking.
    size: AtomicU64,
    /// The size the spec names (`resize ID SIZE`), or `None`: all of the backing device.
    asked: Mutex<Option<SectorCount>>,
}

impl Linear {
    /// Opens `device` exclusively; fails with `Busy` when another user holds it.
    pub fn open(device: &Path) -> Result<Linear> {
        Linear::open_sized(device, None)
    }

    /// Opens `device` exclusively and serves `size` sectors of it (`None`: all of it); a
    /// device smaller than `size` is refused (Corrupt: it shrank since the size was stored).
    pub fn open_sized(device: &Path, size: Option<SectorCount>) -> Result<Linear> {
        let backing = UringDevice::open(
            device,
            OpenOptions {
                exclusive: true,
                read_only: false,
            },
        )?;
        let has = backing.size();
        let served = size.unwrap_or(has);
        if served > has || served.is_zero() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} holds {} sectors, but the device served {} of it (did it shrink?)",
                    device.display(),
                    has.0,
                    served.0
                ),
            ));
        }
        Ok(Linear {
            backing,
            path: device.to_owned(),
            size: AtomicU64::new(served.0),
            asked: Mutex::new(size),
        })
    }

    /// `EINVAL` unless `extent` lies within the served size (the backing device checks its
    /// own size and the alignment).
    fn check(&self, extent: Extent) -> io::Result<()> {
        if extent.fits_in(self.size()) {
            Ok(())
        } else {
            Err(errno(libc::EINVAL))
        }
    }

    fn refused<T: Send + 'static>(err: io::Error) -> IoFuture<io::Result<T>> {
        Box::pin(std::future::ready(Err(err)))
    }
}

impl BlockDevice for Linear {
    fn info(&self) -> &DeviceInfo {
        self.backing.info()
    }

    fn size(&self) -> SectorCount {
        SectorCount(self.size.load(Ordering::SeqCst))
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        if let Err(err) = self.check(Extent::new(offset, buf.sectors())) {
            return Box::pin(std::future::ready((Err(err), buf)));
        }
        self.backing.read(offset, buf)
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        if let Err(err) = self.check(Extent::new(offset, buf.sectors())) {
            return Linear::refused(err);
        }
        self.backing.write(offset, buf, flags)
    }

    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        if let Err(err) = buf
            .sectors()
            .and_then(|n| self.check(Extent::new(offset, n)))
        {
            return Box::pin(std::future::ready((Err(err), buf)));
        }
        self.backing.read_buf(offset, buf)
    }

    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        if let Err(err) = buf
            .sectors()
            .and_then(|n| self.check(Extent::new(offset, n)))
        {
            return Linear::refused(err);
        }
        self.backing.write_buf(offset, buf, flags)
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        self.backing.flush()
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if let Err(err) = self.check(extent) {
            return Linear::refused(err);
        }
        self.backing.discard(extent)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if let Err(err) = self.check(extent) {
            return Linear::refused(err);
        }
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

    /// Re-reads the backing device's size, then serves all of it (`None`) or `to` sectors of
    /// it; see the module doc.
    fn resize(&self, to: Option<SectorCount>) -> Result<SectorCount> {
        let has = self.backing.refresh_size().map_err(|e| {
            Error::io(
                format!("cannot re-read the size of {}", self.path.display()),
                e,
            )
        })?;
        let now = self.size();
        let new = to.unwrap_or(has);
        if new < now {
            return Err(Error::invalid(format!(
                "shrinking is refused: the device serves {} sectors, {} asked",
                now.0, new.0
            )));
        }
        if new > has {
            return Err(Error::invalid(format!(
                "{} holds {} sectors, fewer than the {} asked",
                self.path.display(),
                has.0,
                new.0
            )));
        }
        *self.asked.lock().expect("asked size") = to;
        self.size.fetch_max(new.0, Ordering::SeqCst);
        Ok(self.size())
    }

    /// The spec names the size when one was asked for, so `recover` serves the same.
    fn spec(&self, _built_from: &TargetSpec) -> TargetSpec {
        let asked = *self.asked.lock().expect("asked size");
        let spec = LinearSpec {
            device: self.path.clone(),
            size_sectors: asked.map(|n| n.0),
        };
        TargetSpec::new(kind::NAME, &spec)
    }

    fn status(&self) -> serde_json::Value {
        let info = self.backing.info();
        serde_json::json!({
            "device": self.path,
            "size_sectors": self.size().0,
            "backing_size_sectors": self.backing.size().0,
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

    /// A backing file made longer is served after `resize`: all of it (`None`) or the size
    /// asked for if it fits; shrinking and sizes beyond the backing are refused, requests
    /// beyond the served size fail, and the spec keeps an asked size for `recover`.
    #[test]
    fn resize_follows_a_grown_backing_file() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(1 << 20).expect("size");
        let linear = Arc::new(Linear::open(file.path()).expect("open"));
        let built = TargetSpec::new(
            kind::NAME,
            &LinearSpec {
                device: file.path().to_owned(),
                size_sectors: None,
            },
        );
        assert_eq!(linear.size(), SectorCount(2048));
        assert_eq!(linear.resize(None).expect("same size"), SectorCount(2048));
        file.as_file().set_len(4 << 20).expect("grow");
        let beyond = |dev: &Arc<Linear>, at: u64| {
            let dev = Arc::clone(dev);
            block_on(async move { dev.read(Sector(at), AlignedBuf::new(4096)).await.0 })
        };
        assert!(beyond(&linear, 2048).is_err(), "not served before resize");
        let err = linear.resize(Some(SectorCount(1024))).expect_err("shrink");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = linear
            .resize(Some(SectorCount(16384)))
            .expect_err("too big");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(linear.size(), SectorCount(2048), "refusals change nothing");
        assert_eq!(
            linear.resize(Some(SectorCount(4096))).expect("fits"),
            SectorCount(4096)
        );
        assert!(beyond(&linear, 2048).is_ok());
        assert!(beyond(&linear, 4096).is_err(), "beyond the size asked");
        let spec: LinearSpec = linear.spec(&built).parse().expect("spec");
        assert_eq!(spec.size_sectors, Some(4096));
        assert_eq!(linear.status()["size_sectors"], 4096);
        assert_eq!(linear.status()["backing_size_sectors"], 8192);
        assert_eq!(linear.resize(None).expect("all"), SectorCount(8192));
        assert!(beyond(&linear, 8184).is_ok());
        assert_eq!(linear.spec(&built), built, "all of it: the spec as before");
        drop(linear);
        // Reopened at an asked size, and refused when the backing shrank below it.
        let again = Linear::open_sized(file.path(), Some(SectorCount(4096))).expect("reopen");
        assert_eq!(again.size(), SectorCount(4096));
        drop(again);
        let err = Linear::open_sized(file.path(), Some(SectorCount(16384))).err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    /// The backing device never shrinks while open: a file cut shorter is an error, and the
    /// size stays.
    #[test]
    fn a_backing_file_that_shrank_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(1 << 20).expect("size");
        let linear = Linear::open(file.path()).expect("open");
        file.as_file().set_len(512 << 10).expect("shrink");
        let err = linear.resize(None).expect_err("shrank");
        assert!(err.chain().join(": ").contains("shrank"), "{err}");
        assert_eq!(linear.size(), SectorCount(2048));
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
