//! The pyo3 module `calls._calls`: thin classes over `calls_core` and the swarm engine.
//!
//! Time crosses the boundary as float seconds on the caller's clock. Each object remembers the
//! caller time it was created at and the `Instant` it mapped it to ([`Clock`]); every later time
//! is an offset from that origin, so a test may run virtual time (0.0, 0.02, …) as fast as it
//! likes and a server may pass `time.monotonic()`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use calls_core::record::RecordOutput;
use calls_core::sim::TrackStats;
use calls_core::sim::{PeerOptions, PeerSignal, SimPeer, Transport};
use calls_core::{
    CallId, ClientMessage, ConnId, Datagram, Event as CoreEvent, Grants, LeaveReason, Output,
    Proto, RecordingOptions, Router as CoreRouter, RouterError, ServerMessage, SessionId, SlotInfo,
    TcpError as CoreTcpError, UserId, PROTOCOL_VERSION,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::swarm::{self, ParticipantSpec, SwarmConfig};

create_exception!(
    _calls,
    CallsError,
    PyException,
    "Base class of every error raised by calls."
);
create_exception!(
    _calls,
    ConfigError,
    CallsError,
    "The configuration is invalid; `problems` lists every problem."
);
create_exception!(
    _calls,
    SignalError,
    CallsError,
    "A signaling message was refused (`code`, `session`); the session goes on."
);
create_exception!(
    _calls,
    UnknownSessionError,
    CallsError,
    "No session with this id on this router (`session`)."
);
create_exception!(
    _calls,
    SessionExistsError,
    CallsError,
    "A session with this id already exists (`session`)."
);
create_exception!(
    _calls,
    CallFullError,
    CallsError,
    "The call has reached `max_participants_per_call` (`call`, `max`)."
);
create_exception!(
    _calls,
    RouterFullError,
    CallsError,
    "The router has reached `max_sessions` (`max`)."
);
create_exception!(
    _calls,
    DrainingError,
    CallsError,
    "The router is draining and accepts no new joins."
);
create_exception!(
    _calls,
    OverloadedError,
    CallsError,
    "The router is overloaded and takes no new joins; retry after `retry_after_s`."
);
create_exception!(
    _calls,
    UnknownCallError,
    CallsError,
    "No call with this name on this router: nobody is in it (`call`)."
);
create_exception!(
    _calls,
    RecordingError,
    CallsError,
    "The call is recorded already, or not recorded (`call`, `code`: `already_recording` or `not_recording`)."
);
create_exception!(
    _calls,
    TcpError,
    CallsError,
    "An ICE-TCP connection error (unknown or duplicate connection, oversized frame)."
);
create_exception!(
    _calls,
    SwarmError,
    CallsError,
    "A load-test swarm could not start (bad URL, non-loopback server, bad configuration)."
);

/// The caller's clock (`crate::clock`), its errors as `ValueError`.
#[derive(Debug, Clone, Copy)]
struct Clock(crate::clock::Clock);

impl Clock {
    fn new(now: f64) -> Clock {
        Clock(crate::clock::Clock::new(now, Instant::now()))
    }

    fn instant(&self, now: f64) -> PyResult<Instant> {
        self.0
            .instant(now)
            .map_err(pyo3::exceptions::PyValueError::new_err)
    }

    fn seconds(&self, at: Instant) -> f64 {
        self.0.seconds(at)
    }
}

fn lock<T>(m: &Mutex<T>) -> PyResult<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| CallsError::new_err("internal state poisoned by an earlier panic"))
}

fn addr((host, port): (String, u16)) -> PyResult<SocketAddr> {
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            pyo3::exceptions::PyValueError::new_err(format!("{host:?} is not an IP address"))
        })?;
    Ok(SocketAddr::new(ip, port))
}

fn addr_tuple(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
}

fn proto_of(name: &str) -> PyResult<Proto> {
    match name {
        "udp" => Ok(Proto::Udp),
        "tcp" => Ok(Proto::Tcp),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "proto {other:?} is neither \"udp\" nor \"tcp\""
        ))),
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Udp => "udp",
        _ => "tcp",
    }
}

/// An exception instance of `T` with attributes set.
fn raise(py: Python<'_>, err: PyErr, attrs: &[(&str, Bound<'_, PyAny>)]) -> PyErr {
    let value = err.value(py);
    for (name, v) in attrs {
        let _ = value.setattr(*name, v);
    }
    err
}

