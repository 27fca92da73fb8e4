//! The mirror's foreground I/O: writes through the region protocol, balanced reads with
//! retry and repair, flushes; and the two things a failing leg sets off: failing it, and
//! the superblock update that records it on the survivors.
//!
//! Invariants:
//! - a region's dirty bit is durable before any leg write to it is issued;
//! - a write is acknowledged only when every active leg finished its piece, some leg in sync
//!   (still, after the failures) holds every piece, and, if the slot table changed meanwhile
//!   (a leg failed), the superblocks saying so are durable; a copy on recovering legs alone
//!   is one no assembly could read, so such a write fails with EIO;
//! - a request is cut into pieces of at most `Tuning::write_piece_regions` regions, written
//!   one after another from the last, each admitted to all its regions before any leg is
//!   written: so no write races a resync copy of its regions, and a large request waits for
//!   the copies running where it meets the resync walk, never for the walk to pass all of it;
//! - a read of an out-of-sync region is served by its resync source (other in-sync legs
//!   only when that fails), never by a recovering leg, so no read returns data a resync is
//!   about to overwrite;
//! - a read error is retried on another readable leg; the region is then marked for a
//!   resync from the leg that answered, which writes the good data back over the failing
//!   leg (through the region protocol, so no foreground write can race the repair).
//!
//! # Zero copy
//! A request's buffer is owned memory (copy mode, the simulations, every background path) or
//! a kernel buffer registered on the queue's ring ([`RegBuf`]), which only fixed-buffer I/O on
//! that ring can read or write, so the mirror never sees its bytes. The same code serves both:
//! - a write marks the bitmap exactly as in copy mode, then hands every leg that takes it the
//!   one buffer (`write_buf`; a piece of a request cut at `write_piece_regions` is a
//!   [`RegBuf::slice`], not a copy);
//! - a read is planned as in copy mode; each part fills its own slice of the one buffer, and
//!   a read error is retried on the next leg into that same slice. The repair needs no data
//!   (the resync copies the region from the leg that answered), so it is the same in both
//!   modes;
//! - a leg that refuses a registered buffer (`NeedsCopy`, said before any I/O), or that fails
//!   one with `EINVAL` (ublk passes memory aligned to 4 bytes, which `O_DIRECT` refuses), is
//!   not a failing leg: the request ends with [`needs_copy`] and the front end serves it again
//!   in copy mode, before it completes. A read so refused is simply read again. A write so
//!   refused ends its regions as every write does, before it returns: a region where every
//!   leg refused with `NeedsCopy` wrote nothing and stays in sync; a region where some leg
//!   took the data while another refused it (or refused with `EINVAL`, which may come after a
//!   part of the transfer) may now differ between legs, so it is ended as a write a leg
//!   missed: out of sync, its dirty bit (set before any leg was written) kept until the
//!   resync has made the legs agree. The copy-mode write that follows then writes the same
//!   data to every leg through the region protocol again. No bit is ever cleared while legs
//!   may differ, and no leg is failed for a refusal (a leg that also refuses owned memory
//!   fails in copy mode, as ever).

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::state::{LegRef, LegStats};
use super::superblock::{write_superblock, LegState};
use super::{join_all, Inner};
use crate::device::{
    errno, is_needs_copy, needs_copy, reactor, AlignedBuf, DeviceRef, IoBuf, IoFuture, IoReadDone,
    ReadDone, RegBuf, WriteBuf, WriteFlags,
};
use crate::region::{RegionIndex, RegionRange, WriteAdmission};
use crate::units::{Extent, Sector, SectorCount};

/// What a write does on each leg.
pub(crate) enum LegOp {
    /// Owned memory (copy mode) or a registered buffer (zero copy): one buffer for every leg.
    Write {
        buf: WriteBuf,
        flags: WriteFlags,
    },
    Discard,
    WriteZeroes,
}

/// One leg's I/O of a write.
type LegWrite = IoFuture<io::Result<()>>;

/// One leg's share of a write, before it is issued.
enum LegIo {
    Write(WriteBuf, WriteFlags),
    Discard(Extent),
    WriteZeroes(Extent),
}

impl LegIo {
    fn issue(self, dev: &DeviceRef, at: Sector) -> LegWrite {
        match self {
            LegIo::Write(buf, flags) => dev.write_buf(at, buf, flags),
            LegIo::Discard(extent) => dev.discard(extent),
            LegIo::WriteZeroes(extent) => dev.write_zeroes(extent),
        }
    }
}

/// The leg I/Os of a write: for each, the pieces it carries and its target
/// (`(run of pieces, target)`), and whether it goes on in the background.
#[derive(Default)]
struct LegOps {
    ops: Vec<LegWrite>,
    who: Vec<(Range<usize>, usize)>,
    background: Vec<bool>,
}

/// A leg I/O's result again, for the second of its two readers (the errno is what counts).
fn copy_result(res: &io::Result<()>) -> io::Result<()> {
    match res {
        Ok(()) => Ok(()),
        Err(err) => Err(errno(err.raw_os_error().unwrap_or(libc::EIO))),
    }
}

