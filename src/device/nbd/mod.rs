//! An NBD client as a [`BlockDevice`]: a remote export (nbdkit, qemu-nbd, nbd-server...)
//! served to the core like a local disk.
//!
//! [`NbdDevice::connect`] makes the first connection at once (a wrong address is an error
//! then), after which a worker thread of the device's own owns the socket (see `conn`):
//! callers on any thread hand it commands through a bounded channel and await the reply.
//!
//! The protocol subset (see `proto`): fixed newstyle, `NBD_OPT_GO`, simple replies; read,
//! write (FUA when the export takes it, else write then flush), flush (a no-op when the export
//! has no cache to flush), trim (else `EOPNOTSUPP`), write-zeroes (else emulated with writes of
//! a zero buffer), `NBD_CMD_DISC` on drop. A read-only export fails writes with `EROFS`.
//!
//! **Never hang a caller.** Every request has a deadline ([`NbdOptions::request_timeout`]).
//! A missed deadline, a dead socket or a protocol error takes the link down: the requests in
//! flight fail at once (`ETIMEDOUT` past their deadline, else `EIO`), new ones fail at once with
//! `ENOTCONN`, and the worker reconnects in the background with exponential back-off until
//! the device is dropped. [`BlockDevice::link`] reports the state; its `epoch` grows by one
//! per successful connection, so a caller tells a reconnect from the same link.
//!
//! Requests bigger than the server's maximum payload are split into sequential pieces that
//! share the caller's buffer (no copies); trims and write-zeroes are split at
//! [`EFFECT_PIECE_MAX`].

mod conn;
#[cfg(any(test, feature = "sim"))]
pub mod model;
pub mod proto;
mod url;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smol::channel::Sender;

use self::conn::{Done, Geometry, Job, Op, Shared, Worker};
use self::proto::*;
pub use self::url::{is_nbd_url, NbdAddress, NbdEndpoint, DEFAULT_PORT};
use super::{
    errno, AlignedBuf, BlockDevice, DeviceInfo, IoFuture, LinkStatus, ReadDone, WriteFlags,
};
use crate::error::{Error, ErrorKind, Result};
use crate::units::{Extent, Sector, SectorCount, SECTOR_BYTES};

/// The most bytes one trim or write-zeroes command covers (its length field is 32 bits; a
/// round number well below that keeps each command's work bounded on the server).
pub const EFFECT_PIECE_MAX: u32 = 1 << 30;
/// The zero buffer that emulates write-zeroes, per write.
pub const ZERO_PIECE_MAX: u32 = 1 << 20;
/// The most requests in flight one device may be configured for.
pub const MAX_IN_FLIGHT_LIMIT: usize = 4096;

/// How a device talks to its server; set at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// A request without a reply in this time takes the link down (`ETIMEDOUT`).
    pub request_timeout: Duration,
    /// The most a connection and handshake may take.
    pub connect_timeout: Duration,
    /// Requests in flight at once; more wait in a bounded queue.
    pub max_in_flight: usize,
    /// The first wait before a reconnect, doubled after every failure up to the maximum.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
}

impl Default for NbdOptions {
    fn default() -> NbdOptions {
        NbdOptions {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_in_flight: 64,
            reconnect_backoff_min: Duration::from_millis(500),
            reconnect_backoff_max: Duration::from_secs(15),
        }
    }
}

impl NbdOptions {
    /// Asserts that the options make sense (bad ones are a bug of the caller).
    fn assert_sane(&self) {
        assert!(!self.request_timeout.is_zero(), "{self:?}");
        assert!(!self.connect_timeout.is_zero(), "{self:?}");
        assert!(
            (1..=MAX_IN_FLIGHT_LIMIT).contains(&self.max_in_flight),
            "{self:?}"
        );
        assert!(!self.reconnect_backoff_min.is_zero(), "{self:?}");
        assert!(
            self.reconnect_backoff_min <= self.reconnect_backoff_max,
            "{self:?}"
        );
    }
}

/// A remote export as a block device (see the module doc).
pub struct NbdDevice {
    info: DeviceInfo,
    client: Arc<Client>,
    stop: Sender<()>,
    worker: Option<JoinHandle<()>>,
}