fn router_error(py: Python<'_>, e: RouterError) -> PyErr {
    let text = e.to_string();
    let e_code = e.code();
    let int = |v: u64| v.into_pyobject(py).map(|o| o.into_any()).ok();
    match e {
        RouterError::UnknownSession(s) => raise(
            py,
            UnknownSessionError::new_err(text),
            &[(
                "session",
                int(s.0).unwrap_or_else(|| py.None().into_bound(py)),
            )],
        ),
        RouterError::SessionExists(s) => raise(
            py,
            SessionExistsError::new_err(text),
            &[(
                "session",
                int(s.0).unwrap_or_else(|| py.None().into_bound(py)),
            )],
        ),
        RouterError::CallFull { call, max } => raise(
            py,
            CallFullError::new_err(text),
            &[
                ("call", PyString::new(py, call.as_str()).into_any()),
                (
                    "max",
                    int(max as u64).unwrap_or_else(|| py.None().into_bound(py)),
                ),
            ],
        ),
        RouterError::RouterFull { max } => raise(
            py,
            RouterFullError::new_err(text),
            &[(
                "max",
                int(max as u64).unwrap_or_else(|| py.None().into_bound(py)),
            )],
        ),
        RouterError::Draining => DrainingError::new_err(text),
        RouterError::Overloaded { retry_after_s } => raise(
            py,
            OverloadedError::new_err(text),
            &[(
                "retry_after_s",
                int(retry_after_s).unwrap_or_else(|| py.None().into_bound(py)),
            )],
        ),
        RouterError::UnknownCall(call) => raise(
            py,
            UnknownCallError::new_err(text),
            &[("call", PyString::new(py, call.as_str()).into_any())],
        ),
        RouterError::AlreadyRecording(call) | RouterError::NotRecording(call) => raise(
            py,
            RecordingError::new_err(text),
            &[
                ("call", PyString::new(py, call.as_str()).into_any()),
                ("code", PyString::new(py, e_code).into_any()),
            ],
        ),
        RouterError::Signal { session, error } => raise(
            py,
            SignalError::new_err(text),
            &[
                ("code", PyString::new(py, error.code()).into_any()),
                (
                    "session",
                    int(session.0).unwrap_or_else(|| py.None().into_bound(py)),
                ),
            ],
        ),
        _ => CallsError::new_err(text),
    }
}

fn tcp_error(e: CoreTcpError) -> PyErr {
    TcpError::new_err(e.to_string())
}

fn config_error(py: Python<'_>, e: calls_core::ConfigError) -> PyErr {
    let problems = PyList::new(py, &e.problems)
        .map(|l| l.into_any())
        .unwrap_or_else(|_| py.None().into_bound(py));
    raise(
        py,
        ConfigError::new_err(e.to_string()),
        &[("problems", problems)],
    )
}

/// A Python object → JSON text, through the standard library's `json.dumps`.
fn to_json(py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(text) = value.downcast::<PyString>() {
        return text.extract::<String>();
    }
    py.import("json")?
        .call_method1("dumps", (value,))?
        .extract::<String>()
}

fn from_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

// ------------------------------------------------------------------------------- outputs

/// Bytes to send: a UDP datagram, or (proto `"tcp"`) RFC 4571-framed bytes for connection `conn`.
#[pyclass(frozen, get_all, module = "calls._calls")]
#[derive(Debug)]
struct Transmit {
    proto: &'static str,
    source: (String, u16),
    destination: (String, u16),
    data: Py<PyBytes>,
    conn: Option<u64>,
}

#[pymethods]
impl Transmit {
    #[classattr]
    fn __match_args__() -> (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    ) {
        ("proto", "source", "destination", "data", "conn")
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Transmit(proto={:?}, source={:?}, destination={:?}, data=<{} bytes>, conn={:?})",
            self.proto,
            self.source,
            self.destination,
            self.data.bind(py).as_bytes().len(),
            self.conn
        )
    }
}

/// A message for one session's signaling channel: `json` as sent, `message` parsed.
#[pyclass(frozen, get_all, module = "calls._calls")]
#[derive(Debug)]
struct Signal {
    session: u64,
    json: String,
}

#[pymethods]
impl Signal {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("session", "message")
    }

    /// The message as a dict (`{"type": "answer", "sdp": …}`).
    #[getter]
    fn message<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.json)
    }

    /// The message's `type`.
    #[getter]
    fn r#type(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.json)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn __repr__(&self) -> String {
        format!("Signal(session={}, message={})", self.session, self.json)
    }
}

/// Something happened: `kind` (`joined`, `connected`, `left`, `track_published`,
/// `track_unpublished`, `flow_admitted`, `mute_changed`, `speaker_changed`), the session (0
/// for call-wide events), and the details.
#[pyclass(frozen, get_all, module = "calls._calls")]
#[derive(Debug)]
struct Event {
    kind: &'static str,
    session: u64,
    data: Py<PyDict>,
}

#[pymethods]
impl Event {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str, &'static str) {
        ("kind", "session", "data")
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let data = self
            .data
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default();
        format!(
            "Event(kind={:?}, session={}, data={data})",
            self.kind, self.session
        )
    }
}

/// Nothing more to do: call `handle_timeout` at `at` (caller seconds) or on the next input.
#[pyclass(frozen, get_all, module = "calls._calls")]
#[derive(Debug)]
struct Timeout {
    at: f64,
}

#[pymethods]
impl Timeout {
    #[classattr]
    fn __match_args__() -> (&'static str,) {
        ("at",)
    }

    fn __repr__(&self) -> String {
        format!("Timeout(at={:?})", self.at)
    }
}

/// A recording's output: `kind` (`started`, `file_started`, `data`, `file_finished`,
/// `stopped`), its `call`, the `file` number (None for `started` and `stopped`), the bytes to
/// append (`data`, for `data` only) and the details (`info`: the options for `started`, the
/// file for `file_started`, the summary for `file_finished`).
#[pyclass(frozen, get_all, module = "calls._calls")]
#[derive(Debug)]
struct Record {
    kind: &'static str,
    call: String,
    file: Option<u32>,
    data: Option<Py<PyBytes>>,
    info: Option<PyObject>,
}

#[pymethods]
impl Record {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str, &'static str, &'static str) {
        ("kind", "call", "file", "data")
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let data = self.data.as_ref().map_or("None".to_owned(), |d| {
            format!("<{} bytes>", d.bind(py).as_bytes().len())
        });
        format!(
            "Record(kind={:?}, call={:?}, file={:?}, data={data})",
            self.kind, self.call, self.file
        )
    }
}