impl LegOp {
    /// The part of this operation (on `whole`) that falls on `piece`.
    fn piece(&self, whole: Extent, piece: Extent) -> LegOp {
        match self {
            LegOp::Write { buf, flags } => LegOp::Write {
                buf: piece_of(buf, whole, piece),
                flags: *flags,
            },
            LegOp::Discard => LegOp::Discard,
            LegOp::WriteZeroes => LegOp::WriteZeroes,
        }
    }

    /// Whether this is a write of a registered buffer (zero copy).
    fn is_registered(&self) -> bool {
        matches!(self, LegOp::Write { buf, .. } if buf.is_registered())
    }
}

/// The runs of neighbouring pieces of a write that go to the same legs, given for each piece
/// whether it goes to every active leg (`to_all`: its region is in sync, or no leg recovers)
/// or to the in-sync legs only. Together the runs cover every piece once, in order.
fn same_legs_runs(to_all: &[bool]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (p, &all) in to_all.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if to_all[run.start] == all => run.end = p + 1,
            _ => runs.push(p..p + 1),
        }
    }
    assert_eq!(
        runs.iter().map(|r| r.len()).sum::<usize>(),
        to_all.len(),
        "runs cover every piece once"
    );
    runs
}

/// Another handle on the same write buffer: owned memory is shared, a registration is named
/// again (no byte is copied either way).
fn share(buf: &WriteBuf) -> WriteBuf {
    match buf {
        IoBuf::Owned(owned) => IoBuf::Owned(Arc::clone(owned)),
        IoBuf::Registered(reg) => IoBuf::Registered(reg.clone()),
    }
}

/// The part of `buf` (the data of `whole`) that falls on `piece`: owned bytes are copied
/// into a buffer of their own (as copy mode always did), a registered buffer is sliced.
fn piece_of(buf: &WriteBuf, whole: Extent, piece: Extent) -> WriteBuf {
    match buf {
        IoBuf::Owned(owned) => IoBuf::Owned(slice_of(owned, whole, piece)),
        IoBuf::Registered(reg) => IoBuf::Registered(reg_part(reg, whole, piece)),
    }
}

/// The bytes of `buf` (the data of `whole`) that fall on `piece`, as a buffer of their own.
fn slice_of(buf: &AlignedBuf, whole: Extent, piece: Extent) -> Arc<AlignedBuf> {
    assert_eq!(
        buf.len(),
        whole.len.to_usize_bytes(),
        "a write's buffer is its extent"
    );
    assert!(
        piece.start >= whole.start && piece.end() <= whole.end(),
        "piece {piece} outside {whole}"
    );
    let skip = (piece.start - whole.start).to_usize_bytes();
    let bytes = &buf.as_slice()[skip..skip + piece.len.to_usize_bytes()];
    Arc::new(AlignedBuf::from_slice(bytes))
}

/// The part of the registered buffer `reg` (the data of `whole`) that falls on `part`.
fn reg_part(reg: &RegBuf, whole: Extent, part: Extent) -> RegBuf {
    assert_eq!(
        reg.len(),
        whole.len.to_usize_bytes(),
        "a registered buffer is its request's extent"
    );
    assert!(
        part.start >= whole.start && part.end() <= whole.end(),
        "part {part} outside {whole}"
    );
    // Both fit in u32: they lie within `reg`, whose length is a u32.
    let skip = u32::try_from((part.start - whole.start).to_bytes()).expect("within a u32 buffer");
    let len = u32::try_from(part.len.to_bytes()).expect("within a u32 buffer");
    let sliced = reg
        .slice(skip, len)
        .expect("a part of a request lies within its buffer");
    assert_eq!(sliced.len(), part.len.to_usize_bytes(), "a part's buffer");
    sliced
}

/// The buffer of an owned read, back from [`BlockDevice::read_buf`](crate::device::BlockDevice::read_buf).
fn owned(buf: IoBuf) -> AlignedBuf {
    match buf {
        IoBuf::Owned(owned) => owned,
        IoBuf::Registered(_) => panic!("an owned read came back with a registered buffer"),
    }
}

/// Whether a leg's `err` on a registered buffer refuses the buffer rather than failing the
/// leg: `NeedsCopy`, or `EINVAL` (the memory's alignment, or a misuse the copy-mode retry
/// does not repeat; a leg that fails owned memory too is failed then).
fn refuses_registered(err: &io::Error) -> bool {
    is_needs_copy(err) || err.raw_os_error() == Some(libc::EINVAL)
}

/// What the legs did with a write (one piece of at most `write_piece_regions` regions, cut
/// at regions; see `Inner::tally`).
struct Tally {
    /// Per piece: every leg that was to take it took it.
    piece_ok: Vec<bool>,
    /// Per target: the leg failed the write (an I/O error, not a refusal).
    failed: Vec<bool>,
    /// (piece, target) of each leg I/O that succeeded.
    took: Vec<(usize, usize)>,
    /// Some leg could not discard (`EOPNOTSUPP`); some leg failed otherwise.
    unsupported: bool,
    other: bool,
    /// Some leg refused the registered buffer: the request is served again in copy mode.
    refused: bool,
}

