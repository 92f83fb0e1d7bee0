"""Load testing a calls server with simulated participants.

The participants are str0m peers on Rust threads (``calls._calls.Swarm``): each opens the
reference server's WebSocket (``/ws?call=&user=&token=``), waits for its ``welcome``, negotiates
with the router, sends synthetic Opus (20 ms packets with audio levels) and VP8 (30 fps,
keyframes every 3 s and on PLI; simulcast layers ``q``/``h``/``f`` by default) over its own
UDP socket (or, with ``transport="tcp"``, an ICE-TCP connection to the server's TCP candidate),
and counts what it receives: bitrate per layer, RFC 3550 jitter, freezes. Python only plans,
watches and reports::

    from calls.loadtest import Swarm, plan
    swarm = Swarm("http://127.0.0.1:8080", plan(calls=1, participants=20, speakers=2), duration=10)
    swarm.wait()
    print(swarm.stats()[0].rx_kbps)

``python -m calls.loadtest --help`` is the command-line face (progress bar and report).
"""

import base64
import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from calls._calls import Swarm as _Swarm

__all__ = [
    "TRANSPORTS",
    "Participant",
    "ParticipantStats",
    "Swarm",
    "SlotStats",
    "TrackStats",
    "mint_token",
    "plan",
]

#: What :func:`plan` accepts as ``transport``: everyone on UDP, everyone on ICE-TCP, or mixed
#: (participants 0, 4, 8, … of each call on ICE-TCP, the others on UDP).
TRANSPORTS = ("udp", "tcp", "mixed")


@dataclass(frozen=True)
class Participant:
    """What one simulated participant does."""

    call: str
    user: str
    #: A join token (JWT) when the server has an ``auth_secret``; demo mode without.
    token: Optional[str] = None
    #: Publish a microphone (synthetic Opus).
    audio: bool = True
    #: Publish a camera (synthetic VP8).
    video: bool = False
    #: Publish a screen share (a second VP8 track).
    screen: bool = False
    #: Send video as simulcast: camera layers ``q``/``h``/``f`` (≈150 k / 500 k / 1.5 Mbit/s),
    #: screen ``h``/``f``, three temporal layers each. False: one stream per track (≈520 kbit/s).
    simulcast: bool = True
    #: Talk (speech audio levels). A non-speaker is muted, or sends silence if ``muted`` is False.
    speaking: bool = False
    #: How a non-speaker is quiet: muted (the router forwards nothing) or silent (forwarded).
    muted: bool = True
    #: Honour the server's request for Opus DTX (``usedtx=1``), as Chromium does: while muted
    #: or silent, send a packet every 400 ms instead of every 20 ms.
    dtx: bool = True
    #: Seconds after the swarm starts to join (ramp-up).
    start_after: float = 0.0
    #: Seed of its synthetic media.
    seed: int = 1
    #: ``"udp"``, or ``"tcp"``: ICE-TCP only (an active TCP candidate; one RFC 4571-framed
    #: connection to the server's TCP candidate, opened on the first ICE check).
    transport: str = "udp"
    #: ICE-TCP only: stop reading the connection this many seconds after joining, and never
    #: read it again (a client whose app froze). It goes on sending, so it notices when the
    #: server closes the connection: a ``tcp_errors``, and it is ``failed``. None: it reads to
    #: the end.
    stall_reading_after: Optional[float] = None


@dataclass(frozen=True)
class TrackStats:
    """What a participant received of one publisher track."""

    publisher: int
    source: str
    packets: int
    bytes: int
    lost: int
    keyframes: int
    kbps: float
    freezes: int
    freeze_ms: float
    #: Whether the publisher sends it as simulcast.
    simulcast: bool = False
    #: Simulcast video: ``kbps`` split by the layer received, ``{"q", "h", "f"}``.
    kbps_by_layer: Optional[Dict[str, float]] = None
    #: Video frames by spatial layer index (0 = lowest).
    frames_by_layer: List[int] = field(default_factory=lambda: [0, 0, 0])
    #: Simulcast video: the RID of the layer received last.
    layer: Optional[str] = None
    #: How often the received layer changed.
    layer_switches: int = 0
    #: Video: the longest time between two frames after the first keyframe.
    max_frame_gap_ms: float = 0.0
    #: RFC 3550 interarrival jitter at the end (None before two packets).
    jitter_ms: Optional[float] = None
    #: The largest value the jitter estimate reached.
    jitter_max_ms: Optional[float] = None


