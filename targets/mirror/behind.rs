//! Write-mostly and write-behind legs (md's names and meaning): a leg's options, and the
//! ledger that orders and bounds the writes a write-behind leg may still owe.
//!
//! - A **write-mostly** leg is read only when no other in-sync leg can serve the read, and is
//!   never the resync source while another in-sync leg exists: a leg on a slow link keeps
//!   reads local.
//! - A **write-behind** leg (write-behind implies write-mostly, as in md) takes copy-mode
//!   writes in the background: the write is acknowledged once the other legs have it, while
//!   up to `write_behind` writes (and at most [`BEHIND_BYTES_MAX`] bytes, over all legs) are
//!   still on their way to it. Such a write holds its regions as written (their dirty bits
//!   stay set, no resync or clearing touches them) until the leg answers, so a crash or a
//!   leg failure meanwhile resyncs them. FLUSH waits for every write behind, and a FUA write
//!   or a write when the budget is spent goes to the leg in the foreground: fsync means
//!   every leg.
//!
//! **Order.** A write acknowledged before another is issued must reach the leg first where
//! they overlap: a device (an NBD server) may run requests in any order, and a later write
//! overtaken by an earlier one would leave the leg with stale data that no bit marks. So
//! every I/O to a write-behind leg takes a [`Ticket`] in issue order, synchronously, and
//! waits ([`BehindLedger::wait_turn`]) until no earlier ticket of its leg overlaps it; reads
//! of such a leg wait the same way.
//!
//! A write behind outlives its request, so the request's hold on the gate does not cover
//! it: a change of the region map (a grow, a split-brain resolution) also waits until every
//! such write has ended its regions ([`BehindLedger::settled`]).
//!
//! A write behind runs as a task on the executor of the thread that issued the request (a
//! ublk queue thread), so that thread must keep running until the writes behind end: the
//! daemon shuts a target down (whose FLUSH drains them) before it stops the queues. A caller
//! that writes from a `block_on` of its own and returns from it leaves them unpolled, and
//! a later FLUSH would wait for them forever: such a caller flushes before it leaves.
//!
//! Invariants: a ticket lives until its I/O ended (dropping it, also on cancellation, ends
//! it and wakes the waiters); the background tickets of a slot never exceed its
//! `write_behind`, their bytes never exceed [`BEHIND_BYTES_MAX`].

use std::sync::{Arc, Mutex};

use crate::task::Notify;
use crate::units::Extent;

/// The most writes a leg may have behind (md's bitmap backlog limit).
pub const WRITE_BEHIND_MAX: u32 = 16383;

/// The most bytes held for writes behind, over every leg: each holds a copy of its data
/// (the request's buffer goes back to the front end when the request completes).
pub const BEHIND_BYTES_MAX: usize = 64 << 20;

/// How a leg takes part in reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LegOptions {
    /// Read only when no other in-sync leg can serve the read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_mostly: bool,
    /// Writes the leg may lag behind by (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub write_behind: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl LegOptions {
    /// Parses `write-mostly`, `write-behind=N` (which implies write-mostly), or both,
    /// separated by commas.
    pub fn parse(text: &str) -> Result<LegOptions, String> {
        let mut options = LegOptions::default();
        for word in text.split(',').map(str::trim) {
            match word.split_once('=') {
                None if word == "write-mostly" => options.write_mostly = true,
                Some(("write-behind", n)) => {
                    let n: u32 = n
                        .parse()
                        .map_err(|_| format!("write-behind={n}: not a number"))?;
                    if !(1..=WRITE_BEHIND_MAX).contains(&n) {
                        return Err(format!(
                            "write-behind={n}: give 1 to {WRITE_BEHIND_MAX} writes"
                        ));
                    }
                    options.write_mostly = true;
                    options.write_behind = n;
                }
                _ => {
                    return Err(format!(
                        "unknown leg option '{word}' (write-mostly, write-behind=N)"
                    ))
                }
            }
        }
        Ok(options)
    }

    /// Parses `SLOT=OPTIONS` (`--leg-options`).
    pub fn parse_for_slot(text: &str) -> Result<(usize, LegOptions), String> {
        let (slot, options) = text
            .split_once('=')
            .ok_or_else(|| format!("'{text}': give SLOT=OPTIONS, e.g. 1=write-mostly"))?;
        let slot: usize = slot
            .trim()
            .parse()
            .map_err(|_| format!("'{slot}': a slot is a number"))?;
        if slot >= super::MAX_LEGS {
            return Err(format!("there is no slot {slot}"));
        }
        Ok((slot, LegOptions::parse(options)?))
    }

    /// The words [`LegOptions::parse`] reads back ("" for none).
    pub fn words(&self) -> String {
        let mut words = Vec::new();
        if self.write_behind > 0 {
            words.push(format!("write-behind={}", self.write_behind));
        } else if self.write_mostly {
            words.push("write-mostly".to_string());
        }
        words.join(",")
    }
}

