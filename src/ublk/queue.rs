//! One ublk queue: its thread's ring, executor and tag tasks.
//!
//! libublk calls [`serve_queue`] on a thread of its own for each queue. On that thread the
//! queue's io_uring (libublk's) is also the thread's device ring: [`QueueRing`] submits every
//! SQE the target issues through libublk's slab (user_data = the `Target` bit; libublk adds the
//! slot key), so target I/O and ublk commands share one ring and one wait. Our
//! [`reactor::Executor`] runs the tasks; its off-thread wakes reach the ring through the
//! [`Notifier`] read that [`reactor::serve_notifier_until`] keeps in flight.
//!
//! Each tag has one task, which loops (request -> target -> COMMIT and FETCH). Where a
//! request's data lives ([`Buffers`]):
//! - with `UBLK_F_USER_COPY` (Linux 6.5+) the kernel keeps it in its request: the task leases a
//!   buffer from the daemon's [`BufferPool`] when a READ or WRITE arrives, copies the data in
//!   (WRITE) or out (READ) with `pread`/`pwrite` on `/dev/ublkcN`, and gives the buffer back
//!   before it commits, so an idle tag holds no memory;
//! - without it, the tag owns one mapped buffer of `max_io_buf_bytes` for its whole life, whose
//!   address FETCH hands to the kernel (its pages are resident once the kernel has used them).
//! - with `UBLK_F_AUTO_BUF_REG` (zero copy, Linux 6.16+) the kernel registers the request's own
//!   pages as this ring's fixed buffer at index = tag before it hands the request over (FETCH
//!   and COMMIT pass `BufDesc::AutoReg`), and unregisters them at COMMIT: the task gives the
//!   target a `RegBuf` of the request's bytes under a lease it ends before COMMIT, and the
//!   target's backing I/O (awaited in the task, so on this ring) uses it with fixed-buffer
//!   reads and writes. A request the target cannot serve so (`NeedsCopy`), or whose memory
//!   the backing device refused (`EINVAL`), is served again in copy mode by user copy and
//!   counted in `zero_copy_fallbacks`.
//!
//! **Every fetched request is committed exactly once**, with the byte count or `-errno`: an
//! uncommitted request would block STOP/DEL in the kernel for good. The request path therefore
//! has no panics on bad input; it maps every failure (a failed copy too) to an errno.
//!
//! The queue ends when the kernel aborts its commands (STOP_DEV, or the device going away): the
//! tag tasks see `QueueIsDown`, the notifier read is woken and not renewed, and the thread
//! returns after every task (and with them every borrow of the device) is gone.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::squeue;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkUringData};

use super::pool::BufferPool;
use super::Stats;
use crate::device::reactor::{self, Executor, Notifier, RingDriver, RingId, SqeFuture};
use crate::device::{is_needs_copy, AlignedBuf, IoBuf, RegBuf, RegLease, WriteFlags};
use crate::target::Target;
use crate::units::{Extent, Sector, SectorCount, SECTOR_SHIFT};

/// How long the ring may sleep with nothing to do; libublk then marks the queue idle.
const QUEUE_IDLE_SECS: u64 = 20;
/// How long a queue whose commands were aborted waits for its tag tasks to finish before it
/// gives up on them (they can only be stuck in a target request that never completes).
const QUEUE_STOP_GRACE: Duration = Duration::from_secs(10);
/// The last sector whose byte offset fits in a u64: bounds request extents before arithmetic.
const MAX_SECTOR: u64 = u64::MAX >> SECTOR_SHIFT;

/// What every queue thread of a device shares.
pub(super) struct QueueShared {
    pub target: Arc<dyn Target>,
    pub stats: Arc<Stats>,
    /// The largest request (max_io_buf_bytes).
    pub io_buf_bytes: usize,
    pub buffers: Buffers,
}

/// Where the device's request data lives (see module doc).
pub(super) enum Buffers {
    /// `UBLK_F_USER_COPY`: leased per request from the daemon's pool.
    Leased(Arc<BufferPool>),
    /// One buffer per tag, given to the kernel at FETCH.
    PerTag,
    /// `UBLK_F_AUTO_BUF_REG` (zero copy): the request's own pages, registered on the queue
    /// ring at index = tag; `fallback` (user copy, when granted too) serves the requests that
    /// need their data in our memory.
    Registered { fallback: Option<Arc<BufferPool>> },
}