/// Regions a write was admitted to while it waits for others: dropping the write then
/// (a cancelled request) ends them, so no region is left with a write in flight forever.
struct Admitted<'a> {
    inner: &'a Inner,
    regions: Vec<RegionIndex>,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.regions.is_empty() {
            self.inner.abort(&self.regions);
        }
    }
}

/// One read of a leg: the mirror's extent and the legs to try, in order.
struct SubRead {
    extent: Extent,
    region: RegionIndex,
    candidates: Vec<LegRef>,
}

impl Inner {
    fn check_request(&self, extent: Extent) -> io::Result<()> {
        // The present size: the caller holds the gate, so no grow moves it meanwhile.
        self.info
            .check_extent_in(extent, self.geometry().device_size())
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    pub(crate) async fn write_op(self: Arc<Self>, extent: Extent, op: LegOp) -> io::Result<()> {
        self.check_request(extent)?;
        if extent.is_empty() {
            return Ok(());
        }
        self.engine.note_foreground_io();
        let pieces = self.write_pieces(extent);
        if pieces.len() == 1 {
            return self.write_piece(extent, &op).await;
        }
        // One piece after another, each waiting only for the resync copies running on its own
        // regions. Last piece first: the resync walks the disk upwards, so a request written
        // upwards would meet the walk's next copies at every piece and move at the resync's
        // pace; written downwards it meets the walk once (and the walk skips the regions of a
        // piece in flight).
        for piece in pieces.into_iter().rev() {
            self.write_piece(piece, &op.piece(extent, piece)).await?;
        }
        Ok(())
    }

    /// Cuts a write at every `Tuning::write_piece_regions` regions.
    fn write_pieces(&self, extent: Extent) -> Vec<Extent> {
        let limit = self.tuning.write_piece_regions.max(1);
        let geometry = self.geometry();
        let regions = geometry.regions_touching(extent);
        let mut pieces = Vec::new();
        let (mut start, mut first) = (extent.start, regions.start.0);
        while start < extent.end() {
            let last = first.saturating_add(limit - 1).min(regions.end.0 - 1);
            let end = geometry
                .extent_of(RegionIndex(last))
                .end()
                .min(extent.end());
            assert!(end > start, "an empty write piece at {start}");
            pieces.push(Extent::new(start, end - start));
            (start, first) = (end, last + 1);
        }
        pieces
    }

    /// Writes one piece of at most `Tuning::write_piece_regions` regions through the region
    /// protocol. It succeeds only if, for each region, a leg that is in sync took it: a copy
    /// on recovering legs alone is one no assembly could read.
    async fn write_piece(self: &Arc<Self>, extent: Extent, op: &LegOp) -> io::Result<()> {
        // One read of the shape for the whole piece (the gate keeps it still meanwhile).
        let geometry = self.geometry();
        let regions: Vec<RegionIndex> = geometry.regions_touching(extent).collect();
        let (needs_mark, targets, in_sync) = self.admit(&regions).await;
        if !targets.iter().any(|l| l.state == LegState::InSync) {
            self.abort(&regions);
            return Err(errno(libc::EIO));
        }
        if !needs_mark.is_empty() {
            if let Err(err) = self.log().mark(&needs_mark).await {
                log::error!("mirror {}: cannot mark the dirty log: {err}", self.uuid);
                self.abort(&regions);
                return Err(err);
            }
            self.lock().map.marked(&needs_mark);
        }
        let pieces: Vec<(RegionIndex, Extent)> = geometry.split_at_regions(extent).collect();
        assert_eq!(pieces.len(), regions.len(), "one piece per region written");
        let ops = self.leg_ops(extent, op, &pieces, &targets, &in_sync);
        if ops.background.contains(&true) {
            return self.write_piece_behind(pieces, targets, ops).await;
        }
        let results = join_all(ops.ops).await;
        let tally = Self::tally(
            pieces.len(),
            targets.len(),
            &ops.who,
            results,
            op.is_registered(),
        );
        let outcome = self.settle_write(&pieces, &targets, tally);
        outcome?;
        self.await_persisted().await
    }

    /// The leg I/Os of a write cut into `pieces`, and for each the pieces it carries, its
    /// target and whether it goes on in the background. Pieces go to the same legs unless a
    /// region is out of sync while a leg recovers, so a write is one I/O per leg (md's one
    /// bio per disk) but where those sets differ: a run of neighbouring pieces with the same
    /// set shares one leg I/O, which succeeds or fails for all of them.
    fn leg_ops(
        &self,
        extent: Extent,
        op: &LegOp,
        pieces: &[(RegionIndex, Extent)],
        targets: &[LegRef],
        in_sync: &[bool],
    ) -> LegOps {
        assert_eq!(in_sync.len(), pieces.len(), "a sync state per piece");
        let mut out = LegOps::default();
        let all_in_sync = targets.iter().all(|l| l.state == LegState::InSync);
        // A write goes behind only while a leg that is not write-behind holds it in sync.
        let behind_ok = targets
            .iter()
            .any(|l| l.state == LegState::InSync && l.options.write_behind == 0);
        let to_all: Vec<bool> = in_sync.iter().map(|&s| s || all_in_sync).collect();
        for run in same_legs_runs(&to_all) {
            let first = pieces[run.start].1.start;
            let span = Extent::new(first, pieces[run.end - 1].1.end() - first);
            let run_buf = match op {
                LegOp::Write { buf, .. } if span == extent => Some(share(buf)),
                LegOp::Write { buf, .. } => Some(piece_of(buf, extent, span)),
                _ => None,
            };
            let at = self.leg_sector(span.start);
            for (t, leg) in targets.iter().enumerate() {
                // A recovering leg gets the write only where its region is already copied;
                // an out-of-sync region is copied to it whole later.
                if !to_all[run.start] && leg.state != LegState::InSync {
                    continue;
                }
                let leg_extent = Extent::new(at, span.len);
                let io = match (op, &run_buf) {
                    (LegOp::Write { flags, .. }, Some(b)) => {
                        assert_eq!(b.len(), span.len.to_usize_bytes(), "run buffer");
                        // The same buffer to every leg: owned memory goes to `write` as
                        // ever, a registered buffer to fixed-buffer I/O on this ring.
                        LegIo::Write(share(b), *flags)
                    }
                    (LegOp::Discard, _) => LegIo::Discard(leg_extent),
                    _ => LegIo::WriteZeroes(leg_extent),
                };
                let (fut, background) = if leg.options.write_behind > 0 {
                    self.ordered(leg, leg_extent, io, behind_ok)
                } else {
                    (io.issue(&leg.dev, at), false)
                };
                out.ops.push(fut);
                out.who.push((run.clone(), t));
                out.background.push(background);
            }
        }
        out
    }

    /// An I/O to a write-behind leg, issued in the ledger's order (see `behind.rs`). It goes
    /// on in the background when it is an owned, non-FUA write, `allowed`, and the leg's
    /// budget has room; its data is copied then, since the request's buffer goes back to the
    /// front end when the request completes.
    fn ordered(&self, leg: &LegRef, on_leg: Extent, io: LegIo, allowed: bool) -> (LegWrite, bool) {
        let eligible = allowed && matches!(&io, LegIo::Write(IoBuf::Owned(_), flags) if !flags.fua);
        let budget = if eligible {
            leg.options.write_behind
        } else {
            0
        };
        let (ticket, background) = self.behind.take(leg.slot, on_leg, budget);
        let io = match io {
            LegIo::Write(IoBuf::Owned(data), flags) if background => {
                let copy = Arc::new(AlignedBuf::from_slice(data.as_slice()));
                LegIo::Write(IoBuf::Owned(copy), flags)
            }
            other => other,
        };
        let ledger = Arc::clone(&self.behind);
        let dev = Arc::clone(&leg.dev);
        let fut = Box::pin(async move {
            ledger.wait_turn(&ticket).await;
            let res = io.issue(&dev, on_leg.start).await;
            drop(ticket);
            res
        });
        (fut, background)
    }

    /// Sorts the leg results of a write: which legs took which piece, which failed, and
    /// whether a leg refused the registered buffer (`registered`) instead. A piece is ok only
    /// if every leg meant to take it did; one that some leg took while another refused it
    /// is not (the legs may differ, see the module doc), one that every leg refused with
    /// `NeedsCopy` is (nothing was written).
    fn tally(
        pieces: usize,
        targets: usize,
        who: &[(Range<usize>, usize)],
        results: Vec<io::Result<()>>,
        registered: bool,
    ) -> Tally {
        assert_eq!(who.len(), results.len(), "a result per leg I/O");
        let mut t = Tally {
            piece_ok: vec![true; pieces],
            failed: vec![false; targets],
            took: Vec::new(),
            unsupported: false,
            other: false,
            refused: false,
        };
        let mut refused = vec![false; pieces];
        for ((run, leg), res) in who.iter().zip(results) {
            let leg = *leg;
            assert!(
                !run.is_empty() && run.end <= pieces && leg < targets,
                "leg I/O ({run:?}, {leg}) out of range"
            );
            match res {
                Ok(()) => t.took.extend(run.clone().map(|p| (p, leg))),
                Err(err) if registered && refuses_registered(&err) => {
                    t.refused = true;
                    for p in run.clone() {
                        refused[p] = true;
                        // EINVAL may come after a part of the transfer: the legs may differ.
                        t.piece_ok[p] &= is_needs_copy(&err);
                    }
                }
                Err(err) => {
                    for p in run.clone() {
                        t.piece_ok[p] = false;
                    }
                    // A leg that cannot discard is not broken: resync makes the legs agree.
                    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        t.unsupported = true;
                    } else {
                        t.other = true;
                        t.failed[leg] = true;
                    }
                }
            }
        }
        for &(p, _) in &t.took {
            // Some leg holds the new data, another does not.
            t.piece_ok[p] &= !refused[p];
        }
        t
    }

