//! Per-thread io_uring reactor and executor.
//!
//! Every thread that does device I/O has exactly one io_uring and one [`Executor`]:
//! - on a ublk queue thread the ring is libublk's queue ring, plugged in by the front end
//!   through [`RingDriver`];
//! - anywhere else (the copy engine's thread, tests, tools) [`try_block_on`] creates a
//!   [`LocalRing`].
//!
//! Device futures submit SQEs to the current thread's driver and are woken from its CQEs.
//!
//! **Cross-thread wakeups.** A thread blocked in `io_uring_enter` does not notice that a waker
//! was fired from another thread. The [`Executor`] therefore schedules through a queue whose
//! off-thread pushes also write the thread's [`Notifier`] eventfd, and a task on every ring
//! keeps a read of that eventfd outstanding ([`serve_notifier`]): an off-thread wake becomes a
//! CQE and the ring wakes. Any waker (channels, other threads' engines, blocking pools) is then
//! safe to use on any thread, with no wrapper to forget.
//!
//! **Buffer lifetime.** An SQE points at memory the kernel uses until the CQE. [`submit_owned`]
//! takes ownership of that memory and, should its future be dropped before the CQE (a torn-down
//! executor), leaks it rather than free memory the kernel may still write.
//!
//! **Environment failures are errors.** A ring or eventfd that cannot be created, or an
//! `io_uring_enter` that fails, is an [`Error`] ([`try_block_on`]), never a panic: the kernel
//! may have io_uring disabled or the process may be out of memory or descriptors. EINTR and
//! EBUSY (a completion queue that overflowed) are retried, at most [`ENTER_RETRIES_MAX`] times
//! in a row. A request that cannot be queued completes with its errno, like a failed I/O.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::{self, ThreadId};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::error::{Error, ErrorKind, Result};

/// The future of one submitted SQE: its CQE result (`>= 0`, or `-errno`).
pub type SqeFuture = Pin<Box<dyn Future<Output = i32> + 'static>>;

/// A thread's io_uring, as device code sees it.
pub trait RingDriver {
    /// Queues `sqe` (the driver owns its `user_data`) and returns its result's future. The
    /// caller guarantees that memory the SQE points at outlives the CQE (see [`submit_owned`]).
    fn submit(&self, sqe: squeue::Entry) -> SqeFuture;

    /// Which ring this is: a fixed buffer registered on it is usable only by its SQEs.
    fn id(&self) -> RingId;
}

/// A ring's identity in this process: fixed buffers name the ring they are registered on
/// (see `device::RegBuf`). Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingId(u64);

impl RingId {
    /// A new identity, distinct from every other in this process.
    pub fn fresh() -> RingId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        RingId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// An identity for tests that make buffers without a ring: the top bit is set, which
    /// [`RingId::fresh`] never reaches, so it names no real ring.
    #[cfg(test)]
    pub fn for_test(n: u64) -> RingId {
        RingId(n | 1 << 63)
    }
}

/// The identity of this thread's ring, if it has one.
pub fn current_ring_id() -> Option<RingId> {
    DRIVER.with(|d| d.borrow().as_ref().map(|driver| driver.id()))
}

thread_local! {
    static DRIVER: RefCell<Option<Rc<dyn RingDriver>>> = const { RefCell::new(None) };
    static EXECUTOR: RefCell<Option<Executor>> = const { RefCell::new(None) };
}

/// Installs `driver` as this thread's ring until the guard drops.
pub fn install_driver(driver: Rc<dyn RingDriver>) -> DriverGuard {
    let previous = DRIVER.with(|d| d.borrow_mut().replace(driver));
    DriverGuard { previous }
}

/// Restores the previous driver on drop.
pub struct DriverGuard {
    previous: Option<Rc<dyn RingDriver>>,
}

impl Drop for DriverGuard {
    fn drop(&mut self) {
        DRIVER.with(|d| *d.borrow_mut() = self.previous.take());
    }
}

/// Whether this thread has a ring to submit to.
pub fn has_driver() -> bool {
    DRIVER.with(|d| d.borrow().is_some())
}

fn current_driver() -> Rc<dyn RingDriver> {
    DRIVER.with(|d| d.borrow().clone()).expect(
        "device I/O on a thread without a ring: run it inside reactor::block_on or a ublk queue",
    )
}

