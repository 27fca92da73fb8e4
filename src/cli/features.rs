//! `ublkdm features`: what this kernel's ublk driver offers and what ublkdm uses of it.

use super::*;
use crate::ublk::Features;

pub(super) fn features(json: bool) -> Result<()> {
    init_cli_logging();
    let features = ublk::detect_features()?;
    let kernel = ublk::kernel_release();
    if json {
        let out = features.to_json(&kernel);
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    for line in feature_lines(&features, &kernel) {
        println!("{line}");
    }
    Ok(())
}

/// The table `features` prints: one row per known feature, then any unknown bits and what a
/// new device asks for.
fn feature_lines(features: &Features, kernel: &str) -> Vec<String> {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut lines = vec![
        format!(
            "ublk driver of Linux {kernel}: features {:#x} (GET_FEATURES)",
            features.mask()
        ),
        format!(
            "{:>3}  {:<22} {:<6} {:<7} {:<6} WHAT",
            "BIT", "FEATURE", "SINCE", "OFFERED", "USED"
        ),
    ];
    for row in features.rows() {
        lines.push(format!(
            "{:>3}  {:<22} {:<6} {:<7} {:<6} {}",
            row.info.bit,
            row.info.name,
            row.info.since,
            yes_no(row.offered),
            yes_no(row.used),
            row.info.about
        ));
    }
    let unknown = features.unknown_bits();
    if !unknown.is_empty() {
        let bits: Vec<_> = unknown.iter().map(u8::to_string).collect();
        lines.push(format!(
            "offered bits unknown to ublkdm: {}",
            bits.join(", ")
        ));
    }
    let flags = ublk::device_flags(Some(features), false);
    lines.push(format!(
        "new devices ask for: {}; data path: {}",
        Features::names(flags).join(", "),
        ublk::data_path(flags)
    ));
    if features.offers_zero_copy() {
        let flags = ublk::device_flags(Some(features), true);
        lines.push(format!(
            "zero-copy devices (unless --copy) ask for: {}; data path: {}",
            Features::names(flags).join(", "),
            ublk::data_path(flags)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_feature_and_says_the_data_path() {
        let lines = feature_lines(&Features::from_mask(0x1fe | 1 << 40), "6.12.0");
        assert_eq!(lines.len(), 2 + ublk::FEATURES.len() + 2);
        assert_eq!(
            lines[0],
            "ublk driver of Linux 6.12.0: features 0x100000001fe (GET_FEATURES)"
        );
        let user_copy = lines.iter().find(|l| l.contains(" USER_COPY ")).unwrap();
        assert!(user_copy.contains(" yes     yes "), "{user_copy}");
        let auto = lines.iter().find(|l| l.contains(" AUTO_BUF_REG ")).unwrap();
        assert!(auto.contains(" no      no "), "{auto}");
        assert!(lines.contains(&"offered bits unknown to ublkdm: 40".to_owned()));
        assert_eq!(
            lines.last().unwrap(),
            "new devices ask for: USER_RECOVERY, USER_COPY; data path: copy"
        );
    }

    #[test]
    fn a_driver_with_zero_copy_adds_the_line_of_zero_copy_targets() {
        let lines = feature_lines(&Features::from_mask(0x1f_ffff), "7.3.4");
        assert_eq!(lines.len(), 2 + ublk::FEATURES.len() + 3);
        let auto = lines.iter().find(|l| l.contains(" AUTO_BUF_REG ")).unwrap();
        assert!(auto.contains(" yes     yes "), "{auto}");
        assert_eq!(
            lines[lines.len() - 2],
            "new devices ask for: USER_RECOVERY, USER_COPY; data path: copy"
        );
        assert_eq!(
            lines.last().unwrap(),
            "zero-copy devices (unless --copy) ask for: SUPPORT_ZERO_COPY, USER_RECOVERY, \
             USER_COPY, AUTO_BUF_REG; data path: zero-copy"
        );
    }
}