    /// Fails the legs that failed the write and ends it on every region. `Ok` if every
    /// piece is held by a leg still in sync now (after the failures); [`needs_copy`] if a
    /// leg refused the registered buffer (the request is served again in copy mode).
    fn settle_write(
        &self,
        pieces: &[(RegionIndex, Extent)],
        targets: &[LegRef],
        tally: Tally,
    ) -> io::Result<()> {
        assert_eq!(tally.piece_ok.len(), pieces.len(), "a state per piece");
        self.fail_legs(targets, &tally.failed);
        let held = self.held(targets, &tally.took, pieces.len());
        self.end_regions(pieces, &tally.piece_ok);
        if tally.refused {
            log::debug!(
                "mirror {}: a leg refused a registered buffer; copy mode for this request",
                self.uuid
            );
            return Err(needs_copy());
        }
        if held.contains(&false) {
            let code = if tally.unsupported && !tally.other {
                libc::EOPNOTSUPP
            } else {
                libc::EIO
            };
            return Err(errno(code));
        }
        Ok(())
    }

    /// Fails every target that `failed` names.
    fn fail_legs(&self, targets: &[LegRef], failed: &[bool]) {
        assert_eq!(targets.len(), failed.len(), "a verdict per target");
        for (_, leg) in targets.iter().enumerate().filter(|(t, _)| failed[*t]) {
            LegStats::bump(&leg.stats.write_errors);
            self.fail_leg(leg.slot, leg.generation, "a write failed");
        }
    }