/// The body of a queue thread: serves queue `qid` until the kernel aborts it.
pub(super) fn serve_queue(qid: u16, dev: &UblkDev, shared: &QueueShared) {
    shared.stats.set_io_flusher(qid, is_io_flusher());
    match run_queue(qid, dev, shared) {
        Ok(()) => log::info!("queue {qid}: stopped"),
        Err(err) => log::error!("queue {qid}: {err}"),
    }
}

/// Whether this thread is an IO_FLUSHER (libublk sets it on queue threads; reclaim must not
/// recurse into our own device).
fn is_io_flusher() -> bool {
    const PR_GET_IO_FLUSHER: libc::c_int = 58;
    // SAFETY: PR_GET_IO_FLUSHER takes no pointers and only reads the calling thread's flags.
    let flag = unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) };
    flag == 1
}

fn run_queue(qid: u16, dev: &UblkDev, shared: &QueueShared) -> Result<(), String> {
    // SAFETY: libublk's run_target keeps the UblkDev alive (an Arc it joins this thread
    // against) for as long as this function runs. Everything that holds the extended reference
    // (the queue and the tag tasks that hold the queue) is dropped before this function
    // returns: the tasks by `teardown`, the queue at the end of this scope. The 'static
    // lifetime only lets the tasks be spawned on our executor, which requires it.
    let dev: &'static UblkDev = unsafe { &*(dev as *const UblkDev) };
    let queue =
        Rc::new(UblkQueue::new(qid, dev).map_err(|e| format!("cannot set up the queue: {e}"))?);
    let ring = RingId::fresh();
    let _driver = reactor::install_driver(Rc::new(QueueRing(ring)));
    let notifier = Notifier::new().map_err(|e| format!("cannot create an eventfd: {e}"))?;
    let exec = Executor::new(Some(notifier.clone()));
    let _current = exec.enter();
    let tags: Vec<_> = queue
        .tags()
        .map(|tag| {
            let data = match &shared.buffers {
                Buffers::Leased(pool) => TagData::Leased(UserCopy {
                    pool: Arc::clone(pool),
                    cdev: dev.tgt.fds[0],
                    qid,
                    tag,
                    max_bytes: shared.io_buf_bytes,
                }),
                Buffers::PerTag => TagData::Own(Some(AlignedBuf::new_mapped(shared.io_buf_bytes))),
                Buffers::Registered { fallback } => TagData::Registered(ZeroCopy {
                    ring,
                    tag,
                    max_bytes: shared.io_buf_bytes,
                    fallback: fallback.as_ref().map(|pool| UserCopy {
                        pool: Arc::clone(pool),
                        cdev: dev.tgt.fds[0],
                        qid,
                        tag,
                        max_bytes: shared.io_buf_bytes,
                    }),
                }),
            };
            let task = serve_tag(
                Rc::clone(&queue),
                tag,
                Arc::clone(&shared.target),
                data,
                Arc::clone(&shared.stats),
            );
            exec.spawn(task)
        })
        .collect();
    // FETCH passes each buffer as a raw address (the buffers are ours, not libublk's IoBufs),
    // so libublk's own registration count never runs: report this queue ready ourselves, or
    // START_DEV would wait for it forever. (With user copy libublk waits for none.)
    dev.notify_buffer_registration_complete(false);
    let stopping = Rc::new(Cell::new(false));
    let stop_flag = Rc::clone(&stopping);
    let notifier_task = exec.spawn(reactor::serve_notifier_until(notifier.clone(), move || {
        stop_flag.get()
    }));
    let result = drive(&queue, &exec, &tags, &notifier_task, &stopping, &notifier);
    teardown(&exec, tags, notifier_task);
    if Rc::strong_count(&queue) != 1 {
        log::error!("queue {qid}: a task outlived teardown");
    }
    result
}

/// Runs the ring and the executor until the queue is aborted and its tasks are done.
fn drive(
    queue: &UblkQueue<'static>,
    exec: &Executor,
    tags: &[async_task::Task<()>],
    notifier_task: &async_task::Task<()>,
    stopping: &Cell<bool>,
    notifier: &Notifier,
) -> Result<(), String> {
    let tags_done = || tags.iter().all(|t| t.is_finished());
    let run_ops = || {
        exec.run_ready();
        if tags_done() && !stopping.replace(true) {
            // Wake the notifier task so that it sees `stopping` and leaves no read in flight.
            notifier.notify();
        }
    };
    let aborted_at = Cell::new(None::<Instant>);
    let done = || {
        if tags_done() && notifier_task.is_finished() {
            return true;
        }
        // Also asked after a failed ring wait (EINTR), which is no reason to give up.
        if !queue.is_stopping() {
            return false;
        }
        let since = aborted_at.get().unwrap_or_else(Instant::now);
        aborted_at.set(Some(since));
        let expired = since.elapsed() > QUEUE_STOP_GRACE;
        if expired {
            log::error!(
                "queue {}: tasks still busy {QUEUE_STOP_GRACE:?} after the abort",
                queue.get_qid()
            );
        }
        expired
    };
    let events = libublk::wait_and_handle_io_events(queue, Some(QUEUE_IDLE_SECS), run_ops, done);
    // The event loop never waits on a waker (it blocks in io_uring_enter), so this polls it
    // to completion in one go.
    smol::block_on(events).map_err(|e| format!("queue event loop failed: {e}"))
}

