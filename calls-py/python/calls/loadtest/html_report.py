"""The load test as pictures (``--html report.html``) and as a table (``--csv rows.csv``).

The page is one self-contained HTML file: the plots are inline SVG drawn by matplotlib (the
optional extra ``pip install ./calls-py[report]``), no script and nothing fetched. It shows the
join-time CDF, the received bitrate per simulcast layer over time, loss and jitter per
participant, and the server's CPU and resident memory over time, above the summary and the
pass/fail verdict. :class:`Timeline` is what the command line records while the run goes on.
"""

import csv
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from calls.loadtest import ParticipantStats

__all__ = [
    "CSV_COLUMNS",
    "Timeline",
    "matplotlib_missing",
    "write_csv",
    "write_html",
]

#: Simulcast layers by RID, lowest first.
LAYERS = ("q", "h", "f")

#: The per-participant CSV's columns: :class:`ParticipantStats` fields, and the received
#: bitrate of each simulcast layer.
CSV_COLUMNS = (
    "index", "call", "user", "transport", "state", "error", "speaking", "simulcast",
    "welcome_ms", "connected_ms", "join_ms", "packets_sent", "packets_received",
    "bytes_received", "lost", "loss", "late_or_duplicate", "media_s", "rx_kbps", "tx_kbps",
    "rx_kbps_q", "rx_kbps_h", "rx_kbps_f", "audio_jitter_ms", "video_jitter_ms",
    "audio_delay_p50_ms", "audio_delay_p99_ms",
    "max_frame_gap_ms", "freezes", "keyframe_requests", "signal_errors", "tcp_errors",
)


