//! The copy engine's thread: admission, scheduling and the sub-job pipeline.
//!
//! One loop owns the queues. It takes submissions while fewer than `queue_max` wait, starts
//! jobs (foreground first) while fewer than `jobs_in_flight_max` run, and learns of finished
//! jobs from a local channel. A job runs as `sub_jobs_per_job` workers that take pieces in
//! order; a piece is: buffer from the pool (by priority) → throttle (background only) → read
//! the source (or zero the buffer) → write every destination at once → buffer back. Every
//! counter the clients see is updated here, on this one thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use smol::channel::Receiver;

use super::pool::BufferPool;
use super::split::{piece_count, Piece};
use super::throttle::{Pacer, FOREGROUND_WINDOW};
use super::{CopyDone, CopyJob, DestMask, Priority, Shared, Submission};
use crate::device::reactor::{self, spawn};
use crate::device::{AlignedBuf, WriteFlags};
use crate::error::Result;
use crate::units::SectorCount;

/// Linux `PR_SET_IO_FLUSHER`: memory reclaim must not wait on I/O this thread issues.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// The engine's future, not yet started.
pub(super) struct EngineRun {
    rx: Receiver<Submission>,
    shared: Arc<Shared>,
}

impl EngineRun {
    pub(super) fn new(rx: Receiver<Submission>, shared: Arc<Shared>) -> EngineRun {
        EngineRun { rx, shared }
    }

    pub(super) fn into_future(self) -> impl std::future::Future<Output = ()> {
        run(self.rx, self.shared)
    }
}

/// The body of the engine thread. Sends `Ok` on `ready` once its ring is up, or the error if
/// it cannot have one. A panic here, or a ring that fails after the start, is fatal: clients
/// would wait forever for completions, so the process aborts instead.
pub(super) fn run_thread(run: EngineRun, ready: SyncSender<Result<()>>) {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 {
        log::debug!(
            "copy engine: PR_SET_IO_FLUSHER refused: {}",
            io::Error::last_os_error()
        );
    }
    let started = Arc::new(AtomicBool::new(false));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (started, ready) = (Arc::clone(&started), ready.clone());
        reactor::try_block_on(async move {
            started.store(true, Ordering::Relaxed);
            // The starter waits for this; it cannot have gone.
            let _ = ready.send(Ok(()));
            run.into_future().await
        })
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(err)) if !started.load(Ordering::Relaxed) => {
            let _ = ready.send(Err(err));
        }
        Ok(Err(err)) => {
            log::error!(
                "the copy engine's ring failed: {}; aborting",
                err.chain().join(": ")
            );
            std::process::abort();
        }
        Err(_) => {
            log::error!("the copy engine panicked; aborting");
            std::process::abort();
        }
    }
}

/// What every job of one engine shares, on the engine thread.
struct EngineCtx {
    shared: Arc<Shared>,
    pool: Rc<BufferPool>,
    pacer: RefCell<Pacer>,
}

async fn run(rx: Receiver<Submission>, shared: Arc<Shared>) {
    let config = shared.config.clone();
    let pool = BufferPool::new(
        config.buffer_count(),
        config.sub_job_sectors.to_usize_bytes(),
    );
    let ctx = Rc::new(EngineCtx {
        shared,
        pool,
        pacer: RefCell::new(Pacer::default()),
    });
    let (done_tx, done_rx) = smol::channel::unbounded::<()>();
    let mut waiting: [VecDeque<Submission>; 2] = Default::default();
    let mut running = 0usize;
    let mut open = true;
    loop {
        while running < config.jobs_in_flight_max {
            let Some(sub) = waiting.iter_mut().find_map(|q| q.pop_front()) else {
                break;
            };
            running += 1;
            start_job(&ctx, sub, done_tx.clone());
        }
        let queued: usize = waiting.iter().map(VecDeque::len).sum();
        if !open && running == 0 && queued == 0 {
            return;
        }
        match next_event(&rx, &done_rx, open && queued < config.queue_max).await {
            Event::Submitted(sub) => waiting[sub.job.priority.queue_index()].push_back(sub),
            Event::Closed => open = false,
            Event::JobDone => running -= 1,
        }
    }
}

