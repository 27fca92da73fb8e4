//! Forwarding block devices for tests: a wrapper that changes some operations of the device
//! below implements [`Forward`], overriding only those; [`Forwarding`] makes it a
//! `BlockDevice` that passes every other operation (and the device's info) straight down.

use std::io;
use std::ops::Deref;
use std::sync::Arc;

use ublkdm::device::{
    AlignedBuf, BlockDevice, DeviceInfo, DeviceRef, IoFuture, ReadDone, WriteFlags,
};
use ublkdm::units::{Extent, Sector};

/// A device wrapper: every operation goes to [`Forward::inner`] unless overridden.
pub trait Forward: Send + Sync + 'static {
    /// The device below.
    fn inner(&self) -> &DeviceRef;

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
        self.0.inner().info()
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
