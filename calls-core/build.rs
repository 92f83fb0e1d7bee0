//! Records the git commit for `calls-server --version`, `/version` and `calls_build_info`.
//!
//! Only with the `server` feature: the library's own build never depends on the checkout's
//! state, so a new commit does not rebuild calls-core for its embedders. Packagers building from
//! a tarball (no `.git`) set `GIT_COMMIT` at build time (as Jenkins does); without either the commit reads
//! "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SERVER").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let commit = match std::env::var("GIT_COMMIT") {
        Ok(commit) if !commit.is_empty() => Some(commit),
        _ => git(&["rev-parse", "--short=12", "HEAD"]),
    };
    let commit = commit.unwrap_or_else(|| "unknown".to_owned());
    // Not CALLS_*: cargo also sets this in the environment of `cargo test`/`cargo run`, and the
    // server refuses CALLS_* variables it does not know.
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
    // Rerun when HEAD moves: HEAD itself (branch switch) and the ref it points to (new commit).
    // Only files that exist: cargo reruns a script on every build while one is missing.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watched {
        if let Some(file) = git(&["rev-parse", "--git-path", &path]) {
            if std::path::Path::new(&file).exists() {
                println!("cargo:rerun-if-changed={file}");
            }
        }
    }
}