    /// For each of `pieces` pieces, whether a leg that is still in sync took it.
    fn held(&self, targets: &[LegRef], took: &[(usize, usize)], pieces: usize) -> Vec<bool> {
        let mut held = vec![false; pieces];
        let st = self.lock();
        for &(p, t) in took {
            let leg = &targets[t];
            held[p] |= st.is_current(leg.slot, leg.generation)
                && st.legs[leg.slot].state == LegState::InSync;
        }
        held
    }

    /// Ends a write on each piece's region: in sync if `piece_ok`, else out of sync (its
    /// bit kept) and the resync driver woken.
    fn end_regions(&self, pieces: &[(RegionIndex, Extent)], piece_ok: &[bool]) {
        assert_eq!(pieces.len(), piece_ok.len(), "a state per piece");
        let mut resync = false;
        {
            let mut st = self.lock();
            for (&(region, _), &ok) in pieces.iter().zip(piece_ok) {
                st.map.end_write(region, ok);
                resync |= !st.map.in_sync(region);
            }
        }
        if resync {
            self.kick();
        }
    }

    /// A write with leg I/Os in the background (write-behind legs): acknowledged once the
    /// foreground ones end as a write without the others would (an in-sync leg holds every
    /// piece, failures durable). Its regions end, and a leg that failed in the background is
    /// failed, only when every leg I/O has ended ([`Inner::settle_behind`]), so their dirty
    /// bits stay set until the write-behind leg has the data.
    async fn write_piece_behind(
        self: &Arc<Self>,
        pieces: Vec<(RegionIndex, Extent)>,
        targets: Vec<LegRef>,
        ops: LegOps,
    ) -> io::Result<()> {
        let LegOps {
            ops,
            who,
            background,
        } = ops;
        let (mut fg_idx, mut fg_ops, mut bg_idx, mut bg_ops) = (vec![], vec![], vec![], vec![]);
        for (i, (fut, behind)) in ops.into_iter().zip(background).enumerate() {
            if behind {
                bg_idx.push(i);
                bg_ops.push(fut);
            } else {
                fg_idx.push(i);
                fg_ops.push(fut);
            }
        }
        let (tx, rx) = smol::channel::bounded(1);
        let unsettled = self.behind.unsettled();
        let settle = Arc::clone(self).settle_behind(
            pieces.clone(),
            targets.clone(),
            who.clone(),
            (bg_idx, bg_ops),
            rx,
        );
        reactor::spawn(async move {
            settle.await;
            drop(unsettled);
        })
        .detach();
        let results = join_all(fg_ops).await;
        let copies: Vec<io::Result<()>> = results.iter().map(copy_result).collect();
        let fg_who: Vec<(Range<usize>, usize)> = fg_idx.iter().map(|&i| who[i].clone()).collect();
        let tally = Self::tally(pieces.len(), targets.len(), &fg_who, results, false);
        // The channel holds one message and this is the only one: it cannot be full.
        let _ = tx.try_send(fg_idx.into_iter().zip(copies).collect());
        self.fail_legs(&targets, &tally.failed);
        if self
            .held(&targets, &tally.took, pieces.len())
            .contains(&false)
        {
            return Err(errno(libc::EIO));
        }
        self.await_persisted().await
    }

    /// The end of a write-behind write: waits for its background leg I/Os and for the
    /// foreground's results, then settles the write with all of them.
    async fn settle_behind(
        self: Arc<Self>,
        pieces: Vec<(RegionIndex, Extent)>,
        targets: Vec<LegRef>,
        who: Vec<(Range<usize>, usize)>,
        background: (Vec<usize>, Vec<LegWrite>),
        foreground: smol::channel::Receiver<Vec<(usize, io::Result<()>)>>,
    ) {
        let (bg_idx, bg_ops) = background;
        let bg_results = join_all(bg_ops).await;
        let Ok(fg_results) = foreground.recv().await else {
            // The request was dropped while its legs were written: which took it is
            // unknown, so its regions are left to the resync (no leg is blamed).
            self.end_regions(&pieces, &vec![false; pieces.len()]);
            return;
        };
        let mut results: Vec<Option<io::Result<()>>> = (0..who.len()).map(|_| None).collect();
        for (i, res) in bg_idx.into_iter().zip(bg_results).chain(fg_results) {
            assert!(results[i].is_none(), "one result per leg I/O");
            results[i] = Some(res);
        }
        let results = results
            .into_iter()
            .map(|r| r.expect("a result per leg I/O"))
            .collect();
        let tally = Self::tally(pieces.len(), targets.len(), &who, results, false);
        if let Err(err) = self.settle_write(&pieces, &targets, tally) {
            log::debug!("mirror {}: a write behind ended with {err}", self.uuid);
        }
        if let Err(err) = self.await_persisted().await {
            log::error!("mirror {}: cannot record a failed leg: {err}", self.uuid);
        }
    }

