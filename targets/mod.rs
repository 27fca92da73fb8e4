//! The targets, compiled into the library as modules (see the README's architecture section):
//! each lives in its own folder and owns its spec, its `add` arguments, its commands and its
//! [`TargetKind`](crate::registry::TargetKind), exported as `kind()`.
//!
//! The core never names a target: `main` builds the [`Registry`] here ([`registry`]) and hands
//! it to the CLI and the daemon. Adding a target is a folder and one line in the list below.

use crate::registry::Registry;

/// Declares every target module and registers its kind, in the order `ublkdm add --help`
/// lists them.
macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(pub mod $name;)*

        /// Every target kind this binary serves.
        pub fn registry() -> Registry {
            Registry::new()$(.with($name::kind()))*
        }
    };
}

targets!(linear, mirror, snapshot);

/// What the mirror finds on the machine's block devices (`assemble --scan`), for the tests.
pub fn scan() -> crate::registry::ScanReport {
    registry().scan()
}
