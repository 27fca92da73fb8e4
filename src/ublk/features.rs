//! What the ublk driver offers: its feature mask (`UBLK_U_CMD_GET_FEATURES`, sent by libublk)
//! decoded into named features, what ublkdm uses of them, and the data path of a device.
//!
//! Features are detected, never assumed: [`detect`] asks the driver, [`device_flags`] picks a
//! new device's `UBLK_F_*` flags from what it answered (zero copy for a device whose target
//! never needs the data, where offered), and [`data_path`] reads what a device was granted. The decoding is a pure function of the mask ([`Features::rows`]), so it is
//! tested without a driver.
//!
//! Invariants:
//! - [`FEATURES`] names each bit at most once, in ascending bit order (checked by a test);
//! - a bit the table does not name is kept as unknown ([`Features::unknown_bits`]), never
//!   dropped: a newer kernel's features still show;
//! - a device always asks for `USER_RECOVERY` (serving refuses a device without it) and asks
//!   for any other flag only when the driver offered it; the zero-copy flags only together.

use libublk::ctrl::UblkCtrl;
use libublk::{sys, UblkFlags};

use crate::error::{Error, ErrorKind, Result};

/// One `UBLK_F_*` bit: its name (without `UBLK_F_`), the first kernel that has it, whether
/// ublkdm uses it when offered, and what it gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureInfo {
    pub bit: u8,
    pub name: &'static str,
    pub since: &'static str,
    pub used: Use,
    pub about: &'static str,
}

/// Which devices ask for a feature the driver offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Never,
    /// Every device.
    Always,
    /// Zero-copy devices: a target that never needs the data (`Target::zero_copy`), not
    /// added with `--copy`, on a driver that offers both zero-copy bits.
    ZeroCopy,
    /// Not a device flag: a command the daemon sends to a live device when asked (online
    /// resize, `ublkdm resize`), refused where not offered.
    Command,
}

use Use::{Always, Command, Never, ZeroCopy};

const fn feature(
    bit: u8,
    name: &'static str,
    since: &'static str,
    used: Use,
    about: &'static str,
) -> FeatureInfo {
    FeatureInfo {
        bit,
        name,
        since,
        used,
        about,
    }
}

/// Every feature bit ublkdm knows, in bit order. `since` is the first mainline kernel whose
/// driver offers the bit (zero copy's flag is older, but 6.12 does not offer it: it works from
/// 6.15). `used`: which devices ask for it whenever the driver offers it ([`Use`]).
#[rustfmt::skip]
pub const FEATURES: [FeatureInfo; 20] = [
    feature(0, "SUPPORT_ZERO_COPY", "6.15", ZeroCopy, "zero copy (with AUTO_BUF_REG)"),
    feature(1, "URING_CMD_COMP_IN_TASK", "6.0", Never, "commands completed in task context (the kernel sets it)"),
    feature(2, "NEED_GET_DATA", "6.0", Never, "write data fetched by a second command (legacy)"),
    feature(3, "USER_RECOVERY", "6.1", Always, "a dead daemon leaves the device QUIESCED for 'ublkdm recover'"),
    feature(4, "USER_RECOVERY_REISSUE", "6.1", Never, "requests in flight at a crash are sent again"),
    feature(5, "UNPRIVILEGED_DEV", "6.2", Never, "devices created by unprivileged users"),
    feature(6, "CMD_IOCTL_ENCODE", "6.4", Never, "ioctl-encoded command opcodes (the kernel sets it)"),
    feature(7, "USER_COPY", "6.5", Always, "request data read and written with pread/pwrite on /dev/ublkcN"),
    feature(8, "ZONED", "6.6", Never, "zoned block devices"),
    feature(9, "USER_RECOVERY_FAIL_IO", "6.13", Never, "I/O fails at once while the daemon is away"),
    feature(10, "UPDATE_SIZE", "6.16", Command, "online resize of a live device ('ublkdm resize', 'mirror grow')"),
    feature(11, "AUTO_BUF_REG", "6.16", ZeroCopy, "zero copy by automatic buffer registration (targets that never read the data)"),
    feature(12, "QUIESCE", "6.16", Never, "quiesce a live device (daemon upgrade)"),
    feature(13, "PER_IO_DAEMON", "6.16", Never, "several threads serve one queue"),
    feature(14, "BUF_REG_OFF_DAEMON", "6.16", Never, "buffers registered from any thread"),
    feature(15, "BATCH_IO", "7.0", Never, "requests fetched and committed in batches"),
    feature(16, "INTEGRITY", "7.0", Never, "block integrity metadata"),
    feature(17, "SAFE_STOP_DEV", "7.0", Never, "stop refused while the device is open"),
    feature(18, "NO_AUTO_PART_SCAN", "7.0", Never, "no partition scan when the device starts"),
    feature(19, "SHMEM_ZC", "7.1", Never, "zero copy through registered shared memory"),
];