/// Serializable core value → Python (through JSON).
fn to_py_value(py: Python<'_>, value: &impl serde::Serialize) -> PyResult<PyObject> {
    let text = serde_json::to_string(value)
        .map_err(|e| CallsError::new_err(format!("recording output: {e}")))?;
    Ok(from_json(py, &text)?.unbind())
}

fn record_to_py(py: Python<'_>, out: RecordOutput) -> PyResult<Record> {
    let call = out.call().as_str().to_owned();
    let mut record = Record {
        kind: "other",
        call,
        file: None,
        data: None,
        info: None,
    };
    match out {
        RecordOutput::Started { options, .. } => {
            record.kind = "started";
            record.info = Some(to_py_value(py, &options)?);
        }
        RecordOutput::FileStarted { file, .. } => {
            record.kind = "file_started";
            record.file = Some(file.id.0);
            record.info = Some(to_py_value(py, &file)?);
        }
        RecordOutput::Data { file, bytes, .. } => {
            record.kind = "data";
            record.file = Some(file.0);
            record.data = Some(PyBytes::new(py, &bytes).unbind());
        }
        RecordOutput::FileFinished { summary, .. } => {
            record.kind = "file_finished";
            record.file = Some(summary.id.0);
            record.info = Some(to_py_value(py, &summary)?);
        }
        RecordOutput::Stopped { .. } => record.kind = "stopped",
        // A newer core output: reported with its kind "other".
        _ => {}
    }
    Ok(record)
}

fn event_to_py(py: Python<'_>, event: CoreEvent) -> PyResult<Event> {
    let data = PyDict::new(py);
    let (kind, session) = match event {
        CoreEvent::Joined {
            session,
            call,
            user,
        } => {
            data.set_item("call", call.as_str())?;
            data.set_item("user", user.0)?;
            ("joined", session)
        }
        CoreEvent::Connected { session } => ("connected", session),
        CoreEvent::Left {
            session,
            call,
            reason,
        } => {
            data.set_item("call", call.as_str())?;
            let reason = match reason {
                LeaveReason::Left => "left",
                LeaveReason::Disconnected => "disconnected",
                _ => "other",
            };
            data.set_item("reason", reason)?;
            ("left", session)
        }
        CoreEvent::TrackPublished {
            session,
            mid,
            source,
        } => {
            data.set_item("mid", mid)?;
            data.set_item("source", source.as_str())?;
            ("track_published", session)
        }
        CoreEvent::TrackUnpublished { session, mid } => {
            data.set_item("mid", mid)?;
            ("track_unpublished", session)
        }
        CoreEvent::FlowAdmitted {
            session,
            proto,
            remote,
            local,
        } => {
            data.set_item("proto", proto_name(proto))?;
            data.set_item("remote", addr_tuple(remote))?;
            data.set_item("local", addr_tuple(local))?;
            ("flow_admitted", session)
        }
        CoreEvent::FlowRemoved {
            session,
            proto,
            remote,
            local,
        } => {
            data.set_item("proto", proto_name(proto))?;
            data.set_item("remote", addr_tuple(remote))?;
            data.set_item("local", addr_tuple(local))?;
            ("flow_removed", session)
        }
        CoreEvent::FlowMoved {
            from,
            to,
            proto,
            remote,
            local,
        } => {
            data.set_item("from_session", from.0)?;
            data.set_item("proto", proto_name(proto))?;
            data.set_item("remote", addr_tuple(remote))?;
            data.set_item("local", addr_tuple(local))?;
            ("flow_moved", to)
        }
        CoreEvent::MuteChanged { session, muted } => {
            data.set_item("muted", muted)?;
            ("mute_changed", session)
        }
        // About a call, not one session: the speaker (or None) is in the data.
        CoreEvent::SpeakerChanged { call, session } => {
            data.set_item("call", call.as_str())?;
            data.set_item("speaker", session.map(|s| s.0))?;
            ("speaker_changed", SessionId(0))
        }
        other => {
            data.set_item("debug", format!("{other:?}"))?;
            ("other", SessionId(0))
        }
    };
    Ok(Event {
        kind,
        session: session.0,
        data: data.unbind(),
    })
}

fn output_to_py(py: Python<'_>, out: Output, clock: &Clock) -> PyResult<PyObject> {
    Ok(match out {
        Output::Transmit(t) => Py::new(
            py,
            Transmit {
                proto: proto_name(t.proto),
                source: addr_tuple(t.source),
                destination: addr_tuple(t.destination),
                data: PyBytes::new(py, &t.contents).unbind(),
                conn: t.conn.map(|c| c.0),
            },
        )?
        .into_any(),
        Output::Signal(session, msg) => Py::new(
            py,
            Signal {
                session: session.0,
                json: msg.to_json(),
            },
        )?
        .into_any(),
        Output::Event(e) => Py::new(py, event_to_py(py, e)?)?.into_any(),
        Output::Timeout(at) => Py::new(
            py,
            Timeout {
                at: clock.seconds(at),
            },
        )?
        .into_any(),
        Output::Record(out) => Py::new(py, record_to_py(py, out)?)?.into_any(),
        _ => py.None(),
    })
}

// -------------------------------------------------------------------------------- Router

