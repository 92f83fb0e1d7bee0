"""Rust errors arrive as typed Python exceptions under calls.CallsError."""

from typing import Any, List, Tuple

import pytest

import calls
from calls.loadtest import Participant, Swarm


def test_every_exception_is_a_calls_error() -> None:
    for cls in (
        calls.ConfigError,
        calls.SignalError,
        calls.UnknownSessionError,
        calls.SessionExistsError,
        calls.CallFullError,
        calls.RouterFullError,
        calls.DrainingError,
        calls.OverloadedError,
        calls.TcpError,
        calls.SwarmError,
    ):
        assert issubclass(cls, calls.CallsError)
    assert issubclass(calls.CallsError, Exception)


def test_config_errors_list_every_problem() -> None:
    with pytest.raises(calls.ConfigError) as err:
        calls.Router({"udp_port": 0, "tcp_port": 0})
    assert err.value.problems == ["`udp_port` 0 is not a port", "`tcp_port` 0 is not a port"]
    with pytest.raises(calls.ConfigError, match="unknown field"):
        calls.Router("no_such_key = 1")
    with pytest.raises(TypeError):
        calls.Router(42)  # type: ignore[arg-type]


def test_a_bandwidth_cap_is_for_a_known_session() -> None:
    router = calls.Router()
    router.join("a", 1, "ann", 0.0)
    router.set_bandwidth_cap(1, 250_000, 0.1)
    router.set_bandwidth_cap(1, None, 0.2)
    with pytest.raises(calls.UnknownSessionError) as unknown:
        router.set_bandwidth_cap(99, 250_000, 0.3)
    assert unknown.value.session == 99
    with pytest.raises(OverflowError):
        router.set_bandwidth_cap(1, -1, 0.4)


def test_router_command_errors() -> None:
    router = calls.Router({"max_participants_per_call": 2, "max_sessions": 3})
    router.join("a", 1, "ann", 0.0)
    with pytest.raises(calls.SessionExistsError) as exists:
        router.join("b", 1, "bob", 0.0)
    assert exists.value.session == 1
    router.join("a", 2, "al", 0.0)
    with pytest.raises(calls.CallFullError) as full:
        router.join("a", 3, "bob", 0.0)
    assert (full.value.call, full.value.max) == ("a", 2)
    router.join("b", 3, "bob", 0.0)
    with pytest.raises(calls.RouterFullError) as router_full:
        router.join("c", 4, "cy", 0.0)
    assert router_full.value.max == 3
    with pytest.raises(calls.UnknownSessionError) as unknown:
        router.leave(99, 0.0)
    assert unknown.value.session == 99
    with pytest.raises(calls.UnknownSessionError):
        router.handle_signal(99, {"type": "mute"}, 0.0)
    router.start_draining()
    with pytest.raises(calls.DrainingError):
        router.join("d", 5, "dee", 0.0)


def test_an_overloaded_router_refuses_joins_until_it_recovers() -> None:
    router = calls.Router({"overload_recover_ms": 1000})
    router.join("a", 1, "ann", 0.0)
    assert router.load_level() == "normal"
    # One report of lag is a spike; two in a row are overload.
    assert router.set_load(0.3, 1.0, 0.5) == "normal"
    assert router.set_load(0.3, 1.0, 1.0) == "overloaded"
    with pytest.raises(calls.OverloadedError) as refused:
        router.join("a", 2, "bob", 1.1)
    assert refused.value.retry_after_s == 1
    # Calm: one step down per second.
    assert router.set_load(0.001, 0.1, 1.5) == "overloaded"
    assert router.set_load(0.001, 0.1, 2.5) == "degraded"
    assert router.set_load(0.001, 0.1, 3.5) == "normal"
    router.join("a", 2, "bob", 3.6)
    with pytest.raises(ValueError):
        router.set_load(-1.0, 0.5, 3.7)


def test_signal_errors_carry_the_code() -> None:
    router = calls.Router()
    router.join("a", 1, "ann", 0.0)
    cases: List[Tuple[Any, str]] = [
        ("{not json", "bad_json"),
        ({"type": "answer", "sdp": "v=0"}, "unexpected_answer"),
        ({"type": "offer", "sdp": "garbage"}, "bad_sdp"),
    ]
    for message, code in cases:
        with pytest.raises(calls.SignalError) as err:
            router.handle_signal(1, message, 0.0)
        assert err.value.code == code and err.value.session == 1
    # The session goes on, and the client was told.
    errors = [o for o in router.drain() if isinstance(o, calls.Signal) and o.type == "error"]
    assert [e.message["code"] for e in errors] == [c for _, c in cases]


def test_tcp_errors() -> None:
    router = calls.Router()
    with pytest.raises(calls.TcpError):
        router.handle_tcp_data(5, b"\x00\x01x", 0.0)
    router.tcp_accepted(5, ("127.0.0.1", 40000), ("127.0.0.1", 8443))
    with pytest.raises(calls.TcpError):
        router.tcp_accepted(5, ("127.0.0.1", 40000), ("127.0.0.1", 8443))
    router.tcp_closed(5)
    with pytest.raises(calls.TcpError):
        router.tcp_closed(5)


def test_bad_arguments_are_value_errors() -> None:
    router = calls.Router()
    with pytest.raises(ValueError):
        router.handle_datagram(b"x", ("not-an-ip", 1), ("127.0.0.1", 8443), 0.0)
    with pytest.raises(ValueError):
        router.handle_datagram(b"x", ("127.0.0.1", 1), ("127.0.0.1", 8443), 0.0, proto="sctp")
    with pytest.raises(ValueError):
        router.handle_timeout(float("nan"))
    with pytest.raises(ValueError):
        router.join("a", 1, "ann", 0.0, grants={"fly": True})


def test_times_past_the_clock_span_are_value_errors_not_panics() -> None:
    """Finding 7 (issue 16): `now + grace` overflowed `Instant` and panicked for a huge time;
    like the C ABI, a time more than 100 years from the router's origin is refused."""
    router = calls.Router({}, 0.0)
    router.join("a", 1, "ann", 0.0)
    for far in (1e300, -1e300, 4.0e9, float("inf")):
        with pytest.raises(ValueError):
            router.handle_timeout(far)
        with pytest.raises(ValueError):
            router.join("a", 2, "bob", far)
    # The router is intact: a sane time still works.
    router.handle_timeout(1.0)
    router.join("a", 2, "bob", 1.5)
    assert router.session_count() == 2


def test_a_swarm_refuses_remote_servers_and_bad_urls() -> None:
    p = [Participant(call="c", user="u")]
    with pytest.raises(calls.SwarmError, match="loopback"):
        Swarm("http://192.0.2.1:8080", p, duration=1)
    with pytest.raises(calls.SwarmError, match="TLS"):
        Swarm("https://127.0.0.1:8080", p, duration=1)
    with pytest.raises(calls.SwarmError, match="no participants"):
        Swarm("http://127.0.0.1:8080", [], duration=1)
