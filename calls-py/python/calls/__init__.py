"""calls: Python bindings of the calls WebRTC SFU core, and its load tester.

- :class:`Router` is the sans-IO media router (``calls-core``): feed it datagrams, signaling
  messages and time (float seconds on your clock), drain :meth:`Router.poll_output` until it
  returns a :class:`Timeout`.
- :mod:`calls.loadtest` runs simulated participants (str0m peers on Rust threads, real UDP
  sockets) against a server; ``python -m calls.loadtest --help``.
- :mod:`calls.testing` has a client peer for scripting the router in tests.

Every error is a :class:`CallsError`.
"""

from typing import Union

from calls._calls import (
    PROTOCOL_VERSION,
    CallFullError,
    CallsError,
    ConfigError,
    DrainingError,
    Event,
    OverloadedError,
    Record,
    RecordingError,
    Router,
    RouterFullError,
    SessionExistsError,
    Signal,
    SignalError,
    SwarmError,
    TcpError,
    Timeout,
    Transmit,
    UnknownCallError,
    UnknownSessionError,
    __version__,
)

#: What :meth:`Router.poll_output` returns.
Output = Union[Transmit, Signal, Event, Timeout, Record]


__all__ = [
    "PROTOCOL_VERSION",
    "CallFullError",
    "CallsError",
    "ConfigError",
    "DrainingError",
    "Event",
    "OverloadedError",
    "Output",
    "Record",
    "RecordingError",
    "Router",
    "RouterFullError",
    "SessionExistsError",
    "Signal",
    "SignalError",
    "SwarmError",
    "TcpError",
    "Timeout",
    "Transmit",
    "UnknownCallError",
    "UnknownSessionError",
    "__version__",
]
