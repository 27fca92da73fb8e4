//! The `ublkdm` command: see [`ublkdm::cli`] for the commands and docs/exit-codes.md for the
//! exit codes. This is where the targets meet the core: the registry of target kinds is built
//! here and handed to the CLI (and through it to the daemon), which name no target.

fn main() {
    let registry = ublkdm::targets::registry();
    std::process::exit(ublkdm::cli::main(&registry));
}