/// Submits `sqe` and resolves to its result and `keep`.
///
/// # Safety
/// Every pointer in `sqe` must point into memory owned by `keep` (heap memory that does not
/// move when `keep` moves) or into memory that lives for the rest of the program.
pub unsafe fn submit_owned<T: 'static>(
    sqe: squeue::Entry,
    keep: T,
) -> impl Future<Output = (i32, T)> {
    let fut = current_driver().submit(sqe);
    KeepAlive {
        fut,
        keep: Some(keep),
    }
}

/// Holds a request's memory until its CQE; leaks it if dropped early (see module doc).
struct KeepAlive<T> {
    fut: SqeFuture,
    keep: Option<T>,
}

impl<T> Unpin for KeepAlive<T> {}

impl<T> Future for KeepAlive<T> {
    type Output = (i32, T);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, T)> {
        let res = std::task::ready!(self.fut.as_mut().poll(cx));
        Poll::Ready((res, self.keep.take().expect("polled after completion")))
    }
}

impl<T> Drop for KeepAlive<T> {
    fn drop(&mut self) {
        if let Some(keep) = self.keep.take() {
            log::warn!("an io_uring request was abandoned in flight; leaking its buffer");
            std::mem::forget(keep);
        }
    }
}

/// Turns a CQE result into an `io::Result`.
pub fn cqe_result(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}

/// Sleeps for `duration` on the current thread's ring.
pub async fn sleep(duration: Duration) {
    let ts = Box::new(types::Timespec::from(duration));
    let sqe = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    // SAFETY: the SQE points only at `ts`, a heap allocation moved into `keep`.
    let (res, _ts) = unsafe { submit_owned(sqe, ts) }.await;
    debug_assert!(res == -libc::ETIME || res >= 0, "timeout result {res}");
}

// ---------------------------------------------------------------------------------------------
// Notifier

/// An eventfd that wakes one thread's ring from any thread.
#[derive(Clone, Debug)]
pub struct Notifier {
    fd: Arc<OwnedFd>,
}

impl Notifier {
    pub fn new() -> io::Result<Notifier> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier { fd: Arc::new(fd) })
    }

    /// Makes the eventfd readable. Writes coalesce in the counter, so this never blocks.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        // EAGAIN means the counter is saturated: the ring is already due to wake.
        debug_assert!(n == 8 || io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN));
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Keeps a read of `notifier` outstanding on the current ring, forever: each off-thread
/// [`Notifier::notify`] completes it and so wakes the ring. Spawn it on the ring's executor.
pub async fn serve_notifier(notifier: Notifier) {
    serve_notifier_until(notifier, || false).await
}

/// [`serve_notifier`] that returns once `stop()` holds after a wake: to end it, make `stop()`
/// true and call [`Notifier::notify`]. A ring that is being torn down uses this so that no read
/// is left in flight (its buffer would have to be leaked).
pub async fn serve_notifier_until(notifier: Notifier, stop: impl Fn() -> bool) {
    let mut counter = Box::new(0u64);
    while !stop() {
        let ptr = (&mut *counter as *mut u64).cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(notifier.raw_fd()), ptr, 8).build();
        // SAFETY: the SQE points only into `counter`, a heap allocation moved into `keep`.
        let (res, back) = unsafe { submit_owned(sqe, counter) }.await;
        counter = back;
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            log::error!(
                "notifier read failed: {}",
                io::Error::from_raw_os_error(-res)
            );
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Executor

/// A single-threaded FIFO executor whose wakers may fire from any thread (see module doc).
#[derive(Clone)]
pub struct Executor {
    queue: Arc<RunQueue>,
}

struct RunQueue {
    runnables: Mutex<VecDeque<async_task::Runnable>>,
    owner: ThreadId,
    notifier: Option<Notifier>,
}

impl Executor {
    /// An executor for the current thread; `notifier` wakes this thread's ring on off-thread
    /// wakes (`None` for a ringless, purely local executor).
    pub fn new(notifier: Option<Notifier>) -> Executor {
        let queue = RunQueue {
            runnables: Mutex::new(VecDeque::new()),
            owner: thread::current().id(),
            notifier,
        };
        Executor {
            queue: Arc::new(queue),
        }
    }

    /// Spawns a task on this executor. Must be called on the executor's thread.
    pub fn spawn<F>(&self, future: F) -> async_task::Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        assert_eq!(
            thread::current().id(),
            self.queue.owner,
            "spawn on a foreign executor"
        );
        let queue = Arc::clone(&self.queue);
        let schedule = move |runnable| queue.push(runnable);
        let (runnable, task) = async_task::spawn_local(future, schedule);
        runnable.schedule();
        task
    }

    /// Runs every task that is ready, including those woken meanwhile; true if any ran.
    pub fn run_ready(&self) -> bool {
        let mut ran = false;
        loop {
            let next = self.queue.runnables.lock().expect("run queue").pop_front();
            match next {
                Some(runnable) => {
                    runnable.run();
                    ran = true;
                }
                None => return ran,
            }
        }
    }

    /// Whether a task is waiting to run.
    pub fn has_ready(&self) -> bool {
        !self.queue.runnables.lock().expect("run queue").is_empty()
    }

    /// Makes this the current thread's executor (for [`spawn`]) until the guard drops.
    pub fn enter(&self) -> ExecutorGuard {
        let previous = EXECUTOR.with(|e| e.borrow_mut().replace(self.clone()));
        ExecutorGuard { previous }
    }
}

