//! Owned, aligned I/O buffers.
//!
//! `O_DIRECT` needs buffers aligned to the device's logical block (4 KiB covers every device we
//! serve), and io_uring needs buffers that outlive the request. An [`AlignedBuf`] owns a fixed,
//! page-aligned allocation and a `len` (the part an operation reads or writes), so it can be
//! moved into a request and handed back with the completion.
//!
//! Two kinds of allocation: from the heap ([`AlignedBuf::new`]: zeroed at once, so every page
//! is resident), or mapped ([`AlignedBuf::new_mapped`]: anonymous memory whose pages cost
//! nothing until touched, and which goes back to the system when the buffer drops). Large,
//! long-lived buffers that may stay unused (ublk request buffers) are mapped.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::units::{SectorCount, SECTOR_BYTES};

/// The alignment of every I/O buffer: a page, which satisfies any logical block size up to 4 KiB.
pub const BUF_ALIGN: usize = 4096;

/// A page-aligned, zero-initialised heap buffer with a fixed capacity and a variable length.
///
/// Invariant: `len <= capacity`, both multiples of 512 bytes, and the allocation never moves
/// while the buffer lives (the kernel may hold its address during a request).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
    /// Allocated by `mmap` (freed by `munmap`), not from the heap.
    mapped: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>), so moving it or
// sharing `&AlignedBuf` across threads is as safe as for a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&self` (see above).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `bytes` capacity and length. `bytes` must be a positive multiple of
    /// 512.
    pub fn new(bytes: usize) -> AlignedBuf {
        assert!(
            bytes > 0 && bytes as u64 % SECTOR_BYTES == 0,
            "buffer of {bytes} bytes"
        );
        let layout = Layout::from_size_align(bytes, BUF_ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size (asserted above).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            capacity: bytes,
            len: bytes,
            mapped: false,
        }
    }

    /// A zeroed buffer of `bytes` (a positive multiple of [`BUF_ALIGN`]) in memory of its own,
    /// mapped from the system: its pages are resident only once touched, and dropping it
    /// returns them at once (see module doc). Running out of address space aborts, as a heap
    /// allocation failure does.
    pub fn new_mapped(bytes: usize) -> AlignedBuf {
        assert!(
            bytes > 0 && bytes % BUF_ALIGN == 0,
            "mapped buffer of {bytes} bytes"
        );
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing: no
        // pointer of ours is passed, and the result is checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let layout = Layout::from_size_align(bytes, BUF_ALIGN).expect("buffer layout");
        if raw == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout);
        }
        let ptr = NonNull::new(raw.cast::<u8>())
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            capacity: bytes,
            len: bytes,
            mapped: true,
        }
    }

    /// A zeroed buffer holding `len` sectors.
    pub fn for_sectors(len: SectorCount) -> AlignedBuf {
        AlignedBuf::new(len.to_usize_bytes())
    }

    /// A buffer holding a copy of `data` (whose length must be a multiple of 512).
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The length in sectors.
    pub fn sectors(&self) -> SectorCount {
        SectorCount::from_bytes_exact(self.len as u64).expect("buffer length is whole sectors")
    }

    /// Sets the length an operation will use; it must fit the capacity and be whole sectors.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity && len as u64 % SECTOR_BYTES == 0,
            "buffer length {len}"
        );
        self.len = len;
    }

    /// Sets the length to `len` sectors.
    pub fn set_sectors(&mut self, len: SectorCount) {
        self.set_len(len.to_usize_bytes());
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes and `len <= capacity`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the allocation, for building I/O requests.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The start of the allocation, for requests that fill the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Fills the used part with zeroes.
    pub fn zero(&mut self) {
        self.as_mut_slice().fill(0);
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `new_mapped` with exactly this length, and unmapped only here;
            // nothing borrows the buffer any more.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.capacity) };
            assert_eq!(rc, 0, "munmap of a buffer we mapped");
            return;
        }
        let layout = Layout::from_size_align(self.capacity, BUF_ALIGN).expect("buffer layout");
        // SAFETY: allocated in `new` with exactly this layout, and freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} of {} bytes)", self.len, self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        let mut buf = AlignedBuf::new(8192);
        assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        buf.set_len(512);
        assert_eq!(buf.sectors(), SectorCount(1));
        buf.as_mut_slice().fill(7);
        buf.set_len(8192);
        assert_eq!(buf.as_slice()[511], 7);
        assert_eq!(buf.as_slice()[512], 0);
    }

    #[test]
    fn mapped_buffers_are_aligned_zeroed_and_writable() {
        let mut buf = AlignedBuf::new_mapped(64 << 10);
        assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        buf.as_mut_slice().fill(9);
        buf.set_len(4096);
        assert_eq!(buf.capacity(), 64 << 10);
        assert!(buf.as_slice().iter().all(|&b| b == 9));
    }

    #[test]
    #[should_panic]
    fn length_past_capacity_is_a_bug() {
        AlignedBuf::new(512).set_len(1024);
    }
}
