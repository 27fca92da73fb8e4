//! Per-thread io_uring reactor and executor.
//!
//! Every thread that does device I/O has exactly one io_uring and one [`Executor`]:
//! - on a ublk queue thread the ring is libublk's queue ring, plugged in by the front end
//!   through [`RingDriver`];
//! - anywhere else (the copy engine's thread, tests, tools) [`block_on`] creates a [`LocalRing`].
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

/// The future of one submitted SQE: its CQE result (`>= 0`, or `-errno`).
pub type SqeFuture = Pin<Box<dyn Future<Output = i32> + 'static>>;

/// A thread's io_uring, as device code sees it.
pub trait RingDriver {
    /// Queues `sqe` (the driver owns its `user_data`) and returns its result's future. The
    /// caller guarantees that memory the SQE points at outlives the CQE (see [`submit_owned`]).
    fn submit(&self, sqe: squeue::Entry) -> SqeFuture;
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

/// Submission-queue entries of a [`LocalRing`].
const LOCAL_RING_ENTRIES: u32 = 256;
/// Completion-queue entries: room for every submission plus notifier and timer completions.
const LOCAL_RING_CQ_ENTRIES: u32 = 1024;

/// A thread-owned io_uring with a slab of waiting futures.
pub struct LocalRing {
    ring: RefCell<IoUring>,
    slots: RefCell<Slab<Slot>>,
    in_flight: Cell<usize>,
}

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
}

impl LocalRing {
    pub fn new() -> io::Result<Rc<LocalRing>> {
        let ring = IoUring::builder()
            .setup_cqsize(LOCAL_RING_CQ_ENTRIES)
            .build(LOCAL_RING_ENTRIES)?;
        Ok(Rc::new(LocalRing {
            ring: RefCell::new(ring),
            slots: RefCell::new(Slab::new()),
            in_flight: Cell::new(0),
        }))
    }

    fn push(&self, sqe: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: the caller of RingDriver::submit keeps the SQE's memory alive until its
            // CQE (submit_owned's contract).
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // The SQ is full: hand it to the kernel and retry.
            if let Err(err) = ring.submit() {
                panic!("io_uring submit failed: {err}");
            }
        }
    }

    /// Submits queued SQEs and waits for at least one completion, then wakes its futures.
    fn wait_and_reap(&self) -> io::Result<()> {
        match self.ring.borrow().submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
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
            self.in_flight.set(self.in_flight.get() - 1);
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
        self.push(sqe.user_data(key as u64));
        self.in_flight.set(self.in_flight.get() + 1);
        Box::pin(LocalRingFuture {
            ring: Rc::clone(self),
            key,
        })
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
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    let ring = LocalRing::new().expect("create an io_uring (is io_uring disabled?)");
    let notifier = Notifier::new().expect("create an eventfd");
    let _driver = install_driver(Rc::new(Rc::clone(&ring)));
    let executor = Executor::new(Some(notifier.clone()));
    let _current = executor.enter();
    let _notifier_task = executor.spawn(serve_notifier(notifier));
    let main = executor.spawn(future);
    loop {
        executor.run_ready();
        if main.is_finished() {
            break;
        }
        if executor.has_ready() {
            continue;
        }
        ring.wait_and_reap().expect("io_uring wait");
    }
    // Hand SQEs queued by the last tick to the kernel so they are not silently lost.
    let _ = ring.submit_pending();
    let mut main = main;
    let waker = Waker::noop();
    match Pin::new(&mut main).poll(&mut Context::from_waker(waker)) {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("finished task is pending"),
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
