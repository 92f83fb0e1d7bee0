"""examples/embed_asyncio.py carries a real call: two str0m peers (calls.testing.Peer) join it
over loopback with real UDP sockets and JSON-lines signaling, and hear and see each other."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

from calls.testing import Peer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embed_asyncio.py"


class Participant:
    def __init__(self, signal: Tuple[str, int], call: str, user: str, seed: int) -> None:
        self.tcp = socket.create_connection(signal, timeout=5)
        self.tcp.sendall((json.dumps({"join": {"call": call, "user": user}}) + "\n").encode())
        self.inbox = b""
        while b"\n" not in self.inbox:
            self.inbox += self.tcp.recv(65536)
        line, _, self.inbox = self.inbox.partition(b"\n")
        session = json.loads(line)["joined"]["session"]
        self.tcp.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.peer = Peer(session, user, self.udp.getsockname(), time.monotonic(), seed=seed)
        self.peer.start(time.monotonic())

    def step(self) -> None:
        now = time.monotonic()
        try:
            self.inbox += self.tcp.recv(1 << 20)
        except BlockingIOError:
            pass
        while b"\n" in self.inbox:
            line, _, self.inbox = self.inbox.partition(b"\n")
            self.peer.handle_signal(line.decode(), now)
        while True:
            try:
                data, source = self.udp.recvfrom(2048)
            except BlockingIOError:
                break
            self.peer.handle_datagram(source, data, now)
        at = self.peer.poll_timeout()
        if at is not None and at <= now:
            self.peer.handle_timeout(now)
        for text in self.peer.take_signals():
            self.tcp.setblocking(True)
            self.tcp.sendall((text + "\n").encode())
            self.tcp.setblocking(False)
        for t in self.peer.take_transmits():
            self.udp.sendto(t.data, t.destination)

    def received(self) -> Dict[str, int]:
        return {t["source"]: t["packets"] for t in self.peer.received()}


def test_two_participants_talk_through_the_asyncio_embedder() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--media", "127.0.0.1:0", "--signal", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        host, port = first.split("signal=")[1].strip().rsplit(":", 1)
        people: List[Participant] = [
            Participant((host, int(port)), "standup", user, seed)
            for seed, user in enumerate(["alice", "bob"], start=1)
        ]
        deadline = time.monotonic() + 20
        while not all(
            p.received().get("microphone", 0) >= 50 and p.received().get("camera", 0) >= 50
            for p in people
        ):
            assert time.monotonic() < deadline, [p.received() for p in people]
            for p in people:
                p.step()
            time.sleep(0.001)
        assert all(p.peer.connected for p in people)
    finally:
        proc.kill()
        proc.wait()