/// The sans-IO media router. After every input, drain `poll_output()` until it returns a
/// `Timeout` (or call `drain()`).
#[pyclass(module = "calls._calls")]
struct Router {
    inner: Mutex<CoreRouter>,
    clock: Clock,
}

fn parse_grants(grants: Option<&Bound<'_, PyDict>>) -> PyResult<Grants> {
    let Some(g) = grants else {
        return Ok(Grants::ALL);
    };
    let flag = |key: &str| -> PyResult<bool> {
        match g.get_item(key)? {
            Some(v) => v.extract::<bool>(),
            None => Ok(true),
        }
    };
    for key in g.keys() {
        let key: String = key.extract()?;
        if !["audio", "video", "screen", "subscribe", "recordable"].contains(&key.as_str()) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown grant {key:?} (audio, video, screen, subscribe, recordable)"
            )));
        }
    }
    Ok(Grants::new(
        flag("audio")?,
        flag("video")?,
        flag("screen")?,
        flag("subscribe")?,
    )
    .with_recordable(flag("recordable")?))
}

#[pymethods]
impl Router {
    /// `config`: a dict, a TOML document (str), or None for the defaults. `now`: the caller's
    /// clock at creation (seconds); every later time is read on the same clock.
    #[new]
    #[pyo3(signature = (config = None, now = 0.0))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>, now: f64) -> PyResult<Router> {
        let config = match config {
            None => calls_core::Config::default(),
            Some(c) if c.is_instance_of::<PyString>() => {
                let text: String = c.extract()?;
                calls_core::Config::from_toml_str(&text).map_err(|e| config_error(py, e))?
            }
            Some(c) if c.is_instance_of::<PyDict>() => {
                let text = to_json(py, c)?;
                calls_core::Config::from_json_str(&text).map_err(|e| config_error(py, e))?
            }
            Some(_) => {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "config must be a dict, a TOML str or None",
                ))
            }
        };
        let clock = Clock::new(now);
        let start = clock.instant(now)?;
        let router = CoreRouter::new(config, start).map_err(|e| config_error(py, e))?;
        Ok(Router {
            inner: Mutex::new(router),
            clock,
        })
    }

    /// Adds a participant to a call. `grants`: `{"audio", "video", "screen", "subscribe"}`
    /// booleans (missing ones are allowed); None allows everything.
    #[pyo3(signature = (call, session, user, now, grants = None))]
    fn join(
        &self,
        py: Python<'_>,
        call: &str,
        session: u64,
        user: &str,
        now: f64,
        grants: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let grants = parse_grants(grants)?;
        let at = self.clock.instant(now)?;
        let (call, user) = (CallId::from(call), UserId::from(user));
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.join(call, SessionId(session), user, grants, at))
        })?;
        result.map_err(|e| router_error(py, e))
    }

    /// Removes a participant (its tracks leave everyone's subscriptions).
    fn leave(&self, py: Python<'_>, session: u64, now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        let result =
            py.allow_threads(|| lock(&self.inner).map(|mut r| r.leave(SessionId(session), at)))?;
        result.map_err(|e| router_error(py, e))
    }

    /// Mutes (the router stops forwarding the microphone) or unmutes a participant.
    fn set_muted(&self, py: Python<'_>, session: u64, muted: bool, now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.set_muted(SessionId(session), muted, at))
        })?;
        result.map_err(|e| router_error(py, e))
    }

    /// Caps the bandwidth the router assumes towards a participant (bits per second), below
    /// its congestion-controller estimate: the subscriber's simulcast layers follow at once.
    /// `None` lifts the cap. For tests, and for an admin limiting one participant.
    fn set_bandwidth_cap(
        &self,
        py: Python<'_>,
        session: u64,
        bps: Option<u64>,
        now: f64,
    ) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.set_bandwidth_cap(SessionId(session), bps, at))
        })?;
        result.map_err(|e| router_error(py, e))
    }

    /// A datagram arrived: `source` is the remote `(host, port)`, `destination` the local one.
    #[pyo3(signature = (data, source, destination, now, proto = "udp"))]
    fn handle_datagram(
        &self,
        py: Python<'_>,
        data: &[u8],
        source: (String, u16),
        destination: (String, u16),
        now: f64,
        proto: &str,
    ) -> PyResult<()> {
        let datagram_proto = proto_of(proto)?;
        let (source, destination) = (addr(source)?, addr(destination)?);
        let at = self.clock.instant(now)?;
        py.allow_threads(|| {
            lock(&self.inner).map(|mut r| {
                r.handle_datagram(
                    Datagram {
                        proto: datagram_proto,
                        source,
                        destination,
                        contents: data,
                    },
                    at,
                )
            })
        })
    }

    /// A signaling message from a session's client: a JSON str or a dict.
    fn handle_signal(
        &self,
        py: Python<'_>,
        session: u64,
        message: &Bound<'_, PyAny>,
        now: f64,
    ) -> PyResult<()> {
        let text = to_json(py, message)?;
        let at = self.clock.instant(now)?;
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.handle_signal_json(SessionId(session), &text, at))
        })?;
        result.map_err(|e| router_error(py, e))
    }

    /// Time passed: run due timers.
    fn handle_timeout(&self, py: Python<'_>, now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        py.allow_threads(|| lock(&self.inner).map(|mut r| r.handle_timeout(at)))
    }

    /// An ICE-TCP connection was accepted (before its bytes).
    fn tcp_accepted(
        &self,
        py: Python<'_>,
        conn: u64,
        remote: (String, u16),
        local: (String, u16),
    ) -> PyResult<()> {
        let (remote, local) = (addr(remote)?, addr(local)?);
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.tcp_accepted(ConnId(conn), remote, local))
        })?;
        result.map_err(tcp_error)
    }

    /// Bytes arrived on an ICE-TCP connection (any split; RFC 4571 frames are reassembled).
    fn handle_tcp_data(&self, py: Python<'_>, conn: u64, data: &[u8], now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.handle_tcp_data(ConnId(conn), data, at))
        })?;
        result.map_err(tcp_error)
    }

    /// An ICE-TCP connection closed.
    fn tcp_closed(&self, py: Python<'_>, conn: u64) -> PyResult<()> {
        let result =
            py.allow_threads(|| lock(&self.inner).map(|mut r| r.tcp_closed(ConnId(conn))))?;
        result.map_err(tcp_error)
    }

    /// The next output: `Transmit`, `Signal`, `Event`, or `Timeout` when there is nothing more.
    fn poll_output(&self, py: Python<'_>) -> PyResult<PyObject> {
        let out = lock(&self.inner)?.poll_output();
        output_to_py(py, out, &self.clock)
    }

    /// Every output until the next `Timeout`, which is the last item of the list.
    fn drain(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        let outputs = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| {
                let mut all = Vec::new();
                loop {
                    let out = r.poll_output();
                    let last = matches!(out, Output::Timeout(_));
                    all.push(out);
                    if last {
                        break all;
                    }
                }
            })
        })?;
        outputs
            .into_iter()
            .map(|o| output_to_py(py, o, &self.clock))
            .collect()
    }

    /// Starts recording `call`: its sources come out of `poll_output` as `Record` outputs
    /// (`started`, then per source `file_started`, `data`…, `file_finished`). `sessions`: only
    /// these sessions (None: everyone, also those who join later); `audio`, `camera`, `screen`:
    /// which sources. Sessions joined with `grants={"recordable": False}` are left out.
    #[pyo3(signature = (call, now, sessions = None, *, audio = true, camera = true, screen = true))]
    #[allow(clippy::too_many_arguments)]
    fn start_recording(
        &self,
        py: Python<'_>,
        call: &str,
        now: f64,
        sessions: Option<Vec<u64>>,
        audio: bool,
        camera: bool,
        screen: bool,
    ) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        let options = match sessions {
            None => RecordingOptions::everyone(),
            Some(list) => RecordingOptions::sessions(list.into_iter().map(SessionId).collect()),
        }
        .with_sources(audio, camera, screen);
        let call = CallId::from(call);
        let result = py.allow_threads(|| {
            lock(&self.inner).map(|mut r| r.start_recording(&call, options, at))
        })?;
        result.map_err(|e| router_error(py, e))
    }

    /// Stops recording `call`: every file is finished (`file_finished`), then `stopped`.
    fn stop_recording(&self, py: Python<'_>, call: &str, now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        let call = CallId::from(call);
        let result =
            py.allow_threads(|| lock(&self.inner).map(|mut r| r.stop_recording(&call, at)))?;
        result.map_err(|e| router_error(py, e))
    }

    /// Whether `call` is being recorded.
    fn is_recording(&self, call: &str) -> PyResult<bool> {
        Ok(lock(&self.inner)?.is_recording(&CallId::from(call)))
    }

    /// Re-sends a session's track list and outstanding offer (after its signaling reconnected).
    fn resend_signaling(&self, py: Python<'_>, session: u64) -> PyResult<()> {
        let result = lock(&self.inner)?.resend_signaling(SessionId(session));
        result.map_err(|e| router_error(py, e))
    }

    /// Stops accepting joins (`join` raises `DrainingError`).
    fn start_draining(&self) -> PyResult<()> {
        lock(&self.inner)?.start_draining();
        Ok(())
    }

    /// Reports how loaded the thread driving this router is: `lag` (seconds: how late due
    /// timers and queued input were handled over the last window) and `busy` (0.0–1.0).
    /// Returns the load level the router acts on now: `"normal"`, `"degraded"` (joins raise
    /// `OverloadedError`, video at its lowest layer) or `"overloaded"` (cameras shed too).
    fn set_load(&self, lag: f64, busy: f64, now: f64) -> PyResult<&'static str> {
        let at = self.clock.instant(now)?;
        if !lag.is_finite() || lag < 0.0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "lag must be a finite number of seconds, 0 or more",
            ));
        }
        let load = calls_core::Load::new(std::time::Duration::from_secs_f64(lag), busy);
        Ok(lock(&self.inner)?.set_load(load, at).as_str())
    }

    /// The load level the router acts on (see `set_load`).
    fn load_level(&self) -> PyResult<&'static str> {
        Ok(lock(&self.inner)?.load_level().as_str())
    }

    /// Sessions on this router.
    fn session_count(&self) -> PyResult<usize> {
        Ok(lock(&self.inner)?.session_count())
    }

    /// The metrics snapshot as a dict (counters, gauges, drops by reason, per-session stats).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = py.allow_threads(|| {
            lock(&self.inner).map(|r| serde_json::to_string(&r.metrics()).unwrap_or_default())
        })?;
        from_json(py, &text)
    }

    /// The metrics snapshot in the Prometheus text exposition format.
    fn prometheus(&self, py: Python<'_>) -> PyResult<String> {
        py.allow_threads(|| {
            lock(&self.inner).map(|r| {
                r.metrics()
                    .to_prometheus_with(r.config().metrics_per_session)
            })
        })
    }

    /// The router's worker index for a STUN binding request (None for anything else).
    #[staticmethod]
    fn worker_of_datagram(data: &[u8]) -> Option<u8> {
        CoreRouter::worker_of_datagram(data)
    }

    fn __repr__(&self) -> String {
        let sessions = self.inner.lock().map(|r| r.session_count()).unwrap_or(0);
        format!("Router(sessions={sessions})")
    }
}

