"""Typed stubs of the compiled module ``calls._calls`` (calls-py/src/py.rs)."""

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

from typing_extensions import final

__version__: str
#: The signaling protocol the router speaks (2: receive slots; docs/signaling.md).
PROTOCOL_VERSION: int
__all__ = [
    "__version__",
    "PROTOCOL_VERSION",
    "Router",
    "Transmit",
    "Signal",
    "Event",
    "Timeout",
    "Record",
    "Peer",
    "Swarm",
    "CallsError",
    "ConfigError",
    "SignalError",
    "UnknownSessionError",
    "SessionExistsError",
    "CallFullError",
    "RouterFullError",
    "DrainingError",
    "OverloadedError",
    "UnknownCallError",
    "RecordingError",
    "TcpError",
    "SwarmError",
]

_Address = Tuple[str, int]

class CallsError(Exception):
    """Base class of every error raised by calls."""

class ConfigError(CallsError):
    """The configuration is invalid; ``problems`` lists every problem."""

    problems: List[str]

class SignalError(CallsError):
    """A signaling message was refused (``code``, ``session``); the session goes on."""

    code: str
    session: int

class UnknownSessionError(CallsError):
    """No session with this id on this router (``session``)."""

    session: int

class SessionExistsError(CallsError):
    """A session with this id already exists (``session``)."""

    session: int

class CallFullError(CallsError):
    """The call has reached ``max_participants_per_call`` (``call``, ``max``)."""

    call: str
    max: int

class RouterFullError(CallsError):
    """The router has reached ``max_sessions`` (``max``)."""

    max: int

class DrainingError(CallsError):
    """The router is draining and accepts no new joins."""

class OverloadedError(CallsError):
    """The router is overloaded and takes no new joins; retry after ``retry_after_s``."""

    retry_after_s: int

class UnknownCallError(CallsError):
    """No call with this name on this router: nobody is in it (``call``)."""

    call: str

class RecordingError(CallsError):
    """The call is recorded already, or not recorded (``call``, ``code``:
    ``already_recording`` or ``not_recording``)."""

    call: str
    code: str

class TcpError(CallsError):
    """An ICE-TCP connection error (unknown or duplicate connection, oversized frame)."""

class SwarmError(CallsError):
    """A load-test swarm could not start (bad URL, non-loopback server, bad configuration)."""

@final
class Transmit:
    """Bytes to send: a UDP datagram, or (proto ``"tcp"``) framed bytes for connection ``conn``."""

    __match_args__: ClassVar[Tuple[str, str, str, str, str]]
    @property
    def proto(self) -> str: ...
    @property
    def source(self) -> _Address: ...
    @property
    def destination(self) -> _Address: ...
    @property
    def data(self) -> bytes: ...
    @property
    def conn(self) -> Optional[int]: ...

@final
class Signal:
    """A message for one session's signaling channel: ``json`` as sent, ``message`` parsed."""

    __match_args__: ClassVar[Tuple[str, str]]
    @property
    def session(self) -> int: ...
    @property
    def json(self) -> str: ...
    @property
    def message(self) -> Dict[str, Any]: ...
    @property
    def type(self) -> str: ...

@final
class Event:
    """Something happened: ``kind``, the ``session`` (0 for call-wide events such as
    ``speaker_changed``), and details in ``data``."""

    __match_args__: ClassVar[Tuple[str, str, str]]
    @property
    def kind(self) -> str: ...
    @property
    def session(self) -> int: ...
    @property
    def data(self) -> Dict[str, Any]: ...

@final
class Timeout:
    """Nothing more to do: call ``handle_timeout`` at ``at`` (caller seconds)."""

    __match_args__: ClassVar[Tuple[str]]
    @property
    def at(self) -> float: ...

@final
class Record:
    """A recording's output: ``kind`` (``started``, ``file_started``, ``data``,
    ``file_finished``, ``stopped``), the ``call``, the ``file`` number, the bytes to append
    (``data``) and the details (``info``: options, file or summary)."""

    __match_args__: ClassVar[Tuple[str, str, str, str]]
    @property
    def kind(self) -> str: ...
    @property
    def call(self) -> str: ...
    @property
    def file(self) -> Optional[int]: ...
    @property
    def data(self) -> Optional[bytes]: ...
    @property
    def info(self) -> Optional[Dict[str, Any]]: ...

_Output = Union[Transmit, Signal, Event, Timeout, Record]

