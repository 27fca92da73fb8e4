//! The simulations' shared oracle: what each sector of a simulated device may hold, as tags
//! (see [`super::stamp`]), through writes in flight, acknowledgements, flushes and power
//! cuts; and `TRACE=1` tracing.
//!
//! Invariant: a sector whose `possible` is empty holds exactly its `acked` tag; otherwise
//! (after a cut, or a failed write) it holds one of `possible` until it is written again.

use std::collections::BTreeSet;

use ublkdm::units::Extent;

use super::sectors;

/// `TRACE=1` prints what the simulation does.
pub fn trace(what: std::fmt::Arguments<'_>) {
    if std::env::var_os("TRACE").is_some() {
        eprintln!("{what}");
    }
}

/// What one sector may hold.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The last acknowledged tag (0: zeroes).
    pub acked: u64,
    /// After a power cut and until the sector is written again: every tag it may hold.
    pub possible: Vec<u64>,
    /// The tags a power cut may leave: the last durable one(s)...
    pub durable: Vec<u64>,
    /// ...and every tag written since.
    pub volatile: Vec<u64>,
}

impl Cell {
    /// A sector that durably holds `tag` (0: zeroes).
    pub fn settled(tag: u64) -> Cell {
        Cell {
            acked: tag,
            possible: Vec::new(),
            durable: vec![tag],
            volatile: Vec::new(),
        }
    }

    /// The tags the sector may hold now.
    pub fn tags(&self) -> Vec<u64> {
        if self.possible.is_empty() {
            vec![self.acked]
        } else {
            self.possible.clone()
        }
    }

    /// A durable copy of what the sector holds now (a snapshot's image of it).
    pub fn image(&self) -> Cell {
        let tags = self.tags();
        Cell {
            acked: self.acked,
            possible: if tags.len() > 1 {
                tags.clone()
            } else {
                Vec::new()
            },
            durable: tags,
            volatile: Vec::new(),
        }
    }

    /// The image may also hold `tag` (a write in flight when the image was taken).
    pub fn widen(&mut self, tag: u64) {
        let mut tags = self.tags();
        tags.push(tag);
        tags.sort_unstable();
        tags.dedup();
        self.durable = tags.clone();
        self.possible = tags;
    }

    /// A power cut: the sector keeps one of its durable or volatile tags.
    fn crash(&mut self) {
        let set: BTreeSet<u64> = self.durable.iter().chain(&self.volatile).copied().collect();
        self.possible = set.into_iter().collect();
        self.durable = self.possible.clone();
        self.volatile.clear();
    }
}

/// Every sector of one simulated device.
#[derive(Clone, Debug)]
pub struct Sectors {
    pub cells: Vec<Cell>,
}

impl Sectors {
    /// `count` sectors of zeroes.
    pub fn zeroed(count: u64) -> Sectors {
        let count = usize::try_from(count).expect("sector count fits in memory");
        Sectors {
            cells: vec![Cell::settled(0); count],
        }
    }

    /// A durable copy of what every sector holds now.
    pub fn image(&self) -> Sectors {
        Sectors {
            cells: self.cells.iter().map(Cell::image).collect(),
        }
    }

    /// A write of `tag` to `extent` was issued.
    pub fn issue(&mut self, extent: Extent, tag: u64) {
        for s in sectors(extent) {
            self.cells[s].volatile.push(tag);
        }
    }

    /// The write of `tag` to `extent` was acknowledged (durable at once with `fua`).
    pub fn ack(&mut self, extent: Extent, tag: u64, fua: bool) {
        for s in sectors(extent) {
            let c = &mut self.cells[s];
            c.acked = tag;
            c.possible.clear();
            if fua {
                c.durable = vec![tag];
                c.volatile.clear();
            }
        }
    }

    /// A write failed: its sectors may hold what they held or what it wrote.
    pub fn fail(&mut self, extent: Extent, tag: u64) {
        for s in sectors(extent) {
            let c = &mut self.cells[s];
            let mut tags = c.tags();
            tags.push(tag);
            tags.sort_unstable();
            tags.dedup();
            c.possible = tags;
        }
    }

    /// The acknowledged tags now: what a flush issued now makes durable.
    pub fn acked(&self) -> Vec<u64> {
        self.cells.iter().map(|c| c.acked).collect()
    }

    /// A flush completed with no write in flight: what every sector may hold is durable.
    pub fn flushed_all(&mut self) {
        for c in &mut self.cells {
            c.durable = c.tags();
            c.volatile.clear();
        }
    }

    /// A flush issued when the acknowledged tags were `acked` completed. Tags grow with issue
    /// order and one sector's writes are issued in order, so later ones stay volatile.
    pub fn flushed(&mut self, acked: &[u64]) {
        for (c, &a) in self.cells.iter_mut().zip(acked) {
            // A FUA write acknowledged meanwhile may already be durable and newer.
            if c.durable.iter().any(|&d| d > a) {
                // keep it
            } else if c.possible.is_empty() {
                c.durable = vec![a];
            } else if c.acked == a {
                c.durable = c.possible.clone();
            }
            c.volatile.retain(|&t| t > a);
        }
    }

    /// A power cut: every sector keeps one of its durable or volatile tags.
    pub fn crash(&mut self) {
        for c in &mut self.cells {
            c.crash();
        }
    }

    /// Asserts that sector `at` may hold `tag`.
    pub fn check(&self, at: u64, tag: u64, what: &str) {
        let c = &self.cells[usize::try_from(at).expect("sector index")];
        let ok = if c.possible.is_empty() {
            tag == c.acked
        } else {
            c.possible.contains(&tag)
        };
        assert!(
            ok,
            "{what}: sector {at} holds tag {tag}, expected {} (possible {:?})",
            c.acked, c.possible
        );
    }
}
