//! The daemon's request buffers: one bounded pool shared by every device the daemon serves.
//!
//! Why a pool: in ublk's default (copy) mode every tag owns a buffer of the largest request,
//! given to the kernel once at FETCH, so a device costs `queues x depth x max_io` whether it
//! is busy or idle (64 MiB for a snapshot's device, 128 MiB for an origin's; a 2 GiB machine
//! ran out at the 27th snapshot). With `UBLK_F_USER_COPY` (Linux 6.5+) the data stays in the
//! kernel's request and the server copies it in and out itself, so a buffer is needed only
//! while a request is being served: a queue leases one here when a READ or WRITE arrives and
//! gives it back before it commits. The daemon's buffer memory is then bounded by the pool's
//! `limit` however many devices it serves, and idle devices cost none.
//!
//! Invariants:
//! - the bytes held (leased plus idle) never exceed `limit`, set at construction;
//! - idle buffers kept for reuse never exceed `idle_limit` bytes; the rest are freed;
//! - a lease is at most `limit` bytes, so every request is served once the others give their
//!   buffers back; waiting is first come, first served, so a large request is not starved by
//!   a stream of small ones;
//! - a lease gives its bytes back when it is dropped, with its buffer or without it (a
//!   cancelled request), and wakes the next waiter.
//!
//! Leases are rounded up to a power of two of at least [`MIN_LEASE_BYTES`], so that a freed
//! buffer serves the next request of its size class. Pool buffers are mapped memory
//! ([`AlignedBuf::new_mapped`]): pages never touched cost nothing, and a freed buffer goes back
//! to the system at once, so the daemon's RSS follows what the pool holds. A reused buffer
//! holds an earlier request's bytes: every user fills the part it uses before reading it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::device::AlignedBuf;

/// The smallest lease (and size class): one page.
pub const MIN_LEASE_BYTES: usize = 4096;

/// A daemon's bounded pool of request buffers (see module doc).
pub struct BufferPool {
    limit: usize,
    idle_limit: usize,
    state: Mutex<State>,
}

struct State {
    /// Bytes of every buffer the pool accounts for: leased, idle, or being allocated.
    held: usize,
    /// Idle buffers by size class (index: log2 of the size over [`MIN_LEASE_BYTES`]).
    idle: Vec<Vec<AlignedBuf>>,
    idle_bytes: usize,
    /// Who waits for room, first come first served.
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
    /// The most bytes ever held, and how many leases had to wait.
    peak: usize,
    waits: u64,
}

struct Waiter {
    ticket: u64,
    waker: Waker,
}

/// The pool's figures, for `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub limit_bytes: usize,
    pub held_bytes: usize,
    pub idle_bytes: usize,
    pub peak_bytes: usize,
    pub waits: u64,
}