def matplotlib_missing() -> Optional[str]:
    """Why ``--html`` cannot work here (in words), or None when matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--html needs matplotlib: pip install './calls-py[report]' (or matplotlib)"
    return None


@dataclass
class Timeline:
    """What the run looked like over time, one point per progress tick."""

    #: Seconds since the start.
    at: List[float] = field(default_factory=list)
    #: Kilobits received so far by every participant together, per simulcast layer.
    rx_kbit_by_layer: Dict[str, List[float]] = field(
        default_factory=lambda: {rid: [] for rid in LAYERS}
    )
    #: The server process: (seconds since the start, CPU seconds, resident bytes).
    server: List[Tuple[float, float, int]] = field(default_factory=list)

    def add(self, at: float, stats: Sequence[ParticipantStats]) -> None:
        """A tick: the participants' cumulative received kilobits per layer (their average
        rate per layer times the seconds they received media)."""
        self.at.append(at)
        for rid in LAYERS:
            self.rx_kbit_by_layer[rid].append(
                sum(s.rx_kbps_by_layer.get(rid, 0.0) * s.media_s for s in stats)
            )

    def add_server(self, at: float, cpu_s: float, rss_bytes: int) -> None:
        self.server.append((at, cpu_s, rss_bytes))

    def layer_rates(self) -> Tuple[List[float], Dict[str, List[float]]]:
        """Received Mbit/s per layer between consecutive ticks (at each interval's end)."""
        times: List[float] = []
        rates: Dict[str, List[float]] = {rid: [] for rid in LAYERS}
        for i in range(1, len(self.at)):
            dt = self.at[i] - self.at[i - 1]
            if dt <= 0:
                continue
            times.append(self.at[i])
            for rid in LAYERS:
                kbit = self.rx_kbit_by_layer[rid]
                rates[rid].append(max(0.0, kbit[i] - kbit[i - 1]) / dt / 1000.0)
        return times, rates

    def server_usage(self) -> Tuple[List[float], List[float], List[float]]:
        """(times, CPU percent of one core between samples, RSS in MB)."""
        times: List[float] = []
        cpu: List[float] = []
        rss: List[float] = []
        for (t0, c0, _), (t1, c1, r1) in zip(self.server, self.server[1:]):
            if t1 > t0:
                times.append(t1)
                cpu.append(100.0 * max(0.0, c1 - c0) / (t1 - t0))
                rss.append(r1 / 1e6)
        return times, cpu, rss


def _row(s: ParticipantStats) -> Dict[str, Any]:
    d = s.to_dict()
    for rid in LAYERS:
        d[f"rx_kbps_{rid}"] = s.rx_kbps_by_layer.get(rid, 0.0)
    return {k: d.get(k) for k in CSV_COLUMNS}


def write_csv(path: str, stats: Sequence[ParticipantStats]) -> None:
    """One row per participant (:data:`CSV_COLUMNS`); empty cells for what was not measured."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for s in stats:
            writer.writerow(_row(s))


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    # Inline: the <svg> element without the XML prolog and DOCTYPE.
    return text[text.index("<svg"):]


def _plots(stats: Sequence[ParticipantStats], timeline: Timeline) -> List[Tuple[str, str]]:
    """(title, inline SVG) of each plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: List[Tuple[str, str]] = []

    def figure(title: str) -> Tuple[Any, Any]:
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        return fig, ax

    def done(title: str, fig: Any) -> None:
        out.append((title, _svg(fig)))
        plt.close(fig)

    title = "Join time (WebSocket open to first media), CDF"
    fig, ax = figure(title)
    joins = sorted(s.join_ms for s in stats if s.join_ms is not None)
    if joins:
        ax.step(joins, [(i + 1) / len(joins) for i in range(len(joins))], where="post")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of participants")
    ax.set_ylim(0, 1.05)
    done(title, fig)

    title = "Received bitrate per simulcast layer, all participants"
    fig, ax = figure(title)
    times, rates = timeline.layer_rates()
    for rid in LAYERS:
        ax.plot(times, rates[rid], label=f"layer {rid}")
    ax.set_xlabel("s since start")
    ax.set_ylabel("Mbit/s")
    ax.legend(loc="upper left")
    done(title, fig)

    title = "Loss and jitter per participant"
    fig, ax = figure(title)
    xs = [s.index for s in stats]
    ax.bar(xs, [100.0 * s.loss for s in stats], color="tab:red", alpha=0.6, label="loss %")
    ax.set_xlabel("participant")
    ax.set_ylabel("loss %")
    jitter = ax.twinx()
    def measured(values: Sequence[Optional[float]]) -> List[float]:
        return [math.nan if v is None else v for v in values]

    jitter.plot(xs, measured([s.audio_jitter_ms for s in stats]), "o", label="audio jitter ms")
    jitter.plot(xs, measured([s.video_jitter_ms for s in stats]), "s", label="video jitter ms")
    jitter.set_ylabel("jitter ms")
    handles = ax.get_legend_handles_labels()
    more = jitter.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left")
    done(title, fig)

    title = "Server CPU and resident memory"
    fig, ax = figure(title)
    times, cpu, rss = timeline.server_usage()
    ax.plot(times, cpu, color="tab:blue", label="CPU % of one core")
    ax.set_xlabel("s since start")
    ax.set_ylabel("CPU %")
    mem = ax.twinx()
    mem.plot(times, rss, color="tab:green", label="RSS MB")
    mem.set_ylabel("MB")
    handles = ax.get_legend_handles_labels()
    more = mem.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left")
    if not times:
        ax.text(0.5, 0.5, "server process not found on this machine", ha="center",
                transform=ax.transAxes)
    done(title, fig)
    return out


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }
td.n { text-align: right; } .pass { color: #070; } .fail { color: #b00; }
figure { margin: 1.5em 0; } svg { max-width: 100%; height: auto; }
"""


def write_html(
    path: str,
    report: Dict[str, Any],
    stats: Sequence[ParticipantStats],
    timeline: Timeline,
) -> None:
    """Writes the page: verdict, summary, then each plot as inline SVG."""
    esc = html.escape
    parts = report["participants"]
    verdict = report.get("verdict", {})
    rows = [
        ("participants", parts["total"]),
        ("joined", parts["joined"]),
        ("connected", parts["connected"]),
        ("receiving media", parts["receiving_media"]),
        ("failed", parts["failed"]),
        ("lost packets", report["totals"]["lost"]),
        ("video freezes", report["totals"]["freezes"]),
        ("duration s", f"{report['wall_s']:.1f}" if "wall_s" in report else "-"),
    ]
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>calls load test</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>calls load test</h1>",
    ]
    if verdict:
        cls = "pass" if verdict["passed"] else "fail"
        body.append(f'<p class="{cls}"><b>{"PASS" if verdict["passed"] else "FAIL"}</b></p>')
        if verdict["failures"]:
            body.append("<ul>" + "".join(f"<li>{esc(f)}</li>" for f in verdict["failures"]) + "</ul>")
    config = report.get("config", {})
    body.append(
        "<p>" + esc(", ".join(f"{k} {v}" for k, v in config.items() if v not in (None, False))) + "</p>"
    )
    body.append("<table>")
    body.extend(f'<tr><th>{esc(str(k))}</th><td class="n">{esc(str(v))}</td></tr>' for k, v in rows)
    body.append("</table>")
    for error in parts.get("errors", []):
        body.append(f'<p class="fail">error: {esc(error)}</p>')
    for title, svg in _plots(stats, timeline):
        body.append(f"<figure><h2>{esc(title)}</h2>{svg}</figure>")
    body.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(body) + "\n")
