//! Helpers shared by the unit tests.

use std::path::Path;
use std::process::Command;

/// Runs openssl in `dir` with `args` split on whitespace (so no argument may contain a
/// space); returns whether it succeeded, and its stdout followed by its stderr.
pub(crate) fn openssl_status(dir: &Path, args: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl is installed (/usr/bin/openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// As [`openssl_status`], panicking with the output if openssl fails.
pub(crate) fn openssl(dir: &Path, args: &str) -> String {
    let (ok, text) = openssl_status(dir, args);
    assert!(ok, "openssl {args} failed: {text}");
    text
}
