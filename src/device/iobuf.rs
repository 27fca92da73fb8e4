//! The buffer of a block request: memory we own, or a kernel buffer registered on one ring.
//!
//! [`IoBuf`] is what [`super::BlockDevice::read_buf`] and [`super::BlockDevice::write_buf`]
//! take (see the README's "Zero copy: `IoBuf`"):
//! - `Owned(M)`: an [`AlignedBuf`] for a read (handed back filled), an `Arc<AlignedBuf>` for a
//!   write (shared by every destination);
//! - `Registered(RegBuf)`: a fixed buffer of an io_uring (a ublk request's own pages, which the
//!   kernel registered at the tag's index), which only fixed-buffer I/O on that same ring can
//!   read or write.
//!
//! Invariants of a [`RegBuf`]: `offset + len` lies within the registration (checked where it
//! is made and by [`RegBuf::slice`]); it is used only while its [`RegLease`] is live (its owner
//! ends the lease before the registration goes away) and only on the ring it names. It is not
//! `Send`, so it never leaves its thread. A device that cannot take a registered buffer says
//! so with [`needs_copy`] before it issues any I/O.

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use super::reactor::RingId;
use super::AlignedBuf;
use crate::units::SectorCount;

/// The buffer of a read (`IoBuf`) or of a write (`IoBuf<Arc<AlignedBuf>>`).
#[derive(Debug)]
pub enum IoBuf<M = AlignedBuf> {
    /// Memory we own.
    Owned(M),
    /// A kernel buffer registered on one ring.
    Registered(RegBuf),
}

/// The buffer of a write: owned memory is shared, so that one buffer feeds several devices.
pub type WriteBuf = IoBuf<Arc<AlignedBuf>>;