// ---------------------------------------------------------------------------- test peer

/// A str0m client peer (the simulation's `SimPeer`): publishes synthetic Opus and VP8 and
/// counts what it receives. Sans-IO like the router; exposed as `calls.testing.Peer`.
#[pyclass(module = "calls._calls")]
struct Peer {
    inner: Mutex<SimPeer>,
    clock: Clock,
}

#[pymethods]
impl Peer {
    /// A peer with a host candidate at `addr`; it is session `session` of the router.
    #[new]
    #[pyo3(signature = (session, user, addr, now, *, audio = true, video = true, screen = false, seed = 1))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        session: u64,
        user: &str,
        addr: (String, u16),
        now: f64,
        audio: bool,
        video: bool,
        screen: bool,
        seed: u64,
    ) -> PyResult<Peer> {
        let address = self::addr(addr)?;
        let clock = Clock::new(now);
        let options = PeerOptions {
            audio,
            video,
            screen,
            ..PeerOptions::default()
        };
        let peer = SimPeer::new(
            SessionId(session),
            UserId::from(user),
            address,
            &options,
            seed,
            clock.instant(now)?,
        );
        Ok(Peer {
            inner: Mutex::new(peer),
            clock,
        })
    }

    /// Sends the first offer.
    fn start(&self, now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        lock(&self.inner)?.start(at);
        Ok(())
    }

    /// A datagram from `source` arrived.
    fn handle_datagram(
        &self,
        py: Python<'_>,
        source: (String, u16),
        data: &[u8],
        now: f64,
    ) -> PyResult<()> {
        let (source, at) = (addr(source)?, self.clock.instant(now)?);
        py.allow_threads(|| lock(&self.inner).map(|mut p| p.handle_datagram(source, data, at)))
    }

    /// A message from the router (JSON str or dict).
    fn handle_signal(&self, py: Python<'_>, message: &Bound<'_, PyAny>, now: f64) -> PyResult<()> {
        let text = to_json(py, message)?;
        let msg = ServerMessage::from_json(&text).map_err(|e| {
            raise(
                py,
                SignalError::new_err(e.to_string()),
                &[("code", PyString::new(py, e.code()).into_any())],
            )
        })?;
        let at = self.clock.instant(now)?;
        py.allow_threads(|| lock(&self.inner).map(|mut p| p.handle_signal(msg, at)))
    }

    /// Time passed: send due media, run str0m's timers.
    fn handle_timeout(&self, py: Python<'_>, now: f64) -> PyResult<()> {
        let at = self.clock.instant(now)?;
        py.allow_threads(|| lock(&self.inner).map(|mut p| p.handle_timeout(at)))
    }

    /// When the peer wants `handle_timeout` next (caller seconds), if ever.
    fn poll_timeout(&self) -> PyResult<Option<f64>> {
        Ok(lock(&self.inner)?
            .poll_timeout()
            .map(|at| self.clock.seconds(at)))
    }

    /// Datagrams to send, oldest first (as `Transmit`s, proto `"udp"`).
    fn take_transmits(&self, py: Python<'_>) -> PyResult<Vec<Py<Transmit>>> {
        let transmits = lock(&self.inner)?.take_transmits();
        transmits
            .into_iter()
            .map(|t| {
                Py::new(
                    py,
                    Transmit {
                        proto: proto_name(t.proto),
                        source: addr_tuple(t.source),
                        destination: addr_tuple(t.destination),
                        data: PyBytes::new(py, &t.contents).unbind(),
                        conn: None,
                    },
                )
            })
            .collect()
    }

    /// Signaling messages for the router, as JSON text, oldest first.
    fn take_signals(&self) -> PyResult<Vec<String>> {
        Ok(lock(&self.inner)?
            .take_signals()
            .into_iter()
            .map(|s| match s {
                PeerSignal::Message(m) => m.to_json(),
                PeerSignal::Json(text) => text,
            })
            .collect())
    }

    /// Mutes (sends `mute`, keeps sending silent audio) or unmutes.
    fn set_muted(&self, muted: bool) -> PyResult<()> {
        lock(&self.inner)?.set_muted(muted);
        Ok(())
    }

    /// Sends silence (audio level -127) without muting, or speaks again.
    fn set_silent(&self, silent: bool) -> PyResult<()> {
        lock(&self.inner)?.set_silent(silent);
        Ok(())
    }

    /// Closes the peer's str0m `Rtc` (a closed browser tab); it sends nothing afterwards.
    fn close(&self) -> PyResult<()> {
        lock(&self.inner)?.close();
        Ok(())
    }

    /// Its router session id.
    #[getter]
    fn session(&self) -> PyResult<u64> {
        Ok(lock(&self.inner)?.session().0)
    }

    /// Whether ICE and DTLS are up.
    #[getter]
    fn connected(&self) -> PyResult<bool> {
        Ok(lock(&self.inner)?.is_connected())
    }

    /// RTP packets received, all tracks.
    #[getter]
    fn packets_received(&self) -> PyResult<u64> {
        Ok(lock(&self.inner)?.packets_received())
    }

    /// What was received per publisher track (attributed by the slot mapping): dicts with
    /// `publisher`, `source`, `mid` (the slot it arrived on last), `packets`, `bytes`, `lost`,
    /// `keyframes`.
    fn received<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let peer = lock(&self.inner)?;
        peer.received()
            .map(|(publisher, source, stats)| {
                let d = stats_dict(py, stats)?;
                d.set_item("publisher", publisher.0)?;
                d.set_item("source", source.as_str())?;
                Ok(d)
            })
            .collect()
    }

    /// The receive slots as the router's `slots` messages left them: dicts with `mid`, `kind`
    /// (`audio`, `camera`, `screen`), and `session`, `user`, `source` (`None`: empty).
    fn slots<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let peer = lock(&self.inner)?;
        peer.slots()
            .iter()
            .map(|slot| slot_dict(py, slot))
            .collect()
    }

    /// What arrived on each receive slot, whoever it came from (one continuous stream per
    /// slot): dicts with `mid`, `packets`, `bytes`, `lost`, `keyframes`, `ssrc`,
    /// `ssrc_changes`, `picture_id_breaks`.
    fn slot_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let peer = lock(&self.inner)?;
        peer.slot_stats()
            .values()
            .map(|stats| {
                let d = stats_dict(py, stats)?;
                d.set_item("ssrc", stats.ssrc)?;
                d.set_item("ssrc_changes", stats.ssrc_changes)?;
                d.set_item("picture_id_breaks", stats.picture_id_breaks)?;
                Ok(d)
            })
            .collect()
    }

    /// Packets whose payload came from another publisher than the slot mapping said (the
    /// router forwarded a source before telling the client); 0 when the router is right.
    #[getter]
    fn misattributed(&self) -> PyResult<u64> {
        Ok(lock(&self.inner)?.misattributed())
    }

    /// Sends `pin`: put these participants' cameras on this peer's camera slots first.
    fn pin(&self, sessions: Vec<u64>) -> PyResult<()> {
        let sessions = sessions.into_iter().map(SessionId).collect();
        lock(&self.inner)?.send_signal(ClientMessage::Pin { sessions });
        Ok(())
    }

    /// Sends `slots`: ask for `video` camera slots (the router renegotiates this peer).
    fn request_slots(&self, video: u16) -> PyResult<()> {
        lock(&self.inner)?.send_signal(ClientMessage::Slots { video });
        Ok(())
    }

    /// `ServerMessage::Error`s received, as (code, message).
    fn errors(&self) -> PyResult<Vec<(String, String)>> {
        Ok(lock(&self.inner)?.errors().to_vec())
    }

    fn __repr__(&self) -> String {
        match self.inner.lock() {
            Ok(p) => format!(
                "Peer(session={}, connected={}, packets_received={})",
                p.session().0,
                p.is_connected(),
                p.packets_received()
            ),
            Err(_) => "Peer(<poisoned>)".to_owned(),
        }
    }
}