@dataclass(frozen=True)
class SlotStats:
    """What a participant received on one receive slot: one stream, whoever it carried."""

    mid: str
    #: ``audio``, ``camera`` or ``screen``.
    kind: str
    #: The publisher the slot carries now (None: empty), and its source.
    session: Optional[int]
    source: Optional[str]
    packets: int
    bytes: int
    lost: int
    keyframes: int
    kbps: float
    freezes: int
    freeze_ms: float
    #: Video frames by spatial layer index (0 = lowest).
    frames_by_layer: List[int] = field(default_factory=lambda: [0, 0, 0])
    #: The publisher whose stream the slot carried last: ``session``, or, for a slot emptied
    #: since (its publisher left at the end of a run), the one before.
    last_session: Optional[int] = None
    #: Video: the RID of the layer received last.
    layer: Optional[str] = None
    #: How often the received layer changed.
    layer_switches: int = 0
    #: Video: the longest time between two frames after the first keyframe.
    max_frame_gap_ms: float = 0.0
    #: RFC 3550 interarrival jitter at the end (None before two packets).
    jitter_ms: Optional[float] = None
    #: The largest value the jitter estimate reached.
    jitter_max_ms: Optional[float] = None
    #: How often the slot's SSRC changed (0: one SSRC for its life, as it should be).
    ssrc_changes: int = 0
    #: Video: frames whose VP8 PictureID does not follow the previous one's.
    picture_id_breaks: int = 0
    #: Video: layer or source changes that did not start at a keyframe.
    switches_off_keyframe: int = 0