/// Drops every task on this thread: finished ones, and (after a give-up) cancelled ones, whose
/// futures are dropped by running them once more.
fn teardown(exec: &Executor, tags: Vec<async_task::Task<()>>, notifier_task: async_task::Task<()>) {
    drop(tags);
    drop(notifier_task);
    exec.run_ready();
}

/// The queue's ring as the thread's device ring, and its identity.
struct QueueRing(RingId);

impl RingDriver for QueueRing {
    fn id(&self) -> RingId {
        self.0
    }

    fn submit(&self, sqe: squeue::Entry) -> SqeFuture {
        Box::pin(async move {
            // Only the Target bit: libublk puts its slab key in the other bits and routes the
            // CQE back to this future.
            match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
                Ok(res) => res,
                Err(err) => {
                    // Only a malformed user_data fails here, before anything is queued.
                    log::error!("cannot queue an SQE on the ublk ring: {err}");
                    -libc::EIO
                }
            }
        })
    }
}

/// The life of one tag: FETCH, then serve and COMMIT+FETCH until the queue goes down.
async fn serve_tag(
    queue: Rc<UblkQueue<'static>>,
    tag: u16,
    target: Arc<dyn Target>,
    mut data: TagData,
    stats: Arc<Stats>,
) {
    let fetch = match &data {
        TagData::Own(buf) => BufDesc::RawAddress(buf.as_ref().expect("owned").as_ptr()),
        TagData::Leased(_) => BufDesc::Slice(&[]),
        TagData::Registered(_) => auto_reg(tag),
    };
    if let Err(err) = queue.submit_io_prep_cmd(tag, fetch, 0, None).await {
        return tag_ended(&queue, tag, err);
    }
    loop {
        let request = Request::from_iod(queue.get_iod(tag));
        let res = data.serve(&*target, request, &stats).await;
        stats.record(request.op, res);
        let commit = match &data {
            TagData::Own(buf) => BufDesc::Slice(buf.as_ref().expect("owned").as_slice()),
            TagData::Leased(_) => BufDesc::Slice(&[]),
            TagData::Registered(_) => auto_reg(tag),
        };
        if let Err(err) = queue.submit_io_commit_cmd(tag, commit, res).await {
            return tag_ended(&queue, tag, err);
        }
    }
}

/// What FETCH and COMMIT pass with zero copy: register the request's pages at index = tag
/// on this ring. No `UBLK_AUTO_BUF_REG_FALLBACK`: the index is ours alone, and a registration
/// that fails anyway fails the request in the kernel.
fn auto_reg(tag: u16) -> BufDesc<'static> {
    BufDesc::AutoReg(sys::ublk_auto_buf_reg {
        index: tag,
        ..Default::default()
    })
}

/// A tag's request data (see [`Buffers`]).
enum TagData {
    /// The tag's own buffer; `None` only while a request has it.
    Own(Option<AlignedBuf>),
    Leased(UserCopy),
    Registered(ZeroCopy),
}

impl TagData {
    /// Serves one request: the result to commit (bytes or `-errno`).
    async fn serve(&mut self, target: &dyn Target, request: Request, stats: &Stats) -> i32 {
        match self {
            TagData::Own(slot) => {
                let buf = slot.take().expect("the tag's buffer is back");
                let capacity = buf.capacity();
                let (res, mut buf) = handle_request(target, request, buf).await;
                // The kernel copies read data from, and the next write into, this same
                // allocation.
                assert_eq!(buf.capacity(), capacity, "the target swapped a tag buffer");
                buf.set_len(capacity);
                *slot = Some(buf);
                res
            }
            TagData::Leased(io) => io.serve(target, request).await,
            TagData::Registered(zc) => zc.serve(target, request, stats).await,
        }
    }
}

