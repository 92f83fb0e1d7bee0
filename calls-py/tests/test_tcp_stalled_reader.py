"""An ICE-TCP client that stops reading, against the reference server: the server closes that
connection, and nobody else in the call notices."""

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from conftest import SECRET, Server, running_server

from calls.loadtest import Participant, Swarm, mint_token
from calls.loadtest.report import scrape_metrics
from calls.loadtest.verdict import Thresholds, judge

#: Generous: the kernel's buffers at both ends of the stalled connection (megabytes on
#: loopback) fill first, at the speakers' bitrate, on a machine that may be busy.
PATIENCE_S = 150.0
#: Cameras sent to the stalled reader (and a screen): about 2.7 Mbit/s, so its buffers fill in
#: about 15 s, well before its ICE dies (about 35 s after it stops reading: it never sees an
#: answer to its checks, gives up, and the server's ICE-lite agent times out 15 s later).
SPEAKERS = 4


def test_an_ice_tcp_client_that_stops_reading_is_closed_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    """Finding 1 (issue 16): the server's write queue per ICE-TCP connection is bounded. A
    client that stops reading (its app froze) fills the kernel's buffers, then its queue; the
    worker then closes that connection and counts ``calls_tcp_write_queue_full_total``, instead
    of queueing media for it without end. The speakers (UDP) and a listener on another ICE-TCP
    connection of the same worker do not notice. Without the bound the counter stays 0: only
    the write task's 10 s stall timer closes the connection (``calls_tcp_write_stalls_total``).

    The queue is the default (512 frames): the kernel's buffers take most of the time to fill
    anyway, and a queue much shorter than the speakers' keyframes at once (15 frames each)
    can close a healthy listener too when the machine is busy."""

    def join(user: str) -> Participant:
        return Participant(call="stall", user=user, token=mint_token(SECRET, "stall", user))

    speakers = [
        replace(join(f"speaker-{i}"), speaking=True, video=True, screen=i == 0, simulcast=False)
        for i in range(SPEAKERS)
    ]
    # It sends silence (forwarded) rather than muting, so it keeps writing after it stops
    # reading, and its next write after the server closed the connection fails.
    stalled = replace(join("stalled"), muted=False, transport="tcp", stall_reading_after=3.0)
    healthy = replace(join("healthy"), transport="tcp")
    people = [*speakers, stalled, healthy]
    with running_server(tmp_path) as server:
        with Swarm(server.url, people, duration=PATIENCE_S + 60.0, threads=1) as swarm:

            def describe() -> str:
                lines = [f"{s.user}: {s.state} {s.error} rx={s.packets_received} "
                         f"tcp_errors={s.tcp_errors}" for s in swarm.stats()]
                metrics = scrape_metrics(server.url)
                for name in ("calls_tcp_write_queue_full_total", "calls_tcp_write_stalls_total"):
                    lines.append(f"{name} {metrics.get(name)}")
                return "\n".join(lines) + "\n" + server.log.read_text()[-3000:]

            def until(what: str, condition: Callable[[], bool]) -> None:
                deadline = time.monotonic() + PATIENCE_S
                while not condition():
                    assert time.monotonic() < deadline, f"no {what}:\n{describe()}"
                    time.sleep(0.5)

            until("media for everyone", lambda: all(s.packets_received > 0 for s in swarm.stats()))
            until("full write queue", lambda: queue_full(server) >= 1)
            until("ICE-TCP error at the stalled reader", lambda: swarm.stats()[-2].tcp_errors > 0)
            got = swarm.stats()[-1].packets_received
            until("more media for the healthy listener",
                  lambda: swarm.stats()[-1].packets_received > got + 500)
            assert queue_full(server) == 1, f"another connection was closed:\n{describe()}"
            swarm.stop()
            assert swarm.wait(30.0), "the swarm did not stop"
    stats = swarm.stats()
    by_user = {s.user: s for s in stats}
    closed = by_user["stalled"]
    assert closed.state == "failed" and (closed.error or "").startswith("ICE-TCP"), closed
    for s in stats:
        if s.user == "stalled":
            continue
        assert s.state == "done" and s.error is None and s.tcp_errors == 0, s
        assert s.tcp_frames_dropped == 0, s
    # The healthy listener heard and saw the speakers all along, over ICE-TCP.
    healthy_got = by_user["healthy"].tracks
    cameras = {t.publisher for t in healthy_got if t.source == "camera" and t.packets > 100}
    assert len(cameras) == SPEAKERS, healthy_got
    assert any(t.source == "screen" and t.packets > 100 for t in healthy_got), healthy_got
    # A load test with stalled readers passes when the server closes them.
    verdict = judge(people, stats, Thresholds(max_loss_percent=100.0))
    assert verdict.passed and verdict.failed == 0, verdict.failures


def queue_full(server: Server) -> float:
    """ICE-TCP connections the server closed because their write queue was full."""
    return scrape_metrics(server.url).get("calls_tcp_write_queue_full_total", 0.0)
