"""Checks a live calls-server's /metrics against the ops bundle (CI runs it).

    python3 docs/ops/check_metrics.py http://127.0.0.1:8080/metrics

- the exposition parses with the strict OpenMetrics parser of prometheus_client;
- every metric is in base units (seconds, bytes, ratios): no milli-, micro-, kilo-, bits;
- every calls_* / process_* metric that alerts.yml and grafana-dashboard.json query exists.

Exit status 0 when all hold; otherwise each problem is printed and the status is 1.
"""

import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Set

from prometheus_client.openmetrics.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
NOT_BASE_UNITS = re.compile(r"milli|micro|nano|kilo|mega|_ms(_|$)|_us(_|$)|bits|kbps|minutes|hours")
#: A sample's name is its family's plus one of these (OpenMetrics).
SUFFIXES = ("_total", "_created", "_info", "_bucket", "_count", "_sum", "_gcount", "_gsum")


def queried_names() -> Set[str]:
    """calls_* and process_* names in the alert rules and the dashboard's queries."""
    text = (HERE / "alerts.yml").read_text()
    dashboard = json.loads((HERE / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        text += "\n".join(t["expr"] for t in panel.get("targets", []))
    return set(re.findall(r"\b(?:calls|process)_[a-z_]+", text))


def check(exposition: str) -> List[str]:
    problems: List[str] = []
    try:
        families = list(text_string_to_metric_families(exposition))
    except Exception as e:  # the parser raises ValueError and others on bad input
        return [f"not valid OpenMetrics: {e}"]
    samples: Set[str] = set()
    for family in families:
        if NOT_BASE_UNITS.search(family.name):
            problems.append(f"{family.name}: not in base units")
        samples.add(family.name)
        samples.update(s.name for s in family.samples)
        samples.update(family.name + suffix for suffix in SUFFIXES)
    for name in sorted(queried_names() - samples):
        problems.append(f"{name}: queried by the ops bundle but not exported")
    return problems


def main() -> int:
    source = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/metrics"
    if source.startswith("http"):
        # A server started just before may not listen yet: try for up to 10 s.
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(source, timeout=10) as r:
                    exposition = r.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    else:
        exposition = Path(source).read_text()
    problems = check(exposition)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{source}: strict OpenMetrics, base units, every queried metric exported")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
