//! The committed `include/calls.h` must be what cbindgen generates from the sources.
//! Regenerate it with `make -C calls-ffi header` (`CALLS_UPDATE_HEADER=1 cargo test -p
//! calls-ffi --test header`).

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn committed_header_matches_the_sources() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        // cbindgen follows the `mod` declarations from the crate root.
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .unwrap()
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let committed_path = crate_dir.join("include/calls.h");
    if std::env::var_os("CALLS_UPDATE_HEADER").is_some() {
        std::fs::write(&committed_path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if committed != generated {
        let first_difference = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "calls-ffi/include/calls.h is out of date (first difference at line {}); \
             regenerate it with `make -C calls-ffi header` and commit it",
            first_difference + 1
        );
    }
}