    /// Admits a write to every region in `regions`, waiting while any recovers. Regions
    /// admitted stay admitted while the others are waited for (the resync never starts on a
    /// region with a write in flight), so a write waits at most for the copies already
    /// running on its regions. Returns the regions whose bits need a mark, the active legs,
    /// and whether each region is in sync.
    async fn admit(&self, regions: &[RegionIndex]) -> (Vec<RegionIndex>, Vec<LegRef>, Vec<bool>) {
        let mut held = Admitted {
            inner: self,
            regions: Vec::with_capacity(regions.len()),
        };
        let mut admitted = vec![false; regions.len()];
        let mut needs = Vec::new();
        loop {
            let seen = {
                let mut st = self.lock();
                let mut wait = false;
                for (i, &region) in regions.iter().enumerate() {
                    if admitted[i] {
                        continue;
                    }
                    match st.map.begin_write(region) {
                        WriteAdmission::Proceed { needs_mark } => {
                            admitted[i] = true;
                            held.regions.push(region);
                            if needs_mark {
                                needs.push(region);
                            }
                        }
                        WriteAdmission::Wait => wait = true,
                    }
                }
                if !wait {
                    assert!(needs.len() <= regions.len(), "a mark per region at most");
                    held.regions.clear();
                    st.writes_started += 1;
                    for &region in regions {
                        st.note_write(region);
                    }
                    let in_sync = regions.iter().map(|&r| st.map.in_sync(r)).collect();
                    return (needs, st.active(), in_sync);
                }
                self.recovered.generation()
            };
            self.recovered.wait(seen).await;
        }
    }

    fn abort(&self, regions: &[RegionIndex]) {
        let mut st = self.lock();
        for &region in regions {
            st.map.abort_write(region);
        }
    }

    /// A foreground flush: every active leg is flushed; it succeeds if the flush of a leg in
    /// sync did (the others are failed, and that is durable before the flush completes). A
    /// flush that only recovering legs took fails: no assembly could read them.
    pub(crate) async fn flush_op(self: Arc<Self>) -> io::Result<()> {
        self.engine.note_foreground_io();
        // fsync means every leg: the writes a write-behind leg still owes land first.
        self.behind.drain().await;
        let (any, _) = self.flush_legs().await;
        any?;
        self.await_persisted().await
    }

    /// Flushes every active leg; succeeds only if every leg's flush did (clearing a bit and
    /// promoting a leg need all of them durable).
    pub(crate) async fn flush_active(&self) -> io::Result<()> {
        self.flush_legs().await.1
    }

    /// Flushes every active leg, failing those whose flush fails. Returns whether an in-sync
    /// leg's flush succeeded and whether all did.
    async fn flush_legs(&self) -> (io::Result<()>, io::Result<()>) {
        let targets = self.lock().active();
        if targets.is_empty() {
            return (Err(errno(libc::EIO)), Err(errno(libc::EIO)));
        }
        let results = join_all(targets.iter().map(|l| l.dev.flush()).collect()).await;
        let mut all = Ok(());
        let mut any = false;
        for (leg, res) in targets.iter().zip(results) {
            match res {
                Ok(()) => any |= leg.state == LegState::InSync,
                Err(err) => {
                    LegStats::bump(&leg.stats.write_errors);
                    self.fail_leg(leg.slot, leg.generation, "a flush failed");
                    all = Err(err);
                }
            }
        }
        let any = if any { Ok(()) } else { Err(errno(libc::EIO)) };
        (any, all)
    }

    // -----------------------------------------------------------------------------------------
    // Reads

    pub(crate) async fn read_op(self: Arc<Self>, offset: Sector, mut buf: AlignedBuf) -> ReadDone {
        let extent = Extent::new(offset, buf.sectors());
        if let Err(err) = self.check_request(extent) {
            return (Err(err), buf);
        }
        if extent.is_empty() {
            return (Ok(()), buf);
        }
        self.engine.note_foreground_io();
        let plan = self.plan_read(extent);
        if plan.len() == 1 {
            let sub = plan.into_iter().next().expect("one read");
            let (res, back) = self.read_sub(&sub, IoBuf::Owned(buf)).await;
            return (res, owned(back));
        }
        let reads = plan
            .iter()
            .map(|sub| {
                let part = AlignedBuf::for_sectors(sub.extent.len);
                self.read_sub(sub, IoBuf::Owned(part))
            })
            .collect();
        let results = join_all(reads).await;
        let mut outcome = Ok(());
        for (sub, (res, part)) in plan.iter().zip(results) {
            let part = owned(part);
            match res {
                Ok(()) => {
                    let at = (sub.extent.start - extent.start).to_usize_bytes();
                    assert_eq!(
                        part.len(),
                        sub.extent.len.to_usize_bytes(),
                        "sub-read buffer"
                    );
                    assert!(at + part.len() <= buf.len(), "sub-read outside the read");
                    buf.as_mut_slice()[at..at + part.len()].copy_from_slice(part.as_slice());
                }
                Err(err) => outcome = Err(err),
            }
        }
        (outcome, buf)
    }