impl RunQueue {
    fn push(&self, runnable: async_task::Runnable) {
        self.runnables
            .lock()
            .expect("run queue")
            .push_back(runnable);
        if thread::current().id() != self.owner {
            if let Some(notifier) = &self.notifier {
                notifier.notify();
            }
        }
    }
}

/// Restores the previous current executor on drop.
pub struct ExecutorGuard {
    previous: Option<Executor>,
}

impl Drop for ExecutorGuard {
    fn drop(&mut self) {
        EXECUTOR.with(|e| *e.borrow_mut() = self.previous.take());
    }
}

/// Spawns a task on the current thread's executor.
pub fn spawn<F>(future: F) -> async_task::Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    EXECUTOR
        .with(|e| e.borrow().clone())
        .expect("spawn outside an executor")
        .spawn(future)
}

// ---------------------------------------------------------------------------------------------
// LocalRing: the ring of threads that are not ublk queue threads

/// Submission- and completion-queue entries of a ring.
#[derive(Clone, Copy, Debug)]
struct RingSize {
    sq_entries: u32,
    cq_entries: u32,
}

/// The size of every [`LocalRing`]: 256 submissions, and room in the completion queue for
/// every submission plus notifier and timer completions.
const LOCAL_RING: RingSize = RingSize {
    sq_entries: 256,
    cq_entries: 1024,
};

/// Consecutive `io_uring_enter` calls that may fail with EINTR or EBUSY before the ring is
/// given up as broken. A signal or an overflowed completion queue clears in one or two.
pub const ENTER_RETRIES_MAX: u32 = 1024;

/// A thread-owned io_uring with a slab of waiting futures.
pub struct LocalRing {
    id: RingId,
    ring: RefCell<IoUring>,
    slots: RefCell<Slab<Slot>>,
    in_flight: Cell<usize>,
    /// `io_uring_enter` calls in a row that failed with EINTR or EBUSY.
    enter_retries: Cell<u32>,
}

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
}

/// Whether an `io_uring_enter` error is transient (a signal, a full completion queue).
fn is_transient(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY))
}

impl LocalRing {
    pub fn new() -> io::Result<Rc<LocalRing>> {
        LocalRing::with_size(LOCAL_RING)
    }

    fn with_size(size: RingSize) -> io::Result<Rc<LocalRing>> {
        let ring = IoUring::builder()
            .setup_cqsize(size.cq_entries)
            .build(size.sq_entries)?;
        Ok(Rc::new(LocalRing {
            id: RingId::fresh(),
            ring: RefCell::new(ring),
            slots: RefCell::new(Slab::new()),
            in_flight: Cell::new(0),
            enter_retries: Cell::new(0),
        }))
    }

    /// Counts one transient `io_uring_enter` failure; the error once there were too many.
    fn note_transient(&self, err: io::Error) -> io::Result<()> {
        let retries = self.enter_retries.get() + 1;
        if retries > ENTER_RETRIES_MAX {
            return Err(err);
        }
        self.enter_retries.set(retries);
        Ok(())
    }

