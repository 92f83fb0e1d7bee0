"""Fixtures: the reference server (built with cargo, started on free unusual ports)."""

import os
import random
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "pytest-secret-that-is-long-enough"


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    log: Path


def _free_port(rng: random.Random) -> int:
    """A port in an unusual range that is free for both TCP and UDP on loopback."""
    for _ in range(200):
        port = rng.randrange(20000, 60000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(
                socket.AF_INET, socket.SOCK_DGRAM
            ) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
                return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def _server_binary() -> Path:
    """The reference server: ``CALLSPY_SERVER_BIN`` if set (CI passes the binary ``cargo test``
    built, and a wheel test has no cargo), else built with cargo: release by default,
    ``CALLSPY_SERVER_PROFILE=debug`` for the debug build."""
    given = os.environ.get("CALLSPY_SERVER_BIN")
    if given:
        return Path(given).resolve()
    profile = os.environ.get("CALLSPY_SERVER_PROFILE", "release")
    cmd = ["cargo", "build", "--quiet", "-p", "calls-core", "--features", "server", "--bin", "calls-server"]
    if profile == "release":
        cmd.append("--release")
    subprocess.run(cmd, cwd=REPO, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / ("release" if profile == "release" else "debug") / "calls-server"


@contextmanager
def running_server(log_dir: Path, **settings: str) -> Iterator[Server]:
    """The reference server with an auth secret, on free ports, with ``settings`` as extra
    ``CALLS_*`` variables (``TCP_WRITE_QUEUE_FRAMES="16"``); killed on exit."""
    binary = _server_binary()
    rng = random.Random(os.getpid() ^ time.time_ns())
    http, media = _free_port(rng), _free_port(rng)
    log = log_dir / "server.log"
    # The server refuses unknown CALLS_* settings: pass only ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_")}
    env.update(
        CALLS_HTTP_LISTEN=f"127.0.0.1:{http}",
        CALLS_UDP_PORT=str(media),
        CALLS_TCP_PORT=str(media),
        CALLS_AUTH_SECRET=SECRET,
        CALLS_WORKERS="1",
        CALLS_LOG_LEVEL="warn",
        # A debug build beside the swarms on shared cores lags now and then; these tests are
        # not about overload (calls-core/tests/server_overload.rs is), so its thresholds are
        # lifted rather than have a join refused for 5 s after a hiccup.
        CALLS_OVERLOAD_DEGRADE_LAG_MS="3000",
        CALLS_OVERLOAD_SHED_VIDEO_LAG_MS="6000",
        CALLS_OVERLOAD_BUSY_PERCENT="100",
    )
    env.update({f"CALLS_{name}": value for name, value in settings.items()})
    with open(log, "w") as out:
        proc = subprocess.Popen([str(binary)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield Server(url=url, pid=proc.pid, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The reference server with an auth secret, on free ports; killed at the end."""
    with running_server(tmp_path_factory.mktemp("server")) as s:
        yield s
