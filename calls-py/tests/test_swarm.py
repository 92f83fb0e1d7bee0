"""Simulated participants against the reference server (started by the `server` fixture)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SECRET, Server

from calls.loadtest import Participant, Swarm, mint_token, plan
from calls.loadtest.report import build_report, by_transport


def test_twenty_participants_all_receive_media_for_ten_seconds(server: Server) -> None:
    participants = plan(
        calls=1, participants=20, speakers=2, video=1, ramp=20, secret=SECRET, call_prefix="swarm"
    )
    with Swarm(server.url, participants, duration=10.0, threads=2) as swarm:
        assert swarm.running
        assert swarm.wait(30.0), "the swarm did not stop at its deadline"
        assert not swarm.running
    stats = swarm.stats()
    assert len(stats) == 20
    failed = [(s.user, s.error) for s in stats if s.state != "done"]
    assert not failed, failed
    for s in stats:
        assert s.join_ms is not None and s.join_ms < 5000, s
        # Everyone hears at least one speaker; non-speakers also see the camera.
        sources = {t.source for t in s.tracks if t.packets > 100}
        assert "microphone" in sources, s
        if s.index != 0:
            assert "camera" in sources, s
        assert s.loss < 0.01, s
        assert s.rx_kbps > 30, s
        # Audio delay, timed from each speaker's send to this participant's receive (same
        # process, shared clock): loopback and an idle server add milliseconds, not seconds.
        assert s.audio_delay_p50_ms is not None and s.audio_delay_p99_ms is not None, s
        assert s.audio_delay_max_ms is not None, s
        assert 0 <= s.audio_delay_p50_ms <= s.audio_delay_p99_ms <= s.audio_delay_max_ms, s
        assert s.audio_delay_p50_ms < 100, s
    speakers = [s for s in stats if s.speaking]
    assert len(speakers) == 2
    # The camera publisher got keyframe requests answered: every viewer has a keyframe.
    assert all(t.keyframes > 0 for s in stats for t in s.tracks if t.source == "camera")
    # Slots: each participant received the speakers on audio slots and the camera on a camera
    # slot, each slot one continuous stream the mapping announced correctly.
    speaker_sessions = {s.session for s in speakers}
    camera_publisher = stats[0].session
    for s in stats:
        assert s.misattributed == 0, s
        audio = [x for x in s.slots if x.kind == "audio" and x.packets > 100]
        # By whom each slot carried last: a speaker that finished first may have emptied its
        # slot at this participant before its own report.
        assert {x.last_session for x in audio} >= speaker_sessions - {s.session}, s.slots
        if s.index != 0:
            [camera] = [x for x in s.slots if x.kind == "camera" and x.packets > 100]
            assert camera.last_session == camera_publisher, camera
            assert camera.source in ("camera", None), camera
        for x in s.slots:
            assert x.ssrc_changes == 0 and x.picture_id_breaks == 0, x
    report = build_report({}, stats, wall_s=10.0)
    assert report["totals"]["slots"]["misattributed"] == 0
    assert report["per_participant"]["audio_delay_p99_ms"]["n"] == 20
    assert report["totals"]["slots"]["receiving"]["camera"] == 19


def test_simulcast_viewers_report_layer_bitrates_jitter_and_the_speaker(server: Server) -> None:
    participants = plan(
        calls=1, participants=3, speakers=1, video=2, secret=SECRET, call_prefix="simulcast"
    )
    assert all(p.simulcast for p in participants)
    with Swarm(server.url, participants, duration=6.0, threads=1) as swarm:
        assert swarm.wait(30.0), "the swarm did not stop at its deadline"
    stats = swarm.stats()
    failed = [(s.user, s.error) for s in stats if s.state != "done"]
    assert not failed, failed
    for s in stats:
        assert s.simulcast
        cameras = [t for t in s.tracks if t.source == "camera" and t.packets > 0]
        assert cameras, s
        for t in cameras:
            assert t.simulcast and t.kbps_by_layer is not None, t
            # The layers split the track's bitrate; the router forwards one at a time.
            assert abs(sum(t.kbps_by_layer.values()) - t.kbps) < 0.01 * t.kbps + 1e-6, t
            assert t.layer in ("q", "h", "f"), t
            assert t.jitter_ms is not None and t.jitter_max_ms is not None, t
            assert t.max_frame_gap_ms > 0, t
        assert set(s.rx_kbps_by_layer) == {"q", "h", "f"}
        assert max(s.rx_kbps_by_layer.values()) > 0, s
        assert s.video_jitter_ms is not None and s.video_jitter_ms >= 0, s
        assert s.max_frame_gap_ms > 0, s
        # The one speaker became the active speaker; everyone was told.
        assert s.speaker_messages >= 1, s
    listeners = [s for s in stats if not s.speaking]
    assert listeners and all(s.audio_jitter_ms is not None for s in listeners)


def test_an_ice_tcp_participant_sends_and_receives_media(server: Server) -> None:
    participants = plan(
        calls=1, participants=3, speakers=2, video=2, secret=SECRET, call_prefix="tcp",
        transport="mixed",
    )
    assert [p.transport for p in participants] == ["tcp", "udp", "udp"]
    with Swarm(server.url, participants, duration=6.0, threads=1) as swarm:
        assert swarm.wait(30.0), "the swarm did not stop at its deadline"
    stats = swarm.stats()
    failed = [(s.user, s.error) for s in stats if s.state != "done"]
    assert not failed, failed
    tcp, *udp = stats
    assert tcp.transport == "tcp" and all(s.transport == "udp" for s in udp)
    # Over ICE-TCP it hears and sees the other publisher…
    assert {t.source for t in tcp.tracks if t.packets > 50} == {"microphone", "camera"}, tcp
    assert tcp.loss < 0.01 and tcp.tcp_errors == 0 and tcp.tcp_frames_dropped == 0, tcp
    # …and what it publishes over ICE-TCP reaches the UDP participants.
    for s in udp:
        from_tcp = {t.source for t in s.tracks if t.publisher == tcp.session and t.packets > 50}
        assert from_tcp == {"microphone", "camera"}, s
    totals = by_transport(stats)
    assert totals["tcp"]["receiving_media"] == 1 and totals["udp"]["receiving_media"] == 2
    assert totals["tcp"]["tcp_errors"] == 0


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="transport"):
        plan(transport="sctp")
    with pytest.raises(ValueError, match="neither"):
        Swarm("http://127.0.0.1:9", [Participant(call="c", user="u", transport="sctp")], 1.0)


def test_a_bad_token_is_refused(server: Server) -> None:
    good = Participant(call="t", user="ok", token=mint_token(SECRET, "t", "ok"))
    wrong_call = Participant(call="t", user="x", token=mint_token(SECRET, "other", "x"))
    forged = Participant(call="t", user="y", token=mint_token("not-the-secret", "t", "y"))
    with Swarm(server.url, [good, wrong_call, forged], duration=2.0) as swarm:
        swarm.wait(10.0)
    ok, bad_call, bad_sig = swarm.stats()
    assert ok.state == "done" and ok.session is not None
    assert bad_call.state == "failed" and "4001" in (bad_call.error or ""), bad_call
    assert "another call" in (bad_call.error or "")
    assert bad_sig.state == "failed" and "signature" in (bad_sig.error or ""), bad_sig


def test_the_cli_reports(server: Server, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "calls.loadtest", "--url", server.url, "--participants", "4",
        "--speakers", "2", "--video", "1", "--duration", "4", "--ramp", "0",
        "--secret", SECRET, "--report", str(report), "--quiet", "--transport", "mixed",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["participants"]["receiving_media"] == 4
    assert data["per_participant"]["join_ms"]["n"] == 4
    assert data["server_process"]["pid"] == server.pid
    assert data["server_metrics"]["datagrams_out_per_s"] > 0
    assert "secret" not in data["config"]
    assert data["config"]["simulcast"] is True
    # Participant 0 (a speaker with the camera) on ICE-TCP, the others on UDP.
    by_transport = data["totals"]["by_transport"]
    assert by_transport["tcp"]["participants"] == 1 and by_transport["tcp"]["receiving_media"] == 1
    assert by_transport["udp"]["receiving_media"] == 3
    assert sum(data["totals"]["rx_mbit_s_by_layer"].values()) > 0
    assert data["per_participant"]["rx_kbps_q"]["n"] == 3
    assert data["per_participant"]["video_jitter_ms"]["n"] == 3
    assert data["per_participant"]["audio_jitter_ms"]["n"] >= 2
    detail = data["participants_detail"]
    assert all("jitter_ms" in t and "kbps_by_layer" in t for p in detail for t in p["tracks"])
    assert "per participant" in done.stderr