/// A tag's data path with `UBLK_F_AUTO_BUF_REG`: the kernel registered the request's pages
/// at index `tag` on this thread's ring (`ring`) before handing the request over, and
/// unregisters them at COMMIT.
struct ZeroCopy {
    ring: RingId,
    tag: u16,
    max_bytes: usize,
    /// Copy mode for one request (user copy), when the device was granted it.
    fallback: Option<UserCopy>,
}

impl ZeroCopy {
    /// Hands the target the registered buffer; a request the target cannot serve so
    /// ([`needs_copy`](crate::device::needs_copy)), or whose memory the backing device
    /// refused (`EINVAL` on a valid extent: ublk passes memory aligned to 4 bytes, `O_DIRECT`
    /// wants the logical block), is served again in copy mode and counted.
    async fn serve(&self, target: &dyn Target, request: Request, stats: &Stats) -> i32 {
        let is_write = match request.op {
            sys::UBLK_IO_OP_READ => false,
            sys::UBLK_IO_OP_WRITE => true,
            _ => return no_data_request(target, request).await,
        };
        if request.flags & sys::UBLK_IO_F_NEED_REG_BUF != 0 {
            // Only with the FALLBACK flag, which we never pass.
            log::error!("tag {}: the kernel did not register the request", self.tag);
            return -libc::EIO;
        }
        let bytes = match request.data_bytes(self.max_bytes) {
            Ok(bytes) => bytes,
            Err(errno) => return errno,
        };
        let Some(len) = u32::try_from(bytes).ok() else {
            return -libc::EINVAL;
        };
        let lease = RegLease::new();
        let reg = RegBuf::new(self.ring, self.tag, 0, len, &lease);
        let res = if is_write {
            let flags = write_flags(request);
            target
                .write_buf(request.start, IoBuf::Registered(reg), flags)
                .await
        } else {
            target
                .read_buf(request.start, IoBuf::Registered(reg))
                .await
                .0
        };
        // Before COMMIT, which unregisters the pages: nothing may use the index after this.
        lease.end();
        match res {
            Ok(()) => byte_count(bytes),
            Err(err) if self.falls_back(target, request, &err) => {
                self.copy_mode(target, request, err, stats).await
            }
            Err(err) => neg_errno(&err),
        }
    }

    /// Whether a failed zero-copy request is served again in copy mode (see [`Self::serve`]).
    fn falls_back(&self, target: &dyn Target, request: Request, err: &io::Error) -> bool {
        let valid = || {
            request
                .extent()
                .is_ok_and(|extent| target.info().check_extent(extent).is_ok())
        };
        is_needs_copy(err) || (err.raw_os_error() == Some(libc::EINVAL) && valid())
    }

    /// Serves `request` in copy mode, after `err` in zero copy.
    async fn copy_mode(
        &self,
        target: &dyn Target,
        request: Request,
        err: io::Error,
        stats: &Stats,
    ) -> i32 {
        let Some(user_copy) = &self.fallback else {
            log::error!(
                "tag {}: the request cannot be served in zero copy ({err}) and the device has \
                 no user copy to fall back to",
                self.tag
            );
            return if is_needs_copy(&err) {
                -libc::EOPNOTSUPP
            } else {
                neg_errno(&err)
            };
        };
        stats.record_fallback();
        log::debug!("tag {}: copy mode for one request ({err})", self.tag);
        user_copy.serve(target, request).await
    }
}

/// A tag's data path with `UBLK_F_USER_COPY`: a leased buffer, and copies through the char
/// device at the tag's offset.
struct UserCopy {
    pool: Arc<BufferPool>,
    /// `/dev/ublkcN`, libublk's (open for as long as the queue runs).
    cdev: RawFd,
    qid: u16,
    tag: u16,
    max_bytes: usize,
}

impl UserCopy {
    /// Leases a buffer only for a READ or WRITE, and only while it is served.
    async fn serve(&self, target: &dyn Target, request: Request) -> i32 {
        let is_write = match request.op {
            sys::UBLK_IO_OP_READ => false,
            sys::UBLK_IO_OP_WRITE => true,
            _ => return no_data_request(target, request).await,
        };
        let bytes = match request.data_bytes(self.max_bytes) {
            Ok(bytes) => bytes,
            Err(errno) => return errno,
        };
        let mut lease = self.pool.lease(bytes).await;
        if is_write {
            if let Err(errno) = self.copy(lease.buf_mut().as_mut_slice(), CopyDir::FromRequest) {
                return errno;
            }
        }
        let (res, buf) = handle_request(target, request, lease.take()).await;
        lease.restore(buf);
        if !is_write && res > 0 {
            if let Err(errno) = self.copy(lease.buf_mut().as_mut_slice(), CopyDir::ToRequest) {
                return errno;
            }
        }
        res
    }