impl BufferPool {
    /// A pool of at most `limit` bytes, keeping at most `idle_limit` of them idle. Both must be
    /// at least one lease of the largest size served (checked by [`BufferPool::check_lease`]).
    pub fn new(limit: usize, idle_limit: usize) -> Arc<BufferPool> {
        assert!(limit >= MIN_LEASE_BYTES, "a pool of {limit} bytes");
        let classes = class_index(limit.next_power_of_two()) + 1;
        Arc::new(BufferPool {
            limit,
            idle_limit: idle_limit.min(limit),
            state: Mutex::new(State {
                held: 0,
                idle: (0..classes).map(|_| Vec::new()).collect(),
                idle_bytes: 0,
                waiters: VecDeque::new(),
                next_ticket: 0,
                peak: 0,
                waits: 0,
            }),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a request of `bytes` can ever be served (its size class fits the limit).
    pub fn check_lease(&self, bytes: usize) -> bool {
        bytes > 0 && lease_bytes(bytes).is_some_and(|size| size <= self.limit)
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.lock();
        PoolStats {
            limit_bytes: self.limit,
            held_bytes: state.held,
            idle_bytes: state.idle_bytes,
            peak_bytes: state.peak,
            waits: state.waits,
        }
    }

    /// A buffer of at least `bytes` (its length set to `bytes`), once the pool has room.
    /// `bytes` must pass [`BufferPool::check_lease`].
    pub fn lease(self: &Arc<Self>, bytes: usize) -> LeaseFuture {
        assert!(self.check_lease(bytes), "a lease of {bytes} bytes");
        LeaseFuture {
            pool: Arc::clone(self),
            bytes,
            ticket: None,
        }
    }

    /// A lease now, or `None` if the pool has no room (or others wait before it).
    pub fn try_lease(self: &Arc<Self>, bytes: usize) -> Option<Lease> {
        assert!(self.check_lease(bytes), "a lease of {bytes} bytes");
        let size = lease_bytes(bytes).expect("checked");
        let mut state = self.lock();
        if !state.waiters.is_empty() {
            return None;
        }
        let reused = self.take_room(&mut state, size)?;
        drop(state);
        Some(self.finish_lease(size, bytes, reused))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("buffer pool")
    }

    /// Room for one buffer of `size`: an idle one of its class (returned), or `size` more
    /// bytes held (after freeing idle buffers of other classes if need be). `None`: no room.
    fn take_room(&self, state: &mut State, size: usize) -> Option<Option<AlignedBuf>> {
        let class = class_index(size);
        if let Some(buf) = state.idle[class].pop() {
            state.idle_bytes -= size;
            return Some(Some(buf));
        }
        while state.held + size > self.limit && state.idle_bytes > 0 {
            let buf = state
                .idle
                .iter_mut()
                .rev()
                .find_map(Vec::pop)
                .expect("idle bytes are in some class");
            state.idle_bytes -= buf.capacity();
            state.held -= buf.capacity();
        }
        if state.held + size > self.limit {
            return None;
        }
        state.held += size;
        state.peak = state.peak.max(state.held);
        Some(None)
    }

    /// The lease for room taken by [`BufferPool::take_room`]; allocates outside the lock.
    fn finish_lease(
        self: &Arc<Self>,
        size: usize,
        bytes: usize,
        reused: Option<AlignedBuf>,
    ) -> Lease {
        let mut buf = reused.unwrap_or_else(|| AlignedBuf::new_mapped(size));
        debug_assert_eq!(buf.capacity(), size);
        buf.set_len(bytes);
        Lease {
            pool: Arc::clone(self),
            size,
            buf: Some(buf),
        }
    }

    /// Takes back a lease's `size` bytes and its buffer, if it came back; wakes the next
    /// waiter.
    fn give_back(&self, size: usize, buf: Option<AlignedBuf>) {
        let mut state = self.lock();
        let mut freed = None;
        match buf {
            Some(buf) if state.idle_bytes + size <= self.idle_limit => {
                state.idle[class_index(size)].push(buf);
                state.idle_bytes += size;
            }
            other => {
                state.held -= size;
                freed = other;
            }
        }
        let next = state.waiters.front().map(|w| w.waker.clone());
        drop(state);
        drop(freed);
        if let Some(waker) = next {
            waker.wake();
        }
    }

    /// Leaves the queue (a lease granted, or a wait given up) and wakes the next waiter,
    /// which may fit too.
    fn leave_queue(&self, state: &mut State, ticket: u64) -> Option<Waker> {
        let was_first = state.waiters.front().is_some_and(|w| w.ticket == ticket);
        state.waiters.retain(|w| w.ticket != ticket);
        if was_first {
            state.waiters.front().map(|w| w.waker.clone())
        } else {
            None
        }
    }
}

/// The size of a lease of `bytes`: the next power of two, at least [`MIN_LEASE_BYTES`].
fn lease_bytes(bytes: usize) -> Option<usize> {
    bytes.max(MIN_LEASE_BYTES).checked_next_power_of_two()
}

fn class_index(size: usize) -> usize {
    debug_assert!(size.is_power_of_two() && size >= MIN_LEASE_BYTES);
    (size.trailing_zeros() - MIN_LEASE_BYTES.trailing_zeros()) as usize
}

/// Waits for room in the pool (see [`BufferPool::lease`]).
pub struct LeaseFuture {
    pool: Arc<BufferPool>,
    bytes: usize,
    /// Our place in the queue once we had to wait.
    ticket: Option<u64>,
}

impl Future for LeaseFuture {
    type Output = Lease;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Lease> {
        let size = lease_bytes(self.bytes).expect("checked");
        let pool = Arc::clone(&self.pool);
        let mut state = pool.lock();
        let first = match self.ticket {
            None => state.waiters.is_empty(),
            Some(ticket) => state.waiters.front().is_some_and(|w| w.ticket == ticket),
        };
        if first {
            if let Some(reused) = pool.take_room(&mut state, size) {
                let next = self
                    .ticket
                    .take()
                    .and_then(|t| pool.leave_queue(&mut state, t));
                drop(state);
                if let Some(waker) = next {
                    waker.wake();
                }
                return Poll::Ready(pool.finish_lease(size, self.bytes, reused));
            }
        }
        match self.ticket {
            Some(ticket) => {
                let me = state.waiters.iter_mut().find(|w| w.ticket == ticket);
                me.expect("a waiter stays queued")
                    .waker
                    .clone_from(cx.waker());
            }
            None => {
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                state.waits += 1;
                state.waiters.push_back(Waiter {
                    ticket,
                    waker: cx.waker().clone(),
                });
                self.ticket = Some(ticket);
            }
        }
        Poll::Pending
    }
}

impl Drop for LeaseFuture {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let next = self.pool.leave_queue(&mut self.pool.lock(), ticket);
            if let Some(waker) = next {
                waker.wake();
            }
        }
    }
}

/// A buffer leased from the pool; its bytes go back when it is dropped.
pub struct Lease {
    pool: Arc<BufferPool>,
    size: usize,
    /// The buffer, unless it is out with a request ([`Lease::take`]).
    buf: Option<AlignedBuf>,
}

impl Lease {
    /// The buffer, to hand to a request; give it back with [`Lease::restore`].
    pub fn take(&mut self) -> AlignedBuf {
        self.buf.take().expect("the lease's buffer is here")
    }

