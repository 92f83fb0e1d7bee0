"""Recording through calls.Router: start and stop, the files drained as Record outputs."""

from typing import Dict, List

import pytest

import calls
from calls.testing import Network


def assemble(records: List[calls.Record]) -> Dict[int, bytearray]:
    """Every file's bytes, as an embedder would append them (file number -> contents)."""
    files: Dict[int, bytearray] = {}
    for r in records:
        if r.kind == "file_started":
            assert r.file is not None and r.file not in files
            files[r.file] = bytearray()
        elif r.kind == "data":
            assert r.file is not None and r.data is not None
            files[r.file] += r.data
    return files


def test_a_recorded_call_drains_into_ogg_and_ivf_files() -> None:
    net = Network(calls.Router(), now=100.0)
    alice = net.add_peer("standup", "alice")
    bob = net.add_peer("standup", "bob")
    assert net.run_until(lambda: alice.packets_received > 50 and bob.packets_received > 50)

    net.router.start_recording("standup", net.now)
    assert net.router.is_recording("standup")
    net.run_for(3.0)
    net.router.stop_recording("standup", net.now)
    net.run_for(0.1)
    assert not net.router.is_recording("standup")

    kinds = [r.kind for r in net.records]
    assert kinds[0] == "started" and kinds[-1] == "stopped", kinds
    assert all(r.call == "standup" for r in net.records)
    started = net.records[0]
    assert started.info == {"sessions": None, "audio": True, "camera": True, "screen": True}
    opened = {r.file: r.info for r in net.records if r.kind == "file_started"}
    finished = {r.file: r.info for r in net.records if r.kind == "file_finished"}
    assert opened.keys() == finished.keys() and len(opened) == 4, opened
    sources = sorted((f["user"], f["source"], f["codec"]) for f in opened.values() if f)
    assert sources == [
        ("alice", "camera", "vp8"),
        ("alice", "microphone", "opus"),
        ("bob", "camera", "vp8"),
        ("bob", "microphone", "opus"),
    ]

    files = assemble(net.records)
    for number, info in opened.items():
        assert info is not None and number is not None
        summary = finished[number]
        assert summary is not None
        data = bytes(files[number])
        assert data.startswith(b"OggS" if info["container"] == "ogg" else b"DKIF"), info
        assert summary["bytes"] == len(data)
        # Three seconds of virtual time, started at once (video at its requested keyframe).
        assert 2500 <= summary["duration_ms"] <= 3200, summary
        assert -100 <= summary["start_offset_ms"] <= 500, summary
        assert summary["frames"] > 0 and summary["lost_packets"] == 0, summary
    assert net.router.metrics()["recordings_started"] == 1


def test_a_recording_takes_only_the_named_sessions_and_sources() -> None:
    net = Network(calls.Router())
    alice = net.add_peer("c", "alice")
    bob = net.add_peer("c", "bob")
    assert net.run_until(lambda: alice.packets_received > 50 and bob.packets_received > 50)

    net.router.start_recording("c", net.now, [bob.session], camera=False, screen=False)
    net.run_for(1.0)
    net.router.stop_recording("c", net.now)
    net.run_for(0.1)

    opened = [r.info for r in net.records if r.kind == "file_started"]
    assert [(f["session"], f["source"]) for f in opened if f] == [(bob.session, "microphone")]
    told = {s.session: s.message for s in net.signals if s.type == "recording" and s.message["active"]}
    assert told[bob.session]["recorded"] is True
    assert told[alice.session]["recorded"] is False  # alice knows, and that she is not in it


def test_recording_misuse_raises_typed_errors() -> None:
    router = calls.Router()
    with pytest.raises(calls.UnknownCallError) as unknown:
        router.start_recording("nobody-here", 0.0)
    assert unknown.value.call == "nobody-here"
    with pytest.raises(calls.UnknownCallError):
        router.stop_recording("nobody-here", 0.0)

    router.join("c", 1, "ann", 0.1, grants={"recordable": False})
    router.start_recording("c", 0.2)
    with pytest.raises(calls.RecordingError) as twice:
        router.start_recording("c", 0.3)
    assert (twice.value.call, twice.value.code) == ("c", "already_recording")
    router.stop_recording("c", 0.4)
    with pytest.raises(calls.RecordingError) as stopped:
        router.stop_recording("c", 0.5)
    assert stopped.value.code == "not_recording"
    assert isinstance(stopped.value, calls.CallsError)
    records = [o for o in router.drain() if isinstance(o, calls.Record)]
    assert [r.kind for r in records] == ["started", "stopped"]
    with pytest.raises(ValueError, match="unknown grant"):
        router.join("c", 2, "bo", 0.6, grants={"recorded": True})
