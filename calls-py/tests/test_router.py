"""The router scripted in-process: two str0m peers driven from Python in virtual time."""

from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import calls
from calls.testing import Network


def test_two_participants_hear_and_see_each_other() -> None:
    net = Network(calls.Router(), now=1000.0)
    alice = net.add_peer("standup", "alice")
    bob = net.add_peer("standup", "bob")

    def both_receive() -> bool:
        return all(
            {t["source"] for t in p.received() if t["packets"] >= 25} >= {"microphone", "camera"}
            for p in (alice, bob)
        )

    assert net.run_until(both_receive, limit=10.0), (alice.received(), bob.received())
    assert alice.connected and bob.connected
    from_bob = {t["source"]: t for t in alice.received()}
    assert from_bob["camera"]["publisher"] == bob.session
    assert from_bob["camera"]["keyframes"] >= 1
    assert all(t["lost"] == 0 for t in alice.received() + bob.received())

    kinds = [e.kind for e in net.events]
    assert kinds.count("joined") == 2 and kinds.count("connected") == 2
    published = [e for e in net.events if e.kind == "track_published"]
    assert {e.data["source"] for e in published} == {"microphone", "camera"}
    assert {s.type for s in net.signals} >= {"answer", "offer", "slots", "participant_joined"}

    metrics = net.router.metrics()
    assert metrics["sessions"] == 2 and metrics["connected_sessions"] == 2
    assert metrics["media_out"]["video_packets"] > 0
    assert "calls_sessions 2" in net.router.prometheus()


def test_outputs_are_python_values_on_the_callers_clock() -> None:
    router = calls.Router("udp_port = 9000\nmax_participants_per_call = 5", now=50.0)
    router.join("c", 7, "ann", 50.0, grants={"screen": False})
    outputs = router.drain()
    assert isinstance(outputs[-1], calls.Timeout)
    # Times are on the caller's clock: the join's connect deadline is 30 s after it.
    assert 50.0 < outputs[-1].at <= 80.0 + 1e-6
    events = [o for o in outputs if isinstance(o, calls.Event)]
    assert events and events[0].kind == "joined" and events[0].data == {"call": "c", "user": "ann"}
    assert events[0].session == 7

    router.set_muted(7, True, 50.1)
    muted = [o for o in router.drain() if isinstance(o, calls.Event)]
    assert [(e.kind, e.data) for e in muted] == [("mute_changed", {"muted": True})]

    router.leave(7, 50.2)
    left = [o for o in router.drain() if isinstance(o, calls.Event)]
    assert left[0].kind == "left" and left[0].data["reason"] == "left"
    assert router.session_count() == 0


def test_garbage_datagrams_are_dropped_and_counted() -> None:
    router = calls.Router()
    router.handle_datagram(b"\xff" * 40, ("127.0.0.1", 5000), ("127.0.0.1", 8443), 0.1)
    router.handle_datagram(b"\x00\x01" + b"\x00" * 18, ("127.0.0.1", 5000), ("127.0.0.1", 8443), 0.2)
    assert not [o for o in router.drain() if isinstance(o, calls.Transmit)]
    assert sum(router.metrics()["drops"].values()) == 2
    assert calls.Router.worker_of_datagram(b"\xff") is None


def test_a_muted_participant_is_not_forwarded() -> None:
    net = Network(calls.Router())
    alice = net.add_peer("c", "alice", video=False)
    bob = net.add_peer("c", "bob", video=False)
    assert net.run_until(lambda: alice.packets_received > 20 and bob.packets_received > 20)
    net.router.set_muted(bob.session, True, net.now)
    net.run_for(0.2)
    before = alice.packets_received
    net.run_for(1.0)
    assert alice.packets_received == before
    assert bob.packets_received > 60


def test_the_active_speaker_is_announced_to_the_embedder_and_the_call() -> None:
    net = Network(calls.Router())
    alice = net.add_peer("c", "alice", video=False)
    bob = net.add_peer("c", "bob", video=False)
    bob.set_silent(True)

    def speaker_events() -> List[calls.Event]:
        return [e for e in net.events if e.kind == "speaker_changed"]

    assert net.run_until(lambda: bool(speaker_events()), limit=5.0)
    first = speaker_events()[0]
    assert first.session == 0
    assert first.data == {"call": "c", "speaker": alice.session}
    told = {s.session for s in net.signals if s.type == "speaker"}
    assert told == {alice.session, bob.session}
    assert all(
        s.message["session"] == alice.session for s in net.signals if s.type == "speaker"
    )

    # Silence for a while: nobody is the active speaker.
    alice.set_silent(True)
    assert net.run_until(lambda: len(speaker_events()) == 2, limit=5.0)
    assert speaker_events()[1].data == {"call": "c", "speaker": None}