/// How a device's request data moves between the kernel and the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// The kernel copies each request's data to or from the daemon's buffers.
    #[default]
    Copy,
    /// The daemon's I/O uses the request's own pages, registered on its queue ring.
    ZeroCopy,
}

impl DataPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Copy => "copy",
            DataPath::ZeroCopy => "zero-copy",
        }
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The data path of a device that was granted `flags`: zero copy only if it was granted.
pub fn data_path(flags: u64) -> DataPath {
    let zero_copy = u64::from(sys::UBLK_F_SUPPORT_ZERO_COPY) | u64::from(sys::UBLK_F_AUTO_BUF_REG);
    if flags & zero_copy != 0 {
        DataPath::ZeroCopy
    } else {
        DataPath::Copy
    }
}

/// The data path of a device granted `flags`, saying how copy mode copies: `copy (user copy)`
/// or `copy (a buffer per tag)`; `zero-copy`.
pub fn data_path_text(flags: u64) -> String {
    match data_path(flags) {
        DataPath::Copy if flags & u64::from(sys::UBLK_F_USER_COPY) != 0 => {
            "copy (user copy)".into()
        }
        DataPath::Copy => "copy (a buffer per tag)".into(),
        path => path.to_string(),
    }
}

/// The flags of zero copy: libublk's automatic buffer registration needs both.
pub const ZERO_COPY_FLAGS: u64 =
    sys::UBLK_F_SUPPORT_ZERO_COPY as u64 | sys::UBLK_F_AUTO_BUF_REG as u64;

/// The flags a new device asks for, given the driver's features (`None`: a driver without
/// GET_FEATURES, before Linux 6.5, which has no user copy either); `zero_copy`: whether the
/// device would serve in zero copy, which it does when the driver offers it. A zero-copy
/// device keeps user copy (when offered) for the requests that fall back to copy mode.
pub fn device_flags(features: Option<&Features>, zero_copy: bool) -> u64 {
    let recovery = u64::from(sys::UBLK_F_USER_RECOVERY);
    let zero_copy = zero_copy && features.is_some_and(Features::offers_zero_copy);
    let optional = FEATURES
        .iter()
        .filter(|f| f.used == Always || (zero_copy && f.used == ZeroCopy))
        .map(|f| 1u64 << f.bit)
        .filter(|&flag| features.is_some_and(|f| f.offers(flag)))
        .fold(0, |acc, flag| acc | flag);
    recovery | optional
}

/// One row of `ublkdm features`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureRow {
    pub info: FeatureInfo,
    pub offered: bool,
    /// Offered, and ublkdm uses it.
    pub used: bool,
}

/// A driver's feature mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    mask: u64,
}

impl Features {
    pub fn from_mask(mask: u64) -> Features {
        Features { mask }
    }

    pub fn mask(&self) -> u64 {
        self.mask
    }

    /// Whether every bit of `flag` is offered.
    pub fn offers(&self, flag: u64) -> bool {
        self.mask & flag == flag
    }

