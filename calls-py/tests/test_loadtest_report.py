"""The load tester's server rates over the steady window, from synthetic ``/metrics`` scrapes
(no server): a scrape where a router worker did not answer (``calls_workers_unanswered`` > 0)
lacks that worker's counters and must never bound the window."""

import json
from typing import Any, Dict

from calls.loadtest.report import (
    MetricsScrape,
    MetricsWindow,
    ServerProbe,
    build_report,
    parse_metrics,
    server_metrics,
    server_metrics_rows,
    thread_shares,
)


def scrape(
    at: float,
    datagrams_in: float,
    datagrams_out: float,
    bytes_in: float = 0.0,
    bytes_out: float = 0.0,
    unanswered: int = 0,
) -> MetricsScrape:
    """A scrape of the reference server at ``at`` seconds, with these counter values."""
    return MetricsScrape(
        at=at,
        metrics={
            "calls_datagrams_in_total": datagrams_in,
            "calls_datagrams_out_total": datagrams_out,
            "calls_datagram_bytes_in_total": bytes_in,
            "calls_datagram_bytes_out_total": bytes_out,
            "calls_workers_unanswered": float(unanswered),
        },
    )


def unreachable(at: float) -> MetricsScrape:
    return MetricsScrape(at=at, metrics={})


def window_of(*scrapes: MetricsScrape) -> MetricsWindow:
    window = MetricsWindow()
    for s in scrapes:
        window.add(s)
    return window


