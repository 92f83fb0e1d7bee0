//! The vendored str0m (`calls-core/vendor/str0m`, wired with `[patch.crates-io]`) must carry
//! our patch (`calls-core/vendor/patches/*.patch`, why in `calls-core/vendor/README.md`). If a
//! re-vendoring loses it, these tests fail: the first does not compile without the new
//! `RtcConfig` setter, the second finds a line the patch adds missing from the vendored file.

use std::path::Path;

use str0m::RtcConfig;

#[test]
fn twcc_send_history_is_configurable() {
    assert_eq!(
        RtcConfig::new().twcc_send_history(),
        1000,
        "str0m's default"
    );
    let config = RtcConfig::new().set_twcc_send_history(250);
    assert_eq!(config.twcc_send_history(), 250);
    // A register too small to match any feedback is refused (floor of 64).
    assert_eq!(
        RtcConfig::new()
            .set_twcc_send_history(1)
            .twcc_send_history(),
        64
    );
}

#[test]
fn opus_dtx_is_settable() {
    let mut config = RtcConfig::new().clear_codecs().enable_opus(true, true);
    config.codec_config().set_opus_dtx(true);
    let opus = config
        .codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == str0m::format::Codec::Opus)
        .expect("Opus configured");
    assert_eq!(opus.spec().format.use_dtx, Some(true));
    assert!(opus.red().is_some(), "RED kept");
}

/// Patch 0011: the extension map visits its mapped ids through a mask kept beside the entries;
/// what it finds must not change.
#[test]
fn extension_map_finds_what_is_mapped() {
    use str0m::rtp::{Extension, ExtensionMap};
    let mut map = ExtensionMap::empty();
    assert_eq!(map.iter().count(), 0);
    map.set(14, Extension::RtpMid);
    map.set(1, Extension::AudioLevel);
    map.set(3, Extension::TransportSequenceNumber);
    map.set(0, Extension::AbsoluteSendTime); // out of range: ignored
    map.set(17, Extension::AbsoluteSendTime); // out of range: ignored
    let ids: Vec<_> = map.iter().map(|(id, e)| (id, e.clone())).collect();
    assert_eq!(
        ids,
        [
            (1, Extension::AudioLevel),
            (3, Extension::TransportSequenceNumber),
            (14, Extension::RtpMid),
        ],
        "in id order, nothing else"
    );
    assert_eq!(map.id_of(Extension::RtpMid), Some(14));
    assert_eq!(map.id_of(Extension::AbsoluteSendTime), None);
    // Mapping an id again replaces what it held.
    map.set(3, Extension::AbsoluteSendTime);
    assert_eq!(map.id_of(Extension::TransportSequenceNumber), None);
    assert_eq!(map.id_of(Extension::AbsoluteSendTime), Some(3));
    assert_eq!(map.iter().count(), 3);
    assert_eq!(
        ExtensionMap::standard().iter().count(),
        7,
        "str0m's standard map"
    );
}

#[test]
fn every_line_the_patch_adds_is_in_the_vendored_source() {
    let vendor = Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor");
    let mut patches: Vec<_> = std::fs::read_dir(vendor.join("patches"))
        .expect("calls-core/vendor/patches")
        .map(|e| e.expect("a patch file").path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    assert!(!patches.is_empty(), "no patch in calls-core/vendor/patches");
    let mut checked = 0;
    for patch in patches {
        let text = std::fs::read_to_string(&patch).expect("patch text");
        let mut file = None;
        let mut source = String::new();
        for line in text.lines() {
            if let Some(path) = line.strip_prefix("+++ b/") {
                let path = vendor.join("str0m").join(path);
                source = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                file = Some(path);
            } else if let Some(added) = line.strip_prefix('+') {
                let Some(path) = &file else { continue };
                if added.trim().is_empty() {
                    continue;
                }
                assert!(
                    source.lines().any(|l| l == added),
                    "{} lost a line of {}: {added:?}",
                    path.display(),
                    patch.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "the patch adds {checked} lines: not parsed?");
}