    /// Copies `buf` (the request's first `buf.len()` bytes) from or to the kernel's request.
    fn copy(&self, buf: &mut [u8], dir: CopyDir) -> Result<(), i32> {
        let mut done = 0;
        while done < buf.len() {
            let offset = u32::try_from(done).map_err(|_| -libc::EINVAL)?;
            let pos = UblkIOCtx::ublk_user_copy_pos(self.qid, self.tag, offset);
            let pos = libc::off_t::try_from(pos).map_err(|_| -libc::EINVAL)?;
            let rest = &mut buf[done..];
            // SAFETY: `rest` is valid for `rest.len()` bytes (written by pread, read by
            // pwrite) for the whole call; `cdev` stays open while the queue runs.
            let n = unsafe {
                match dir {
                    CopyDir::FromRequest => {
                        libc::pread(self.cdev, rest.as_mut_ptr().cast(), rest.len(), pos)
                    }
                    CopyDir::ToRequest => {
                        libc::pwrite(self.cdev, rest.as_ptr().cast(), rest.len(), pos)
                    }
                }
            };
            match usize::try_from(n) {
                Ok(0) => return Err(-libc::EIO),
                Ok(n) => done += n,
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        log::error!(
                            "queue {} tag {}: user copy failed: {err}",
                            self.qid,
                            self.tag
                        );
                        return Err(neg_errno(&err));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Which way [`UserCopy::copy`] moves data.
#[derive(Clone, Copy)]
enum CopyDir {
    /// A WRITE's data, into our buffer.
    FromRequest,
    /// A READ's data, from our buffer.
    ToRequest,
}

fn tag_ended(queue: &UblkQueue<'_>, tag: u16, err: UblkError) {
    match err {
        UblkError::QueueIsDown => log::debug!("queue {} tag {tag}: queue is down", queue.get_qid()),
        err => log::error!(
            "queue {} tag {tag}: ublk command failed: {err}",
            queue.get_qid()
        ),
    }
}

/// A request as the kernel described it (copied out of the shared descriptor array).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Request {
    /// The operation, `UBLK_IO_OP_*`.
    pub op: u32,
    /// The whole `op_flags` word: flags such as `UBLK_IO_F_FUA` are tested against it
    /// unshifted.
    pub flags: u32,
    pub start: Sector,
    pub len: SectorCount,
}

impl Request {
    fn from_iod(iod: &sys::ublksrv_io_desc) -> Request {
        Request {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            start: Sector(iod.start_sector),
            len: SectorCount(u64::from(iod.nr_sectors)),
        }
    }

    /// The request's extent, or `EINVAL` when its end would not be addressable.
    fn extent(&self) -> Result<Extent, i32> {
        match self.start.0.checked_add(self.len.0) {
            Some(end) if end <= MAX_SECTOR => Ok(Extent::new(self.start, self.len)),
            _ => Err(-libc::EINVAL),
        }
    }

    /// The data length of a read or write, checked against the largest request `max`.
    fn data_bytes(&self, max: usize) -> Result<usize, i32> {
        self.extent()?;
        let bytes = usize::try_from(self.len.to_bytes()).map_err(|_| -libc::EINVAL)?;
        if bytes == 0 || bytes > max {
            return Err(-libc::EINVAL);
        }
        Ok(bytes)
    }
}

/// Serves one request on `target`: the CQE result to commit (bytes or `-errno`) and the buffer.
pub(super) async fn handle_request(
    target: &dyn Target,
    request: Request,
    buf: AlignedBuf,
) -> (i32, AlignedBuf) {
    match request.op {
        sys::UBLK_IO_OP_READ => read(target, request, buf).await,
        sys::UBLK_IO_OP_WRITE => write(target, request, buf).await,
        _ => (no_data_request(target, request).await, buf),
    }
}

/// Serves a request that carries no data: 0 or `-errno`.
async fn no_data_request(target: &dyn Target, request: Request) -> i32 {
    match request.op {
        sys::UBLK_IO_OP_FLUSH => status(target.flush().await),
        sys::UBLK_IO_OP_DISCARD => match request.extent() {
            Ok(extent) => status(target.discard(extent).await),
            Err(errno) => errno,
        },
        sys::UBLK_IO_OP_WRITE_ZEROES => match request.extent() {
            Ok(extent) => status(target.write_zeroes(extent).await),
            Err(errno) => errno,
        },
        _ => -libc::EOPNOTSUPP,
    }
}

async fn read(target: &dyn Target, request: Request, mut buf: AlignedBuf) -> (i32, AlignedBuf) {
    let bytes = match request.data_bytes(buf.capacity()) {
        Ok(bytes) => bytes,
        Err(errno) => return (errno, buf),
    };
    buf.set_len(bytes);
    let (res, buf) = target.read(request.start, buf).await;
    (
        res.map_or_else(|e| neg_errno(&e), |()| byte_count(bytes)),
        buf,
    )
}

async fn write(target: &dyn Target, request: Request, mut buf: AlignedBuf) -> (i32, AlignedBuf) {
    let bytes = match request.data_bytes(buf.capacity()) {
        Ok(bytes) => bytes,
        Err(errno) => return (errno, buf),
    };
    buf.set_len(bytes);
    let flags = write_flags(request);
    let shared = Arc::new(buf);
    let res = target
        .write(request.start, Arc::clone(&shared), flags)
        .await;
    let buf = Arc::try_unwrap(shared).expect("the target kept a reference to a tag buffer");
    (
        res.map_or_else(|e| neg_errno(&e), |()| byte_count(bytes)),
        buf,
    )
}

/// The flags of a WRITE request.
fn write_flags(request: Request) -> WriteFlags {
    WriteFlags {
        fua: request.flags & sys::UBLK_IO_F_FUA != 0,
    }
}

/// The result of a request without data: 0 or `-errno`.
fn status(res: io::Result<()>) -> i32 {
    res.map_or_else(|e| neg_errno(&e), |()| 0)
}

/// `-errno` for `err`, `-EIO` when it carries none.
fn neg_errno(err: &io::Error) -> i32 {
    err.raw_os_error()
        .filter(|&e| e > 0)
        .map_or(-libc::EIO, |e| -e)
}

/// A completed transfer of `bytes` as a CQE result (bounded by the tag buffer, so it fits).
fn byte_count(bytes: usize) -> i32 {
    i32::try_from(bytes).unwrap_or(-libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use crate::device::{DeviceRef, Forward, Forwarding, IoFuture, MemDevice};

    /// A target over a memory device, to drive the request mapping without a kernel.
    struct MemTarget(DeviceRef);

    impl MemTarget {
        fn new(mem: Arc<MemDevice>) -> Arc<Forwarding<MemTarget>> {
            Arc::new(Forwarding(MemTarget(mem)))
        }
    }

    impl Forward for MemTarget {
        fn inner(&self) -> &DeviceRef {
            &self.0
        }
    }

    impl Target for Forwarding<MemTarget> {
        fn kind(&self) -> &'static str {
            "mem"
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    fn request(op: u32, flags: u32, start: u64, len: u64) -> Request {
        Request {
            op,
            flags: op | flags,
            start: Sector(start),
            len: SectorCount(len),
        }
    }

    fn serve(
        target: &Arc<Forwarding<MemTarget>>,
        req: Request,
        buf: AlignedBuf,
    ) -> (i32, AlignedBuf) {
        let target = Arc::clone(target);
        run_local(async move { handle_request(&*target, req, buf).await })
    }

    #[test]
    fn writes_and_reads_return_byte_counts_and_data() {
        let mem = MemDevice::new_volatile("m", SectorCount(64));
        let target = MemTarget::new(Arc::clone(&mem));
        let mut buf = AlignedBuf::new(16 << 10);
        buf.as_mut_slice()[..4096].fill(0xab);
        let (res, mut buf) = serve(
            &target,
            request(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 8, 8),
            buf,
        );
        assert_eq!(res, 4096);
        assert_eq!(mem.unflushed_sectors(), 0, "FUA reached the device");
        buf.set_len(buf.capacity());
        buf.zero();
        let (res, buf) = serve(&target, request(sys::UBLK_IO_OP_READ, 0, 8, 8), buf);
        assert_eq!(res, 4096);
        assert!(buf.as_slice().iter().all(|&b| b == 0xab));
        let (res, _) = serve(&target, request(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), buf);
        assert_eq!(res, 0);
    }

    /// A user copy whose "char device" is a sparse file: the request's data lives at the
    /// tag's offset in it, as the kernel's request does behind `/dev/ublkcN`.
    fn user_copy(file: &std::fs::File, pool: &Arc<BufferPool>, tag: u16) -> UserCopy {
        use std::os::fd::AsRawFd;
        UserCopy {
            pool: Arc::clone(pool),
            cdev: file.as_raw_fd(),
            qid: 0,
            tag,
            max_bytes: 64 << 10,
        }
    }

    #[test]
    fn user_copy_moves_data_through_a_leased_buffer_given_back_after() {
        use std::os::unix::fs::FileExt;
        let file = tempfile::tempfile().expect("temp file");
        let pool = BufferPool::new(64 << 10, 0);
        let io = user_copy(&file, &pool, 3);
        let pos = UblkIOCtx::ublk_user_copy_pos(0, 3, 0);
        let mem = MemDevice::new_volatile("m", SectorCount(64));
        let target = MemTarget::new(Arc::clone(&mem));
        file.write_all_at(&[0x5a; 8192], pos)
            .expect("the request's data");
        let run = |req| {
            let (target, io) = (Arc::clone(&target), user_copy(&file, &pool, 3));
            run_local(async move { io.serve(&*target, req).await })
        };
        assert_eq!(run(request(sys::UBLK_IO_OP_WRITE, 0, 16, 16)), 8192);
        assert_eq!(pool.stats().held_bytes, 0, "the buffer went back");
        file.write_all_at(&[0; 8192], pos).expect("clear");
        assert_eq!(run(request(sys::UBLK_IO_OP_READ, 0, 16, 16)), 8192);
        let mut back = [0u8; 8192];
        file.read_exact_at(&mut back, pos).expect("read back");
        assert!(
            back.iter().all(|&b| b == 0x5a),
            "the read's data reached the request"
        );
        assert_eq!(run(request(sys::UBLK_IO_OP_FLUSH, 0, 0, 0)), 0);
        assert_eq!(pool.stats().peak_bytes, 8192, "no lease for a flush");
        assert_eq!(
            run(request(sys::UBLK_IO_OP_READ, 0, 0, 256)),
            -libc::EINVAL,
            "too large"
        );
        drop(io);
    }

    #[test]
    fn a_failed_user_copy_completes_with_an_errno() {
        let file = tempfile::tempfile().expect("temp file");
        let pool = BufferPool::new(64 << 10, 0);
        let target = MemTarget::new(MemDevice::new("m", SectorCount(64)));
        // Nothing at the tag's offset: the copy of a WRITE's data reads end of file.
        let io = user_copy(&file, &pool, 1);
        let res = run_local(async move {
            io.serve(&*target, request(sys::UBLK_IO_OP_WRITE, 0, 0, 8))
                .await
        });
        assert_eq!(res, -libc::EIO);
        assert_eq!(pool.stats().held_bytes, 0);
    }

    /// A target that fails every registered buffer with `errno` (0: the default refusal,
    /// `needs_copy`) and serves owned ones from memory.
    struct RegisteredFails(DeviceRef, i32);

    impl Forward for RegisteredFails {
        fn inner(&self) -> &DeviceRef {
            &self.0
        }
        fn read_buf(&self, offset: Sector, buf: IoBuf) -> IoFuture<crate::device::IoReadDone> {
            match (&buf, self.1) {
                (IoBuf::Registered(_), errno) if errno != 0 => Box::pin(std::future::ready((
                    Err(io::Error::from_raw_os_error(errno)),
                    buf,
                ))),
                _ => self.0.read_buf(offset, buf),
            }
        }
        fn write_buf(
            &self,
            offset: Sector,
            buf: crate::device::WriteBuf,
            flags: WriteFlags,
        ) -> IoFuture<io::Result<()>> {
            match (&buf, self.1) {
                (IoBuf::Registered(_), errno) if errno != 0 => {
                    Box::pin(std::future::ready(Err(io::Error::from_raw_os_error(errno))))
                }
                _ => self.0.write_buf(offset, buf, flags),
            }
        }
    }

    impl Target for Forwarding<RegisteredFails> {
        fn kind(&self) -> &'static str {
            "registered-fails"
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    fn zero_copy(fallback: Option<UserCopy>) -> ZeroCopy {
        ZeroCopy {
            ring: RingId::fresh(),
            tag: 3,
            max_bytes: 64 << 10,
            fallback,
        }
    }

    /// A request whose target needs the data (the default of every target but linear), or
    /// whose memory the backing device refused (EINVAL on a valid extent), is served again
    /// in copy mode through user copy and counted; other errors are the request's result.
    #[test]
    fn zero_copy_requests_fall_back_to_copy_mode_one_by_one() {
        use std::os::unix::fs::FileExt;
        let file = tempfile::tempfile().expect("temp file");
        let pool = BufferPool::new(64 << 10, 0);
        let pos = UblkIOCtx::ublk_user_copy_pos(0, 3, 0);
        file.write_all_at(&[0x6b; 8192], pos).expect("request data");
        let mem = MemDevice::new_volatile("m", SectorCount(64));
        let stats = Arc::new(Stats::new(1));
        let run = |errno: i32, req: Request| {
            let target = Forwarding(RegisteredFails(mem.clone(), errno));
            let zc = zero_copy(Some(user_copy(&file, &pool, 3)));
            let stats = Arc::clone(&stats);
            run_local(async move { zc.serve(&target, req, &stats).await })
        };
        assert_eq!(run(0, request(sys::UBLK_IO_OP_WRITE, 0, 8, 16)), 8192);
        assert_eq!(stats.zero_copy_fallbacks(), 1, "needs-copy falls back");
        assert_eq!(
            mem.snapshot(Extent::new(Sector(8), SectorCount(16))),
            vec![0x6b; 8192]
        );
        file.write_all_at(&[0; 8192], pos).expect("clear");
        assert_eq!(
            run(libc::EINVAL, request(sys::UBLK_IO_OP_READ, 0, 8, 16)),
            8192
        );
        assert_eq!(stats.zero_copy_fallbacks(), 2, "refused memory falls back");
        let mut back = [0u8; 8192];
        file.read_exact_at(&mut back, pos).expect("read back");
        assert!(
            back.iter().all(|&b| b == 0x6b),
            "the read reached the request"
        );
        assert_eq!(
            run(libc::EIO, request(sys::UBLK_IO_OP_READ, 0, 8, 16)),
            -libc::EIO
        );
        assert_eq!(
            run(libc::EINVAL, request(sys::UBLK_IO_OP_READ, 0, 60, 8)),
            -libc::EINVAL,
            "a request past the end is not retried"
        );
        assert_eq!(run(0, request(sys::UBLK_IO_OP_FLUSH, 0, 0, 0)), 0);
        assert_eq!(
            stats.zero_copy_fallbacks(),
            2,
            "errors and flushes never fall back"
        );
        assert_eq!(pool.stats().held_bytes, 0);
    }

    /// Without user copy there is nothing to fall back to: the request fails, it is not lost.
    #[test]
    fn a_zero_copy_request_without_a_fallback_fails_with_an_errno() {
        let stats = Stats::new(1);
        let mem = MemDevice::new("m", SectorCount(64));
        let target = Forwarding(RegisteredFails(mem, 0));
        let zc = zero_copy(None);
        let res = run_local(async move {
            let r = zc
                .serve(&target, request(sys::UBLK_IO_OP_WRITE, 0, 0, 8), &stats)
                .await;
            (r, stats.zero_copy_fallbacks())
        });
        assert_eq!(res, (-libc::EOPNOTSUPP, 0));
        let stats = Stats::new(1);
        let target = Forwarding(RegisteredFails(MemDevice::new("m", SectorCount(64)), 0));
        let zc = zero_copy(None);
        let need_reg = request(sys::UBLK_IO_OP_READ, sys::UBLK_IO_F_NEED_REG_BUF, 0, 8);
        let res = run_local(async move { zc.serve(&target, need_reg, &stats).await });
        assert_eq!(res, -libc::EIO, "a request the kernel did not register");
    }

    #[test]
    fn bad_requests_complete_with_an_errno() {
        let target = MemTarget::new(MemDevice::new("m", SectorCount(64)));
        let buf = AlignedBuf::new(4096);
        let (res, buf) = serve(&target, request(sys::UBLK_IO_OP_READ, 0, 60, 8), buf);
        assert_eq!(res, -libc::EINVAL, "past the end");
        let (res, buf) = serve(&target, request(sys::UBLK_IO_OP_WRITE, 0, 0, 16), buf);
        assert_eq!(res, -libc::EINVAL, "larger than the tag buffer");
        let (res, buf) = serve(
            &target,
            request(sys::UBLK_IO_OP_DISCARD, 0, u64::MAX - 1, 8),
            buf,
        );
        assert_eq!(res, -libc::EINVAL, "unaddressable extent");
        let (res, buf) = serve(&target, request(sys::UBLK_IO_OP_WRITE_SAME, 0, 0, 8), buf);
        assert_eq!(res, -libc::EOPNOTSUPP);
        let (res, _) = serve(&target, request(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 0, 8), buf);
        assert_eq!(res, 0);
    }
}