    /// Whether zero copy by automatic buffer registration is offered (Linux 6.16+).
    pub fn offers_zero_copy(&self) -> bool {
        self.offers(ZERO_COPY_FLAGS)
    }

    /// Every known feature, offered or not, in bit order.
    pub fn rows(&self) -> Vec<FeatureRow> {
        FEATURES
            .iter()
            .map(|&info| {
                let offered = self.offers(1u64 << info.bit);
                let used = match info.used {
                    Never => false,
                    Always | Command => true,
                    ZeroCopy => self.offers_zero_copy(),
                };
                FeatureRow {
                    info,
                    offered,
                    used: offered && used,
                }
            })
            .collect()
    }

    /// The bits offered that [`FEATURES`] does not name, ascending.
    pub fn unknown_bits(&self) -> Vec<u8> {
        (0..64u8)
            .filter(|&bit| self.mask & (1u64 << bit) != 0)
            .filter(|&bit| !FEATURES.iter().any(|f| f.bit == bit))
            .collect()
    }

    /// The names of `flags`' known bits, in bit order (for logs and `features`).
    pub fn names(flags: u64) -> Vec<&'static str> {
        FEATURES
            .iter()
            .filter(|f| flags & (1u64 << f.bit) != 0)
            .map(|f| f.name)
            .collect()
    }

    /// `ublkdm features --json`: the kernel, the mask, every known feature, the unknown bits,
    /// what a new device asks for and its data path, in copy mode and where zero copy is
    /// wanted (a linear device).
    pub fn to_json(&self, kernel: &str) -> serde_json::Value {
        let rows: Vec<_> = self
            .rows()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "bit": r.info.bit,
                    "name": r.info.name,
                    "since": r.info.since,
                    "offered": r.offered,
                    "used": r.used,
                    "about": r.info.about,
                })
            })
            .collect();
        let flags = device_flags(Some(self), false);
        let zc_flags = device_flags(Some(self), true);
        serde_json::json!({
            "kernel": kernel,
            "get_features": true,
            "mask": self.mask,
            "mask_hex": format!("{:#x}", self.mask),
            "features": rows,
            "unknown_bits": self.unknown_bits(),
            "device_flags": Features::names(flags),
            "data_path": data_path(flags),
            "zero_copy_device_flags": Features::names(zc_flags),
            "zero_copy_data_path": data_path(zc_flags),
        })
    }
}

/// Asks the driver for its features (GET_FEATURES, Linux 6.5+) on this thread, whose control
/// ring libublk makes if it has none. `Ok(None)`: the driver does not know the command.
pub(super) fn query_here() -> Result<Option<Features>> {
    let ctrl = UblkCtrl::new(None, -1, 0, 0, 0, 0, 0, UblkFlags::empty())
        .map_err(|e| super::ublk_error("cannot open the ublk driver".into(), e))?;
    Ok(ctrl.get_driver_features().map(Features::from_mask))
}

/// Refuses (Unsupported, exit 5) unless the driver can resize a live device
/// (`UBLK_F_UPDATE_SIZE`, Linux 6.16+); asked on this thread, which needs a control ring.
pub(super) fn require_resize_here() -> Result<()> {
    let offered = query_here()?.is_some_and(|f| f.offers(u64::from(sys::UBLK_F_UPDATE_SIZE)));
    if offered {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "this kernel's ublk driver cannot resize a live device (UPDATE_SIZE, Linux 6.16 or \
             later; this is {}); nothing was changed",
            kernel_release()
        ),
    ))
}

/// The driver's features, for the CLI: exit 5 without a driver or without GET_FEATURES.
pub fn detect() -> Result<Features> {
    super::require_driver()?;
    let answer = super::on_scratch_thread(
        super::QUERY_TIMEOUT,
        "asking the ublk driver for its features".into(),
        query_here,
    )?;
    answer.ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "the ublk driver does not answer GET_FEATURES (Linux 6.5 or later has it)",
        )
    })
}

