"""The smallest complete embedder of calls in Python: asyncio, one UDP socket for every call's
media, signaling as JSON lines over TCP, one ``calls.Router`` and its drive loop.

    python calls-py/examples/embed_asyncio.py --media 127.0.0.1:8443 --signal 127.0.0.1:8444

Protocol (one JSON object per line, as the Rust ``minimal_embedder`` example): the client sends
``{"join": {"call": "standup", "user": "alice"}}``, gets ``{"joined": {"session": 1}}``, then sends
and receives the messages of docs/signaling.md. Closing the connection leaves the call.
"""

import argparse
import asyncio
import json
import socket
import time
from typing import Dict, Optional, Tuple, cast

import calls


def address(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Embedder(asyncio.DatagramProtocol):
    """Owns the router; every input is followed by `flush()`, which drains every output."""

    def __init__(self, media: Tuple[str, int]) -> None:
        self.media = media
        self.router = calls.Router(
            {"bind_address": media[0], "udp_port": media[1], "enable_tcp": False},
            now=time.monotonic(),
        )
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.clients: Dict[int, asyncio.StreamWriter] = {}
        self.next_session = 1
        self.timer: Optional[asyncio.TimerHandle] = None

    # -- inputs -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, source: Tuple[str, int]) -> None:
        self.router.handle_datagram(data, source, self.media, time.monotonic())
        self.flush()

    def on_timer(self) -> None:
        self.router.handle_timeout(time.monotonic())
        self.flush()

    async def signaling(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = json.loads((await reader.readline()) or b"{}").get("join") or {}
        session = self.next_session
        self.next_session += 1
        try:
            self.router.join(str(first.get("call")), session, str(first.get("user")), time.monotonic())
        except calls.CallsError as e:
            writer.write((json.dumps({"error": str(e)}) + "\n").encode())
            writer.close()
            return
        self.clients[session] = writer
        writer.write((json.dumps({"joined": {"session": session}}) + "\n").encode())
        self.flush()
        while line := await reader.readline():
            try:
                self.router.handle_signal(session, line.decode(), time.monotonic())
            except calls.SignalError:
                pass  # the router already told the client with an `error` message
            self.flush()
        del self.clients[session]
        self.router.leave(session, time.monotonic())
        self.flush()

    # -- outputs ----------------------------------------------------------------------------
    def flush(self) -> None:
        for out in self.router.drain():
            if isinstance(out, calls.Transmit):
                assert self.transport is not None
                self.transport.sendto(out.data, out.destination)
            elif isinstance(out, calls.Signal):
                writer = self.clients.get(out.session)
                if writer is not None:
                    writer.write((out.json + "\n").encode())
            elif isinstance(out, calls.Timeout):
                if self.timer is not None:
                    self.timer.cancel()
                delay = max(0.0, out.at - time.monotonic())
                self.timer = asyncio.get_running_loop().call_later(delay, self.on_timer)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", default="127.0.0.1:8443")
    parser.add_argument("--signal", default="127.0.0.1:8444")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    # Bind first: with port 0 the router must advertise the port the kernel picked.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address(args.media))
    media = sock.getsockname()
    _, embedder = await loop.create_datagram_endpoint(lambda: Embedder(media), sock=sock)
    server = await asyncio.start_server(embedder.signaling, *address(args.signal))
    signal_addr = server.sockets[0].getsockname()
    print(f"listening media={media[0]}:{media[1]} signal={signal_addr[0]}:{signal_addr[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