/// What a request's future needs: shared with the device, outlives it if a future does.
struct Client {
    jobs: Sender<Job>,
    shared: Arc<Shared>,
    request_timeout: Duration,
    read_only: bool,
    logical: u32,
    /// Zeroes for emulated write-zeroes, made on first use.
    zeroes: std::sync::OnceLock<Arc<AlignedBuf>>,
}

impl NbdDevice {
    /// Connects to `addr` and shakes hands, blocking until done or failed (within
    /// `opts.connect_timeout`); then a worker thread serves the device.
    pub fn connect(addr: NbdAddress, opts: NbdOptions) -> Result<NbdDevice> {
        opts.assert_sane();
        let shared = Arc::new(Shared::new());
        let (jobs_tx, jobs_rx) = smol::channel::bounded(opts.max_in_flight);
        let (stop_tx, stop_rx) = smol::channel::bounded(1);
        let worker = Worker {
            addr: addr.clone(),
            opts: opts.clone(),
            shared: shared.clone(),
            jobs: jobs_rx,
            stop: stop_rx,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || smol::block_on(worker.run(ready_tx)))
            .map_err(|e| Error::io(format!("cannot start the client thread of {addr}"), e))?;
        let geometry = match ready_rx.recv() {
            Ok(Ok(geometry)) => geometry,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(Error::new(
                    e.kind(),
                    format!("cannot connect to {addr}: {e}"),
                ));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::new(
                    ErrorKind::Daemon,
                    format!("cannot connect to {addr}: the client thread died"),
                ));
            }
        };
        let client = Client {
            jobs: jobs_tx,
            shared,
            request_timeout: opts.request_timeout,
            read_only: geometry.has(FLAG_READ_ONLY),
            logical: geometry.logical,
            zeroes: std::sync::OnceLock::new(),
        };
        Ok(NbdDevice {
            info: device_info(&addr, &geometry),
            client: Arc::new(client),
            stop: stop_tx,
            worker: Some(thread),
        })
    }

    /// Whether the export is read-only (writes fail with `EROFS`).
    pub fn read_only(&self) -> bool {
        self.client.read_only
    }
}

