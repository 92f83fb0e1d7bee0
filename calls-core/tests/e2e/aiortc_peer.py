#!/usr/bin/env python3
"""An aiortc participant for the end-to-end tests.

Joins a call through the reference server's WebSocket signaling (docs/signaling.md, protocol 2),
publishes a tone (Opus) and a moving test pattern (VP8), answers the server's offer of its receive
slots, keeps the slot mapping from the `slots` messages, and counts the frames it decodes per slot
(m-line). Every half second it prints one JSON status line on stdout:

    {"session": 3, "protocol": 2, "roster": {"1": "web"},
     "slots": {"4": {"mid": "4", "kind": "camera", "session": 1, "user": "web", "source": "camera"}},
     "recv": {"4": {"kind": "video", "frames": 120}}, "router_offers": 1,
     "ice": "completed", "connection": "connected", "errors": [...]}

The Node tests read those lines. It runs until stdin closes or it gets SIGTERM.

usage: aiortc_peer.py WS_URL   (e.g. ws://127.0.0.1:18084/ws?call=x&user=py)
"""

import asyncio
import fractions
import json
import math
import signal
import struct
import sys
import time

import aioice.ice
import av
import websockets
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError

# aioice skips loopback when it discovers host addresses; the server is on loopback only.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]

RATE = 48000
PTIME = 0.02


class Tone(MediaStreamTrack):
    """A 440 Hz tone, 20 ms frames, paced in real time."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        n = int(RATE * PTIME)
        self._samples = n
        self._pcm = struct.pack(
            f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(n))
        )
        self._start = None
        self._ts = 0

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        else:
            self._ts += self._samples
            await asyncio.sleep(max(0, self._start + self._ts / RATE - time.time()))
        frame = av.AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(self._pcm)
        frame.pts = self._ts
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


class Pattern(VideoStreamTrack):
    """A small moving gradient (320x240), paced by VideoStreamTrack (30 fps)."""

    W, H = 320, 240

    def __init__(self):
        super().__init__()
        self._n = 0

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(self.W, self.H, "yuv420p")
        self._n += 1
        for i, plane in enumerate(frame.planes):
            line = plane.line_size
            rows = plane.buffer_size // line
            if i == 0:
                shift = (self._n * 4) % 256
                row = bytes((x + shift) % 256 for x in range(line))
                plane.update(row * rows)
            else:
                plane.update(bytes([128 + (40 if i == 1 else -40)]) * (line * rows))
        frame.pts = pts
        frame.time_base = time_base
        return frame


async def main(url):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    state = {
        "session": None,
        "protocol": None,
        "roster": {},
        "slots": {},
        "router_offers": 0,
        "recv": {},
        "errors": [],
        "making_offer": False,
    }
    consumers = []

    def mid_of(track):
        for t in pc.getTransceivers():
            if t.receiver and t.receiver.track is track:
                return t.mid
        return None

    async def consume(track):
        mid = mid_of(track)
        key = mid or track.id
        state["recv"][key] = {"kind": track.kind, "frames": 0}
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            # The m-line may have been mapped after the event fired.
            state["recv"][key]["frames"] += 1

    @pc.on("track")
    def on_track(track):
        consumers.append(asyncio.ensure_future(consume(track)))

    pc.addTransceiver(Tone(), direction="sendonly")
    pc.addTransceiver(Pattern(), direction="sendonly")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin, lambda: stop.set() if not sys.stdin.readline() else None)

    async with websockets.connect(url, max_size=2**20) as ws:

        async def send(msg):
            await ws.send(json.dumps(msg))

        async def offer():
            state["making_offer"] = True
            await pc.setLocalDescription(await pc.createOffer())
            await send({"type": "offer", "sdp": pc.localDescription.sdp})

        async def status():
            while True:
                line = {
                    "t": time.time(),
                    "session": state["session"],
                    "protocol": state["protocol"],
                    "roster": state["roster"],
                    "slots": state["slots"],
                    "router_offers": state["router_offers"],
                    "recv": state["recv"],
                    "ice": pc.iceConnectionState,
                    "connection": pc.connectionState,
                    "errors": state["errors"][-5:],
                }
                print(json.dumps(line), flush=True)
                await asyncio.sleep(0.5)

        async def receive():
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "welcome":
                    state["session"] = msg["session"]
                    state["protocol"] = msg.get("protocol")
                    # The client offers first (what it publishes); the router then offers the
                    # receive slots.
                    await offer()
                elif kind == "answer":
                    state["making_offer"] = False
                    if pc.signalingState == "have-local-offer":
                        await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "answer"))
                elif kind == "offer":
                    # The client is the impolite peer: ignore a server offer while ours is out.
                    if state["making_offer"] or pc.signalingState != "stable":
                        continue
                    await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "offer"))
                    await pc.setLocalDescription(await pc.createAnswer())
                    await send({"type": "answer", "sdp": pc.localDescription.sdp})
                    state["router_offers"] += 1
                elif kind == "slots":
                    # Every slot before each router offer, then the slots whose source changes.
                    for slot in msg["slots"]:
                        state["slots"][slot["mid"]] = slot
                elif kind == "roster":
                    state["roster"] = {str(p["session"]): p["user"] for p in msg["participants"]}
                elif kind == "participant_joined":
                    state["roster"][str(msg["session"])] = msg["user"]
                elif kind == "participant_left":
                    state["roster"].pop(str(msg["session"]), None)
                elif kind == "error":
                    state["errors"].append(msg)
            state["errors"].append({"closed": ws.close_code, "reason": ws.close_reason})

        tasks = [asyncio.ensure_future(status()), asyncio.ensure_future(receive())]
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks + consumers + [waiter]:
            t.cancel()
        try:
            await ws.send(json.dumps({"type": "leave"}))
        except Exception:
            pass
    await pc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