def rates(sm: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("datagrams_in_per_s", "datagrams_out_per_s", "mbit_in_s", "mbit_out_s")
    return {k: sm[k] for k in keys}


NOT_MEASURED = {
    "datagrams_in_per_s": None,
    "datagrams_out_per_s": None,
    "mbit_in_s": None,
    "mbit_out_s": None,
}


def test_rates_are_over_the_time_between_the_first_and_last_scrape() -> None:
    sm = server_metrics(
        window_of(
            scrape(10.0, 1000, 3000, 1_000_000, 3_000_000),
            scrape(15.0, 1500, 4500, 1_600_000, 4_200_000),
            scrape(20.0, 2000, 6000, 2_250_000, 5_500_000),
        )
    )
    assert sm["window_s"] == 10.0
    assert rates(sm) == {
        "datagrams_in_per_s": 100.0,
        "datagrams_out_per_s": 300.0,
        "mbit_in_s": 1.0,
        "mbit_out_s": 2.0,
    }
    assert (sm["scrapes"], sm["scrapes_incomplete"], sm["scrapes_failed"]) == (3, 0, 0)
    assert sm["not_measured"] is None
    assert server_metrics_rows(sm) == [
        ("server datagrams (steady 10 s)", "in 100/s (1.00 Mbit/s), out 300/s (2.00 Mbit/s)"),
        ("server /metrics scrapes (steady)", "3: 0 with workers unanswered, 0 unreachable"),
    ]


def test_an_incomplete_start_scrape_moves_the_start_to_the_next_complete_one() -> None:
    # The saturated worker's counts are missing at 10 s: a window from there would overstate.
    sm = server_metrics(
        window_of(
            scrape(10.0, 200, 600, unanswered=1),
            scrape(12.0, 1200, 3600),
            scrape(14.0, 1300, 3900, unanswered=1),
            scrape(20.0, 2000, 6000),
        )
    )
    assert sm["window_s"] == 8.0
    assert sm["datagrams_in_per_s"] == 100.0
    assert sm["datagrams_out_per_s"] == 300.0
    assert (sm["scrapes"], sm["scrapes_incomplete"], sm["scrapes_failed"]) == (4, 2, 0)
    assert server_metrics_rows(sm) == [
        ("server datagrams (steady 8 s)", "in 100/s (0.00 Mbit/s), out 300/s (0.00 Mbit/s)"),
        (
            "server /metrics scrapes (steady)",
            "4: 2 with workers unanswered (server saturated), 0 unreachable",
        ),
    ]


def test_an_incomplete_end_scrape_leaves_the_end_at_the_last_complete_one() -> None:
    # The 200-participant run: the last scrape lacked the saturated worker, and the window's
    # difference went negative.
    sm = server_metrics(
        window_of(
            scrape(10.0, 1000, 3000),
            scrape(18.0, 1800, 5400),
            scrape(20.0, 50, 150, unanswered=1),
        )
    )
    assert sm["window_s"] == 8.0
    assert sm["datagrams_in_per_s"] == 100.0
    assert sm["datagrams_out_per_s"] == 300.0
    assert (sm["scrapes"], sm["scrapes_incomplete"]) == (3, 1)
    assert sm["not_measured"] is None


def test_all_scrapes_incomplete_is_not_measured() -> None:
    sm = server_metrics(
        window_of(
            scrape(10.0, 1000, 3000, unanswered=1),
            scrape(20.0, 500, 1500, unanswered=2),
        )
    )
    assert rates(sm) == NOT_MEASURED
    assert sm["window_s"] == 0.0
    assert sm["not_measured"] == "server workers unanswered"
    assert server_metrics_rows(sm) == [
        ("server datagrams (steady)", "n/a (server workers unanswered)"),
        (
            "server /metrics scrapes (steady)",
            "2: 2 with workers unanswered (server saturated), 0 unreachable",
        ),
    ]


def test_one_complete_scrape_among_incomplete_ones_is_not_a_window() -> None:
    sm = server_metrics(
        window_of(
            scrape(10.0, 1000, 3000, unanswered=1),
            scrape(12.0, 1200, 3600),
            scrape(20.0, 500, 1500, unanswered=1),
        )
    )
    assert rates(sm) == NOT_MEASURED
    assert sm["not_measured"] == "server workers unanswered"
    assert (sm["scrapes"], sm["scrapes_incomplete"]) == (3, 2)


def test_a_counter_going_backwards_is_not_measured() -> None:
    # Both scrapes complete, but the server restarted in between.
    sm = server_metrics(window_of(scrape(10.0, 5000, 15000), scrape(20.0, 100, 16000)))
    assert rates(sm) == NOT_MEASURED
    assert sm["window_s"] == 0.0
    assert sm["not_measured"] == "counter went backwards: datagrams_in"
    assert server_metrics_rows(sm)[0] == (
        "server datagrams (steady)",
        "n/a (counter went backwards: datagrams_in)",
    )


def test_an_unreachable_server_is_not_measured_and_counted() -> None:
    sm = server_metrics(window_of(unreachable(10.0), scrape(12.0, 1000, 3000), unreachable(20.0)))
    assert rates(sm) == NOT_MEASURED
    assert sm["not_measured"] == "server unreachable"
    assert (sm["scrapes"], sm["scrapes_incomplete"], sm["scrapes_failed"]) == (3, 0, 2)
    assert server_metrics_rows(sm)[1] == (
        "server /metrics scrapes (steady)",
        "3: 0 with workers unanswered, 2 unreachable",
    )


def test_a_server_without_byte_counters_reports_datagrams_only() -> None:
    start = MetricsScrape(10.0, {"calls_datagrams_in_total": 0, "calls_datagrams_out_total": 0})
    end = MetricsScrape(20.0, {"calls_datagrams_in_total": 500, "calls_datagrams_out_total": 900})
    sm = server_metrics(window_of(start, end))
    assert rates(sm) == {
        "datagrams_in_per_s": 50.0,
        "datagrams_out_per_s": 90.0,
        "mbit_in_s": None,
        "mbit_out_s": None,
    }
    assert server_metrics_rows(sm)[0] == (
        "server datagrams (steady 10 s)",
        "in 50/s (n/a Mbit/s), out 90/s (n/a Mbit/s)",
    )


def test_the_report_keeps_its_server_metrics_keys_and_adds_the_scrape_counts() -> None:
    window = window_of(
        scrape(10.0, 1000, 3000, unanswered=1), scrape(12.0, 1000, 3000), scrape(22.0, 2000, 6000)
    )
    report = build_report({}, [], wall_s=30.0, metrics=window)
    assert report["server_metrics"] == {
        "window_s": 10.0,
        "datagrams_in_per_s": 100.0,
        "datagrams_out_per_s": 300.0,
        "mbit_in_s": 0.0,
        "mbit_out_s": 0.0,
        "scrapes": 3,
        "scrapes_incomplete": 1,
        "scrapes_failed": 0,
        "not_measured": None,
    }
    json.dumps(report)
    assert "server_metrics" not in build_report({}, [], wall_s=30.0, metrics=MetricsWindow())


def test_the_reference_servers_unanswered_gauge_marks_a_scrape_incomplete() -> None:
    text = (
        "# TYPE calls_datagrams_in counter\n"
        "calls_datagrams_in_total 1234\n"
        'calls_datagrams_dropped_total{reason="unknown_source"} 7\n'
        'calls_datagrams_dropped_total{reason="oversized"} 1\n'
        "# TYPE calls_workers_unanswered gauge\n"
        "calls_workers_unanswered 1\n"
        "# EOF\n"
    )
    metrics = parse_metrics(text)
    assert metrics["calls_datagrams_in_total"] == 1234.0
    assert metrics["calls_datagrams_dropped_total"] == 8.0
    assert not MetricsScrape(0.0, metrics).complete
    assert MetricsScrape(0.0, parse_metrics(text.replace("unanswered 1", "unanswered 0"))).complete


def test_each_server_thread_reports_its_share_of_a_core() -> None:
    """The per-thread CPU of a process (here this one: a named thread spinning while the main
    thread sleeps) comes out by thread name, in % of one core over the probe's window."""
    import os
    import threading
    import time

    stop = threading.Event()

    def spin() -> None:
        # Name the OS thread as a server names its workers (Python 3.11 does not).
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write("spinner")
        while not stop.is_set():
            pass

    probe = ServerProbe(os.getpid())
    worker = threading.Thread(target=spin, name="spinner")
    worker.start()
    try:
        first = probe.sample()
        time.sleep(1.0)
        last = probe.sample()
    finally:
        stop.set()
        worker.join()
    assert first is not None and last is not None
    shares = thread_shares(first, last)
    assert "spinner" in shares, shares
    # The spinner ran for most of the second (it shares the GIL with nobody but a sleeper).
    assert shares["spinner"] > 50.0, shares
    assert list(shares)[0] == "spinner", shares
    assert sum(shares.values()) <= 100.0 * (os.cpu_count() or 1) + 5.0, shares