    /// Queues `sqe`; when the submission queue is full, hands it to the kernel first.
    fn push(&self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller of RingDriver::submit keeps the SQE's memory alive until its
            // CQE (submit_owned's contract).
            if unsafe { self.ring.borrow_mut().submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            // The SQ is full: hand it to the kernel and retry.
            let submitted = self.ring.borrow().submit();
            match submitted {
                Ok(_) => self.enter_retries.set(0),
                Err(err) if is_transient(&err) => {
                    self.note_transient(err)?;
                    // EBUSY: the completion queue overflowed; reaping makes room.
                    self.reap();
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Submits queued SQEs and waits for at least one completion, then wakes its futures.
    fn wait_and_reap(&self) -> io::Result<()> {
        let waited = self.ring.borrow().submit_and_wait(1);
        match waited {
            Ok(_) => self.enter_retries.set(0),
            Err(err) if is_transient(&err) => self.note_transient(err)?,
            Err(err) => return Err(err),
        }
        self.reap();
        Ok(())
    }

    /// Hands queued SQEs to the kernel without waiting.
    fn submit_pending(&self) -> io::Result<()> {
        self.ring.borrow().submit().map(|_| ())
    }

    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            let key = cqe.user_data() as usize;
            let slot = slots.get_mut(key).expect("CQE for an unknown request");
            let waker = match std::mem::replace(slot, Slot::Done(cqe.result())) {
                Slot::Waiting(waker) => waker,
                Slot::Done(_) => panic!("two CQEs for one request"),
            };
            let in_flight = self.in_flight.get();
            assert!(in_flight > 0, "a completion with no request in flight");
            self.in_flight.set(in_flight - 1);
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }
}

impl RingDriver for Rc<LocalRing> {
    fn submit(&self, sqe: squeue::Entry) -> SqeFuture {
        let key = self.slots.borrow_mut().insert(Slot::Waiting(None));
        if let Err(err) = self.push(&sqe.user_data(key as u64)) {
            // Nothing was queued: the request fails like an I/O error, with the ring's errno.
            self.slots.borrow_mut().remove(key);
            log::error!("cannot queue an SQE on the io_uring: {err}");
            let errno = err.raw_os_error().unwrap_or(libc::EIO);
            return Box::pin(std::future::ready(-errno));
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Box::pin(LocalRingFuture {
            ring: Rc::clone(self),
            key,
        })
    }

    fn id(&self) -> RingId {
        self.id
    }
}

struct LocalRingFuture {
    ring: Rc<LocalRing>,
    key: usize,
}

impl Future for LocalRingFuture {
    type Output = i32;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.ring.slots.borrow_mut();
        match slots.get_mut(self.key).expect("request slot") {
            Slot::Done(res) => {
                let res = *res;
                slots.remove(self.key);
                Poll::Ready(res)
            }
            Slot::Waiting(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Runs `future` to completion on this thread, with a [`LocalRing`] as the thread's driver and
/// a fresh [`Executor`] for the tasks it spawns. Blocks in `io_uring_enter` while idle.
///
/// Fails, without running `future` to its end, when the ring or its eventfd cannot be created
/// (io_uring disabled, out of memory or descriptors: [`ErrorKind::Unsupported`], exit 5) or
/// when waiting on the ring fails for good.
pub fn try_block_on<F>(future: F) -> Result<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    block_on_sized(LOCAL_RING, future)
}

/// [`try_block_on`] that panics on an environment failure: for tests and tools only.
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    match try_block_on(future) {
        Ok(value) => value,
        Err(err) => panic!("{}", err.chain().join(": ")),
    }
}

/// Starts a thread named `name` that runs the future `make` returns under [`try_block_on`],
/// and returns once the thread's ring is up: a ring the thread cannot have is this call's
/// error, not a panic on that thread. The thread's result is the future's output, or an error
/// if its ring failed later.
pub fn spawn_ring_thread<M, F>(name: &str, make: M) -> Result<thread::JoinHandle<Result<F::Output>>>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future + 'static,
    F::Output: Send + 'static,
{
    spawn_ring_thread_sized(LOCAL_RING, name, make)
}

fn spawn_ring_thread_sized<M, F>(
    size: RingSize,
    name: &str,
    make: M,
) -> Result<thread::JoinHandle<Result<F::Output>>>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future + 'static,
    F::Output: Send + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            block_on_sized(size, async move {
                // The starter waits for this; it cannot have gone.
                let _ = ready_tx.send(());
                make().await
            })
        })
        .map_err(|e| Error::io(format!("cannot start the {name} thread"), e))?;
    if ready_rx.recv().is_ok() {
        return Ok(handle);
    }
    // The future never ran: the thread has ended with the reason, or panicked.
    match handle.join() {
        Ok(Err(err)) => Err(err.context(format!("cannot start the {name} thread"))),
        Ok(Ok(_)) => unreachable!("the future ran without saying so"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn block_on_sized<F>(size: RingSize, future: F) -> Result<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let ring = LocalRing::with_size(size)
        .map_err(|e| Error::with_source(ErrorKind::Unsupported, "cannot create an io_uring", e))?;
    block_on_ring(ring, future)
}

/// [`try_block_on`] on a ring made already.
fn block_on_ring<F>(ring: Rc<LocalRing>, future: F) -> Result<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let notifier = Notifier::new().map_err(|e| Error::io("cannot create an eventfd", e))?;
    let _driver = install_driver(Rc::new(Rc::clone(&ring)));
    let executor = Executor::new(Some(notifier.clone()));
    let _current = executor.enter();
    let stopping = Rc::new(Cell::new(false));
    let stop_flag = Rc::clone(&stopping);
    let notifier_task = executor.spawn(serve_notifier_until(notifier.clone(), move || {
        stop_flag.get()
    }));
    let mut main = executor.spawn(future);
    run_until(&executor, &ring, || main.is_finished())?;
    // The notifier task must end, not be dropped pending: a dropped pending task is scheduled
    // once more to drop its future, on a run queue nobody runs again, which it keeps alive
    // through its own schedule function (with the eventfd, the ring and the read in flight:
    // two file descriptors per call, until the process runs out).
    stopping.set(true);
    notifier.notify();
    run_until(&executor, &ring, || notifier_task.is_finished())?;
    // Hand SQEs queued by the last tick to the kernel so they are not silently lost.
    let _ = ring.submit_pending();
    match Pin::new(&mut main).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => Ok(value),
        Poll::Pending => unreachable!("finished task is pending"),
    }
}

/// [`block_on`] with `bufs` registered as the ring's fixed buffers 0, 1, ...: `make` gets a
/// [`RegBuf`] of each, whole, and its future runs on that ring. Returns the output and the
/// buffers (unregistered again). For tests of fixed-buffer I/O without a ublk device: the
/// registration of user memory stands in for the kernel's registration of a request's pages.
#[cfg(feature = "sim")]
pub fn block_on_registered<M, F>(
    mut bufs: Vec<crate::device::AlignedBuf>,
    make: M,
) -> (F::Output, Vec<crate::device::AlignedBuf>)
where
    M: FnOnce(Vec<crate::device::RegBuf>) -> F,
    F: Future + 'static,
    F::Output: 'static,
{
    use crate::device::{RegBuf, RegLease};
    let ring = LocalRing::new().expect("an io_uring");
    let iovecs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.capacity(),
        })
        .collect();
    // SAFETY: every iovec points into a buffer of `bufs`, which this function owns (their heap
    // allocations do not move) and unregisters before it hands them back.
    unsafe { ring.ring.borrow().submitter().register_buffers(&iovecs) }
        .expect("register fixed buffers");
    let lease = RegLease::new();
    let regs = iovecs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let index = u16::try_from(i).expect("a few buffers");
            let len = u32::try_from(v.iov_len).expect("a test buffer");
            RegBuf::new(ring.id, index, v.iov_base as u64, len, &lease)
        })
        .collect();
    let future = make(regs);
    let output = block_on_ring(Rc::clone(&ring), future).expect("the ring runs");
    lease.end();
    ring.ring
        .borrow()
        .submitter()
        .unregister_buffers()
        .expect("unregister fixed buffers");
    (output, bufs)
}

