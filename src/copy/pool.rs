//! The copy engine's buffer pool: the whole memory budget, allocated once.
//!
//! Every byte a copy holds comes from here, so the engine can never use more than its budget:
//! `count × buf_bytes ≤ budget`, allocated at construction, and a sub-job waits for a buffer
//! rather than allocating one. Waiters are served by priority (a copy that a foreground write
//! waits for goes first), then in arrival order. Lives on the engine's thread only.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use super::Priority;
use crate::device::AlignedBuf;

/// A fixed set of equal buffers handed out by priority.
pub struct BufferPool {
    state: RefCell<PoolState>,
}

struct PoolState {
    free: Vec<AlignedBuf>,
    buf_bytes: usize,
    total: usize,
    in_use: usize,
    peak_in_use: usize,
    /// Waiters per priority: index 0 is foreground.
    waiters: [VecDeque<Rc<WaitSlot>>; 2],
}

#[derive(Default)]
struct WaitSlot {
    buf: RefCell<Option<AlignedBuf>>,
    waker: RefCell<Option<Waker>>,
}

impl BufferPool {
    /// `count` buffers of `buf_bytes` each. Both must be positive.
    pub fn new(count: usize, buf_bytes: usize) -> Rc<BufferPool> {
        assert!(count > 0 && buf_bytes > 0, "empty buffer pool");
        let free = (0..count).map(|_| AlignedBuf::new(buf_bytes)).collect();
        let state = PoolState {
            free,
            buf_bytes,
            total: count,
            in_use: 0,
            peak_in_use: 0,
            waiters: Default::default(),
        };
        Rc::new(BufferPool {
            state: RefCell::new(state),
        })
    }

    /// Waits for a buffer, full length, content unspecified.
    pub fn acquire(self: &Rc<Self>, priority: Priority) -> Acquire {
        Acquire {
            pool: Rc::clone(self),
            priority,
            slot: None,
        }
    }

    /// Returns a buffer: to the first waiter of the highest priority, else to the free list.
    pub fn release(&self, mut buf: AlignedBuf) {
        let mut state = self.state.borrow_mut();
        assert_eq!(
            buf.capacity(),
            state.buf_bytes,
            "foreign buffer returned to the pool"
        );
        buf.set_len(state.buf_bytes);
        let waiter = state.waiters.iter_mut().find_map(|q| q.pop_front());
        match waiter {
            Some(slot) => {
                // The buffer stays in use: it passes straight to the waiter.
                *slot.buf.borrow_mut() = Some(buf);
                if let Some(waker) = slot.waker.borrow_mut().take() {
                    waker.wake();
                }
            }
            None => {
                state.in_use -= 1;
                state.free.push(buf);
            }
        }
        assert!(
            state.in_use + state.free.len() == state.total,
            "pool accounting"
        );
    }

    /// Bytes held by sub-jobs now, and the most ever held.
    pub fn bytes_in_use(&self) -> (usize, usize) {
        let state = self.state.borrow();
        (
            state.in_use * state.buf_bytes,
            state.peak_in_use * state.buf_bytes,
        )
    }
}

impl PoolState {
    fn take_free(&mut self) -> Option<AlignedBuf> {
        let buf = self.free.pop()?;
        self.in_use += 1;
        self.peak_in_use = self.peak_in_use.max(self.in_use);
        assert!(self.in_use <= self.total, "pool over budget");
        Some(buf)
    }
}

/// The future of [`BufferPool::acquire`]. Dropping it gives back a buffer it was handed.
pub struct Acquire {
    pool: Rc<BufferPool>,
    priority: Priority,
    slot: Option<Rc<WaitSlot>>,
}

impl Future for Acquire {
    type Output = AlignedBuf;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AlignedBuf> {
        if let Some(slot) = self.slot.clone() {
            let handed = slot.buf.borrow_mut().take();
            if let Some(buf) = handed {
                self.slot = None;
                return Poll::Ready(buf);
            }
            *slot.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let queue = self.priority.queue_index();
        let mut state = self.pool.state.borrow_mut();
        // Take a free buffer only if nobody of this or a higher priority is already waiting.
        let ahead = state.waiters[..=queue].iter().any(|q| !q.is_empty());
        if !ahead {
            if let Some(buf) = state.take_free() {
                return Poll::Ready(buf);
            }
        }
        let slot = Rc::new(WaitSlot::default());
        *slot.waker.borrow_mut() = Some(cx.waker().clone());
        state.waiters[queue].push_back(Rc::clone(&slot));
        drop(state);
        self.slot = Some(slot);
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else { return };
        let handed = slot.buf.borrow_mut().take();
        match handed {
            Some(buf) => self.pool.release(buf),
            None => {
                let mut state = self.pool.state.borrow_mut();
                for queue in &mut state.waiters {
                    queue.retain(|w| !Rc::ptr_eq(w, &slot));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::{run_local, spawn};

    #[test]
    fn foreground_waiters_go_first() {
        let order = run_local(async {
            let pool = BufferPool::new(1, 4096);
            let held = pool.acquire(Priority::Background).await;
            let log = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for (name, prio) in [
                ("bg1", Priority::Background),
                ("fg", Priority::Foreground),
                ("bg2", Priority::Background),
            ] {
                let (pool, log) = (Rc::clone(&pool), Rc::clone(&log));
                tasks.push(spawn(async move {
                    let buf = pool.acquire(prio).await;
                    log.borrow_mut().push(name);
                    pool.release(buf);
                }));
            }
            smol::future::yield_now().await;
            pool.release(held);
            for t in tasks {
                t.await;
            }
            assert_eq!(pool.bytes_in_use(), (0, 4096));
            Rc::try_unwrap(log).expect("log").into_inner()
        });
        assert_eq!(order, vec!["fg", "bg1", "bg2"]);
    }
}
