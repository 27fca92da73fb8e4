//! Small async helpers the targets share: waiting for many
//! futures at once without spawning ([`join_all`]: it runs on whatever thread polls it, so
//! device futures stay on their ring), and a broadcast wake-up ([`Notify`]) whose wakers may
//! fire from any thread (the reactor's executor makes that safe).
//!
//! Invariant of [`Notify`]: a waiter that read the generation before checking its condition
//! (under the lock that guards the condition) cannot miss a notification sent after that.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// Polls every future until all are done; the outputs come back in order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<Option<Pin<Box<F>>>> =
        futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        let mut all = true;
        for (slot, out) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *out = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if all {
            Poll::Ready(
                outputs
                    .iter_mut()
                    .map(|o| o.take().expect("output"))
                    .collect(),
            )
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A generation counter with waiters: [`Notify::notify_all`] bumps it and wakes everyone
/// waiting on an older generation.
#[derive(Default)]
pub struct Notify {
    inner: Mutex<NotifyState>,
}

#[derive(Default)]
struct NotifyState {
    generation: u64,
    wakers: Vec<Waker>,
}

impl Notify {
    /// The current generation: pass it to [`Notify::wait`] after checking the condition.
    pub fn generation(&self) -> u64 {
        self.inner.lock().expect("notify").generation
    }

    pub fn notify_all(&self) {
        let wakers = {
            let mut state = self.inner.lock().expect("notify");
            state.generation += 1;
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Waits until the generation differs from `seen`.
    pub async fn wait(&self, seen: u64) {
        std::future::poll_fn(|cx| {
            let mut state = self.inner.lock().expect("notify");
            if state.generation != seen {
                return Poll::Ready(());
            }
            if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                state.wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor::{run_local, spawn};
    use std::sync::Arc;

    #[test]
    fn join_all_keeps_order_and_notify_wakes() {
        let out = run_local(async {
            let notify = Arc::new(Notify::default());
            let seen = notify.generation();
            let waiter = {
                let n = Arc::clone(&notify);
                spawn(async move {
                    n.wait(seen).await;
                    7
                })
            };
            let values = join_all(vec![
                Box::pin(async { 1 }) as Pin<Box<dyn Future<Output = i32>>>,
                Box::pin(async {
                    smol::future::yield_now().await;
                    2
                }),
            ])
            .await;
            notify.notify_all();
            (values, waiter.await)
        });
        assert_eq!(out, (vec![1, 2], 7));
    }
}
