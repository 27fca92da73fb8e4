//! Forwarding block devices for tests and simulations: a wrapper that changes some
//! operations of the device below implements [`Forward`], overriding only those;
//! [`Forwarding`] makes it a [`BlockDevice`] that passes every other operation (the device's
//! info and size, owned and registered buffers alike) straight down.
//!
//! One trait for every wrapper keeps them honest: a new `BlockDevice` method gets its
//! forwarding default here once, not in each test's copy of the whole interface.

use std::io;
use std::ops::Deref;
use std::sync::Arc;

use super::{
    AlignedBuf, BlockDevice, DeviceInfo, DeviceRef, IoBuf, IoFuture, IoReadDone, LinkStatus,
    ReadDone, WriteBuf, WriteFlags,
};
use crate::units::{Extent, Sector, SectorCount};

/// A device wrapper: every operation goes to [`Forward::inner`] unless overridden.
pub trait Forward: Send + Sync + 'static {
    /// The device below.
    fn inner(&self) -> &DeviceRef;

    fn info(&self) -> &DeviceInfo {
        self.inner().info()
    }

    fn size(&self) -> SectorCount {
        self.inner().size()
    }

    fn refresh_size(&self) -> io::Result<SectorCount> {
        self.inner().refresh_size()
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        self.inner().read(offset, buf)
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        self.inner().write(offset, buf, flags)
    }

    /// By default owned memory goes through [`Forward::read`] (so a wrapper that overrides
    /// it sees every owned read) and a registered buffer straight down.
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        match buf {
            IoBuf::Owned(owned) => super::owned_read(self.read(offset, owned)),
            reg => self.inner().read_buf(offset, reg),
        }
    }

    /// As [`Forward::read_buf`], for writes.
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        match buf {
            IoBuf::Owned(owned) => self.write(offset, owned, flags),
            reg => self.inner().write_buf(offset, reg, flags),
        }
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        self.inner().flush()
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.inner().discard(extent)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.inner().write_zeroes(extent)
    }
}

/// A [`Forward`] wrapper as a block device; derefs to the wrapper for its own methods.
pub struct Forwarding<T>(pub T);

impl<T> Deref for Forwarding<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Forward> BlockDevice for Forwarding<T> {
    fn info(&self) -> &DeviceInfo {
        Forward::info(&self.0)
    }
    fn size(&self) -> SectorCount {
        Forward::size(&self.0)
    }
    fn refresh_size(&self) -> io::Result<SectorCount> {
        Forward::refresh_size(&self.0)
    }
    fn link(&self) -> Option<LinkStatus> {
        self.0.inner().link()
    }
    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        Forward::read(&self.0, offset, buf)
    }
    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        Forward::write(&self.0, offset, buf, flags)
    }
    fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<IoReadDone> {
        Forward::read_buf(&self.0, offset, buf)
    }
    fn write_buf(
        &self,
        offset: Sector,
        buf: WriteBuf,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        Forward::write_buf(&self.0, offset, buf, flags)
    }
    fn flush(&self) -> IoFuture<io::Result<()>> {
        Forward::flush(&self.0)
    }
    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        Forward::discard(&self.0, extent)
    }
    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        Forward::write_zeroes(&self.0, extent)
    }
}