/// The counters every received-stream dict has.
fn stats_dict<'py>(py: Python<'py>, stats: &TrackStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mid", stats.mid.as_str())?;
    d.set_item("packets", stats.packets)?;
    d.set_item("bytes", stats.bytes)?;
    d.set_item("lost", stats.gaps)?;
    d.set_item("keyframes", stats.keyframes)?;
    Ok(d)
}

fn slot_dict<'py>(py: Python<'py>, slot: &SlotInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mid", slot.mid.as_str())?;
    d.set_item("kind", slot.kind.as_str())?;
    d.set_item("session", slot.session.map(|s| s.0))?;
    d.set_item("user", slot.user.as_ref().map(|u| u.0.as_str()))?;
    d.set_item("source", slot.source.map(|s| s.as_str()))?;
    Ok(d)
}

// --------------------------------------------------------------------------------- swarm

fn spec_from_dict(d: &Bound<'_, PyDict>, index: usize) -> PyResult<ParticipantSpec> {
    fn get<'py, T: FromPyObject<'py>>(
        d: &Bound<'py, PyDict>,
        key: &str,
        default: T,
    ) -> PyResult<T> {
        match d.get_item(key)? {
            Some(v) if !v.is_none() => v.extract(),
            _ => Ok(default),
        }
    }
    const KEYS: [&str; 14] = [
        "call",
        "user",
        "token",
        "audio",
        "video",
        "screen",
        "simulcast",
        "speaking",
        "muted",
        "dtx",
        "start_after",
        "seed",
        "transport",
        "stall_reading_after",
    ];
    for key in d.keys() {
        let key: String = key.extract()?;
        if !KEYS.contains(&key.as_str()) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "participant {index}: unknown key {key:?}"
            )));
        }
    }
    let seconds = |key: &str, value: f64| {
        Duration::try_from_secs_f64(value).map_err(|_| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "participant {index}: {key} {value} is not a duration"
            ))
        })
    };
    let start_after = seconds("start_after", get(d, "start_after", 0.0)?)?;
    let stall_reading_after = get::<Option<f64>>(d, "stall_reading_after", None)?
        .map(|s| seconds("stall_reading_after", s))
        .transpose()?;
    let transport = match get(d, "transport", "udp".to_owned())?.as_str() {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "participant {index}: transport {other:?} is neither \"udp\" nor \"tcp\""
            )))
        }
    };
    Ok(ParticipantSpec {
        call: get(d, "call", "loadtest".to_owned())?,
        user: get(d, "user", format!("sim-{index}"))?,
        token: get(d, "token", None)?,
        audio: get(d, "audio", true)?,
        video: get(d, "video", false)?,
        screen: get(d, "screen", false)?,
        simulcast: get(d, "simulcast", true)?,
        speaking: get(d, "speaking", false)?,
        muted: get(d, "muted", true)?,
        dtx: get(d, "dtx", true)?,
        start_after,
        seed: get(d, "seed", index as u64 + 1)?,
        transport,
        stall_reading_after,
    })
}

