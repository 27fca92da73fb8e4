//! Block devices: the core's only route to storage.
//!
//! [`BlockDevice`] is an asynchronous interface (read, write with optional FUA, flush, discard,
//! write-zeroes) over owned buffers, and, through `read_buf`/`write_buf`, over [`IoBuf`]s:
//! owned memory or a kernel buffer registered on the calling thread's ring (zero copy; see
//! `iobuf`). Implementations:
//! - [`UringDevice`]: a real block device or regular file, `O_DIRECT`, through io_uring on the
//!   calling thread's ring (see [`reactor`]);
//! - `MemDevice`: memory, with a volatile write cache that a simulated crash can lose or tear;
//! - `FaultyDevice`: a seeded, deterministic fault injector wrapped around any device.
//!
//! The last two exist for tests and simulations only: they are compiled with the `sim` feature
//! (which the tests turn on), never into the release binary; so is [`tools`], which runs the
//! real tools (mkfs, cryptsetup...) that make foreign data for tests.
//!
//! [`probe`] says which foreign signatures (file systems, partition tables, LUKS...) a device
//! holds, for every target that must not overwrite them by accident.
//!
//! Invariants every implementation keeps: requests outside the device fail with `EINVAL` and
//! touch nothing; a request's buffer is handed back with its completion; errors are `io::Error`
//! values carrying an errno, never panics.

mod buf;
#[cfg(feature = "sim")]
mod faulty;
#[cfg(feature = "sim")]
mod forward;
mod iobuf;
#[cfg(feature = "sim")]
mod mem;
pub mod nbd;
pub mod probe;
pub mod reactor;
#[cfg(feature = "sim")]
pub mod tools;
mod uring;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

pub use buf::{AlignedBuf, BUF_ALIGN};
#[cfg(feature = "sim")]
pub use faulty::{FaultConfig, FaultyDevice, OpKind};
#[cfg(feature = "sim")]
pub use forward::{Forward, Forwarding};
pub use iobuf::{is_needs_copy, needs_copy, IoBuf, NeedsCopy, RegBuf, RegLease, WriteBuf};
#[cfg(feature = "sim")]
pub use mem::MemDevice;
pub use nbd::{is_nbd_url, NbdAddress, NbdDevice, NbdOptions};
pub use uring::{
    check_distinct, open_distinct, same_device, DeviceIdentity, OpenOptions, UringDevice,
};

use crate::units::{Extent, Sector, SectorCount};

/// A future returned by a device operation. Not `Send`: real devices complete on the ring of
/// the thread that submitted the request.
pub type IoFuture<T> = Pin<Box<dyn Future<Output = T> + 'static>>;

/// The result of a read: the outcome and the buffer, filled on success.
pub type ReadDone = (io::Result<()>, AlignedBuf);

/// The result of [`BlockDevice::read_buf`]: the outcome and the buffer.
pub type IoReadDone = (io::Result<()>, IoBuf);

/// An owned-memory read as a [`BlockDevice::read_buf`] result: the buffer comes back as
/// [`IoBuf::Owned`].
pub(crate) fn owned_read(read: IoFuture<ReadDone>) -> IoFuture<IoReadDone> {
    Box::pin(async move {
        let (res, owned) = read.await;
        (res, IoBuf::Owned(owned))
    })
}

/// What a device is and can do, read from the kernel (or set by a test device).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// A name for messages: the path, or a test label.
    pub name: String,
    /// Usable size in sectors (a whole number of logical blocks).
    pub size: SectorCount,
    pub logical_block_bytes: u32,
    pub physical_block_bytes: u32,
    /// Discard is passed down (and may or may not zero).
    pub discard: bool,
    /// Write-zeroes is offloaded to the device (otherwise it is emulated with writes).
    pub write_zeroes: bool,
    /// Writes may sit in a volatile cache until a flush.
    pub volatile_cache: bool,
    /// The device honours FUA natively.
    pub fua: bool,
    pub rotational: bool,
}

impl DeviceInfo {
    /// The logical block size in sectors.
    pub fn logical_block_sectors(&self) -> SectorCount {
        SectorCount(u64::from(self.logical_block_bytes) / crate::units::SECTOR_BYTES)
    }

