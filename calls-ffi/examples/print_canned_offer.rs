//! How the SDP offer embedded in `tests/test_calls.c` was made: a str0m client offering a
//! send-only Opus microphone and a send-only VP8 camera, as the reference client does.
//! Run `cargo run -p calls-ffi --example print_canned_offer` and paste.

#![allow(clippy::unwrap_used)] // a developer tool: fail loudly
#![allow(clippy::disallowed_methods)]

use std::time::Instant;

use calls_core::str0m::media::{Direction, MediaKind};
use calls_core::str0m::{Candidate, Rtc};
use calls_core::ClientMessage;

fn main() {
    let mut rtc = Rtc::builder().set_rtp_mode(true).build(Instant::now());
    rtc.add_local_candidate(Candidate::host("127.0.0.1:40000".parse().unwrap(), "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, _pending) = api.apply().unwrap();
    let json = ClientMessage::Offer {
        sdp: offer.to_sdp_string(),
        screen_mid: None,
    }
    .to_json();
    // One C string literal per SDP line, escaped for C (the JSON escapes stay escaped).
    let escaped = json.replace('\\', "\\\\").replace('"', "\\\"");
    for line in escaped.split_inclusive("\\\\r\\\\n") {
        println!("    \"{line}\"");
    }
}