/// The running kernel's release (`uname -r`), or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's 6.12 driver reports (measured in the VM): bits 1..=8, no zero copy.
    const MASK_6_12: u64 = 0x1fe;
    /// What Debian's 7.3 driver reports (measured in the VM): bits 0..=20, 20 unknown to us.
    const MASK_7_3: u64 = 0x1f_ffff;

    fn offered(mask: u64, name: &str) -> bool {
        let row = Features::from_mask(mask)
            .rows()
            .into_iter()
            .find(|r| r.info.name == name)
            .expect("known feature");
        row.offered
    }

    #[test]
    fn the_table_names_each_bit_once_in_order_and_matches_the_kernel_header() {
        for pair in FEATURES.windows(2) {
            assert!(pair[0].bit < pair[1].bit, "{:?}", pair);
        }
        let header = [
            (
                "SUPPORT_ZERO_COPY",
                u64::from(sys::UBLK_F_SUPPORT_ZERO_COPY),
            ),
            ("USER_RECOVERY", u64::from(sys::UBLK_F_USER_RECOVERY)),
            ("USER_COPY", u64::from(sys::UBLK_F_USER_COPY)),
            ("UPDATE_SIZE", u64::from(sys::UBLK_F_UPDATE_SIZE)),
            ("AUTO_BUF_REG", u64::from(sys::UBLK_F_AUTO_BUF_REG)),
            ("QUIESCE", u64::from(sys::UBLK_F_QUIESCE)),
            ("BATCH_IO", u64::from(sys::UBLK_F_BATCH_IO)),
        ];
        for (name, flag) in header {
            assert_eq!(Features::names(flag), [name]);
        }
    }

    #[test]
    fn a_6_12_mask_offers_user_copy_but_no_zero_copy_or_resize() {
        assert!(!offered(MASK_6_12, "SUPPORT_ZERO_COPY"));
        assert!(offered(MASK_6_12, "USER_RECOVERY"));
        assert!(offered(MASK_6_12, "USER_COPY"));
        assert!(offered(MASK_6_12, "ZONED"));
        assert!(!offered(MASK_6_12, "USER_RECOVERY_FAIL_IO"));
        assert!(!offered(MASK_6_12, "AUTO_BUF_REG"));
        assert!(!offered(MASK_6_12, "UPDATE_SIZE"));
        assert!(Features::from_mask(MASK_6_12).unknown_bits().is_empty());
    }

    #[test]
    fn a_newer_mask_offers_auto_buf_reg_update_size_and_batch_io() {
        for name in [
            "AUTO_BUF_REG",
            "UPDATE_SIZE",
            "QUIESCE",
            "BATCH_IO",
            "SHMEM_ZC",
        ] {
            assert!(offered(MASK_7_3, name), "{name}");
        }
        assert_eq!(Features::from_mask(MASK_7_3).unknown_bits(), [20]);
    }

    #[test]
    fn only_offered_features_ublkdm_uses_are_used() {
        let rows = Features::from_mask(MASK_7_3).rows();
        let used: Vec<_> = rows
            .iter()
            .filter(|r| r.used)
            .map(|r| r.info.name)
            .collect();
        assert_eq!(
            used,
            [
                "SUPPORT_ZERO_COPY",
                "USER_RECOVERY",
                "USER_COPY",
                "UPDATE_SIZE",
                "AUTO_BUF_REG"
            ]
        );
        let rows = Features::from_mask(MASK_6_12).rows();
        let used: Vec<_> = rows
            .iter()
            .filter(|r| r.used)
            .map(|r| r.info.name)
            .collect();
        assert_eq!(used, ["USER_RECOVERY", "USER_COPY"]);
        // One zero-copy bit alone is not zero copy.
        let half = Features::from_mask(MASK_6_12 | u64::from(sys::UBLK_F_SUPPORT_ZERO_COPY));
        assert!(!half.rows()[0].used);
        let none = Features::from_mask(0).rows();
        assert_eq!(none.len(), FEATURES.len());
        assert!(none.iter().all(|r| !r.offered && !r.used));
    }

    #[test]
    fn unknown_bits_are_kept() {
        let features = Features::from_mask(MASK_6_12 | 1 << 20 | 1 << 63);
        assert_eq!(features.unknown_bits(), [20, 63]);
        assert_eq!(Features::names(1 << 20), Vec::<&str>::new());
    }

    #[test]
    fn a_device_asks_for_recovery_always_and_user_copy_only_when_offered() {
        let recovery = u64::from(sys::UBLK_F_USER_RECOVERY);
        let user_copy = u64::from(sys::UBLK_F_USER_COPY);
        assert_eq!(device_flags(None, false), recovery);
        assert_eq!(device_flags(None, true), recovery);
        assert_eq!(device_flags(Some(&Features::from_mask(0)), true), recovery);
        let f = Features::from_mask(MASK_6_12);
        assert_eq!(device_flags(Some(&f), false), recovery | user_copy);
        assert_eq!(
            device_flags(Some(&f), true),
            recovery | user_copy,
            "not offered"
        );
        // Resize is a command, never a device flag; zero copy only where wanted.
        let f = Features::from_mask(MASK_7_3);
        assert_eq!(device_flags(Some(&f), false), recovery | user_copy);
        assert_eq!(
            device_flags(Some(&f), true),
            recovery | user_copy | ZERO_COPY_FLAGS
        );
        assert_eq!(data_path(device_flags(Some(&f), true)), DataPath::ZeroCopy);
        let half = Features::from_mask(MASK_6_12 | u64::from(sys::UBLK_F_AUTO_BUF_REG));
        assert_eq!(device_flags(Some(&half), true), recovery | user_copy);
    }

    #[test]
    fn the_data_path_follows_the_granted_flags() {
        assert_eq!(data_path(0), DataPath::Copy);
        assert_eq!(data_path(u64::from(sys::UBLK_F_USER_COPY)), DataPath::Copy);
        assert_eq!(
            data_path(u64::from(sys::UBLK_F_AUTO_BUF_REG)),
            DataPath::ZeroCopy
        );
        assert_eq!(DataPath::ZeroCopy.to_string(), "zero-copy");
        let user_copy = u64::from(sys::UBLK_F_USER_COPY);
        assert_eq!(data_path_text(user_copy), "copy (user copy)");
        assert_eq!(data_path_text(0), "copy (a buffer per tag)");
        assert_eq!(serde_json::to_value(DataPath::Copy).unwrap(), "copy");
    }

    #[test]
    fn the_json_lists_every_feature_and_the_device_flags() {
        let json = Features::from_mask(MASK_6_12).to_json("6.12.0");
        assert_eq!(json["mask"], MASK_6_12);
        assert_eq!(json["mask_hex"], "0x1fe");
        assert_eq!(json["features"].as_array().unwrap().len(), FEATURES.len());
        assert_eq!(json["features"][7]["name"], "USER_COPY");
        assert_eq!(json["features"][7]["used"], true);
        assert_eq!(
            json["device_flags"],
            serde_json::json!(["USER_RECOVERY", "USER_COPY"])
        );
        assert_eq!(json["data_path"], "copy");
        assert_eq!(json["zero_copy_data_path"], "copy", "not offered by 6.12");
        let json = Features::from_mask(MASK_7_3).to_json("7.3.4");
        assert_eq!(json["data_path"], "copy");
        assert_eq!(json["zero_copy_data_path"], "zero-copy");
        assert_eq!(
            json["zero_copy_device_flags"],
            serde_json::json!([
                "SUPPORT_ZERO_COPY",
                "USER_RECOVERY",
                "USER_COPY",
                "AUTO_BUF_REG"
            ])
        );
    }
}