fn device_info(addr: &NbdAddress, g: &Geometry) -> DeviceInfo {
    DeviceInfo {
        name: addr.to_string(),
        size: SectorCount(g.size / SECTOR_BYTES),
        logical_block_bytes: g.logical,
        physical_block_bytes: g.physical,
        discard: g.has(FLAG_SEND_TRIM),
        write_zeroes: g.has(FLAG_SEND_WRITE_ZEROES),
        volatile_cache: g.has(FLAG_SEND_FLUSH),
        fua: g.has(FLAG_SEND_FUA),
        rotational: g.has(FLAG_ROTATIONAL),
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        // Every wait of the worker races the stop channel; closing the job channel fails
        // requests still queued (their futures may outlive the device) with ENOTCONN.
        self.stop.close();
        self.client.jobs.close();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Client {
    fn flags(&self) -> u16 {
        self.shared.flags.load(Ordering::Acquire)
    }

    fn has(&self, flag: u16) -> bool {
        self.flags() & flag != 0
    }

    /// The most bytes per read or write request, in whole logical blocks.
    fn max_payload(&self) -> usize {
        let max = self.shared.max_payload.load(Ordering::Acquire);
        (max / self.logical * self.logical).max(self.logical) as usize
    }

    /// Sends one command and waits for its outcome.
    async fn submit(&self, op: Op, flags: u16, offset: u64, len: u32) -> Done {
        let deadline = Instant::now() + self.request_timeout;
        let (job, done) = Job::new(op, flags, offset, len, deadline);
        if !self.shared.is_connected() {
            // Dropping the job completes it with ENOTCONN (see conn's invariants).
            drop(job);
        } else if let Err(refused) = self.jobs.send(job).await {
            drop(refused.into_inner());
        }
        // Every job completes once, even if dropped (conn's invariants), so this only fails
        // if a job was leaked: a bug, reported as EIO rather than a hang.
        done.recv()
            .await
            .unwrap_or(Done::Other(Err(errno(libc::EIO))))
    }

    async fn read(&self, offset: u64, mut buf: AlignedBuf) -> ReadDone {
        let total = buf.len();
        let piece = self.max_payload();
        let mut at = 0;
        while at < total {
            let len = piece.min(total - at);
            let op = Op::Read { buf, at };
            buf = match self.submit(op, 0, offset + at as u64, len as u32).await {
                Done::Read(Ok(()), b) => b,
                Done::Read(Err(e), b) => return (Err(e), b),
                Done::Other(res) => {
                    // Only a leaked job gets here (see submit); the buffer is gone.
                    let err = res.err().unwrap_or_else(|| errno(libc::EIO));
                    return (Err(err), AlignedBuf::new(total));
                }
            };
            at += len;
        }
        (Ok(()), buf)
    }

    async fn write(&self, offset: u64, buf: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        let native_fua = fua && self.has(FLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let piece = self.max_payload();
        let mut at = 0;
        while at < buf.len() {
            let len = piece.min(buf.len() - at);
            let op = Op::Write {
                buf: buf.clone(),
                at,
            };
            done(self.submit(op, flags, offset + at as u64, len as u32).await)?;
            at += len;
        }
        if fua && !native_fua {
            return self.flush().await;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        if !self.has(FLAG_SEND_FLUSH) {
            // No cache on the server's side to flush: completed writes are durable.
            return Ok(());
        }
        done(self.submit(Op::Flush, 0, 0, 0).await)
    }

    /// Sends `make()` over `extent` in pieces of at most [`EFFECT_PIECE_MAX`].
    async fn effect(&self, extent: Extent, make: fn() -> Op) -> io::Result<()> {
        let piece = u64::from(EFFECT_PIECE_MAX / self.logical * self.logical);
        let mut offset = extent.start.to_bytes();
        let end = extent.end().to_bytes();
        while offset < end {
            let len = piece.min(end - offset);
            done(self.submit(make(), 0, offset, len as u32).await)?;
            offset += len;
        }
        Ok(())
    }

    async fn discard(&self, extent: Extent) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        if !self.has(FLAG_SEND_TRIM) {
            return Err(errno(libc::EOPNOTSUPP));
        }
        self.effect(extent, || Op::Trim).await
    }

    async fn write_zeroes(&self, extent: Extent) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        if self.has(FLAG_SEND_WRITE_ZEROES) {
            return self.effect(extent, || Op::WriteZeroes).await;
        }
        let piece = (ZERO_PIECE_MAX as usize).min(self.max_payload());
        let zeroes = self
            .zeroes
            .get_or_init(|| Arc::new(AlignedBuf::new(piece)))
            .clone();
        let mut offset = extent.start.to_bytes();
        let end = extent.end().to_bytes();
        while offset < end {
            let len = (zeroes.len() as u64).min(end - offset) as u32;
            let op = Op::Write {
                buf: zeroes.clone(),
                at: 0,
            };
            done(self.submit(op, 0, offset, len).await)?;
            offset += u64::from(len);
        }
        Ok(())
    }
}

/// The result of a command without a buffer.
fn done(d: Done) -> io::Result<()> {
    match d {
        Done::Other(res) | Done::Read(res, _) => res,
    }
}

impl BlockDevice for NbdDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: Sector, buf: AlignedBuf) -> IoFuture<ReadDone> {
        if let Err(e) = self.info.check_extent(Extent::new(offset, buf.sectors())) {
            return Box::pin(std::future::ready((Err(e), buf)));
        }
        let client = self.client.clone();
        Box::pin(async move { client.read(offset.to_bytes(), buf).await })
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        if let Err(e) = self.info.check_extent(Extent::new(offset, buf.sectors())) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let client = self.client.clone();
        Box::pin(async move { client.write(offset.to_bytes(), buf, flags.fua).await })
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        let client = self.client.clone();
        Box::pin(async move { client.flush().await })
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if let Err(e) = self.info.check_extent(extent) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let client = self.client.clone();
        Box::pin(async move { client.discard(extent).await })
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        if let Err(e) = self.info.check_extent(extent) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let client = self.client.clone();
        Box::pin(async move { client.write_zeroes(extent).await })
    }

    fn link(&self) -> Option<LinkStatus> {
        Some(self.client.shared.status().clone())
    }
}