enum Event {
    Submitted(Submission),
    Closed,
    JobDone,
}

/// Waits for a finished job, or also for a submission when there is room for one.
async fn next_event(rx: &Receiver<Submission>, done_rx: &Receiver<()>, take_new: bool) -> Event {
    let done = async {
        done_rx.recv().await.expect("engine holds a sender");
        Event::JobDone
    };
    if !take_new {
        return done.await;
    }
    let new = async {
        match rx.recv().await {
            Ok(sub) => Event::Submitted(sub),
            Err(_) => Event::Closed,
        }
    };
    smol::future::or(done, new).await
}

fn start_job(ctx: &Rc<EngineCtx>, sub: Submission, done_tx: smol::channel::Sender<()>) {
    let shared = &ctx.shared;
    shared.jobs_queued.fetch_sub(1, Ordering::Relaxed);
    shared.jobs_in_flight.fetch_add(1, Ordering::Relaxed);
    let ctx = Rc::clone(ctx);
    spawn(async move {
        let done = run_job(&ctx, &sub).await;
        let shared = &ctx.shared;
        shared.cancels.lock().expect("cancel map").remove(&sub.id);
        shared.jobs_in_flight.fetch_sub(1, Ordering::Relaxed);
        shared.jobs_done.fetch_add(1, Ordering::Relaxed);
        // A client that dropped its queue no longer wants the completion.
        let _ = sub.reply.try_send(done);
        let _ = done_tx.try_send(());
    })
    .detach();
}

/// The progress and errors of one job, shared by its workers.
#[derive(Default)]
struct JobState {
    next_piece: Cell<u64>,
    stop: Cell<bool>,
    read_error: Cell<Option<i32>>,
    write_errors: Cell<DestMask>,
    sectors_done: Cell<u64>,
}

impl JobState {
    fn fail_read(&self, err: &io::Error, ignore_errors: bool) {
        if self.read_error.get().is_none() {
            self.read_error
                .set(Some(err.raw_os_error().unwrap_or(libc::EIO)));
        }
        self.stop.set(self.stop.get() || !ignore_errors);
    }

    fn fail_write(&self, dest: usize, ignore_errors: bool) {
        let mut mask = self.write_errors.get();
        mask.insert(dest);
        self.write_errors.set(mask);
        self.stop.set(self.stop.get() || !ignore_errors);
    }
}