/// Simulated participants on Rust threads (see `calls.loadtest.Swarm` for the friendly face).
#[pyclass(module = "calls._calls")]
struct Swarm {
    inner: Mutex<swarm::Swarm>,
}

#[pymethods]
impl Swarm {
    /// Starts at once. `participants`: dicts with `call`, `user`, `token`, `audio`, `video`,
    /// `screen`, `simulcast` (default true), `speaking`, `muted`, `dtx` (default true),
    /// `start_after` (s), `seed`, `transport` (`"udp"`, the default, or `"tcp"`: ICE-TCP
    /// only), `stall_reading_after` (s; ICE-TCP only: stop reading the connection then, a
    /// client whose app froze).
    /// `threads` 0 = one per core.
    #[new]
    #[pyo3(signature = (url, participants, duration, threads = 0, allow_remote = false))]
    fn new(
        py: Python<'_>,
        url: String,
        participants: Vec<Bound<'_, PyDict>>,
        duration: f64,
        threads: usize,
        allow_remote: bool,
    ) -> PyResult<Swarm> {
        let participants = participants
            .iter()
            .enumerate()
            .map(|(i, d)| spec_from_dict(d, i))
            .collect::<PyResult<Vec<_>>>()?;
        let duration = Duration::try_from_secs_f64(duration)
            .map_err(|_| SwarmError::new_err(format!("duration {duration} is not a duration")))?;
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let config = SwarmConfig {
            url,
            participants,
            duration,
            threads,
            allow_remote,
        };
        let swarm = py
            .allow_threads(|| swarm::Swarm::start(config))
            .map_err(|e| SwarmError::new_err(e.to_string()))?;
        Ok(Swarm {
            inner: Mutex::new(swarm),
        })
    }

