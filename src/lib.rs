//! ublkdm: a userspace device-mapper served through Linux ublk.
//!
//! The core (this crate's `src/`) owns storage access ([`device`]), the shared copy engine
//! ([`copy`]), region bookkeeping and the persistent dirty log ([`region`]), units ([`units`]),
//! errors ([`error`]) and the on-disk codec every persistent structure is built from
//! ([`format`]); [`target`] and [`registry`] are the seam to the targets, which live under
//! `targets/` and are compiled in as modules (see the README's architecture section for why).
//! The core names no target: `main` builds the [`registry::Registry`] from `targets`. The ublk
//! front end ([`ublk`], the only user of libublk), the daemon ([`daemon`]), the control socket
//! protocol ([`control`]) and the CLI ([`cli`]) sit on top.
pub mod cli;
pub mod control;
pub mod copy;
pub mod daemon;
pub mod device;
pub mod error;
pub mod format;
pub mod region;
pub mod registry;
pub mod target;
pub mod task;
pub mod ublk;
pub mod units;
pub mod watch;

#[path = "../targets/mod.rs"]
pub mod targets;
