//! The `ublkdm` command: see [`ublkdm::cli`] for the commands and docs/exit-codes.md for the
//! exit codes.

fn main() {
    std::process::exit(ublkdm::cli::main());
}