    /// Every participant's statistics as JSON (a list of objects; at most 250 ms old).
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        py.allow_threads(|| {
            lock(&self.inner).map(|s| serde_json::to_string(&s.stats()).unwrap_or_default())
        })
    }

    /// Asks every participant to leave now; returns at once.
    fn stop(&self) -> PyResult<()> {
        lock(&self.inner)?.stop();
        Ok(())
    }

    /// Waits for the threads to finish, at most `timeout` seconds (None: until the end).
    /// Returns whether they have. Ctrl-C raises `KeyboardInterrupt` while waiting.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let until = timeout
            .and_then(|t| Duration::try_from_secs_f64(t.max(0.0)).ok())
            .map(|t| Instant::now() + t);
        loop {
            if !lock(&self.inner)?.is_running() {
                return py.allow_threads(|| {
                    lock(&self.inner).map(|mut s| s.wait(Duration::from_secs(5)))
                });
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(false);
            }
            py.allow_threads(|| std::thread::sleep(Duration::from_millis(10)));
            py.check_signals()?;
        }
    }

    /// Whether media threads are still running.
    #[getter]
    fn running(&self) -> PyResult<bool> {
        Ok(lock(&self.inner)?.is_running())
    }

    /// Seconds since the swarm started.
    #[getter]
    fn elapsed(&self) -> PyResult<f64> {
        Ok(lock(&self.inner)?.elapsed())
    }

    /// The configured run time, seconds.
    #[getter]
    fn duration(&self) -> PyResult<f64> {
        Ok(lock(&self.inner)?.duration())
    }
}

/// The compiled half of the `calls` package.
#[pymodule]
fn _calls(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add_class::<Router>()?;
    m.add_class::<Transmit>()?;
    m.add_class::<Signal>()?;
    m.add_class::<Event>()?;
    m.add_class::<Timeout>()?;
    m.add_class::<Record>()?;
    m.add_class::<Peer>()?;
    m.add_class::<Swarm>()?;
    // Shown as `calls.ConfigError`, where users import them from.
    let errors = [
        ("CallsError", py.get_type::<CallsError>()),
        ("ConfigError", py.get_type::<ConfigError>()),
        ("SignalError", py.get_type::<SignalError>()),
        ("UnknownSessionError", py.get_type::<UnknownSessionError>()),
        ("SessionExistsError", py.get_type::<SessionExistsError>()),
        ("CallFullError", py.get_type::<CallFullError>()),
        ("RouterFullError", py.get_type::<RouterFullError>()),
        ("DrainingError", py.get_type::<DrainingError>()),
        ("OverloadedError", py.get_type::<OverloadedError>()),
        ("UnknownCallError", py.get_type::<UnknownCallError>()),
        ("RecordingError", py.get_type::<RecordingError>()),
        ("TcpError", py.get_type::<TcpError>()),
        ("SwarmError", py.get_type::<SwarmError>()),
    ];
    for (name, class) in errors {
        class.setattr("__module__", "calls")?;
        m.add(name, class)?;
    }
    Ok(())
}