SOURCE_OF_SLOT = {"audio": "microphone", "camera": "camera", "screen": "screen"}


def slot_mapping(net: Network, session: int) -> Dict[str, Dict[str, Any]]:
    """The slot mapping ``session`` was told, as it stands now: mid -> latest slot entry."""
    mapping: Dict[str, Dict[str, Any]] = {}
    for s in net.signals:
        if s.session == session and s.type == "slots":
            for slot in s.message["slots"]:
                mapping[slot["mid"]] = slot
    return mapping


def test_slot_mappings_name_real_publishers_and_joins_renegotiate_nobody() -> None:
    net = Network(calls.Router())
    peers = [net.add_peer("c", user) for user in ("ann", "ben", "cid")]
    users = {p.session: user for p, user in zip(peers, ("ann", "ben", "cid"))}
    assert net.run_until(lambda: all(p.packets_received > 100 for p in peers))

    # One router offer per participant (its slots), whoever joined after it.
    offers = Counter(s.session for s in net.signals if s.type == "offer")
    assert offers == {p.session: 1 for p in peers}
    # A newcomer learns who is there from one roster message.
    rosters = [s for s in net.signals if s.type == "roster" and s.session == peers[2].session]
    assert [sorted(e["session"] for e in r.message["participants"]) for r in rosters] == [
        sorted([peers[0].session, peers[1].session])
    ]
    for s in net.signals:
        if s.type != "slots":
            continue
        for slot in s.message["slots"]:
            assert slot["kind"] in SOURCE_OF_SLOT, slot
            if slot["session"] is None:
                continue
            assert slot["session"] != s.session, f"{s.session} receives itself: {slot}"
            assert users[slot["session"]] == slot["user"], slot
            assert slot["source"] == SOURCE_OF_SLOT[slot["kind"]], slot
    for p in peers:
        carried = {(m["session"], m["source"]) for m in slot_mapping(net, p.session).values()}
        others = {q.session for q in peers if q is not p}
        assert {(o, src) for o in others for src in ("microphone", "camera")} <= carried


def test_a_pin_puts_that_camera_on_a_viewers_only_camera_slot() -> None:
    net = Network(calls.Router())
    viewer = net.add_peer("c", "vic", video=False)
    pat = net.add_peer("c", "pat")
    pia = net.add_peer("c", "pia")
    assert net.run_until(lambda: viewer.packets_received > 100)

    def camera_sessions() -> List[Optional[int]]:
        return [
            m["session"] for m in slot_mapping(net, viewer.session).values() if m["kind"] == "camera"
        ]

    # One camera slot: the router renegotiates the viewer (and only the viewer).
    offers_before = Counter(s.session for s in net.signals if s.type == "offer")
    viewer.request_slots(1)
    net.run_for(1.0)
    offers = Counter(s.session for s in net.signals if s.type == "offer")
    assert offers - offers_before == Counter({viewer.session: 1})
    assert len([s for s in camera_sessions() if s is not None]) == 1, slot_mapping(net, viewer.session)

    for target in (pia, pat, pia):
        viewer.pin([target.session])

        def shows_target() -> bool:
            cameras = [s for s in viewer.slots() if s["kind"] == "camera" and s["session"]]
            if [s["session"] for s in cameras] != [target.session]:
                return False
            got: Dict[Tuple[int, str], int] = {
                (t["publisher"], t["source"]): t["packets"] for t in viewer.received()
            }
            return got.get((target.session, "camera"), 0) > counted.get(target.session, 0) + 30

        counted: Dict[int, int] = {
            t["publisher"]: t["packets"] for t in viewer.received() if t["source"] == "camera"
        }
        assert net.run_until(shows_target, limit=5.0), (target.session, viewer.slots())
        # What the peer follows is what the router said.
        assert [s for s in camera_sessions() if s is not None] == [target.session]
    assert not viewer.errors()
    assert viewer.misattributed == 0
    # One stream on the camera slot across the three sources: one SSRC, no picture-id break.
    [camera_slot] = [s for s in viewer.slots() if s["kind"] == "camera" and s["session"]]
    [stream] = [s for s in viewer.slot_stats() if s["mid"] == camera_slot["mid"]]
    assert stream["ssrc_changes"] == 0 and stream["picture_id_breaks"] == 0, stream
    assert calls.PROTOCOL_VERSION == 2

    # Too many pins is refused with `invalid`; the session goes on.
    try:
        net.router.handle_signal(
            viewer.session, {"type": "pin", "sessions": list(range(1000, 1026))}, net.now
        )
    except calls.SignalError as e:
        assert e.code == "invalid"
    else:
        raise AssertionError("26 pins were accepted")
