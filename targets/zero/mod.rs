//! The zero target, an example of a target's whole shape in one folder: reads return zeros,
//! writes are dropped (like dm-zero). Its spec is its size; `ublkdm add zero --size 1G` creates
//! one. Nothing is stored anywhere, so it has no commands, no children and nothing to scan.
//!
//! Invariant: every request is checked against the size and the logical block (512 bytes)
//! before it is answered, as a real device would.

use std::io;
use std::sync::Arc;

use clap::{Args, FromArgMatches};

use crate::cli::clap_error;
use crate::device::{AlignedBuf, BlockDevice, DeviceInfo, IoFuture, ReadDone, WriteFlags};
use crate::error::{Error, Result};
use crate::registry::TargetKind;
use crate::target::{Target, TargetSpec};
use crate::units::{Extent, Sector, SectorCount, SECTOR_BYTES, SECTOR_SHIFT};

/// The kind's name.
pub const NAME: &str = "zero";
/// The largest zero device: 1 PiB (a bound, not a need).
pub const MAX_SIZE_BYTES: u64 = 1 << 50;

/// What a zero device is built from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ZeroSpec {
    /// Its size in sectors.
    pub size_sectors: u64,
}

/// `ublkdm add zero --size SIZE`.
#[derive(Debug, Args)]
pub struct AddZero {
    /// The device's size, e.g. 1G (a whole number of 512-byte sectors).
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size_bytes)]
    pub size: u64,
}

/// A device of zeros that drops writes.
pub struct Zero {
    info: DeviceInfo,
}

impl Zero {
    /// A zero device of `size` (at least one sector, at most [`MAX_SIZE_BYTES`]).
    pub fn new(size: SectorCount) -> Result<Zero> {
        let bytes = size.0.checked_mul(SECTOR_BYTES);
        if size.0 == 0 || bytes.is_none_or(|b| b > MAX_SIZE_BYTES) {
            return Err(Error::invalid(format!(
                "a zero device is 1 sector to {} bytes",
                MAX_SIZE_BYTES
            )));
        }
        let info = DeviceInfo {
            name: format!("zero ({} sectors)", size.0),
            size,
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            discard: true,
            write_zeroes: true,
            volatile_cache: false,
            fua: true,
            rotational: false,
        };
        Ok(Zero { info })
    }

    fn ready(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        Box::pin(std::future::ready(self.info.check_extent(extent)))
    }
}

impl BlockDevice for Zero {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: Sector, mut buf: AlignedBuf) -> IoFuture<ReadDone> {
        let checked = self.info.check_extent(Extent::new(offset, buf.sectors()));
        if checked.is_ok() {
            buf.as_mut_slice().fill(0);
        }
        Box::pin(std::future::ready((checked, buf)))
    }

    fn write(
        &self,
        offset: Sector,
        buf: Arc<AlignedBuf>,
        _flags: WriteFlags,
    ) -> IoFuture<io::Result<()>> {
        self.ready(Extent::new(offset, buf.sectors()))
    }

    fn flush(&self) -> IoFuture<io::Result<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.ready(extent)
    }

    fn write_zeroes(&self, extent: Extent) -> IoFuture<io::Result<()>> {
        self.ready(extent)
    }
}

impl Target for Zero {
    fn kind(&self) -> &'static str {
        NAME
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "size_sectors": self.info.size.0 })
    }
}

/// The zero target's [`TargetKind`].
pub struct ZeroKind;

/// The kind, for the registry.
pub fn kind() -> Box<dyn TargetKind> {
    Box::new(ZeroKind)
}

impl TargetKind for ZeroKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn add_command(&self) -> clap::Command {
        AddZero::augment_args(
            clap::Command::new(NAME).about("A device that reads zeros and drops writes."),
        )
    }

    fn add_spec(&self, args: &clap::ArgMatches) -> Result<TargetSpec> {
        let args = AddZero::from_arg_matches(args).map_err(clap_error)?;
        if args.size % SECTOR_BYTES != 0 {
            return Err(Error::invalid(format!(
                "size {} is not a whole number of sectors",
                args.size
            )));
        }
        let spec = ZeroSpec {
            size_sectors: args.size >> SECTOR_SHIFT,
        };
        Zero::new(SectorCount(spec.size_sectors))?;
        Ok(TargetSpec::new(NAME, &spec))
    }

    fn open(&self, spec: &TargetSpec) -> Result<Arc<dyn Target>> {
        let spec: ZeroSpec = spec.parse()?;
        Ok(Arc::new(Zero::new(SectorCount(spec.size_sectors))?))
    }

    fn describe(&self, spec: &TargetSpec) -> String {
        match spec.parse::<ZeroSpec>() {
            Ok(spec) => format!("{NAME} {} sectors", spec.size_sectors),
            Err(_) => format!("{NAME} (unreadable spec)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::reactor;
    use crate::registry::Registry;

    fn registry() -> Registry {
        Registry::new().with(kind())
    }

    #[test]
    fn add_zero_parses_through_the_registry_and_opens() {
        let registry = registry();
        let matches = crate::cli::command(&registry)
            .try_get_matches_from(["ublkdm", "add", "zero", "--size", "1M", "--queues", "2"])
            .expect("parse");
        let (_, add) = matches.subcommand().expect("add");
        let (name, args) = add.subcommand().expect("zero");
        let spec = registry
            .find(name)
            .expect("zero")
            .add_spec(args)
            .expect("spec");
        assert_eq!(
            serde_json::to_string(&spec).expect("json"),
            r#"{"target":"zero","size_sectors":2048}"#
        );
        assert_eq!(registry.describe(Some(&spec)), "zero 2048 sectors");
        let target = registry.open(&spec).expect("open");
        assert_eq!(target.info().size, SectorCount(2048));
        let t = Arc::clone(&target);
        let (read, buf) = reactor::block_on(async move {
            let written = AlignedBuf::from_slice(&[0xa5; 4096]);
            t.write(Sector(8), Arc::new(written), WriteFlags::FUA)
                .await
                .expect("write");
            t.read(Sector(8), AlignedBuf::from_slice(&[0xff; 4096]))
                .await
        });
        read.expect("read");
        assert!(buf.as_slice().iter().all(|&b| b == 0), "reads zeros");
        let beyond =
            reactor::block_on(
                async move { target.read(Sector(2048), AlignedBuf::new(4096)).await.0 },
            );
        assert!(beyond.is_err(), "a read past the end fails");
    }

    #[test]
    fn bad_sizes_are_refused() {
        let registry = registry();
        let add = |size: &str| {
            let Ok(matches) = crate::cli::command(&registry)
                .try_get_matches_from(["ublkdm", "add", "zero", "--size", size])
            else {
                return Err(Error::invalid("clap refused it"));
            };
            let (_, add) = matches.subcommand().expect("add");
            let (_, args) = add.subcommand().expect("zero");
            ZeroKind.add_spec(args)
        };
        assert!(add("0").is_err());
        assert!(add("1000").is_err(), "not whole sectors");
        assert!(add("2048T").is_err(), "over the bound");
        assert!(add("4K").is_ok());
    }
}
