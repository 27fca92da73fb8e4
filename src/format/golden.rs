//! Golden-image support for the format tests: an image written as the runs of bytes that are
//! not zero, so that a test can pin every byte of a 4 KiB image in a few lines.
//!
//! Invariant: [`runs`] is a pure function of the image, so a golden list built once from a
//! known-good encoder fails the test on any change of any byte or of the length.

/// Longest piece of one entry, in bytes (64 hex digits keep a line readable).
const PIECE: usize = 32;
/// Zero bytes shorter than this between two non-zero bytes stay inside one run, so that a
/// small little-endian integer does not split its field into pieces.
const GAP: usize = 16;

/// The non-zero runs of `image` as `(offset, hex)`, each at most [`PIECE`] bytes.
pub fn runs(image: &[u8]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(skip) = image[at..].iter().position(|&b| b != 0) {
        let start = at + skip;
        let mut end = start + 1;
        let mut last_nonzero = start;
        while end < image.len() && end - start < PIECE && end - last_nonzero <= GAP {
            if image[end] != 0 {
                last_nonzero = end;
            }
            end += 1;
        }
        let piece = &image[start..=last_nonzero];
        out.push((start, piece.iter().map(|b| format!("{b:02x}")).collect()));
        at = last_nonzero + 1;
    }
    out
}

/// Asserts that `image` is `len` bytes whose non-zero runs are `expected` (see [`runs`]).
pub fn assert_image(image: &[u8], len: usize, expected: &[(usize, &str)]) {
    let got = runs(image);
    let printed: Vec<String> = got
        .iter()
        .map(|(at, hex)| format!("({at}, \"{hex}\"),"))
        .collect();
    assert_eq!(image.len(), len, "image length");
    let want: Vec<(usize, String)> = expected.iter().map(|&(at, h)| (at, h.to_owned())).collect();
    assert!(
        got == want,
        "image differs from the golden one; it is now:\n{}",
        printed.join("\n")
    );
}

/// The image of `len` bytes whose non-zero runs are `runs`: what a decoder is tested on.
pub fn image(len: usize, runs: &[(usize, &str)]) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for &(at, hex) in runs {
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).expect("ascii hex");
            out[at + i] = u8::from_str_radix(text, 16).expect("hex digits");
        }
    }
    out
}

#[test]
fn runs_split_and_join() {
    let mut bytes = vec![0u8; 128];
    bytes[3] = 1;
    bytes[10] = 2;
    bytes[40] = 0xff;
    bytes[60..100].fill(7);
    let r = runs(&bytes);
    assert_eq!(r[0], (3, "0100000000000002".to_owned()));
    assert_eq!(r[1], (40, "ff".to_owned()));
    assert_eq!(r[2].0, 60);
    assert_eq!(r[2].1.len(), 64);
    assert_eq!(r[3], (92, "0707070707070707".to_owned()));
    assert_eq!(r.len(), 4);
    let pinned: Vec<(usize, &str)> = r.iter().map(|(at, h)| (*at, h.as_str())).collect();
    assert_eq!(image(128, &pinned), bytes);
}