/// One I/O to a write-behind leg, in issue order.
struct Entry {
    seq: u64,
    slot: usize,
    /// Where on the leg.
    extent: Extent,
    /// A write in the background (counted against the budget), and its bytes.
    background: bool,
    bytes: usize,
}

#[derive(Default)]
struct LedgerState {
    next_seq: u64,
    entries: Vec<Entry>,
    background_bytes: usize,
    /// Writes with I/O in the background not yet settled (their regions still begun).
    unsettled: usize,
}

/// The I/O in flight to write-behind legs (see the module doc).
pub struct BehindLedger {
    state: Mutex<LedgerState>,
    changed: Notify,
    bytes_max: usize,
}

/// A write with I/O in the background, until it has ended its regions; dropped, it lets
/// [`BehindLedger::settled`] go on.
pub struct Unsettled {
    ledger: Arc<BehindLedger>,
}

/// An I/O's place in its leg's order; it ends when dropped.
pub struct Ticket {
    ledger: Arc<BehindLedger>,
    seq: u64,
}

/// What a leg owes: writes taken in the background and not yet answered, and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Lag {
    pub writes: u64,
    pub bytes: u64,
}

fn overlaps(a: Extent, b: Extent) -> bool {
    a.start < b.end() && b.start < a.end()
}