    /// Checks that `extent` lies on the device and on logical-block boundaries.
    pub fn check_extent(&self, extent: Extent) -> io::Result<()> {
        self.check_extent_in(extent, self.size)
    }

    /// Checks that `extent` lies within `size` (a device's present size, see
    /// [`BlockDevice::size`]) and on logical-block boundaries.
    pub fn check_extent_in(&self, extent: Extent, size: SectorCount) -> io::Result<()> {
        let block = self.logical_block_sectors().0.max(1);
        let aligned = extent.start.0 % block == 0 && extent.len.0 % block == 0;
        if extent.fits_in(size) && aligned {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }
}

/// Flags on a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Forced unit access: the data is durable when the write completes.
    pub fua: bool,
}

impl WriteFlags {
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// An asynchronous block device. Shared between threads as `Arc<dyn BlockDevice>`; each
/// operation runs on the thread that awaits it.
pub trait BlockDevice: Send + Sync + 'static {
    /// What the device was opened or built with. Its `size` is the size then: a device that
    /// can grow at run time (see `Target::resize`) reports its present size by [`Self::size`].
    fn info(&self) -> &DeviceInfo;

    /// The present size. Bounds checks use this, not `info().size`; it never shrinks while
    /// the device is open.
    fn size(&self) -> SectorCount {
        self.info().size
    }

    /// Reads the present size from the device again (one that can be extended under us, a
    /// block device or a file, grows [`Self::size`] to it) and returns it; by default the
    /// size it has. For a target that holds its devices as `DeviceRef`s (a snapshot origin).
    fn refresh_size(&self) -> io::Result<SectorCount> {
        Ok(self.size())
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone>;

    /// Writes `buf` at `offset`. The buffer is shared so that one buffer can feed several
    /// destinations at once.
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>>;

    /// Reads `buf.len()` bytes at `offset` into an owned or a registered buffer (see
    /// [`IoBuf`]). By default owned memory goes to [`BlockDevice::read`] and a registered
    /// buffer is refused with [`needs_copy`], before any I/O: a device that can read into a
    /// registered buffer, or pass one on, says so by overriding this.
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        match buf {
            IoBuf::Owned(owned) => owned_read(self.read(offset, owned)),
            reg @ IoBuf::Registered(_) => Box::pin(std::future::ready((Err(needs_copy()), reg))),
        }
    }

    /// Writes an owned or a registered buffer at `offset`; the default is as for
    /// [`BlockDevice::read_buf`].
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        match buf {
            IoBuf::Owned(owned) => self.write(offset, owned, flags),
            IoBuf::Registered(_) => Box::pin(std::future::ready(Err(needs_copy()))),
        }
    }

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<io::Result<()>>;

    /// Discards `extent`; `EOPNOTSUPP` when the device cannot.
    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>>;

    /// Writes zeroes over `extent`, offloaded when the device can (see [`DeviceInfo::write_zeroes`]).
    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>>;

    /// The state of the link to a remote device (an NBD export); `None` for a local one.
    fn link(&self) -> Option<LinkStatus> {
        None
    }
}

/// Whether a remote device's link is up (see [`LinkStatus`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LinkState {
    Connected,
    /// Requests fail at once (`ENOTCONN`) until a reconnect succeeds.
    Down,
    /// A reconnect is under way; requests still fail at once.
    Connecting,
}

/// A remote device's link, as [`BlockDevice::link`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub state: LinkState,
    /// Successful connections so far, from 1: a caller tells a reconnect (a new epoch) from
    /// the link it knew.
    pub epoch: u64,
    /// Reconnect attempts so far.
    pub reconnects: u64,
    /// Why the link last went down or a reconnect last failed.
    pub last_error: Option<String>,
    /// Requests sent and not yet answered.
    pub in_flight: u64,
}

/// A shared handle to any block device.
pub type DeviceRef = Arc<dyn BlockDevice>;

/// An `io::Error` for an errno.
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Fails a request with `EINVAL` unless `extent` is valid for `info` and its buffer matches.
#[cfg(feature = "sim")]
pub(crate) fn check_buf_request(
    info: &DeviceInfo,
    offset: Sector,
    buf: &AlignedBuf,
) -> io::Result<()> {
    info.check_extent(Extent::new(offset, buf.sectors()))
}