    /// Puts back the buffer [`Lease::take`] gave out (the same allocation, whatever its length).
    pub fn restore(&mut self, buf: AlignedBuf) {
        assert!(self.buf.is_none(), "a lease holds one buffer");
        assert_eq!(buf.capacity(), self.size, "not the lease's buffer");
        self.buf = Some(buf);
    }

    pub fn buf(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("the lease's buffer is here")
    }

    pub fn buf_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("the lease's buffer is here")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.give_back(self.size, self.buf.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::run_local;
    use std::task::Wake;

    const K: usize = 1024;

    struct Flag(std::sync::atomic::AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn flag() -> (Arc<Flag>, Waker) {
        let flag = Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        (Arc::clone(&flag), Waker::from(flag))
    }

    /// Lets the other tasks run once.
    async fn yield_once() {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if yielded {
                return Poll::Ready(());
            }
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
    }

    fn poll(fut: &mut LeaseFuture, waker: &Waker) -> Poll<Lease> {
        Pin::new(fut).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn leases_round_up_to_size_classes_and_reuse_idle_buffers() {
        let pool = BufferPool::new(64 * K, 64 * K);
        let lease = pool.try_lease(5 * K).expect("room");
        assert_eq!(lease.buf().len(), 5 * K);
        assert_eq!(lease.buf().capacity(), 8 * K);
        let first = lease.buf().as_ptr();
        drop(lease);
        assert_eq!(pool.stats().idle_bytes, 8 * K);
        let again = pool.try_lease(8 * K).expect("room");
        assert_eq!(again.buf().as_ptr(), first, "the idle buffer is reused");
        assert_eq!(pool.stats().held_bytes, 8 * K);
        let tiny = pool.try_lease(512).expect("room");
        assert_eq!(tiny.buf().capacity(), MIN_LEASE_BYTES);
    }

    #[test]
    fn the_limit_bounds_what_is_held() {
        let pool = BufferPool::new(64 * K, 16 * K);
        let leases: Vec<_> = (0..4)
            .map(|_| pool.try_lease(16 * K).expect("room"))
            .collect();
        assert_eq!(pool.stats().held_bytes, 64 * K);
        assert!(pool.try_lease(MIN_LEASE_BYTES).is_none(), "full");
        drop(leases);
        let stats = pool.stats();
        assert_eq!(
            stats.idle_bytes,
            16 * K,
            "idle buffers beyond idle_limit are freed"
        );
        assert_eq!(stats.held_bytes, 16 * K);
        assert_eq!(stats.peak_bytes, 64 * K);
        // A class with no idle buffer evicts the idle ones of other classes.
        let big = pool.try_lease(64 * K).expect("room after evicting");
        assert_eq!(pool.stats().idle_bytes, 0);
        assert_eq!(pool.stats().held_bytes, 64 * K);
        drop(big);
        assert!(!pool.check_lease(65 * K), "larger than the limit");
        assert!(!pool.check_lease(0));
    }

    #[test]
    fn waiters_are_served_first_come_first_served() {
        let pool = BufferPool::new(64 * K, 0);
        let held = pool.try_lease(64 * K).expect("room");
        let (big_woken, big_waker) = flag();
        let (small_woken, small_waker) = flag();
        let mut big = pool.lease(64 * K);
        let mut small = pool.lease(4 * K);
        assert!(poll(&mut big, &big_waker).is_pending());
        assert!(poll(&mut small, &small_waker).is_pending());
        assert!(pool.try_lease(4 * K).is_none(), "no overtaking of waiters");
        drop(held);
        assert!(big_woken.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            poll(&mut small, &small_waker).is_pending(),
            "the big one is first"
        );
        let big_lease = match poll(&mut big, &big_waker) {
            Poll::Ready(lease) => lease,
            Poll::Pending => panic!("the first waiter is served"),
        };
        assert!(
            small_woken.0.load(std::sync::atomic::Ordering::SeqCst),
            "next is woken"
        );
        assert!(poll(&mut small, &small_waker).is_pending(), "still no room");
        drop(big_lease);
        assert!(poll(&mut small, &small_waker).is_ready());
        assert_eq!(pool.stats().waits, 2);
    }

    #[test]
    fn a_cancelled_wait_or_a_lost_buffer_gives_everything_back() {
        let pool = BufferPool::new(16 * K, 16 * K);
        let mut held = pool.try_lease(16 * K).expect("room");
        let (_, waker) = flag();
        let (second_woken, second_waker) = flag();
        let mut first = pool.lease(16 * K);
        let mut second = pool.lease(8 * K);
        assert!(poll(&mut first, &waker).is_pending());
        assert!(poll(&mut second, &second_waker).is_pending());
        drop(first);
        assert!(second_woken.0.load(std::sync::atomic::Ordering::SeqCst));
        // A request that lost its buffer (dropped with the request) still frees its bytes.
        drop(held.take());
        drop(held);
        assert_eq!(pool.stats().held_bytes, 0);
        assert!(poll(&mut second, &second_waker).is_ready());
    }

    #[test]
    fn many_tasks_share_a_small_pool_without_exceeding_it() {
        let pool = BufferPool::new(64 * K, 32 * K);
        let peak = run_local({
            let pool = Arc::clone(&pool);
            async move {
                let tasks: Vec<_> = (0..32usize)
                    .map(|i| {
                        let pool = Arc::clone(&pool);
                        crate::device::reactor::spawn(async move {
                            for round in 0..8usize {
                                let bytes = MIN_LEASE_BYTES << ((i + round) % 5);
                                let mut lease = pool.lease(bytes).await;
                                lease.buf_mut().as_mut_slice().fill(i as u8);
                                yield_once().await;
                                assert!(lease.buf().as_slice().iter().all(|&b| b == i as u8));
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await;
                }
                pool.stats().peak_bytes
            }
        });
        assert!(peak <= 64 * K, "peak {peak}");
        let stats = pool.stats();
        assert!(
            stats.waits > 0,
            "the pool was too small for everyone at once"
        );
        assert_eq!(
            stats.held_bytes, stats.idle_bytes,
            "nothing leased any more"
        );
        assert!(stats.idle_bytes <= 32 * K);
    }
}
