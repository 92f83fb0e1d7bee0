//! Issue 16 scenarios on the simulated network: what a rogue participant can no longer make the
//! router do. Real str0m peers, virtual time; assertions on what was sent where.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)] // test: fail loudly

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use calls_core::sim::{PeerOptions, SimWorld};
use calls_core::str0m::ice::{StunMessage, TransId};
use calls_core::{Config, DropReason, TrackSource};

/// Finding 3 (issue 16): a connected participant signs a USE-CANDIDATE binding request with
/// its own ICE password and spoofs a victim's address. Before, ICE-lite nominated the victim
/// and the router sent the participant's media there (361 datagrams in 5 s in this test
/// without the check). Now the victim gets at most a few
/// consent checks (no larger than the spoofed request), and the participant keeps receiving
/// its media at its real address.
#[test]
fn a_spoofed_nomination_does_not_redirect_media_to_a_victim() {
    let mut config = Config::default();
    config.consent_checks = true; // the default, set here so the tests say what they rely on
    let mut world = SimWorld::with_config(16, Instant::now(), config);
    let alice = world.add_peer("c", "alice", PeerOptions::audio_only());
    let alice_addr = world.peer(alice).addr();
    world.capture_from(alice_addr, 50);
    let bob = world.add_peer("c", "bob", PeerOptions::audio_only());
    let heard = |w: &SimWorld| {
        w.peer(alice)
            .received_from(bob, TrackSource::Microphone)
            .map_or(0, |t| t.packets)
    };
    assert!(world.run_until(|w| heard(w) > 20, Duration::from_secs(5)));

    // What alice (the attacker) knows: her ufrag (in her own checks) and the router's ufrag
    // and password for her session (its answer). She signs a fresh nominating request.
    let client_ufrag = world
        .captured()
        .iter()
        .find_map(|d| {
            let m = StunMessage::parse(d).ok()?;
            let (_, client) = m.username()?.split_once(':')?;
            Some(client.to_owned())
        })
        .expect("alice's binding requests were captured");
    let router_ufrag = world.peer(alice).remote_ice_ufrag().unwrap().to_owned();
    let router_pwd = world.peer(alice).remote_ice_password().unwrap().to_owned();
    let username = format!("{router_ufrag}:{client_ufrag}");
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    let spoof = || {
        let request =
            StunMessage::binding_request(&username, TransId::new(), true, 7, u32::MAX >> 1, true);
        let mut buf = vec![0u8; 1500];
        let len = request
            .to_bytes(Some(router_pwd.as_bytes()), &mut buf, |k, p| {
                hmac.sha1_hmac(k, p)
            })
            .unwrap();
        buf.truncate(len);
        buf
    };
    let victim: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    let before = heard(&world);
    for _ in 0..10 {
        world.inject_datagram(victim, &spoof());
        world.run_for(Duration::from_millis(300));
    }
    world.run_for(Duration::from_secs(2));

    let to_victim = world.router_transmits_to(victim);
    assert!(to_victim <= 10, "{to_victim} datagrams sent to the victim");
    assert!(
        heard(&world) > before + 100,
        "alice still hears bob at her real address ({} → {})",
        before,
        heard(&world)
    );
    assert!(world.metrics().dropped(DropReason::ConsentPending) >= 10);
}