impl BehindLedger {
    pub fn new(bytes_max: usize) -> Arc<BehindLedger> {
        assert!(bytes_max > 0, "a write-behind budget");
        Arc::new(BehindLedger {
            state: Mutex::new(LedgerState::default()),
            changed: Notify::default(),
            bytes_max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().expect("write-behind ledger")
    }

    /// Takes a ticket for an I/O on `extent` of the leg in `slot`: in the background if
    /// `behind` (the leg's `write_behind`, 0 for a foreground I/O) and the budget allows,
    /// else in the foreground. Returns the ticket and whether it is in the background.
    pub fn take(self: &Arc<Self>, slot: usize, extent: Extent, behind: u32) -> (Ticket, bool) {
        let bytes = extent.len.to_usize_bytes();
        let mut st = self.lock();
        let owed = st
            .entries
            .iter()
            .filter(|e| e.slot == slot && e.background)
            .count();
        let background = behind > 0
            && owed < behind as usize
            && st.background_bytes.saturating_add(bytes) <= self.bytes_max;
        let seq = st.next_seq;
        st.next_seq += 1;
        if background {
            st.background_bytes += bytes;
        }
        st.entries.push(Entry {
            seq,
            slot,
            extent,
            background,
            bytes: if background { bytes } else { 0 },
        });
        assert!(
            st.background_bytes <= self.bytes_max,
            "write-behind bytes over budget"
        );
        drop(st);
        let ticket = Ticket {
            ledger: Arc::clone(self),
            seq,
        };
        (ticket, background)
    }

    /// Waits until no earlier ticket of the same leg overlaps `ticket`'s extent.
    pub async fn wait_turn(&self, ticket: &Ticket) {
        loop {
            let seen = {
                let st = self.lock();
                let me = st
                    .entries
                    .iter()
                    .find(|e| e.seq == ticket.seq)
                    .expect("a live ticket is in the ledger");
                let blocked = st
                    .entries
                    .iter()
                    .any(|e| e.seq < me.seq && e.slot == me.slot && overlaps(e.extent, me.extent));
                if !blocked {
                    return;
                }
                self.changed.generation()
            };
            self.changed.wait(seen).await;
        }
    }

    /// Waits until no I/O to the leg in `slot` on `extent` is in flight (a read of it).
    pub async fn wait_clear(&self, slot: usize, extent: Extent) {
        loop {
            let seen = {
                let st = self.lock();
                let busy = st
                    .entries
                    .iter()
                    .any(|e| e.slot == slot && overlaps(e.extent, extent));
                if !busy {
                    return;
                }
                self.changed.generation()
            };
            self.changed.wait(seen).await;
        }
    }

    /// Waits until every ticket taken before now has ended (a flush).
    pub async fn drain(&self) {
        let upto = self.lock().next_seq;
        loop {
            let seen = {
                let st = self.lock();
                if !st.entries.iter().any(|e| e.seq < upto) {
                    return;
                }
                self.changed.generation()
            };
            self.changed.wait(seen).await;
        }
    }

    /// Counts a write whose background I/O will end its regions later.
    pub fn unsettled(self: &Arc<Self>) -> Unsettled {
        self.lock().unsettled += 1;
        Unsettled {
            ledger: Arc::clone(self),
        }
    }

    /// Waits until every write with background I/O has ended its regions: a change of the
    /// region map (a grow, a split-brain resolution), which holds requests back through the
    /// gate, must also wait for these, which outlive their requests.
    pub async fn settled(&self) {
        loop {
            let seen = {
                let st = self.lock();
                if st.unsettled == 0 {
                    return;
                }
                self.changed.generation()
            };
            self.changed.wait(seen).await;
        }
    }

    /// Whether nothing is in flight to any write-behind leg.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// What the leg in `slot` owes.
    pub fn lag(&self, slot: usize) -> Lag {
        let st = self.lock();
        let mut lag = Lag::default();
        for e in st.entries.iter().filter(|e| e.slot == slot && e.background) {
            lag.writes += 1;
            lag.bytes += e.bytes as u64;
        }
        lag
    }

    fn end(&self, seq: u64) {
        {
            let mut st = self.lock();
            let at = st
                .entries
                .iter()
                .position(|e| e.seq == seq)
                .expect("a ticket ends once");
            let entry = st.entries.remove(at);
            st.background_bytes -= entry.bytes;
        }
        self.changed.notify_all();
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        {
            let mut st = self.ledger.lock();
            assert!(st.unsettled > 0, "an unsettled write counted");
            st.unsettled -= 1;
        }
        self.ledger.changed.notify_all();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.ledger.end(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{Sector, SectorCount};
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn ext(start: u64, len: u64) -> Extent {
        Extent::new(Sector(start), SectorCount(len))
    }

    fn ready(fut: impl Future<Output = ()>) -> bool {
        let mut fut = pin!(fut);
        matches!(
            fut.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }

    #[test]
    fn options_parse_and_print_back() {
        assert_eq!(
            LegOptions::parse("write-mostly").unwrap(),
            LegOptions {
                write_mostly: true,
                write_behind: 0
            }
        );
        let wb = LegOptions::parse("write-mostly,write-behind=64").unwrap();
        assert_eq!((wb.write_mostly, wb.write_behind), (true, 64));
        assert_eq!(LegOptions::parse(&wb.words()).unwrap(), wb);
        assert!(LegOptions::parse("write-behind=8").unwrap().write_mostly);
        for bad in [
            "",
            "fast",
            "write-behind=0",
            "write-behind=x",
            "write-behind=16384",
        ] {
            assert!(LegOptions::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(LegOptions::parse_for_slot("1=write-mostly").unwrap().0, 1);
        assert!(LegOptions::parse_for_slot("9=write-mostly").is_err());
        assert!(LegOptions::parse_for_slot("write-mostly").is_err());
    }

    #[test]
    fn an_overlapping_later_io_waits_for_the_earlier_one() {
        let ledger = BehindLedger::new(1 << 20);
        let (first, bg) = ledger.take(1, ext(0, 8), 4);
        assert!(bg);
        let (second, _) = ledger.take(1, ext(4, 8), 4);
        let (other_leg, _) = ledger.take(0, ext(0, 8), 0);
        let (apart, _) = ledger.take(1, ext(100, 8), 4);
        assert!(ready(ledger.wait_turn(&first)));
        assert!(!ready(ledger.wait_turn(&second)), "overlaps the first");
        assert!(ready(ledger.wait_turn(&other_leg)), "another leg");
        assert!(ready(ledger.wait_turn(&apart)), "no overlap");
        assert!(!ready(ledger.wait_clear(1, ext(6, 1))));
        drop(first);
        assert!(ready(ledger.wait_turn(&second)));
        assert!(!ready(ledger.drain()));
        drop((second, other_leg, apart));
        assert!(ready(ledger.drain()));
        assert!(ledger.is_idle());
    }

    #[test]
    fn settled_waits_for_every_unsettled_write() {
        let ledger = BehindLedger::new(1 << 20);
        assert!(ready(ledger.settled()));
        let (a, b) = (ledger.unsettled(), ledger.unsettled());
        assert!(!ready(ledger.settled()));
        drop(a);
        assert!(!ready(ledger.settled()));
        drop(b);
        assert!(ready(ledger.settled()));
    }

    #[test]
    fn the_background_is_bounded_by_writes_and_bytes() {
        let ledger = BehindLedger::new(16 * 512);
        let tickets: Vec<(Ticket, bool)> =
            (0..3).map(|i| ledger.take(1, ext(i * 8, 4), 2)).collect();
        let bg: Vec<bool> = tickets.iter().map(|t| t.1).collect();
        assert_eq!(bg, [true, true, false], "two writes behind at most");
        assert_eq!(
            ledger.lag(1),
            Lag {
                writes: 2,
                bytes: 4096
            }
        );
        // The byte budget (16 sectors) is half spent: a 12-sector write goes in the foreground.
        assert!(!ledger.take(2, ext(0, 12), 10).1);
        assert!(ledger.take(2, ext(0, 8), 10).1);
        drop(tickets);
        assert_eq!(ledger.lag(1), Lag::default());
    }
}
