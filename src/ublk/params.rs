//! The kernel parameters of a ublk device, derived from the target's [`DeviceInfo`].
//!
//! Pure functions, so the mapping is unit tested without a kernel. The kernel rejects (at
//! SET_PARAMS) a logical block outside 512..=4096 bytes, a physical block smaller than the
//! logical one, and `max_sectors` above the io buffer; those are refused here first, with a
//! message that names the target. Discard and write-zeroes parameters appear only when the
//! target supports them, because the kernel sends whatever the parameters allow.

use libublk::sys;

use crate::device::DeviceInfo;
use crate::error::{Error, Result};
use crate::units::SECTOR_SHIFT;

/// The largest discard the kernel may send in one request: 1 GiB, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The largest write-zeroes the kernel may send in one request: 1 GiB, in sectors.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// The largest logical block ublk accepts (the kernel's page size on x86).
const MAX_LOGICAL_BLOCK_BYTES: u32 = 4096;
/// The largest physical block we advertise; larger values are clamped (a hint only).
const MAX_PHYSICAL_BLOCK_BYTES: u32 = 64 << 10;

/// The parameters for a device that serves `info` with io buffers of `io_buf_bytes`.
pub fn device_params(info: &DeviceInfo, io_buf_bytes: u32) -> Result<sys::ublk_params> {
    let logical = block_shift(info.logical_block_bytes, 512, MAX_LOGICAL_BLOCK_BYTES)
        .ok_or_else(|| bad_geometry(info, "logical block size", info.logical_block_bytes))?;
    let physical_bytes = info
        .physical_block_bytes
        .clamp(info.logical_block_bytes, MAX_PHYSICAL_BLOCK_BYTES);
    let physical = block_shift(
        physical_bytes,
        info.logical_block_bytes,
        MAX_PHYSICAL_BLOCK_BYTES,
    )
    .ok_or_else(|| bad_geometry(info, "physical block size", info.physical_block_bytes))?;
    if io_buf_bytes % info.logical_block_bytes != 0 || io_buf_bytes == 0 {
        return Err(Error::invalid(format!(
            "io buffer of {io_buf_bytes} bytes is not a whole number of blocks"
        )));
    }
    if info.size.is_zero() {
        return Err(Error::invalid(format!("{} is empty", info.name)));
    }
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs: attrs(info),
            logical_bs_shift: logical,
            physical_bs_shift: physical,
            io_min_shift: physical,
            io_opt_shift: physical,
            max_sectors: io_buf_bytes >> SECTOR_SHIFT,
            dev_sectors: info.size.0,
            ..Default::default()
        },
        ..Default::default()
    };
    if info.discard || info.write_zeroes {
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_granularity: physical_bytes,
            max_discard_sectors: if info.discard { MAX_DISCARD_SECTORS } else { 0 },
            max_write_zeroes_sectors: if info.write_zeroes {
                MAX_WRITE_ZEROES_SECTORS
            } else {
                0
            },
            // The kernel supports single-segment discards only.
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    Ok(params)
}

/// The basic attributes: what the block layer must know about caching and the medium.
fn attrs(info: &DeviceInfo) -> u32 {
    let mut attrs = 0;
    if info.volatile_cache {
        // The kernel then sends FLUSH requests, which the target must honour.
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
    }
    if info.fua {
        // Without it the block layer turns a FUA write into a write plus a flush.
        attrs |= sys::UBLK_ATTR_FUA;
    }
    if info.rotational {
        attrs |= sys::UBLK_ATTR_ROTATIONAL;
    }
    attrs
}

/// log2 of `bytes` when it is a power of two in `min..=max`.
fn block_shift(bytes: u32, min: u32, max: u32) -> Option<u8> {
    (bytes.is_power_of_two() && (min..=max).contains(&bytes)).then(|| bytes.trailing_zeros() as u8)
}

fn bad_geometry(info: &DeviceInfo, what: &str, value: u32) -> Error {
    Error::invalid(format!(
        "{}: {what} of {value} bytes cannot be served through ublk",
        info.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::SectorCount;

    fn info() -> DeviceInfo {
        DeviceInfo {
            name: "test".into(),
            size: SectorCount(1 << 20),
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            discard: false,
            write_zeroes: false,
            volatile_cache: true,
            fua: false,
            rotational: false,
        }
    }

    #[test]
    fn basic_params_follow_the_target() {
        let p = device_params(&info(), 512 << 10).expect("params");
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.dev_sectors, 1 << 20);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE);
    }

    #[test]
    fn discard_params_only_when_supported() {
        let mut i = info();
        i.write_zeroes = true;
        i.fua = true;
        let p = device_params(&i, 512 << 10).expect("params");
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(p.discard.max_discard_sectors, 0);
        assert_eq!(p.discard.max_write_zeroes_sectors, MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
    }

    #[test]
    fn impossible_geometry_is_refused() {
        let mut i = info();
        i.logical_block_bytes = 8192;
        i.physical_block_bytes = 8192;
        assert!(device_params(&i, 512 << 10).is_err());
        let mut i = info();
        i.logical_block_bytes = 1000;
        assert!(device_params(&i, 512 << 10).is_err());
    }
}
