//! `ublkdm resize ID [SIZE]`: online resize through the device's daemon.
//!
//! The daemon decides (it asks the driver whether a live device can be resized, grows the
//! target, tells the kernel); the CLI refuses only what it can see alone: a size that is not
//! whole sectors, and a child's device (a snapshot keeps its size: the origin is resized).

use super::*;
use crate::target::ChildSpec;
use crate::units::SectorCount;

/// SIZE as bytes, which must be whole 512-byte sectors (the daemon then checks the device's
/// logical block).
pub(super) fn parse_resize(text: &str) -> std::result::Result<u64, String> {
    let bytes = crate::units::parse_size_bytes(text)?;
    if bytes == 0 || SectorCount::from_bytes_exact(bytes).is_none() {
        return Err(format!(
            "size '{text}' is not a whole, non-zero number of 512-byte sectors"
        ));
    }
    Ok(bytes)
}

pub(super) fn resize(id: u32, size: Option<u64>, json: bool) -> Result<()> {
    init_cli_logging();
    let info = ublk::query(id)?;
    if let Some(ChildSpec { parent, kind, name }) =
        info.spec.as_ref().and_then(TargetSpec::as_child)
    {
        return Err(Error::invalid(format!(
            "device {id} is {kind} '{name}' of device {parent}, which keeps its size: resize \
             device {parent}"
        )));
    }
    let size_sectors = size.and_then(SectorCount::from_bytes_exact).map(|n| n.0);
    let reply = control::request(id, Command::Resize { size_sectors })?;
    if json {
        println!("{reply}");
        return Ok(());
    }
    println!("{}", resized_line(id, &reply));
    Ok(())
}

/// `device 0 (/dev/ublkb0) grown from 1 GiB to 2 GiB`, or `... stays at 1 GiB`.
fn resized_line(id: u32, reply: &serde_json::Value) -> String {
    let size = |key: &str| {
        reply[key].as_u64().map_or_else(
            || "?".to_owned(),
            |n| pow2_size_text(SectorCount(n).to_bytes()),
        )
    };
    let device = text(&reply["device"]);
    let (old, new) = (size("old_size_sectors"), size("size_sectors"));
    if old == new {
        format!("device {id} ({device}) stays at {new}")
    } else {
        format!("device {id} ({device}) grown from {old} to {new}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_whole_sectors() {
        assert_eq!(parse_resize("2G"), Ok(2 << 30));
        assert_eq!(parse_resize("1536M"), Ok(1536 << 20));
        assert!(parse_resize("0").is_err());
        assert!(parse_resize("1000").is_err());
        assert!(parse_resize("2X").is_err());
    }

    #[test]
    fn the_reply_reads_in_one_line() {
        let reply = serde_json::json!({
            "old_size_sectors": 2097152, "size_sectors": 3145728, "device": "/dev/ublkb0"
        });
        assert_eq!(
            resized_line(0, &reply),
            "device 0 (/dev/ublkb0) grown from 1 GiB to 1536 MiB"
        );
        let same = serde_json::json!({
            "old_size_sectors": 8, "size_sectors": 8, "device": "/dev/ublkb1"
        });
        assert_eq!(
            resized_line(1, &same),
            "device 1 (/dev/ublkb1) stays at 4 KiB"
        );
    }
}
