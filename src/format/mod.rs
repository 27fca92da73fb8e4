//! The on-disk codec layer: what every persistent structure of ublkdm (the mirror superblock,
//! the dirty log, the snapshot store's superblock and log) is built from.
//!
//! Invariant: every image written is byte-identical to what the format tables in the owners'
//! `//!` docs say; the golden tests in each owner pin those bytes.

#[cfg(test)]
pub mod golden;
