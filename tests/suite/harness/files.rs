//! Files the tests read or write: fixtures, the shipped examples, scratch directories.

use std::path::{Path, PathBuf};

/// `tests/fixtures/<name>` (a path below it, e.g. `binary/dev.yaml`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `tests/fixtures/seeds/<name>`.
pub fn seed_fixture(name: &str) -> PathBuf {
    fixture("seeds").join(name)
}

/// `deploy/examples/<name>`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples")
        .join(name)
}

/// The text of example `name` with each `(from, to)` replaced once; fails when `from` is
/// not in it (the variant would silently be the example).
pub fn example_variant(name: &str, edits: &[(&str, &str)]) -> String {
    let path = example(name);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "{} no longer contains {from:?}: update the test's variant",
            path.display()
        );
        text = text.replacen(from, to, 1);
    }
    text
}

/// A new, empty directory `<prefix>-<ulid>` in cargo's scratch directory for tests.
pub fn scratch_dir(prefix: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}