async fn run_job(ctx: &Rc<EngineCtx>, sub: &Submission) -> CopyDone {
    let job = Rc::new(sub.job.clone());
    let state = Rc::new(JobState::default());
    let sub_job = ctx.shared.config.sub_job_sectors;
    let count = piece_count(job.len(), sub_job);
    let workers = (ctx.shared.config.sub_jobs_per_job as u64).min(count);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (ctx, job, state, cancel) = (
                Rc::clone(ctx),
                Rc::clone(&job),
                Rc::clone(&state),
                Arc::clone(&sub.cancel),
            );
            spawn(async move {
                while !state.stop.get() && !cancel.load(Ordering::Relaxed) {
                    let index = state.next_piece.get();
                    if index >= count {
                        break;
                    }
                    state.next_piece.set(index + 1);
                    run_piece(&ctx, &job, &state, super::piece(job.len(), sub_job, index)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
    let cancelled = sub.cancel.load(Ordering::Relaxed) && state.next_piece.get() < count;
    if job.flush && !cancelled && state.read_error.get().is_none() {
        flush_dests(&job, &state).await;
    }
    CopyDone {
        job: sub.id,
        token: sub.token,
        read_error: state.read_error.get(),
        write_errors: state.write_errors.get(),
        cancelled,
        sectors_done: SectorCount(state.sectors_done.get()),
    }
}

/// Copies (or zeroes) one piece to every destination.
async fn run_piece(ctx: &EngineCtx, job: &CopyJob, state: &JobState, piece: Piece) {
    if job.source.is_none() && job.dests.iter().all(|d| d.dev.info().write_zeroes) {
        return zero_piece_offloaded(job, state, piece).await;
    }
    let mut buf = ctx.pool.acquire(job.priority).await;
    ctx.note_memory();
    buf.set_sectors(piece.len);
    if job.priority == Priority::Background {
        ctx.throttle(piece.len).await;
    }
    match &job.source {
        Some(src) => {
            let (res, back) = src.dev.read(src.extent.start + piece.skip, buf).await;
            buf = back;
            if let Err(err) = res {
                state.fail_read(&err, job.ignore_errors);
                return ctx.give_back(buf);
            }
        }
        None => buf.zero(),
    }
    let buf = write_all(job, state, piece, buf).await;
    ctx.give_back(buf);
    state
        .sectors_done
        .set(state.sectors_done.get() + piece.len.0);
    ctx.shared
        .bytes_done
        .fetch_add(piece.len.to_bytes(), Ordering::Relaxed);
}

/// Writes `buf` to every destination at once; returns the buffer when all are done.
async fn write_all(job: &CopyJob, state: &JobState, piece: Piece, buf: AlignedBuf) -> AlignedBuf {
    let buf = Arc::new(buf);
    let writes: Vec<_> = job
        .dests
        .iter()
        .map(|d| {
            spawn(d.dev.write(
                d.extent.start + piece.skip,
                Arc::clone(&buf),
                WriteFlags::default(),
            ))
        })
        .collect();
    for (dest, write) in writes.into_iter().enumerate() {
        if write.await.is_err() {
            state.fail_write(dest, job.ignore_errors);
        }
    }
    Arc::try_unwrap(buf).expect("every write has handed the buffer back")
}

async fn zero_piece_offloaded(job: &CopyJob, state: &JobState, piece: Piece) {
    let zeroes: Vec<_> = job
        .dests
        .iter()
        .map(|d| {
            spawn(
                d.dev
                    .write_zeroes(d.extent.sub_extent(piece.skip, piece.len)),
            )
        })
        .collect();
    for (dest, op) in zeroes.into_iter().enumerate() {
        if op.await.is_err() {
            state.fail_write(dest, job.ignore_errors);
        }
    }
    state
        .sectors_done
        .set(state.sectors_done.get() + piece.len.0);
}

async fn flush_dests(job: &CopyJob, state: &JobState) {
    let flushes: Vec<_> = job.dests.iter().map(|d| spawn(d.dev.flush())).collect();
    for (dest, flush) in flushes.into_iter().enumerate() {
        if flush.await.is_err() {
            state.fail_write(dest, true);
        }
    }
}

impl EngineCtx {
    fn give_back(&self, buf: AlignedBuf) {
        self.pool.release(buf);
        self.note_memory();
    }

    fn note_memory(&self) {
        let (in_use, peak) = self.pool.bytes_in_use();
        self.shared.memory_in_use.store(in_use, Ordering::Relaxed);
        self.shared.memory_peak.store(peak, Ordering::Relaxed);
    }

    /// Waits until the throttle admits `len` more sectors of background copying.
    async fn throttle(&self, len: SectorCount) {
        let now = self.shared.clock.now();
        let last_fg = Duration::from_nanos(self.shared.last_foreground_ns.load(Ordering::Relaxed));
        let busy = !last_fg.is_zero() && now.saturating_sub(last_fg) < FOREGROUND_WINDOW;
        let rate = self.shared.config.throttle.rate_bytes_per_sec(busy);
        let wait = self.pacer.borrow_mut().admit(now, len.to_bytes(), rate);
        if !wait.is_zero() {
            self.shared.clock.sleep(wait).await;
        }
    }
}
