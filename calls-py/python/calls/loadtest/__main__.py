"""``python -m calls.loadtest``: simulated participants against a calls server, a live progress
bar, and a report (table and JSON)."""

import argparse
import ipaddress
import json
import os
import resource
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from calls import CallsError
from calls.loadtest import TRANSPORTS, ParticipantStats, Swarm, plan
from calls.loadtest.html_report import Timeline, matplotlib_missing, write_csv, write_html
from calls.loadtest.verdict import Thresholds, judge, parse_percent, server_unreachable
from calls.loadtest.report import (
    MetricsScrape,
    MetricsWindow,
    ServerProbe,
    ServerSample,
    build_report,
    find_pid_by_port,
    scrape_metrics,
    server_metrics_rows,
    udp_receive_buffer_errors,
)

#: After the last join is due, wait this long before the steady-state window starts.
SETTLE_S = 3.0
#: Seconds between the progress line's updates, the timeline's points and the ``/metrics``
#: scrapes of the steady window. Each tick converts every participant's statistics to Python
#: objects: at 0.5 s that was a tenth of a 600-participant swarm's CPU.
TICK_S = 1.0


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags and options that are unset by
    default (their help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m calls.loadtest",
        description="Run simulated participants (str0m peers on Rust threads, real UDP or "
        "ICE-TCP) against a calls server and report join time, bitrate (per simulcast layer), "
        "loss, jitter, freezes and server load.",
        epilog="Exit status: 0 when every threshold holds, 1 when one does not (each is named), "
        "2 when the server cannot be reached or the run cannot start, 130 on Ctrl-C.",
        formatter_class=_Defaults,
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the server's HTTP address")
    p.add_argument("--calls", type=int, default=1, help="number of calls")
    p.add_argument("--participants", type=int, default=10, help="participants per call")
    p.add_argument("--speakers", type=int, default=2, help="talking participants per call")
    p.add_argument("--video", type=int, default=0, help="camera publishers per call")
    p.add_argument("--screen", type=int, default=0, help="screen sharers per call")
    p.add_argument(
        "--simulcast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="publish video as simulcast: camera q/h/f, screen h/f",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="udp",
        help="media over UDP, ICE-TCP only (RFC 4571 framing to the server's TCP candidate), "
        "or mixed: every 4th participant of a call (0, 4, 8, …) on ICE-TCP",
    )
    p.add_argument(
        "--stalled-readers",
        type=int,
        default=0,
        metavar="N",
        help="the last N participants of each call are on ICE-TCP and stop reading their "
        "connection after --stall-after (clients whose app froze: the server should close them, "
        "and nobody else should notice; their closing is not a failure)",
    )
    p.add_argument(
        "--stall-after",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds after joining that a stalled reader stops reading",
    )
    p.add_argument("--silent", action="store_true", help="non-speakers send silence instead of muting")
    p.add_argument(
        "--no-dtx",
        dest="dtx",
        action="store_false",
        help="quiet microphones ignore the server's Opus DTX request and send 50 packets/s",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds, ramp-up included")
    p.add_argument("--ramp", type=float, default=20.0, help="joins per second (0: all at once)")
    p.add_argument("--secret", help="the server's auth_secret: mint join tokens")
    p.add_argument("--threads", type=int, default=0, help="media threads (0: one per core)")
    p.add_argument("--server-pid", type=int, help="the server process (default: found by port)")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="run the load tester at this much lower CPU priority (0-19), so that on a machine "
        "it shares with the server it does not take the CPU time the server's lag is measured by",
    )
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained page with plots here (needs the [report] extra: matplotlib)",
    )
    p.add_argument("--csv", metavar="FILE", help="write one row per participant here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    limits = p.add_argument_group("pass/fail thresholds (exit status 1 when one is broken)")
    limits.add_argument(
        "--max-failed",
        type=int,
        default=0,
        metavar="N",
        help="participants allowed to fail (no join, no connection, an error)",
    )
    limits.add_argument(
        "--min-receiving",
        type=parse_percent,
        default="100%",
        metavar="PERCENT",
        help="of the participants with someone to hear or see, how many must receive media",
    )
    limits.add_argument(
        "--max-loss",
        type=parse_percent,
        default="1%",
        metavar="PERCENT",
        help="media packets lost, over every participant",
    )
    limits.add_argument(
        "--max-audio-delay",
        type=float,
        default=400.0,
        metavar="MS",
        help="audio delay (publisher's send to listener's receive) that 99%% of the participants "
        "keep 99%% of their audio under (ITU-T G.114's planning limit is 400 ms)",
    )
    args = p.parse_args(argv)
    if args.max_failed < 0:
        p.error("--max-failed must be 0 or more")
    if not args.max_audio_delay > 0:
        p.error("--max-audio-delay must be positive")
    if args.html:
        why = matplotlib_missing()
        if why:
            p.error(why)
    for name in ("calls", "participants"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration <= 0:
        p.error("--duration must be positive")
    if not 0 <= args.stalled_readers <= args.participants:
        p.error("--stalled-readers must be between 0 and --participants")
    if args.stall_after < 0:
        p.error("--stall-after must be 0 or more")
    if not 0 <= args.nice <= 19:
        p.error("--nice must be between 0 and 19")
    return args


def loopback_target(url: str) -> Tuple[str, int]:
    """(host, port) of a loopback URL; anything else is refused."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "ws"):
        raise SystemExit(f"{url}: only http:// and ws:// URLs")
    host, port = parts.hostname or "", parts.port or 80
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError as e:
        raise SystemExit(f"{url}: {e}") from None
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise SystemExit(f"{url}: the load tester only targets loopback servers")
    return host, port


def scrape(url: str) -> MetricsScrape:
    """The server's ``/metrics`` now; timed at the middle of the request, since the server
    asks its workers for their counters while we wait (up to 2 s)."""
    asked = time.monotonic()
    metrics = scrape_metrics(url)
    return MetricsScrape(at=(asked + time.monotonic()) / 2, metrics=metrics)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def summary(stats: List[ParticipantStats]) -> Dict[str, Any]:
    return {
        "joined": sum(1 for s in stats if s.session is not None),
        "connected": sum(1 for s in stats if s.connected_ms is not None),
        "receiving": sum(1 for s in stats if s.packets_received > 0),
        "failed": sum(1 for s in stats if s.state == "failed"),
        "rx_bytes": sum(s.bytes_received for s in stats),
        "rx_packets": sum(s.packets_received for s in stats),
    }


def render(report: Dict[str, Any], console: Console) -> None:
    parts = report["participants"]
    console.print(
        f"[bold]participants[/bold] {parts['total']}: joined {parts['joined']}, "
        f"connected {parts['connected']}, receiving media {parts['receiving_media']}, "
        f"failed {parts['failed']}" + ("  [yellow](interrupted)[/yellow]" if report["interrupted"] else "")
    )
    for e in parts["errors"]:
        console.print(f"  [red]error[/red] {e}")
    table = Table(title="per participant")
    for col in ("metric", "n", "min", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for name, d in report["per_participant"].items():
        cells = [f"{d[k]:.1f}" if k in d else "-" for k in ("min", "p50", "p90", "p99", "max")]
        table.add_row(name, str(d["n"]), *cells)
    console.print(table)
    totals = Table(title="totals")
    totals.add_column("what")
    totals.add_column("value", justify="right")
    t = report["totals"]
    totals.add_row("clients sent", f"{t['client_tx_packets_per_s']:.0f} pkt/s, {t['client_tx_mbit_s']:.2f} Mbit/s")
    totals.add_row("clients received", f"{t['client_rx_packets_per_s']:.0f} pkt/s, {t['client_rx_mbit_s']:.2f} Mbit/s")
    totals.add_row("lost packets / video freezes", f"{t['lost']} / {t['freezes']}")
    by_layer = t["rx_mbit_s_by_layer"]
    totals.add_row(
        "clients received by layer q / h / f",
        " / ".join(f"{by_layer[rid]:.2f}" for rid in ("q", "h", "f")) + " Mbit/s",
    )
    totals.add_row("longest video frame gap", f"{t['max_frame_gap_ms']:.0f} ms")
    totals.add_row(
        "speaker / layers messages received", f"{t['speaker_messages']} / {t['layers_messages']}"
    )
    slots = t.get("slots")
    if slots:
        rx = slots["receiving"]
        totals.add_row(
            "slots receiving (audio / camera / screen)",
            f"{rx['audio']} / {rx['camera']} / {rx['screen']}",
        )
        totals.add_row(
            "slot errors (misattributed / SSRC changes / picture-id breaks / off-keyframe)",
            f"{slots['misattributed']} / {slots['ssrc_changes']} / "
            f"{slots['picture_id_breaks']} / {slots['switches_off_keyframe']}",
        )
    for transport, g in t["by_transport"].items():
        totals.add_row(
            f"{transport}: joined / receiving / failed",
            f"{g['joined']} / {g['receiving_media']} / {g['failed']} of {g['participants']}, "
            f"loss {g['loss_percent']:.2f} %"
            + (
                f", ICE-TCP errors {g['tcp_errors']}, frames dropped {g['tcp_frames_dropped']}"
                if transport == "tcp"
                else ""
            ),
        )
    if "udp_rcvbuf_errors" in t:
        totals.add_row("UDP receive-buffer drops (this machine)", str(t["udp_rcvbuf_errors"]))
    sm = report.get("server_metrics")
    if sm:
        for what, value in server_metrics_rows(sm):
            totals.add_row(what, value)
    sp = report.get("server_process")
    if sp:
        cpu = sp["cpu_percent"]
        totals.add_row(
            f"server pid {sp['pid']}",
            (f"CPU {cpu:.0f}% " if cpu is not None else "")
            + f"RSS {sp['rss_before_mb']:.0f} → {sp['rss_peak_mb']:.0f} MB "
            f"({sp['rss_per_participant_kb']:.0f} kB/participant)",
        )
        busy = [(n, c) for n, c in sp.get("thread_cpu_percent", {}).items() if c >= 0.5]
        if busy:
            totals.add_row(
                "server threads (CPU % of a core)",
                ", ".join(f"{n} {c:.0f}%" for n, c in busy),
            )
    lt = report.get("load_tester")
    if lt and lt.get("participants_per_core"):
        totals.add_row(
            "load tester",
            f"{lt['cores_used']:.2f} cores, {lt['participants_per_core']:.0f} participants/core",
        )
    console.print(totals)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    _, port = loopback_target(args.url)
    why = server_unreachable(args.url)
    if why is not None:
        console.print(f"[red]cannot start:[/red] {why}")
        return 2
    participants = plan(
        calls=args.calls,
        participants=args.participants,
        speakers=args.speakers,
        video=args.video,
        screen=args.screen,
        simulcast=args.simulcast,
        ramp=args.ramp,
        secret=args.secret,
        silent=args.silent,
        dtx=args.dtx,
        token_ttl=args.duration + 3600,
        transport=args.transport,
        stalled_readers=args.stalled_readers,
        stall_after=args.stall_after,
    )
    pid = args.server_pid or find_pid_by_port(port)
    probe = ServerProbe(pid) if pid else None
    # The server's CPU and memory through the whole run, for the page's plot.
    usage = ServerProbe(pid) if pid else None
    timeline = Timeline()
    baseline: Optional[ServerSample] = probe.sample() if probe else None
    if probe:
        probe.samples.clear()
    last_join = max(p.start_after for p in participants)
    steady_at = min(last_join + SETTLE_S, args.duration * 0.5)
    config = {k: v for k, v in vars(args).items() if k != "secret"}
    config["server_pid"] = pid

    if args.nice:
        # Before the swarm starts: its threads inherit this thread's priority.
        os.nice(args.nice)
    try:
        swarm = Swarm(args.url, participants, args.duration, threads=args.threads)
    except CallsError as e:
        console.print(f"[red]cannot start:[/red] {e}")
        return 2
    started = time.monotonic()
    rcvbuf_errors_before = udp_receive_buffer_errors()
    interrupted = False
    metrics = MetricsWindow()
    steady_started: Optional[float] = None
    window_end = 0.0
    steady_cpu = 0.0
    steady_snapshot: Optional[Dict[str, Any]] = None
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    stats: List[ParticipantStats] = []
    with progress:
        task = progress.add_task("load test", total=args.duration, status="starting")
        prev = (time.monotonic(), 0)
        try:
            while not swarm.wait(TICK_S):
                now = time.monotonic()
                stats = swarm.stats()
                s = summary(stats)
                timeline.add(now - started, stats)
                used = usage.sample() if usage else None
                if used:
                    timeline.add_server(used.at - started, used.cpu_s, used.rss_bytes)
                rate = (s["rx_bytes"] - prev[1]) * 8 / max(now - prev[0], 1e-3) / 1e6
                prev = (now, s["rx_bytes"])
                progress.update(
                    task,
                    completed=min(swarm.elapsed, args.duration),
                    status=f"joined {s['joined']}/{len(participants)} "
                    f"receiving {s['receiving']} failed {s['failed']} rx {rate:.1f} Mbit/s",
                )
                if s["failed"] == len(participants):
                    # Nobody is left to measure: the server went away, or refuses everyone.
                    progress.update(task, status="every participant failed: stopping")
                    swarm.stop()
                    swarm.wait(10.0)
                    break
                if steady_started is None and now - started >= steady_at:
                    steady_started = now
                    steady_cpu = cpu_seconds()
                    metrics.add(scrape(args.url))
                    steady_snapshot = s
                    if probe:
                        probe.sample()
                elif steady_started is not None:
                    if probe:
                        probe.sample()
                    if args.duration - (now - started) > 0.6:
                        metrics.add(scrape(args.url))
                        window_end = now
        except KeyboardInterrupt:
            interrupted = True
            progress.update(task, status="stopping (Ctrl-C)")
            swarm.stop()
            try:
                swarm.wait(10.0)
            except KeyboardInterrupt:
                pass
    wall = time.monotonic() - started
    stats = swarm.stats()
    steady: Optional[Dict[str, Any]] = None
    loadtester_cpu = None
    loadtester_window = 0.0
    if steady_started is not None:
        loadtester_cpu = cpu_seconds() - steady_cpu
        loadtester_window = time.monotonic() - steady_started
    if steady_started is not None and window_end > steady_started:
        steady = {
            "started_s": steady_started - started,
            "window_s": window_end - steady_started,
            "at_start": steady_snapshot,
        }
    report = build_report(
        config,
        stats,
        wall,
        steady=steady,
        probe=probe,
        metrics=metrics,
        interrupted=interrupted,
        loadtester_cpu_s=loadtester_cpu,
        loadtester_window_s=loadtester_window,
        baseline=baseline,
    )
    rcvbuf_errors_after = udp_receive_buffer_errors()
    if rcvbuf_errors_before is not None and rcvbuf_errors_after is not None:
        # Loss on loopback is almost always a full socket buffer (server or participants).
        report["totals"]["udp_rcvbuf_errors"] = rcvbuf_errors_after - rcvbuf_errors_before
    report["participants_detail"] = [s.to_dict() for s in stats]
    verdict = judge(
        participants,
        stats,
        Thresholds(
            max_failed=args.max_failed,
            min_receiving_percent=args.min_receiving,
            max_loss_percent=args.max_loss,
            max_audio_delay_ms=args.max_audio_delay,
        ),
    )
    report["verdict"] = verdict.to_dict()
    render(report, console)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        console.print(f"report written to {args.report}")
    if args.csv:
        write_csv(args.csv, stats)
        console.print(f"participants written to {args.csv}")
    if args.html:
        timeline.add(time.monotonic() - started, stats)
        write_html(args.html, report, stats, timeline)
        console.print(f"page written to {args.html}")
    if interrupted:
        return 130
    if not verdict.passed:
        for failure in verdict.failures:
            console.print(f"[red]FAIL[/red] {failure}")
        return 1
    console.print(
        f"[green]PASS[/green] failed {verdict.failed} (max {args.max_failed}), "
        f"receiving {verdict.receiving}/{verdict.expected_receivers} "
        f"(min {args.min_receiving:g}%), loss {verdict.loss_percent:.2f}% "
        f"(max {args.max_loss:g}%)"
        + (
            f", audio delay p99 {verdict.audio_delay_p99_ms:.0f} ms (max {args.max_audio_delay:g} ms)"
            if verdict.audio_delay_p99_ms is not None
            else ""
        )
    )
    return 0


def main(argv: Optional[List[str]] = None) -> None:
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