/// Runs `executor`'s tasks, waiting on `ring` whenever none is ready, until `done()`.
fn run_until(executor: &Executor, ring: &LocalRing, done: impl Fn() -> bool) -> Result<()> {
    loop {
        executor.run_ready();
        if done() {
            return Ok(());
        }
        if executor.has_ready() {
            continue;
        }
        ring.wait_and_reap()
            .map_err(|e| Error::io("waiting on the io_uring failed", e))?;
    }
}

/// Runs `future` deterministically with no ring: every task runs in FIFO order, and a state
/// where nothing can run and `future` is unfinished is a deadlock (a panic). For simulations
/// over in-memory devices.
pub fn run_local<F>(future: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    let executor = Executor::new(None);
    let _current = executor.enter();
    let mut main = executor.spawn(future);
    while executor.run_ready() {}
    assert!(
        main.is_finished(),
        "simulation deadlock: every task is waiting"
    );
    match Pin::new(&mut main).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("finished task is pending"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn nop_and_sleep_complete() {
        block_on(async {
            // SAFETY: a NOP points at no memory.
            let (res, ()) = unsafe { submit_owned(opcode::Nop::new().build(), ()) }.await;
            assert_eq!(res, 0);
            let start = Instant::now();
            sleep(Duration::from_millis(20)).await;
            assert!(start.elapsed() >= Duration::from_millis(19));
        });
    }

    /// The file descriptors this process has open.
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .count()
    }

    /// Every `try_block_on` gives back its ring and eventfd: each leaked two, and a daemon ran
    /// out of file descriptors after about 500 commands (found by the snapshot_scale VM test:
    /// "cannot create an io_uring: Too many open files" at the 503rd snapshot-create).
    #[test]
    fn block_on_leaks_no_file_descriptor() {
        try_block_on(async {}).expect("ring");
        let before = open_fds();
        for _ in 0..50 {
            try_block_on(async { sleep(Duration::from_millis(1)).await }).expect("ring");
        }
        // Other tests' threads open and close descriptors meanwhile: allow a few.
        let after = open_fds();
        assert!(
            after < before + 10,
            "{before} descriptors open before, {after} after"
        );
    }

    /// A waker fired from another thread wakes a ring that sleeps in io_uring_enter: without
    /// the notifier the ring would sleep forever here (no other request is in flight).
    #[test]
    fn off_thread_wake_reaches_a_sleeping_ring() {
        let (tx, rx) = smol::channel::bounded::<u32>(1);
        let sender = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            smol::block_on(tx.send(7)).expect("send");
        });
        let got = block_on(async move { rx.recv().await.expect("recv") });
        assert_eq!(got, 7);
        sender.join().expect("sender");
    }

    /// A ring the kernel refuses is an error of kind Unsupported (exit 5), not a panic: zero
    /// submission entries is EINVAL on every kernel, as an io_uring disabled by sysctl is EPERM.
    #[test]
    fn a_ring_that_cannot_be_created_is_an_error() {
        let impossible = RingSize {
            sq_entries: 0,
            cq_entries: 0,
        };
        let ran = Rc::new(Cell::new(false));
        let flag = Rc::clone(&ran);
        let err = block_on_sized(impossible, async move { flag.set(true) })
            .expect_err("a ring of zero entries");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert_eq!(err.kind().exit_code(), 5);
        assert_eq!(err.to_string(), "cannot create an io_uring");
        assert_eq!(err.chain().len(), 2, "{:?}", err.chain());
        assert!(!ran.get(), "the future ran without a ring");
    }

    /// A thread whose ring cannot be created is the starter's error; one that can runs.
    #[test]
    fn a_ring_thread_reports_its_ring() {
        let impossible = RingSize {
            sq_entries: 0,
            cq_entries: 0,
        };
        let err = spawn_ring_thread_sized(impossible, "test", || async { 1 })
            .expect_err("a ring of zero entries");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert_eq!(err.to_string(), "cannot start the test thread");
        let handle = spawn_ring_thread("test", || async {
            sleep(Duration::from_millis(1)).await;
            7
        })
        .expect("a ring thread");
        assert_eq!(handle.join().expect("thread").expect("ring"), 7);
    }

    /// More requests at once than the submission queue holds: the full queue is handed to the
    /// kernel and every request completes.
    #[test]
    fn a_full_submission_queue_is_submitted_not_a_panic() {
        let n = 4 * LOCAL_RING.sq_entries as usize;
        let results = try_block_on(async move {
            let nops: Vec<_> = (0..n)
                // SAFETY: a NOP points at no memory.
                .map(|_| unsafe { submit_owned(opcode::Nop::new().build(), ()) })
                .collect();
            let mut results = Vec::with_capacity(nops.len());
            for nop in nops {
                results.push(nop.await.0);
            }
            results
        })
        .expect("ring");
        assert_eq!(results.len(), n);
        assert!(results.iter().all(|&r| r == 0), "{results:?}");
    }

    #[test]
    fn tasks_spawned_inside_run_in_order() {
        let order = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&order);
        run_local(async move {
            let a = spawn({
                let o = Rc::clone(&seen);
                async move { o.borrow_mut().push(1) }
            });
            let b = spawn({
                let o = Rc::clone(&seen);
                async move { o.borrow_mut().push(2) }
            });
            a.await;
            b.await;
        });
        assert_eq!(*order.borrow(), vec![1, 2]);
    }
}
