"""Measurements around a swarm: the server process (CPU, memory), the server's ``/metrics``
counters, and the final report (percentiles over participants, totals)."""

import math
import os
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from calls.loadtest import ParticipantStats

__all__ = [
    "MetricsScrape",
    "MetricsWindow",
    "ServerProbe",
    "thread_shares",
    "ServerSample",
    "build_report",
    "by_transport",
    "find_pid_by_port",
    "parse_metrics",
    "percentiles",
    "scrape_metrics",
    "server_metrics",
    "server_metrics_rows",
    "udp_receive_buffer_errors",
]

#: Simulcast layers by RID, lowest first (a screen share has only ``h`` and ``f``).
LAYERS = ("q", "h", "f")


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> Dict[str, Any]:
    """``{"n", "min", "p50", …, "max", "mean"}`` (nearest-rank), or only ``n`` when empty."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    out: Dict[str, Any] = {"n": len(data)}
    if not data:
        return out
    out["min"] = data[0]
    for p in ps:
        rank = max(1, math.ceil(p / 100 * len(data)))
        out[f"p{p}"] = data[rank - 1]
    out["max"] = data[-1]
    out["mean"] = sum(data) / len(data)
    return out


def find_pid_by_port(port: int) -> Optional[int]:
    """The process listening on TCP ``port`` on this machine, found through /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class ServerSample:
    """One look at the server process."""

    at: float
    cpu_s: float
    rss_bytes: int
    threads: int
    # CPU seconds per thread name (threads of one name summed, e.g. a runtime's workers).
    thread_cpu_s: Dict[str, float] = field(default_factory=dict)