@final
class Router:
    """The sans-IO media router."""

    def __new__(
        cls, config: Union[Mapping[str, Any], str, None] = None, now: float = 0.0
    ) -> "Router": ...
    def join(
        self,
        call: str,
        session: int,
        user: str,
        now: float,
        grants: Optional[Dict[str, bool]] = None,
    ) -> None: ...
    def leave(self, session: int, now: float) -> None: ...
    def set_muted(self, session: int, muted: bool, now: float) -> None: ...
    def set_bandwidth_cap(self, session: int, bps: Optional[int], now: float) -> None: ...
    def handle_datagram(
        self,
        data: bytes,
        source: _Address,
        destination: _Address,
        now: float,
        proto: str = "udp",
    ) -> None: ...
    def handle_signal(
        self, session: int, message: Union[str, Mapping[str, Any]], now: float
    ) -> None: ...
    def handle_timeout(self, now: float) -> None: ...
    def tcp_accepted(self, conn: int, remote: _Address, local: _Address) -> None: ...
    def handle_tcp_data(self, conn: int, data: bytes, now: float) -> None: ...
    def tcp_closed(self, conn: int) -> None: ...
    def poll_output(self) -> _Output: ...
    def drain(self) -> List[_Output]: ...
    def start_recording(
        self,
        call: str,
        now: float,
        sessions: Optional[List[int]] = None,
        *,
        audio: bool = True,
        camera: bool = True,
        screen: bool = True,
    ) -> None: ...
    def stop_recording(self, call: str, now: float) -> None: ...
    def is_recording(self, call: str) -> bool: ...
    def resend_signaling(self, session: int) -> None: ...
    def start_draining(self) -> None: ...
    def set_load(self, lag: float, busy: float, now: float) -> str: ...
    def load_level(self) -> str: ...
    def session_count(self) -> int: ...
    def metrics(self) -> Dict[str, Any]: ...
    def prometheus(self) -> str: ...
    @staticmethod
    def worker_of_datagram(data: bytes) -> Optional[int]: ...

@final
class Peer:
    """A str0m client peer publishing synthetic Opus and VP8 (``calls.testing.Peer``)."""

    def __new__(
        cls,
        session: int,
        user: str,
        addr: _Address,
        now: float,
        *,
        audio: bool = True,
        video: bool = True,
        screen: bool = False,
        seed: int = 1,
    ) -> "Peer": ...
    def start(self, now: float) -> None: ...
    def handle_datagram(self, source: _Address, data: bytes, now: float) -> None: ...
    def handle_signal(self, message: Union[str, Mapping[str, Any]], now: float) -> None: ...
    def handle_timeout(self, now: float) -> None: ...
    def poll_timeout(self) -> Optional[float]: ...
    def take_transmits(self) -> List[Transmit]: ...
    def take_signals(self) -> List[str]: ...
    def set_muted(self, muted: bool) -> None: ...
    def set_silent(self, silent: bool) -> None: ...
    def close(self) -> None: ...
    @property
    def session(self) -> int: ...
    @property
    def connected(self) -> bool: ...
    @property
    def packets_received(self) -> int: ...
    def received(self) -> List[Dict[str, Any]]: ...
    def slots(self) -> List[Dict[str, Any]]: ...
    def slot_stats(self) -> List[Dict[str, Any]]: ...
    @property
    def misattributed(self) -> int: ...
    def pin(self, sessions: List[int]) -> None: ...
    def request_slots(self, video: int) -> None: ...
    def errors(self) -> List[Tuple[str, str]]: ...

@final
class Swarm:
    """Simulated participants on Rust threads (see ``calls.loadtest.Swarm``).

    Each participant is a dict of ``calls.loadtest.Participant``'s fields: ``call``, ``user``,
    ``token``, ``audio``, ``video``, ``screen``, ``simulcast``, ``speaking``, ``muted``,
    ``start_after`` (s), ``seed``, ``transport`` (``"udp"`` or ``"tcp"``) and
    ``stall_reading_after`` (s, ICE-TCP only: stop reading the connection then); an unknown
    key is a ``ValueError``, a stalled UDP reader a ``SwarmError``.
    """

    def __new__(
        cls,
        url: str,
        participants: List[Dict[str, Any]],
        duration: float,
        threads: int = 0,
        allow_remote: bool = False,
    ) -> "Swarm": ...
    def stats_json(self) -> str: ...
    def stop(self) -> None: ...
    def wait(self, timeout: Optional[float] = None) -> bool: ...
    @property
    def running(self) -> bool: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def duration(self) -> float: ...
