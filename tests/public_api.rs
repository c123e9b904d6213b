//! The public API, one item per line, against the committed snapshot `tests/public-api.txt`, so that the public
//! surface changes only on purpose.
//!
//! The test builds the rustdoc JSON of the library with every feature (`cargo rustdoc --lib --all-features ... --
//! --output-format json`, with `RUSTC_BOOTSTRAP=1` for that child process only: JSON output is unstable in rustdoc
//! even on the stable toolchain) into its own target directory, `<target>/tmp/public-api`, so it neither waits for
//! nor invalidates the test build. public-api renders the items; those carrying `#[must_use]` get that prefix here,
//! since public-api renders only `#[non_exhaustive]`, `#[repr]` and the linkage attributes. Blanket impls
//! (`impl<T> From<T> for T` and every dependency's `impl<T> Trait for T`) are left out: they follow the dependency
//! tree, not this crate. Auto-trait impls (`Send`, `Sync`, `Unpin`, the unwind-safety traits) stay: losing one
//! breaks users.
//!
//! After a deliberate change, rewrite the snapshot and review its diff with the change:
//!
//! ```text
//! CREDBROKER_UPDATE_PUBLIC_API=1 cargo test --test public_api
//! git diff tests/public-api.txt
//! ```

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The committed snapshot, relative to the package root.
const SNAPSHOT: &str = "tests/public-api.txt";
/// Set to anything but empty or `0` to rewrite the snapshot instead of comparing with it.
const UPDATE_VAR: &str = "CREDBROKER_UPDATE_PUBLIC_API";
/// The rustdoc JSON format that the pinned public-api (0.52.1, on rustdoc-types 0.57) reads: the format of the
/// stable toolchain, rustc 1.95.
const FORMAT_VERSION: u64 = 57;

#[test]
fn public_api_matches_snapshot() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let json_path = build_rustdoc_json(root);
    let current = render(&json_path);
    let snapshot_path = root.join(SNAPSHOT);

    if update_requested() {
        std::fs::write(&snapshot_path, &current)
            .unwrap_or_else(|e| panic!("writing {}: {e}", snapshot_path.display()));
        eprintln!(
            "public API: wrote {} ({} items)",
            snapshot_path.display(),
            current.lines().count()
        );
        return;
    }

    let committed = match std::fs::read_to_string(&snapshot_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("reading {}: {e}", snapshot_path.display()),
    };
    // Compared line by line, so a checkout that turned the line endings into CRLF still matches.
    let old: Vec<&str> = committed.lines().collect();
    let new: Vec<&str> = current.lines().collect();
    if old == new {
        return;
    }
    panic!("{}", mismatch_report(&old, &new));
}

fn update_requested() -> bool {
    std::env::var_os(UPDATE_VAR).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Builds the library's rustdoc JSON with every feature and returns its path.
fn build_rustdoc_json(root: &Path) -> PathBuf {
    // A target directory of its own inside the test build's (`CARGO_TARGET_TMPDIR` is `<target>/tmp`, wherever
    // CARGO_TARGET_DIR or --target-dir put it), so this build neither waits for the test build's lock nor
    // replaces its artifacts (a check build with every feature and RUSTC_BOOTSTRAP set).
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("public-api");
    // The cargo running this test, so the JSON comes from the same toolchain; `cargo` on PATH otherwise.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let output = Command::new(&cargo)
        .current_dir(root)
        .args([
            "rustdoc",
            "--lib",
            "--all-features",
            "--quiet",
            "--color",
            "never",
        ])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args([
            "--",
            "-Z",
            "unstable-options",
            "--output-format",
            "json",
            "--cap-lints",
            "warn",
        ])
        // JSON output is an unstable rustdoc option; allow it on the stable toolchain, for this child only.
        .env("RUSTC_BOOTSTRAP", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", cargo.to_string_lossy()));
    assert!(
        output.status.success(),
        "`cargo rustdoc --output-format json` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The library's crate name: the package name with `-` as `_` (Cargo.toml sets no `[lib] name`).
    let lib_name = env!("CARGO_PKG_NAME").replace('-', "_");
    target_dir.join("doc").join(format!("{lib_name}.json"))
}

/// The public API, one item per line in public-api's order (grouped by path, then lexical), newline-terminated.
fn render(json_path: &Path) -> String {
    let text = std::fs::read_to_string(json_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", json_path.display()));
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", json_path.display()));
    let format = json["format_version"].as_u64().unwrap_or(0);
    assert!(
        format == FORMAT_VERSION,
        "rustdoc wrote JSON format {format}, but the pinned public-api reads format {FORMAT_VERSION} (the stable \
         rustc 1.95's). Run this test with that toolchain, or, when the toolchain moves on, pin the public-api \
         release whose rustdoc-types is 0.{format}.x in Cargo.toml, set FORMAT_VERSION in {} and regenerate the \
         snapshot ({UPDATE_VAR}=1).",
        file!()
    );

    let api = public_api::Builder::from_rustdoc_json(json_path)
        .omit_blanket_impls(true)
        .build()
        .unwrap_or_else(|e| panic!("public-api could not read {}: {e}", json_path.display()));

    let index = &json["index"];
    let must_use = |id: u32| {
        index[id.to_string()]["attrs"]
            .as_array()
            .is_some_and(|attrs| attrs.iter().any(|a| a.get("must_use").is_some()))
    };
    let mut out = String::new();
    for item in api.items() {
        if must_use(item.id().0) {
            out.push_str("#[must_use] ");
        }
        out.push_str(&item.to_string());
        out.push('\n');
    }
    out
}

/// The lines only the snapshot has, the lines only the crate has, and how to accept the change.
fn mismatch_report(old: &[&str], new: &[&str]) -> String {
    let old_set: HashSet<&str> = old.iter().copied().collect();
    let new_set: HashSet<&str> = new.iter().copied().collect();
    let removed: Vec<&str> = old
        .iter()
        .copied()
        .filter(|l| !new_set.contains(l))
        .collect();
    let added: Vec<&str> = new
        .iter()
        .copied()
        .filter(|l| !old_set.contains(l))
        .collect();

    let mut report = format!("the public API differs from {SNAPSHOT}");
    if old.is_empty() {
        report.push_str(" (missing or empty)");
    }
    report.push_str(&format!(
        ": {} removed (-, only in the snapshot), {} added (+, only in the crate)\n",
        removed.len(),
        added.len()
    ));
    for line in &removed {
        report.push_str(&format!("- {line}\n"));
    }
    for line in &added {
        report.push_str(&format!("+ {line}\n"));
    }
    if removed.is_empty() && added.is_empty() {
        report.push_str(
            "(the same items in another order or with duplicates: the renderer changed)\n",
        );
    }
    report.push_str(&format!(
        "\nIf the change is deliberate, rewrite the snapshot and commit it with the change:\n    \
         {UPDATE_VAR}=1 cargo test --test public_api\n"
    ));
    report
}
