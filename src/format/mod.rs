//! The on-disk codec layer: what every persistent structure of ublkdm (the mirror superblock,
//! the dirty log, the snapshot store's superblock and log) is built from.
//!
//! - A structure's header is a `#[repr(C)]` struct of little-endian fields
//!   (`zerocopy::little_endian`, alignment 1, so no padding: the field offsets are those of
//!   the declaration), deriving `zerocopy`'s `FromBytes`/`IntoBytes`; its owner checks every
//!   offset its `//!` table names with [`offset_of!`](core::mem::offset_of) at compile time.
//!   Decoding is [`header`] (a typed view of an image's prefix), encoding [`write_header`].
//! - [`crc`]: the one checksum rule, crc32c of a whole image with its crc field taken as zero.
//! - [`read`]: the one "read N sectors at S" helper, bounded by a named maximum, since lengths
//!   come from disk.
//! - [`magic`]: every magic number ublkdm writes, and the recognition of our own metadata at
//!   a device's start (for a target that must not overwrite another target's device).
//!
//! Invariants: every image written is byte-identical to what the format tables in the
//! owners' `//!` docs say (the golden tests in each owner pin those bytes); nothing here
//! panics on bytes read from disk, and nothing is sized from them unbounded.

pub mod crc;
#[cfg(test)]
pub mod golden;
pub mod magic;
pub mod read;

pub use zerocopy::little_endian::{U32, U64};
pub use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The header `H` at the start of `image`, or `None` when `image` is shorter than one.
pub fn header<H: FromBytes + KnownLayout + Immutable + Unaligned>(image: &[u8]) -> Option<&H> {
    H::ref_from_prefix(image).ok().map(|(h, _)| h)
}

/// Writes `header` over the start of `image`.
///
/// Panics when `image` is shorter than the header: images are sized by their owner, a bug.
pub fn write_header<H: IntoBytes + Immutable>(image: &mut [u8], header: &H) {
    let bytes = header.as_bytes();
    image[..bytes.len()].copy_from_slice(bytes);
}