    /// A read into a registered buffer (zero copy): planned as [`Inner::read_op`] plans it,
    /// each part read into its own slice of `reg` (no copy, no buffer of ours). Fails with
    /// [`needs_copy`] when a leg refused the buffer, for the front end to read again in copy
    /// mode.
    pub(crate) async fn read_registered(
        self: Arc<Self>,
        offset: Sector,
        reg: RegBuf,
    ) -> IoReadDone {
        let Some(sectors) = SectorCount::from_bytes_exact(reg.len() as u64) else {
            return (Err(errno(libc::EINVAL)), IoBuf::Registered(reg));
        };
        let extent = Extent::new(offset, sectors);
        if let Err(err) = self.check_request(extent) {
            return (Err(err), IoBuf::Registered(reg));
        }
        if extent.is_empty() {
            return (Ok(()), IoBuf::Registered(reg));
        }
        self.engine.note_foreground_io();
        let plan = self.plan_read(extent);
        let covered: u64 = plan.iter().map(|sub| sub.extent.len.0).sum();
        assert_eq!(covered, sectors.0, "the parts of a read cover it exactly");
        let reads = plan
            .iter()
            .map(|sub| {
                let part = reg_part(&reg, extent, sub.extent);
                self.read_sub(sub, IoBuf::Registered(part))
            })
            .collect();
        let results = join_all(reads).await;
        let mut outcome = Ok(());
        for (res, _) in results {
            match res {
                Ok(()) => {}
                // Copy mode reads it all again: no other error matters then.
                Err(err) if is_needs_copy(&err) => return (Err(err), IoBuf::Registered(reg)),
                Err(err) => outcome = Err(err),
            }
        }
        (outcome, IoBuf::Registered(reg))
    }

    /// Cuts a read at regions, picks the legs each piece may come from, and splits large
    /// pieces of in-sync regions across legs.
    fn plan_read(&self, extent: Extent) -> Vec<SubRead> {
        let mut st = self.lock();
        let mut plan = Vec::new();
        for (region, piece) in self.geometry().split_at_regions(extent) {
            if !st.map.in_sync(region) {
                let Some(source) = st.source_for(region) else {
                    plan.push(SubRead {
                        extent: piece,
                        region,
                        candidates: Vec::new(),
                    });
                    continue;
                };
                let mut candidates: Vec<LegRef> = st.leg_ref(source).into_iter().collect();
                for slot in st.in_sync_slots() {
                    if slot != source {
                        candidates.extend(st.leg_ref(slot));
                    }
                }
                plan.push(SubRead {
                    extent: piece,
                    region,
                    candidates,
                });
                continue;
            }
            let mut legs = st.active();
            st.rotor = st.rotor.wrapping_add(1);
            let rotor = st.rotor;
            let n = legs.len().max(1);
            legs.sort_by_key(|l| {
                let load = l.stats.in_flight.load(Ordering::Relaxed);
                (l.options.write_mostly, load, (l.slot + n - rotor % n) % n)
            });
            // Write-mostly legs come last: tried only when the others fail, never split onto.
            let readers = match legs.iter().filter(|l| !l.options.write_mostly).count() {
                0 => legs.len(),
                some => some,
            };
            let split = piece.len >= self.tuning.read_split && readers > 1;
            if !split {
                plan.push(SubRead {
                    extent: piece,
                    region,
                    candidates: legs,
                });
                continue;
            }
            let ways = readers as u64;
            let chunk = piece.len.0.div_ceil(ways).next_multiple_of(8);
            assert!(chunk > 0, "an empty split of {piece}");
            let mut skip = 0;
            let mut i = 0;
            while skip < piece.len.0 {
                let part = piece.sub_extent(SectorCount(skip), SectorCount(chunk));
                let mut candidates = legs.clone();
                candidates[..readers].rotate_left(i % readers);
                plan.push(SubRead {
                    extent: part,
                    region,
                    candidates,
                });
                skip += part.len.0;
                i += 1;
            }
        }
        plan
    }

