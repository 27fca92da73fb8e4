//! What the ublk driver offers: its feature mask (`UBLK_U_CMD_GET_FEATURES`, sent by libublk)
//! decoded into named features, what ublkdm uses of them, and the data path of a device.
//!
//! Features are detected, never assumed: [`detect`] asks the driver, [`device_flags`] picks a
//! new device's `UBLK_F_*` flags from what it answered, and [`data_path`] reads what a device
//! was granted. The decoding is a pure function of the mask ([`Features::rows`]), so it is
//! tested without a driver.
//!
//! Invariants:
//! - [`FEATURES`] names each bit at most once, in ascending bit order (checked by a test);
//! - a bit the table does not name is kept as unknown ([`Features::unknown_bits`]), never
//!   dropped: a newer kernel's features still show;
//! - a device always asks for `USER_RECOVERY` (serving refuses a device without it) and asks
//!   for any other flag only when the driver offered it.

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
    pub used: bool,
    pub about: &'static str,
}

const fn feature(
    bit: u8,
    name: &'static str,
    since: &'static str,
    used: bool,
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
/// 6.15). `used`: ublkdm asks for it on every device whenever the driver offers it.
#[rustfmt::skip]
pub const FEATURES: [FeatureInfo; 20] = [
    feature(0, "SUPPORT_ZERO_COPY", "6.15", false, "zero copy by explicit buffer registration"),
    feature(1, "URING_CMD_COMP_IN_TASK", "6.0", false, "commands completed in task context (the kernel sets it)"),
    feature(2, "NEED_GET_DATA", "6.0", false, "write data fetched by a second command (legacy)"),
    feature(3, "USER_RECOVERY", "6.1", true, "a dead daemon leaves the device QUIESCED for 'ublkdm recover'"),
    feature(4, "USER_RECOVERY_REISSUE", "6.1", false, "requests in flight at a crash are sent again"),
    feature(5, "UNPRIVILEGED_DEV", "6.2", false, "devices created by unprivileged users"),
    feature(6, "CMD_IOCTL_ENCODE", "6.4", false, "ioctl-encoded command opcodes (the kernel sets it)"),
    feature(7, "USER_COPY", "6.5", true, "request data read and written with pread/pwrite on /dev/ublkcN"),
    feature(8, "ZONED", "6.6", false, "zoned block devices"),
    feature(9, "USER_RECOVERY_FAIL_IO", "6.13", false, "I/O fails at once while the daemon is away"),
    feature(10, "UPDATE_SIZE", "6.16", false, "online resize of a live device"),
    feature(11, "AUTO_BUF_REG", "6.16", false, "zero copy with automatic buffer registration"),
    feature(12, "QUIESCE", "6.16", false, "quiesce a live device (daemon upgrade)"),
    feature(13, "PER_IO_DAEMON", "6.16", false, "several threads serve one queue"),
    feature(14, "BUF_REG_OFF_DAEMON", "6.16", false, "buffers registered from any thread"),
    feature(15, "BATCH_IO", "7.0", false, "requests fetched and committed in batches"),
    feature(16, "INTEGRITY", "7.0", false, "block integrity metadata"),
    feature(17, "SAFE_STOP_DEV", "7.0", false, "stop refused while the device is open"),
    feature(18, "NO_AUTO_PART_SCAN", "7.0", false, "no partition scan when the device starts"),
    feature(19, "SHMEM_ZC", "7.1", false, "zero copy through registered shared memory"),
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

/// The flags a new device asks for, given the driver's features (`None`: a driver without
/// GET_FEATURES, before Linux 6.5, which has no user copy either).
pub fn device_flags(features: Option<&Features>) -> u64 {
    let recovery = u64::from(sys::UBLK_F_USER_RECOVERY);
    let optional = FEATURES
        .iter()
        .filter(|f| f.used)
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

    /// Every known feature, offered or not, in bit order.
    pub fn rows(&self) -> Vec<FeatureRow> {
        FEATURES
            .iter()
            .map(|&info| {
                let offered = self.offers(1u64 << info.bit);
                FeatureRow {
                    info,
                    offered,
                    used: offered && info.used,
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
    /// what a new device asks for and its data path.
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
        let flags = device_flags(Some(self));
        serde_json::json!({
            "kernel": kernel,
            "get_features": true,
            "mask": self.mask,
            "mask_hex": format!("{:#x}", self.mask),
            "features": rows,
            "unknown_bits": self.unknown_bits(),
            "device_flags": Features::names(flags),
            "data_path": data_path(flags),
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
        assert_eq!(used, ["USER_RECOVERY", "USER_COPY"]);
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
        assert_eq!(device_flags(None), recovery);
        assert_eq!(device_flags(Some(&Features::from_mask(0))), recovery);
        let f = Features::from_mask(MASK_6_12);
        assert_eq!(device_flags(Some(&f)), recovery | user_copy);
        // Zero copy and resize are not used yet, even where offered.
        let f = Features::from_mask(MASK_7_3);
        assert_eq!(device_flags(Some(&f)), recovery | user_copy);
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
    }
}
