//! The shape of the code, checked as tests so that it stays: no function outside the tests is
//! longer than [`MAX_FN_LINES`], and the core (`src/`) names no target outside `main.rs`, the
//! one place that builds the registry of targets.
//!
//! Functions are found by a line scanner, not a parser: a line that starts a `fn` item, then
//! braces counted with string, character literals and comments removed. That is exact for
//! rustfmt-formatted code, which CI enforces. `#[cfg(test)]` modules and `tests.rs` files are
//! tests and are left out.

use std::path::{Path, PathBuf};

/// The longest function allowed outside the tests, in lines from `fn` to its closing brace.
const MAX_FN_LINES: usize = 80;

/// The `.rs` files under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `line` without its string and character literals and its `//` comment.
fn code_only(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(s) = chars.next() {
                    match s {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            // A character literal ('{', '\''), not a lifetime ('a).
            '\'' if matches!(chars.clone().nth(1), Some('\'')) => {
                chars.nth(1);
            }
            '\'' if chars.peek() == Some(&'\\') => {
                chars.by_ref().take_while(|&s| s != '\'').count();
                chars.next();
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// Whether `line` starts a function item (with a body or not).
fn starts_fn(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    Some(name.split(['(', '<']).next().unwrap_or(name))
}

/// From line `start`, the index of the line where the item opened there closes (its braces
/// balance), or `None` for an item without a body.
fn item_end(lines: &[String], start: usize) -> Option<usize> {
    let mut depth = 0i64;
    let mut opened = false;
    for (i, line) in lines.iter().enumerate().skip(start) {
        if !opened && line.contains(';') && !line.contains('{') {
            return None;
        }
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if opened && depth <= 0 {
            return Some(i);
        }
    }
    panic!("unbalanced braces from line {}", start + 1);
}

/// The functions of `text` longer than `limit` lines, as `name (N lines, line L)`.
fn long_functions(text: &str, limit: usize) -> Vec<String> {
    let lines: Vec<String> = text.lines().map(code_only).collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" {
            // The test module (or item) that follows is skipped whole.
            i = item_end(&lines, i + 1).map_or(i + 1, |end| end + 1);
            continue;
        }
        let name = starts_fn(&lines[i]);
        if let Some((name, end)) = name.and_then(|name| Some((name, item_end(&lines, i)?))) {
            let length = end - i + 1;
            if length > limit {
                found.push(format!("{name} ({length} lines, line {})", i + 1));
            }
        }
        i += 1;
    }
    found
}

#[test]
fn the_scanner_measures_functions() {
    let text = "fn short() {\n    let s = \"}}\";\n    let c = '{';\n}\n\
                #[cfg(test)]\nmod tests {\n    fn long() {\n\n\n\n    }\n}\n\
                pub(crate) fn long<'a>(x: &'a str) {\n    // }\n\n\n}\n";
    // `short` is 4 lines, the test module's `long` is skipped, the last `long` is 5 lines.
    assert!(
        long_functions(text, 5).is_empty(),
        "{:?}",
        long_functions(text, 5)
    );
    assert_eq!(long_functions(text, 4), ["long (5 lines, line 13)"]);
}

#[test]
fn no_function_outside_the_tests_is_too_long() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut too_long = Vec::new();
    for file in [
        rust_files(&root.join("src")),
        rust_files(&root.join("targets")),
    ]
    .concat()
    {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        for found in long_functions(&text, MAX_FN_LINES) {
            let path = file.strip_prefix(root).expect("in the repo");
            too_long.push(format!("{}: {found}", path.display()));
        }
    }
    assert!(
        too_long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        too_long.join("\n")
    );
}

#[test]
fn the_core_names_no_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let named: Vec<String> = rust_files(&root.join("src"))
        .into_iter()
        .filter(|file| !file.ends_with("src/main.rs"))
        .flat_map(|file| {
            let text = std::fs::read_to_string(&file).expect("read source");
            let path = file.strip_prefix(root).expect("in the repo").to_owned();
            text.lines()
                .enumerate()
                .filter(|(_, line)| line.contains("targets::"))
                .map(|(n, line)| format!("{}:{}: {}", path.display(), n + 1, line.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        named.is_empty(),
        "the core names a target:\n{}",
        named.join("\n")
    );
}