    /// Reads one piece from its first candidate that answers; after a failure the region is
    /// repaired from the leg that answered. A leg that refuses a registered buffer ends it at
    /// once with [`needs_copy`]: it is not a read error, and no other leg is tried.
    async fn read_sub(&self, sub: &SubRead, mut buf: IoBuf) -> IoReadDone {
        assert_eq!(
            buf.len(),
            sub.extent.len.to_usize_bytes(),
            "a sub-read's buffer"
        );
        let mut last = errno(libc::EIO);
        let mut failed = false;
        let at = self.leg_sector(sub.extent.start);
        let registered = buf.is_registered();
        for leg in &sub.candidates {
            if leg.options.write_behind > 0 {
                // Writes still on their way to the leg would make its data stale here.
                let on_leg = Extent::new(at, sub.extent.len);
                self.behind.wait_clear(leg.slot, on_leg).await;
            }
            leg.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let (res, back) = leg.dev.read_buf(at, buf).await;
            let before = leg.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            assert!(before > 0, "leg {} in-flight count went negative", leg.slot);
            buf = back;
            match res {
                Err(err) if registered && refuses_registered(&err) => {
                    return (Err(needs_copy()), buf);
                }
                Ok(()) => {
                    LegStats::bump(&leg.stats.reads);
                    if failed {
                        self.repair_from(sub.region, leg.slot).await;
                    }
                    return (Ok(()), buf);
                }
                Err(err) => {
                    LegStats::bump(&leg.stats.reads);
                    log::warn!(
                        "mirror {}: read error on {} (slot {}) at {at}: {err}",
                        self.uuid,
                        leg.dev.info().name,
                        leg.slot
                    );
                    LegStats::bump(&leg.stats.read_errors);
                    failed = true;
                    last = err;
                }
            }
        }
        (Err(last), buf)
    }

    /// Marks `region` out of sync with `good` as its copy source, so the resync writes the
    /// good data back over the leg that failed the read.
    pub(crate) async fn repair_from(&self, region: RegionIndex, good: usize) {
        {
            let mut st = self.lock();
            if st.legs[good].state == LegState::InSync {
                st.repair_source.insert(region, good);
            }
            st.map.mark_out_of_sync(RegionRange::one(region));
        }
        if let Err(err) = self.log().mark_range(RegionRange::one(region)).await {
            log::error!(
                "mirror {}: cannot mark {region} for repair: {err}",
                self.uuid
            );
        }
        self.kick();
    }

    // -----------------------------------------------------------------------------------------
    // Leg failure and superblock updates

    /// Fails the leg `(slot, generation)` if it is still that incarnation and active: no I/O
    /// goes to it from now on; the superblock update follows (see `persist`).
    pub(crate) fn fail_leg(&self, slot: usize, generation: u64, why: &str) {
        let (failed, remote) = {
            let mut st = self.lock();
            let leg = &st.legs[slot];
            let remote = leg
                .dev
                .clone()
                .filter(|dev| dev.link().is_some())
                .map(|dev| (dev, leg.link_epoch));
            (st.fail(slot, generation), remote)
        };
        if failed {
            if let Some((dev, epoch)) = remote {
                // Kept for its return (see `remote.rs`).
                self.remotes.watch(slot, dev, epoch);
            }
            log::error!(
                "mirror {}: leg in slot {slot} failed ({why}); running degraded",
                self.uuid
            );
            self.meta.remove_member(slot);
            self.kick();
            // Writes waiting for a recovery must not wait for one that can no longer end.
            self.recovered.notify_all();
        }
    }

    /// Waits until the slot table as it is now is durable on every live leg.
    pub(crate) async fn await_persisted(&self) -> io::Result<()> {
        let pending = {
            let st = self.lock();
            st.persisted_gen < st.state_gen
        };
        if pending {
            self.persist().await
        } else {
            Ok(())
        }
    }

    /// Writes the slot table, with the event counter raised, to every active leg; legs that
    /// fail the write are failed and the update is redone without them.
    pub(crate) async fn persist(&self) -> io::Result<()> {
        let _serial = self.sb_lock.lock().await;
        for _ in 0..=super::MAX_LEGS + 1 {
            let (generation, writes) = {
                let mut st = self.lock();
                if st.persisted_gen >= st.state_gen {
                    return Ok(());
                }
                st.events += 1;
                if !st.missing_legs() {
                    st.events_cleared = st.events;
                }
                let writes: Vec<(LegRef, super::Superblock)> = st
                    .active()
                    .into_iter()
                    .map(|leg| {
                        let sb = st.superblock(self.uuid, self.layout(), leg.slot);
                        (leg, sb)
                    })
                    .collect();
                (st.state_gen, writes)
            };
            if writes.is_empty() {
                return Err(errno(libc::EIO));
            }
            let results = join_all(
                writes
                    .iter()
                    .map(|(leg, sb)| write_superblock(&leg.dev, sb))
                    .collect(),
            )
            .await;
            let mut all_ok = true;
            for ((leg, _), res) in writes.iter().zip(results) {
                if let Err(err) = res {
                    all_ok = false;
                    LegStats::bump(&leg.stats.write_errors);
                    log::error!(
                        "mirror {}: superblock update failed on slot {}: {err}",
                        self.uuid,
                        leg.slot
                    );
                    self.fail_leg(leg.slot, leg.generation, "its superblock update failed");
                }
            }
            if all_ok {
                let mut st = self.lock();
                st.persisted_gen = st.persisted_gen.max(generation);
                if st.persisted_gen >= st.state_gen {
                    return Ok(());
                }
            }
        }
        Err(errno(libc::EIO))
    }
}
