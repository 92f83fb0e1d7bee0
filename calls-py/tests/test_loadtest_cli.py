"""``python -m calls.loadtest`` as a CI job uses it: thresholds decide the exit status, an
unreachable server or a run where everyone fails ends at once, and ``--help`` shows defaults."""

import csv
import subprocess
import sys
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
from conftest import SECRET, Server

from calls.loadtest import Participant, ParticipantStats, plan
from calls.loadtest.verdict import Thresholds, expected_receivers, judge, parse_percent


def loadtest(*args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    cmd = [sys.executable, "-m", "calls.loadtest", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def stats(index: int, state: str = "done", received: int = 100, lost: int = 0) -> ParticipantStats:
    """What participant ``index`` measured, as far as the verdict looks."""
    return ParticipantStats(
        index=index, call="c", user=f"u{index}", speaking=False, state=state, error=None,
        session=index, join_started_s=0.0, welcome_ms=1.0, connected_ms=2.0, join_ms=3.0,
        packets_sent=0, bytes_sent=0, packets_received=received, bytes_received=received * 100,
        lost=lost, loss=0.0, late_or_duplicate=0, media_s=1.0, rx_kbps=1.0, tx_kbps=0.0,
        freezes=0, keyframe_requests=0, signal_errors=0,
    )


def test_percentages_read_with_or_without_the_sign() -> None:
    assert parse_percent("100%") == 100.0
    assert parse_percent("0.5") == 0.5
    for bad in ("101%", "-1", "most"):
        try:
            parse_percent(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_a_lone_speaker_among_muted_listeners_is_not_expected_to_receive() -> None:
    people = plan(participants=3, speakers=1)
    assert expected_receivers(people) == [False, True, True]
    people = plan(participants=3, speakers=0, video=0)
    assert expected_receivers(people) == [False, False, False]


def test_each_broken_threshold_is_named() -> None:
    people: List[Participant] = plan(participants=4, speakers=2)
    clean = judge(people, [stats(i) for i in range(4)], Thresholds())
    assert clean.passed, clean.failures
    bad = judge(
        people,
        [stats(0, state="failed", received=0), stats(1, lost=10), stats(2), stats(3, received=0)],
        Thresholds(max_failed=0, min_receiving_percent=100.0, max_loss_percent=1.0),
    )
    assert [f.split(" (")[-1] for f in bad.failures] == [
        "--max-failed 0)",
        "--min-receiving 100%)",
        "--max-loss 1%)",
    ], bad.failures
    assert judge(
        people,
        [stats(0, state="failed", received=0), stats(1), stats(2), stats(3)],
        Thresholds(max_failed=1, min_receiving_percent=75.0),
    ).passed
    # Audio delay: the 99th percentile of the participants' own p99s, so one slow
    # participant of four fails the run, and one of two hundred does not.
    slow = [replace(stats(i), audio_delay_p99_ms=20.0 + 500.0 * (i == 3)) for i in range(4)]
    late = judge(people, slow, Thresholds())
    assert [f.split(" (")[-1] for f in late.failures] == ["--max-audio-delay 400 ms)"], late
    assert late.audio_delay_p99_ms == 520.0 and "1 of 4 participants over" in late.failures[0]
    crowd = plan(participants=200, speakers=2)
    outlier = [replace(stats(i), audio_delay_p99_ms=20.0 + 500.0 * (i == 7)) for i in range(200)]
    assert judge(crowd, outlier, Thresholds()).audio_delay_p99_ms == 20.0
    assert judge(crowd, outlier, Thresholds(max_audio_delay_ms=10.0)).failures


def test_stalled_readers_are_on_ice_tcp_and_being_closed_is_not_their_failure() -> None:
    people = plan(participants=4, speakers=1, stalled_readers=1, stall_after=2.0)
    assert [p.stall_reading_after for p in people] == [None, None, None, 2.0]
    assert [p.transport for p in people] == ["udp", "udp", "udp", "tcp"]
    closed = replace(stats(3, state="failed"), error="ICE-TCP: write: Broken pipe (os error 32)")
    never_connected = replace(closed, connected_ms=None)
    assert judge(people, [stats(0), stats(1), stats(2), closed], Thresholds()).passed
    refused = judge(people, [stats(0), stats(1), stats(2), never_connected], Thresholds())
    assert refused.failed == 1, refused
    with pytest.raises(ValueError, match="stalled_readers"):
        plan(participants=2, stalled_readers=3)
    done = loadtest("--participants", "2", "--stalled-readers", "3")
    assert done.returncode == 2 and "--stalled-readers" in done.stderr, done.stderr


def test_help_shows_defaults_and_thresholds() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "calls.loadtest", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for needle in ("--max-failed N", "an error) (default: 0)", "(default: 100%)",
                   "(default: 1%)", "(default: 60.0)", "Exit status",
                   "--max-audio-delay MS", "is 400 ms) (default: 400.0)"):
        assert needle in text, (needle, done.stdout)
    assert "(default: None)" not in text


def test_an_unreachable_server_stops_at_once_with_a_reason() -> None:
    started = time.monotonic()
    done = loadtest("--url", "http://127.0.0.1:9", "--participants", "5", "--duration", "30")
    assert time.monotonic() - started < 10
    assert done.returncode == 2, done.stderr
    assert "cannot reach http://127.0.0.1:9" in done.stderr, done.stderr
    assert "is the server running" in done.stderr


def test_a_run_where_everyone_is_refused_fails_without_waiting_it_out(server: Server) -> None:
    started = time.monotonic()
    done = loadtest(
        "--url", server.url, "--participants", "3", "--duration", "30", "--ramp", "0",
        "--secret", "not-the-server-secret",
    )
    assert time.monotonic() - started < 15, done.stderr
    assert done.returncode == 1, done.stderr
    assert "FAIL 3 of 3 participants failed (--max-failed 0)" in done.stderr, done.stderr


def test_a_healthy_run_passes_with_video(server: Server) -> None:
    # At a lower priority, as on a machine shared with the server.
    done = loadtest(
        "--url", server.url, "--participants", "3", "--speakers", "2", "--video", "2",
        "--duration", "5", "--ramp", "0", "--secret", SECRET, "--nice", "5",
    )
    assert done.returncode == 0, done.stderr
    assert "PASS failed 0" in done.stderr, done.stderr
    assert "audio delay p99" in " ".join(done.stderr.split()), done.stderr


def test_a_priority_outside_nice_range_is_refused() -> None:
    done = loadtest("--url", "http://127.0.0.1:9", "--nice", "20")
    assert done.returncode == 2, done.stderr
    assert "--nice must be between 0 and 19" in done.stderr, done.stderr


def test_the_page_and_the_csv_hold_every_participant_and_plot(server: Server, tmp_path: Path) -> None:
    page, rows = tmp_path / "report.html", tmp_path / "rows.csv"
    done = loadtest(
        "--url", server.url, "--participants", "3", "--speakers", "2", "--video", "1",
        "--duration", "5", "--ramp", "0", "--secret", SECRET,
        "--html", str(page), "--csv", str(rows),
    )
    assert done.returncode == 0, done.stderr

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.open: List[str] = []
            self.svgs = 0
            self.titles: List[str] = []
            self.scripts = 0

        def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
            self.svgs += tag == "svg"
            self.scripts += tag == "script"
            self.open.append(tag)

        def handle_data(self, data: str) -> None:
            if self.open and self.open[-1] == "h2":
                self.titles.append(data)

        def handle_endtag(self, tag: str) -> None:
            while self.open and self.open.pop() != tag:
                pass

    parsed = Page()
    parsed.feed(page.read_text())
    parsed.close()
    assert parsed.scripts == 0
    assert parsed.svgs >= 4, parsed.svgs
    for title in ("Join time", "per simulcast layer", "Loss and jitter", "Server CPU"):
        assert any(title in t for t in parsed.titles), (title, parsed.titles)
    assert "PASS" in page.read_text()

    with open(rows) as f:
        table = list(csv.DictReader(f))
    assert [r["index"] for r in table] == ["0", "1", "2"]
    assert all(float(r["join_ms"]) > 0 for r in table)
    assert float(table[1]["rx_kbps_q"]) + float(table[1]["rx_kbps_h"]) + float(table[1]["rx_kbps_f"]) > 0
