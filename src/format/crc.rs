//! The checksum of every image ublkdm writes: crc32c of the whole image, computed with its
//! 4-byte crc field taken as zero, stored little-endian in that field.
//!
//! Invariant: [`seal`] then [`verify`] of the same bytes holds; any change to a byte outside
//! the field (or to the field) after sealing makes [`verify`] fail, bar a crc collision.

/// Bytes of a crc field.
pub const CRC_BYTES: usize = 4;

/// The crc32c of `image` with the crc field at byte `field` taken as zero.
///
/// Panics when the field is not inside the image (the offset is the owner's constant: a bug).
pub fn compute(image: &[u8], field: usize) -> u32 {
    let end = field + CRC_BYTES;
    assert!(end <= image.len(), "crc field past the image");
    let crc = crc32c::crc32c(&image[..field]);
    let crc = crc32c::crc32c_append(crc, &[0; CRC_BYTES]);
    crc32c::crc32c_append(crc, &image[end..])
}

/// Fills the crc field at byte `field` of `image`.
pub fn seal(image: &mut [u8], field: usize) {
    let crc = compute(image, field);
    image[field..field + CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
}

/// Whether the crc field at byte `field` of `image` matches the image.
pub fn verify(image: &[u8], field: usize) -> bool {
    let stored = u32::from_le_bytes(
        image[field..field + CRC_BYTES]
            .try_into()
            .expect("four bytes"),
    );
    stored == compute(image, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_images_verify_and_damage_does_not() {
        let mut image: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        seal(&mut image, 12);
        assert!(verify(&image, 12));
        // The rule: the field taken as zero, over the whole image.
        let mut zeroed = image.clone();
        zeroed[12..16].fill(0);
        assert_eq!(compute(&image, 12), crc32c::crc32c(&zeroed));
        for at in [0, 12, 15, 16, 4095] {
            let mut bad = image.clone();
            bad[at] ^= 1;
            assert!(!verify(&bad, 12), "byte {at}");
        }
    }
}