@dataclass(frozen=True)
class ParticipantStats:
    """One participant's measurements (times in ms from opening its WebSocket)."""

    index: int
    call: str
    user: str
    speaking: bool
    #: waiting, joining, joined, connected, done or failed.
    state: str
    error: Optional[str]
    session: Optional[int]
    join_started_s: Optional[float]
    welcome_ms: Optional[float]
    connected_ms: Optional[float]
    #: WebSocket open → first media packet received.
    join_ms: Optional[float]
    packets_sent: int
    bytes_sent: int
    packets_received: int
    bytes_received: int
    lost: int
    loss: float
    late_or_duplicate: int
    media_s: float
    rx_kbps: float
    tx_kbps: float
    freezes: int
    keyframe_requests: int
    signal_errors: int
    #: Per publisher track (attributed by the slot mapping).
    tracks: List[TrackStats] = field(default_factory=list)
    #: Per receive slot.
    slots: List[SlotStats] = field(default_factory=list)
    #: Packets whose payload came from another publisher than the slot mapping said.
    misattributed: int = 0
    #: Whether it publishes video as simulcast.
    simulcast: bool = False
    #: Received simulcast video bitrate by layer over ``media_s``: ``{"q", "h", "f"}`` kbit/s.
    rx_kbps_by_layer: Dict[str, float] = field(default_factory=dict)
    #: The largest RFC 3550 jitter among its received audio / video tracks.
    audio_jitter_ms: Optional[float] = None
    video_jitter_ms: Optional[float] = None
    #: Audio delay: how long its received audio packets took from their publisher's send (in
    #: this process) to its receive, over every publisher it heard: median, 99th percentile,
    #: largest. Holds the server's and the network's share and the load tester's own lateness
    #: (a busy tester reads late). None before the first audio packet.
    audio_delay_p50_ms: Optional[float] = None
    audio_delay_p99_ms: Optional[float] = None
    audio_delay_max_ms: Optional[float] = None
    #: The longest frame gap among its received video tracks.
    max_frame_gap_ms: float = 0.0
    #: ``speaker`` messages (active speaker changes) received.
    speaker_messages: int = 0
    #: ``layers`` (dynacast) messages received about its own video.
    layers_messages: int = 0
    #: ``"udp"`` or ``"tcp"`` (ICE-TCP only).
    transport: str = "udp"
    #: ICE-TCP: the connection failed (closed or reset by the server, refused, or a frame
    #: longer than 2048 bytes); the participant's media ended there and it is ``failed``.
    tcp_errors: int = 0
    #: ICE-TCP: frames not sent (the 256 KiB send queue was full, or they were for another
    #: address than the connection's).
    tcp_frames_dropped: int = 0

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "ParticipantStats":
        fields = dict(d)
        fields["tracks"] = [TrackStats(**t) for t in d.get("tracks", [])]
        fields["slots"] = [SlotStats(**t) for t in d.get("slots", [])]
        return ParticipantStats(**fields)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Swarm:
    """Runs participants against a server until ``duration`` seconds have passed.

    Starts at once; ``threads`` media threads (0: one per core). Every participant stops at
    the deadline or on :meth:`stop`, sends ``{"type":"leave"}`` and closes its sockets.
    """

    def __init__(
        self,
        url: str,
        participants: List[Participant],
        duration: float,
        threads: int = 0,
        allow_remote: bool = False,
    ) -> None:
        self.participants = list(participants)
        specs = [asdict(p) for p in self.participants]
        self._swarm = _Swarm(url, specs, duration, threads, allow_remote)

    def stats(self) -> List[ParticipantStats]:
        """Every participant's statistics (at most 250 ms old)."""
        raw: List[Dict[str, Any]] = json.loads(self._swarm.stats_json())
        return [ParticipantStats.from_dict(d) for d in raw]

    def stop(self) -> None:
        """Asks everyone to leave now (see :meth:`wait`)."""
        self._swarm.stop()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits for the end (at most ``timeout`` s); returns whether it has come."""
        return self._swarm.wait(timeout)

    @property
    def running(self) -> bool:
        return self._swarm.running

    @property
    def elapsed(self) -> float:
        return self._swarm.elapsed

    @property
    def duration(self) -> float:
        return self._swarm.duration

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.wait(10.0)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    secret: str,
    call: str,
    user: str,
    name: Optional[str] = None,
    ttl: float = 3600.0,
    grants: Optional[Dict[str, bool]] = None,
) -> str:
    """A join token (JWT, HS256) for the reference server: ``{call, sub, name, grants, exp}``."""
    header = {"alg": "HS256", "typ": "JWT"}
    claims: Dict[str, Any] = {"call": call, "sub": user, "exp": int(time.time() + ttl)}
    if name is not None:
        claims["name"] = name
    if grants is not None:
        claims["grants"] = grants
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def plan(
    calls: int = 1,
    participants: int = 10,
    speakers: int = 2,
    video: int = 0,
    screen: int = 0,
    simulcast: bool = True,
    ramp: float = 0.0,
    secret: Optional[str] = None,
    silent: bool = False,
    dtx: bool = True,
    call_prefix: str = "loadtest",
    token_ttl: float = 3600.0,
    transport: str = "udp",
    stalled_readers: int = 0,
    stall_after: float = 5.0,
) -> List[Participant]:
    """``calls`` calls of ``participants`` each. In every call the first ``speakers`` talk,
    the first ``video`` publish a camera and the first ``screen`` share a screen (as simulcast
    unless ``simulcast`` is False); the others are muted (or send silence with ``silent``).
    ``dtx``: quiet microphones honour the server's Opus DTX request (False: 50 packets a
    second of silence, as a client without DTX).
    ``ramp``: joins per second (0: all at once).
    With ``secret``, each participant gets a join token.
    ``transport``: ``"udp"``, ``"tcp"`` (everyone ICE-TCP only) or ``"mixed"`` (participants
    0, 4, 8, … of each call ICE-TCP only: a quarter, including a publisher).
    ``stalled_readers``: the last ones of each call are on ICE-TCP whatever ``transport`` says,
    and stop reading their connection ``stall_after`` seconds after joining (the server should
    close their connections; nobody else should notice)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    if not 0 <= stalled_readers <= participants:
        raise ValueError(f"stalled_readers {stalled_readers} is not between 0 and {participants}")
    out: List[Participant] = []
    for c in range(calls):
        call = f"{call_prefix}-{c}"
        for i in range(participants):
            n = len(out)
            user = f"sim-{c}-{i}"
            stalls = i >= participants - stalled_readers
            out.append(
                Participant(
                    call=call,
                    user=user,
                    token=mint_token(secret, call, user, ttl=token_ttl) if secret else None,
                    audio=True,
                    video=i < video,
                    screen=i < screen,
                    simulcast=simulcast,
                    speaking=i < speakers,
                    muted=not silent,
                    dtx=dtx,
                    start_after=n / ramp if ramp > 0 else 0.0,
                    seed=n + 1,
                    transport="tcp" if stalls else _transport_of(transport, i),
                    stall_reading_after=stall_after if stalls else None,
                )
            )
    return out


def _transport_of(transport: str, index_in_call: int) -> str:
    if transport == "mixed":
        return "tcp" if index_in_call % 4 == 0 else "udp"
    return transport