impl<M: AsRef<AlignedBuf>> IoBuf<M> {
    /// The bytes a request moves.
    pub fn len(&self) -> usize {
        match self {
            IoBuf::Owned(buf) => buf.as_ref().len(),
            IoBuf::Registered(reg) => reg.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The length in sectors, or `EINVAL` when it is not whole sectors (a registered buffer's
    /// length comes from a request, so it is checked, not asserted).
    pub fn sectors(&self) -> io::Result<SectorCount> {
        SectorCount::from_bytes_exact(self.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    pub fn is_registered(&self) -> bool {
        matches!(self, IoBuf::Registered(_))
    }
}

impl AsRef<AlignedBuf> for AlignedBuf {
    fn as_ref(&self) -> &AlignedBuf {
        self
    }
}

/// Whether a buffer registration may still be used: its owner (a ublk tag, for one request)
/// ends it before the registration goes away. Clones share one state.
#[derive(Clone, Debug)]
pub struct RegLease(Rc<Cell<bool>>);

impl RegLease {
    /// A live lease.
    pub fn new() -> RegLease {
        RegLease(Rc::new(Cell::new(true)))
    }

    /// Ends the lease: every [`RegBuf`] under it is refused from now on.
    pub fn end(&self) {
        self.0.set(false);
    }

    pub fn is_live(&self) -> bool {
        self.0.get()
    }
}

impl Default for RegLease {
    fn default() -> Self {
        RegLease::new()
    }
}

/// A part of a fixed buffer registered on ring `ring` at `index` (see module doc).
#[derive(Clone, Debug)]
pub struct RegBuf {
    ring: RingId,
    index: u16,
    /// The address of the registration's byte 0 in a fixed-buffer SQE: 0 for a buffer the
    /// kernel registered (a ublk request's pages), the memory's address for user memory.
    base: u64,
    offset: u32,
    len: u32,
    lease: RegLease,
}

impl RegBuf {
    /// The first `len` bytes of the registration at `index` on `ring`, whose byte 0 is `base`
    /// in a fixed-buffer SQE, under `lease`.
    pub fn new(ring: RingId, index: u16, base: u64, len: u32, lease: &RegLease) -> RegBuf {
        RegBuf {
            ring,
            index,
            base,
            offset: 0,
            len,
            lease: lease.clone(),
        }
    }

    pub fn ring(&self) -> RingId {
        self.ring
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn offset(&self) -> u32 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` bytes from `offset` of this part, or `None` when they do not lie within it.
    pub fn slice(&self, offset: u32, len: u32) -> Option<RegBuf> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(RegBuf {
            offset: self.offset + offset,
            len,
            ..self.clone()
        })
    }

    /// The address a fixed-buffer SQE gives for byte `done` of this part.
    pub fn sqe_addr(&self, done: usize) -> u64 {
        assert!(
            done <= self.len(),
            "byte {done} of a {}-byte buffer",
            self.len
        );
        self.base + u64::from(self.offset) + done as u64
    }

    /// Whether I/O on ring `current` may use this buffer now: its ring, and its lease live.
    /// `EINVAL` otherwise (logged: it is a misuse, but the request must still complete).
    pub fn check_usable(&self, current: Option<RingId>) -> io::Result<()> {
        let why = if !self.lease.is_live() {
            "its request was already completed"
        } else if current != Some(self.ring) {
            "it is registered on another ring"
        } else {
            return Ok(());
        };
        log::error!(
            "a registered buffer (index {}) was refused: {why}",
            self.index
        );
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// The marker inside the error [`needs_copy`] makes.
#[derive(Debug)]
pub struct NeedsCopy;

impl std::fmt::Display for NeedsCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this request needs its data in memory of ours (copy mode)")
    }
}

impl std::error::Error for NeedsCopy {}

/// The error by which a device refuses a registered buffer, before issuing any I/O: the
/// caller serves the request again with owned memory. It carries no errno: a caller that
/// does not look inside fails the request with `EIO`.
pub fn needs_copy() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, NeedsCopy)
}

/// Whether `err` is [`needs_copy`]'s.
pub fn is_needs_copy(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|inner| inner.is::<NeedsCopy>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> RingId {
        RingId::for_test(7)
    }

    #[test]
    fn an_iobuf_knows_its_length_and_kind() {
        let owned: IoBuf = IoBuf::Owned(AlignedBuf::new(4096));
        assert_eq!(owned.len(), 4096);
        assert_eq!(owned.sectors().unwrap(), SectorCount(8));
        assert!(!owned.is_registered());
        let shared: WriteBuf = IoBuf::Owned(Arc::new(AlignedBuf::new(1024)));
        assert_eq!(shared.sectors().unwrap(), SectorCount(2));
        let lease = RegLease::new();
        let reg: IoBuf = IoBuf::Registered(RegBuf::new(ring(), 3, 0, 8192, &lease));
        assert!(reg.is_registered());
        assert_eq!(reg.sectors().unwrap(), SectorCount(16));
        let odd: IoBuf = IoBuf::Registered(RegBuf::new(ring(), 3, 0, 1000, &lease));
        assert_eq!(
            odd.sectors().unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn slices_stay_inside_and_address_their_bytes() {
        let lease = RegLease::new();
        let reg = RegBuf::new(ring(), 5, 0x1000, 64 << 10, &lease);
        let part = reg.slice(8192, 4096).expect("inside");
        assert_eq!((part.index(), part.offset(), part.len()), (5, 8192, 4096));
        assert_eq!(part.sqe_addr(0), 0x1000 + 8192);
        assert_eq!(part.sqe_addr(512), 0x1000 + 8192 + 512);
        let inner = part.slice(1024, 1024).expect("inside the part");
        assert_eq!(inner.offset(), 8192 + 1024);
        assert!(part.slice(0, 4097).is_none(), "past the part");
        assert!(reg.slice(u32::MAX, 2).is_none(), "overflow");
        assert!(reg.slice(64 << 10, 0).is_some(), "empty at the end");
    }

    #[test]
    #[should_panic]
    fn an_address_past_the_buffer_is_a_bug() {
        RegBuf::new(ring(), 0, 0, 512, &RegLease::new()).sqe_addr(513);
    }

    #[test]
    fn a_buffer_is_usable_only_on_its_ring_and_while_its_lease_lives() {
        let lease = RegLease::new();
        let reg = RegBuf::new(ring(), 1, 0, 4096, &lease);
        assert!(reg.check_usable(Some(ring())).is_ok());
        let other = RingId::for_test(8);
        assert_eq!(
            reg.check_usable(Some(other)).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert!(reg.check_usable(None).is_err(), "no ring at all");
        let part = reg.slice(0, 512).expect("inside");
        lease.end();
        assert!(!lease.is_live());
        assert!(reg.check_usable(Some(ring())).is_err(), "after its request");
        assert!(
            part.check_usable(Some(ring())).is_err(),
            "slices share the lease"
        );
    }

    #[test]
    fn needs_copy_is_recognised_and_nothing_else_is() {
        let err = needs_copy();
        assert!(is_needs_copy(&err));
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(!is_needs_copy(&io::Error::from_raw_os_error(
            libc::EOPNOTSUPP
        )));
        assert!(!is_needs_copy(&io::Error::other("x")));
    }
}