class ServerProbe:
    """Reads a local process's CPU time and resident memory from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.samples: List[ServerSample] = []

    def sample(self) -> Optional[ServerSample]:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                # Fields after the command name (which may contain spaces).
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{self.pid}/status") as f:
                status = f.read()
        except OSError:
            return None
        cpu = (int(fields[11]) + int(fields[12])) / self.ticks
        thread_cpu = self._thread_cpu()
        rss = re.search(r"VmRSS:\s+(\d+) kB", status)
        threads = re.search(r"Threads:\s+(\d+)", status)
        s = ServerSample(
            at=time.monotonic(),
            cpu_s=cpu,
            rss_bytes=int(rss.group(1)) * 1024 if rss else 0,
            threads=int(threads.group(1)) if threads else 0,
            thread_cpu_s=thread_cpu,
        )
        self.samples.append(s)
        return s

    def _thread_cpu(self) -> Dict[str, float]:
        """CPU seconds of each of the process's threads, summed by thread name."""
        by_name: Dict[str, float] = {}
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return by_name
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    text = f.read()
            except OSError:
                continue  # the thread ended meanwhile
            name = text[text.find("(") + 1 : text.rfind(")")]
            fields = text[text.rfind(")") + 1 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / self.ticks
            by_name[name] = by_name.get(name, 0.0) + cpu
        return by_name


def thread_shares(first: ServerSample, last: ServerSample) -> Dict[str, float]:
    """Each thread name's CPU between two samples, in % of one core, busiest first."""
    span = last.at - first.at
    if span <= 0:
        return {}
    shares = {
        name: 100.0 * max(0.0, cpu - first.thread_cpu_s.get(name, 0.0)) / span
        for name, cpu in last.thread_cpu_s.items()
    }
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def scrape_metrics(url: str, timeout: float = 5.0) -> Dict[str, float]:
    """The server's ``/metrics`` as ``{name: value}`` (labels summed), or {} if unreachable."""
    base = url.rstrip("/")
    if base.startswith("ws://"):
        base = "http://" + base[len("ws://") :]
    if not base.startswith("http://"):
        base = "http://" + base
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return {}
    return parse_metrics(text)


def parse_metrics(text: str) -> Dict[str, float]:
    """Prometheus / OpenMetrics text as ``{name: value}``, the samples of a name summed over
    its labels."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return out


def udp_receive_buffer_errors() -> Optional[int]:
    """This machine's UDP datagrams dropped because a socket's receive buffer was full."""
    try:
        with open("/proc/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        header, values = lines[0], lines[1]
        return int(values[header.index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def _counter(metrics: Dict[str, float], name: str) -> Optional[float]:
    for key in (f"calls_{name}_total", f"{name}_total", f"calls_{name}", name):
        if key in metrics:
            return metrics[key]
    return None


@dataclass(frozen=True)
class MetricsScrape:
    """One scrape of the server's ``/metrics`` (``{}`` if it was unreachable), and when."""

    at: float
    metrics: Dict[str, float]

    @property
    def answered(self) -> bool:
        return bool(self.metrics)

    @property
    def complete(self) -> bool:
        """Every router worker answered: ``calls_workers_unanswered`` is 0 (or absent, from a
        server that does not report it). A worker that did not answer within the server's 2 s
        limit is missing from the counters, so an incomplete scrape must not bound a window."""
        return self.answered and self.metrics.get("calls_workers_unanswered", 0.0) == 0


class MetricsWindow:
    """The steady window's ``/metrics`` scrapes, fed one by one (:meth:`add`): the first
    complete scrape is the window's start, the latest complete one its end, and the others
    are counted. Keeps only those two scrapes."""

    def __init__(self) -> None:
        self.start: Optional[MetricsScrape] = None
        self.end: Optional[MetricsScrape] = None
        #: Scrapes tried, scrapes with a worker unanswered, and scrapes that got no answer.
        self.scrapes = 0
        self.incomplete = 0
        self.failed = 0

    def add(self, scrape: MetricsScrape) -> None:
        self.scrapes += 1
        if not scrape.answered:
            self.failed += 1
        elif not scrape.complete:
            self.incomplete += 1
        else:
            if self.start is None:
                self.start = scrape
            self.end = scrape


#: The server's rates over the steady window: (report key, counter, counts per unit), the
#: byte counters in Mbit/s (125 000 bytes a megabit).
SERVER_RATES = (
    ("datagrams_in_per_s", "datagrams_in", 1.0),
    ("datagrams_out_per_s", "datagrams_out", 1.0),
    ("mbit_in_s", "datagram_bytes_in", 125_000.0),
    ("mbit_out_s", "datagram_bytes_out", 125_000.0),
)


def server_metrics(window: MetricsWindow) -> Dict[str, Any]:
    """The report's ``server_metrics``: the :data:`SERVER_RATES` between the window's first
    and last complete scrape, over the time between those two scrapes (``window_s``), and how
    many scrapes there were (``scrapes``), how many had a worker unanswered
    (``scrapes_incomplete``: the server was saturated) and how many got no answer
    (``scrapes_failed``). A rate that cannot be measured is None, and ``not_measured`` says
    why: no two complete scrapes, or a counter that went backwards (the server restarted)."""
    out: Dict[str, Any] = {
        "window_s": 0.0,
        **{key: None for key, _, _ in SERVER_RATES},
        "scrapes": window.scrapes,
        "scrapes_incomplete": window.incomplete,
        "scrapes_failed": window.failed,
        "not_measured": None,
    }
    start, end = window.start, window.end
    if start is None or end is None or end.at <= start.at:
        if window.incomplete:
            out["not_measured"] = "server workers unanswered"
        elif window.failed:
            out["not_measured"] = "server unreachable"
        else:
            out["not_measured"] = "only one scrape"
        return out
    seconds = end.at - start.at
    rates: Dict[str, Optional[float]] = {}
    backwards: List[str] = []
    for key, name, per_unit in SERVER_RATES:
        a, b = _counter(start.metrics, name), _counter(end.metrics, name)
        if a is None or b is None:
            rates[key] = None
        elif b < a:
            backwards.append(name)
        else:
            rates[key] = (b - a) / seconds / per_unit
    if backwards:
        # A counter never decreases in one server process: this is a restart, and the
        # differences of the other counters are just as meaningless.
        out["not_measured"] = f"counter went backwards: {', '.join(backwards)}"
        return out
    out["window_s"] = seconds
    out.update(rates)
    return out


def server_metrics_rows(sm: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The totals table's rows for a report's ``server_metrics``: (what, value)."""
    scrapes = (
        f"{sm['scrapes']}: {sm['scrapes_incomplete']} with workers unanswered"
        + (" (server saturated)" if sm["scrapes_incomplete"] else "")
        + f", {sm['scrapes_failed']} unreachable"
    )
    rows = [("server /metrics scrapes (steady)", scrapes)]
    if sm["not_measured"] is not None:
        rows.insert(0, ("server datagrams (steady)", f"n/a ({sm['not_measured']})"))
        return rows

    def rate(key: str, digits: int) -> str:
        value = sm[key]
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows.insert(
        0,
        (
            f"server datagrams (steady {sm['window_s']:.0f} s)",
            f"in {rate('datagrams_in_per_s', 0)}/s ({rate('mbit_in_s', 2)} Mbit/s), "
            f"out {rate('datagrams_out_per_s', 0)}/s ({rate('mbit_out_s', 2)} Mbit/s)",
        ),
    )
    return rows


def by_transport(stats: List[ParticipantStats]) -> Dict[str, Dict[str, Any]]:
    """Totals per transport (``udp``, ``tcp``; only those in use): participants, joined,
    connected, receiving media, failed, packets received and lost, loss percent, ICE-TCP
    errors and dropped frames."""
    out: Dict[str, Dict[str, Any]] = {}
    for transport in sorted({s.transport for s in stats}):
        group = [s for s in stats if s.transport == transport]
        received = sum(s.packets_received for s in group)
        lost = sum(s.lost for s in group)
        out[transport] = {
            "participants": len(group),
            "joined": sum(1 for s in group if s.session is not None),
            "connected": sum(1 for s in group if s.connected_ms is not None),
            "receiving_media": sum(1 for s in group if s.packets_received > 0),
            "failed": sum(1 for s in group if s.state == "failed"),
            "packets_received": received,
            "lost": lost,
            "loss_percent": 100.0 * lost / (received + lost) if received + lost > 0 else 0.0,
            "tcp_errors": sum(s.tcp_errors for s in group),
            "tcp_frames_dropped": sum(s.tcp_frames_dropped for s in group),
        }
    return out


def slot_totals(stats: List[ParticipantStats]) -> Dict[str, Any]:
    """What the receive slots carried, over all participants: slots that received media (by
    kind), the publishers the audio and camera slots named at the end, and the counts that must
    stay 0 when the router keeps each slot one continuous, correctly announced stream."""
    slots = [slot for s in stats for slot in s.slots]
    receiving = [slot for slot in slots if slot.packets > 0]
    return {
        "receiving": {
            kind: sum(1 for slot in receiving if slot.kind == kind)
            for kind in ("audio", "camera", "screen")
        },
        "publishers_shown": len({slot.session for slot in slots if slot.session is not None}),
        "misattributed": sum(s.misattributed for s in stats),
        "ssrc_changes": sum(slot.ssrc_changes for slot in slots),
        "picture_id_breaks": sum(slot.picture_id_breaks for slot in slots),
        "switches_off_keyframe": sum(slot.switches_off_keyframe for slot in slots),
    }


def build_report(
    config: Dict[str, Any],
    stats: List[ParticipantStats],
    wall_s: float,
    steady: Optional[Dict[str, Any]] = None,
    probe: Optional[ServerProbe] = None,
    metrics: Optional[MetricsWindow] = None,
    interrupted: bool = False,
    loadtester_cpu_s: Optional[float] = None,
    loadtester_window_s: float = 0.0,
    baseline: Optional[ServerSample] = None,
) -> Dict[str, Any]:
    """The report as a JSON-ready dict. ``metrics``: the steady window's ``/metrics`` scrapes
    (``server_metrics``, see :func:`server_metrics`)."""
    n = len(stats)
    receiving = [s for s in stats if s.packets_received > 0]
    failed = [s for s in stats if s.state == "failed"]
    rx_packets = sum(s.packets_received for s in stats)
    tx_packets = sum(s.packets_sent for s in stats)
    rx_bytes = sum(s.bytes_received for s in stats)
    tx_bytes = sum(s.bytes_sent for s in stats)
    # Per-layer bitrates over the participants that receive simulcast video at all.
    simulcast_viewers = [s for s in receiving if any(t.simulcast for t in s.tracks)]
    video_viewers = [s for s in receiving if any(t.source != "microphone" for t in s.tracks)]
    report: Dict[str, Any] = {
        "config": config,
        "interrupted": interrupted,
        "wall_s": wall_s,
        "participants": {
            "total": n,
            "joined": sum(1 for s in stats if s.session is not None),
            "connected": sum(1 for s in stats if s.connected_ms is not None),
            "receiving_media": len(receiving),
            "failed": len(failed),
            "errors": sorted({s.error for s in failed if s.error})[:10],
        },
        "per_participant": {
            "welcome_ms": percentiles([s.welcome_ms for s in stats if s.welcome_ms is not None]),
            "connected_ms": percentiles(
                [s.connected_ms for s in stats if s.connected_ms is not None]
            ),
            "join_ms": percentiles([s.join_ms for s in stats if s.join_ms is not None]),
            "rx_kbps": percentiles([s.rx_kbps for s in receiving]),
            "tx_kbps": percentiles([s.tx_kbps for s in stats if s.tx_kbps > 0]),
            "loss_percent": percentiles([100.0 * s.loss for s in receiving]),
            "freezes": percentiles([float(s.freezes) for s in receiving]),
            **{
                f"rx_kbps_{rid}": percentiles(
                    [s.rx_kbps_by_layer.get(rid, 0.0) for s in simulcast_viewers]
                )
                for rid in LAYERS
            },
            "audio_jitter_ms": percentiles(
                [s.audio_jitter_ms for s in stats if s.audio_jitter_ms is not None]
            ),
            "video_jitter_ms": percentiles(
                [s.video_jitter_ms for s in stats if s.video_jitter_ms is not None]
            ),
            "audio_delay_p50_ms": percentiles(
                [s.audio_delay_p50_ms for s in stats if s.audio_delay_p50_ms is not None]
            ),
            "audio_delay_p99_ms": percentiles(
                [s.audio_delay_p99_ms for s in stats if s.audio_delay_p99_ms is not None]
            ),
            "max_frame_gap_ms": percentiles([s.max_frame_gap_ms for s in video_viewers]),
            "speaker_messages": percentiles(
                [float(s.speaker_messages) for s in stats if s.session is not None]
            ),
        },
        "totals": {
            "client_packets_sent": tx_packets,
            "client_packets_received": rx_packets,
            "client_bytes_sent": tx_bytes,
            "client_bytes_received": rx_bytes,
            "lost": sum(s.lost for s in stats),
            "freezes": sum(s.freezes for s in stats),
            "client_tx_packets_per_s": tx_packets / wall_s if wall_s > 0 else 0.0,
            "client_rx_packets_per_s": rx_packets / wall_s if wall_s > 0 else 0.0,
            "client_tx_mbit_s": tx_bytes * 8 / wall_s / 1e6 if wall_s > 0 else 0.0,
            "client_rx_mbit_s": rx_bytes * 8 / wall_s / 1e6 if wall_s > 0 else 0.0,
            "rx_mbit_s_by_layer": {
                rid: sum(s.rx_kbps_by_layer.get(rid, 0.0) for s in stats) / 1e3 for rid in LAYERS
            },
            "max_frame_gap_ms": max((s.max_frame_gap_ms for s in stats), default=0.0),
            "speaker_messages": sum(s.speaker_messages for s in stats),
            "layers_messages": sum(s.layers_messages for s in stats),
            "slots": slot_totals(stats),
            "by_transport": by_transport(stats),
        },
    }
    if steady is not None:
        report["steady_state"] = steady
    if metrics is not None and metrics.scrapes:
        report["server_metrics"] = server_metrics(metrics)
    if probe is not None and len(probe.samples) >= 2:
        first, last = probe.samples[0], probe.samples[-1]
        span = last.at - first.at
        peak = max(s.rss_bytes for s in probe.samples)
        base = baseline if baseline is not None else first
        joined = max(1, report["participants"]["joined"])
        report["server_process"] = {
            "pid": probe.pid,
            "cpu_percent": 100.0 * (last.cpu_s - first.cpu_s) / span if span > 0 else None,
            "cpu_window_s": span,
            "rss_before_mb": base.rss_bytes / 1e6,
            "rss_peak_mb": peak / 1e6,
            "rss_per_participant_kb": (peak - base.rss_bytes) / joined / 1e3,
            "threads": last.threads,
            # % of one core per thread name over the same window (the workers' shares).
            "thread_cpu_percent": thread_shares(first, last),
        }
    if loadtester_cpu_s is not None and loadtester_window_s > 0:
        cores = loadtester_cpu_s / loadtester_window_s
        report["load_tester"] = {
            "cpu_s": loadtester_cpu_s,
            "window_s": loadtester_window_s,
            "cores_used": cores,
            "participants_per_core": n / cores if cores > 0 else None,
        }
    return report
