//! Gives `libcalls.so` its SONAME, `libcalls.so.0`: programs linked against it record that name,
//! so a compatible update (0.x.y) replaces the file without relinking them, and `make install`
//! lays out the usual `libcalls.so.0.1.0` ← `libcalls.so.0` ← `libcalls.so` chain.
//!
//! The major number stays 0 while the ABI may change between minor versions; it becomes 1 with
//! the first stable ABI.

/// The SONAME's version: bump it on every ABI break.
const ABI_MAJOR: u32 = 0;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" || target_os == "freebsd" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcalls.so.{ABI_MAJOR}");
    }
}
