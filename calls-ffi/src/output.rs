//! `calls_output`: one item of the router's output queue, as a tagged struct.

use std::collections::HashMap;
use std::time::Instant;

use calls_core::record::RecordOutput;
use calls_core::{CallId, Event, LeaveReason, Output, Proto};
use serde_json::json;

use crate::address::calls_address;

/// Which kind of output `calls_router_poll_output` returned.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum calls_output_kind {
    /// Nothing more to do until `timeout_us` (or the next input): stop draining, wait, then
    /// call `calls_router_handle_timeout`.
    Timeout = 0,
    /// Send the `len` bytes in the buffer from `source` to `destination` (UDP), or write them
    /// to TCP connection `conn` as they are (TCP: they include the RFC 4571 length prefix).
    Transmit = 1,
    /// Deliver the JSON text in the buffer (a signaling message, NUL-terminated, `len` bytes
    /// without the NUL) to session `session`'s signaling channel.
    Signal = 2,
    /// Something happened (`event` says what; the buffer holds it as JSON text,
    /// NUL-terminated). The router has already acted on it: log it or update your state.
    Event = 3,
    /// A recording's output (`record` says which; `recording` and `file` say where it goes).
    /// `CALLS_RECORD_KIND_DATA`: append the `len` bytes in the buffer to that file. The others:
    /// JSON text in the buffer (NUL-terminated) describing the recording or the file.
    Record = 4,
}

/// What a record output (`CALLS_OUTPUT_KIND_RECORD`) is. The JSON text of the non-data kinds
/// has a `"type"` with the same name in snake_case, `"recording"` and `"call"`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum calls_record_kind {
    /// Not a record output.
    None = 0,
    /// A recording started (its start is time zero of every file's `start_offset_ms`): create
    /// its folder. `{"type":"started","recording":1,"call":"standup","options":{"sessions":null,
    /// "audio":true,"camera":true,"screen":true}}`
    Started = 1,
    /// A new file: create it, empty. `{"type":"file_started","recording":1,"call":"standup",
    /// "file":{"id":1,"name":"0001-s3-microphone.ogg","session":3,"user":"alice",
    /// "source":"microphone","codec":"opus","container":"ogg"}}`
    FileStarted = 2,
    /// Bytes to append to file `file` of recording `recording` (binary, no NUL).
    Data = 3,
    /// A file is complete; nothing more is appended to it. `{"type":"file_finished",
    /// "recording":1,"call":"standup","summary":{"id":1,"start_offset_ms":20,"duration_ms":9980,
    /// "frames":499,"bytes":61234,"silence_ms":0,"lost_packets":0,"broken_frames":0,
    /// "layer_switches":0,"sync":"sender_report"}}` (fields as in docs/recording.md)
    FileFinished = 4,
    /// The recording stopped; every file of it is finished.
    /// `{"type":"stopped","recording":1,"call":"standup"}`
    Stopped = 5,
}

/// Transport of a transmit.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum calls_proto {
    /// Not a transmit.
    None = 0,
    /// A UDP datagram: send it from `source` to `destination`.
    Udp = 1,
    /// An ICE-TCP frame: write it to connection `conn`.
    Tcp = 2,
}

/// What an event output reports. The JSON text has a `"type"` with the same name in
/// snake_case, `"session"` (the output's `session`), and the fields listed here.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum calls_event_kind {
    /// Not an event.
    None = 0,
    /// `{"type":"joined","session":1,"call":"standup","user":"alice"}`
    Joined = 1,
    /// ICE and DTLS are up, media can flow: `{"type":"connected","session":1}`
    Connected = 2,
    /// The session is gone (`"reason"`: `"left"` after `calls_router_leave`, `"disconnected"`
    /// when ICE/DTLS failed or timed out): `{"type":"left","session":1,"call":"standup",
    /// "reason":"disconnected"}`. Close its signaling channel if it is still open.
    Left = 3,
    /// `{"type":"track_published","session":1,"mid":"0","source":"microphone"}` (`"source"`:
    /// `"microphone"`, `"camera"` or `"screen"`)
    TrackPublished = 4,
    /// `{"type":"track_unpublished","session":1,"mid":"0"}`
    TrackUnpublished = 5,
    /// `{"type":"mute_changed","session":1,"muted":true}`
    MuteChanged = 6,
    /// A client address authenticated for a session (first contact, NAT rebinding, an ICE-TCP
    /// connection): `{"type":"flow_admitted","session":1,"proto":"udp","remote":"192.0.2.7:5000",
    /// "local":"10.0.0.1:8443"}`. A dispatcher in front of several routers routes that
    /// (proto, remote) to this router from now on.
    FlowAdmitted = 7,
    /// The active speaker of a call changed (its members also get a `speaker` signaling
    /// message): `{"type":"speaker_changed","session":2,"call":"standup","speaker":2}`.
    /// `"speaker"` (and the output's `session`) is the new speaker's session, or `null` (and
    /// `session` 0) when nobody speaks any more.
    SpeakerChanged = 8,
    /// A client address no longer reaches a session (it left, the TCP connection closed, or
    /// the address was the oldest beyond `max_flows_per_session`):
    /// `{"type":"flow_removed","session":1,"proto":"udp","remote":"192.0.2.7:5000",
    /// "local":"10.0.0.1:8443"}`. A dispatcher forgets that (proto, remote) unless another
    /// router admitted it since; for `"tcp"`, close that connection (`calls_router_tcp_closed`).
    FlowRemoved = 9,
    /// A client address moved to another session of this router (the output's `session`):
    /// `{"type":"flow_moved","session":2,"from":1,"proto":"udp","remote":"192.0.2.7:5000",
    /// "local":"10.0.0.1:8443"}`. Routing by router does not change.
    FlowMoved = 10,
    /// An event this version of the C API has no kind for: `{"type":"other",
    /// "session":0,"debug":"…"}`.
    Other = 99,
}

/// One output of the router, filled in by `calls_router_poll_output`. Fields that do not
/// apply to `kind` are zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct calls_output {
    /// What this output is.
    pub kind: calls_output_kind,
    /// Transmit: UDP or TCP.
    pub proto: calls_proto,
    /// Event: which event.
    pub event: calls_event_kind,
    /// Signal: the session to deliver to. Event: the session it is about (for
    /// `CALLS_EVENT_KIND_SPEAKER_CHANGED` the new speaker, 0 when nobody speaks).
    pub session: u64,
    /// Transmit over TCP: the connection (as given to `calls_router_tcp_accepted`).
    pub conn: u64,
    /// Transmit: the local address to send from (an advertised candidate).
    pub source: calls_address,
    /// Transmit: where to send.
    pub destination: calls_address,
    /// Bytes in the caller's buffer: the datagram, or the JSON text without its NUL. After
    /// `CALLS_RESULT_BUFFER_TOO_SMALL`: the buffer size needed.
    pub len: usize,
    /// Timeout: when to call `calls_router_handle_timeout`, on the caller's clock (the same
    /// microseconds as `now_us`). Not relative: compare it with your current time.
    pub timeout_us: u64,
    /// Record: which recording output.
    pub record: calls_record_kind,
    /// Record: the recording, numbered 1, 2, … by this router handle in the order they
    /// started (a call recorded twice gets two numbers); the `started` JSON names its call.
    pub recording: u64,
    /// Record (file_started, data, file_finished): the file's number within its recording.
    pub file: u32,
}

/// The numbers this handle gave the recordings that run (a C caller keys its folders by a
/// number rather than by the call's name, which data outputs do not carry).
#[derive(Debug, Default)]
pub(crate) struct Recordings {
    running: HashMap<CallId, u64>,
    last: u64,
}

impl Recordings {
    /// The number of `call`'s recording (a new one for `started`; forgotten after `stopped`).
    fn number(&mut self, out: &RecordOutput) -> u64 {
        let call = out.call();
        match out {
            RecordOutput::Started { .. } => {
                self.last += 1;
                self.running.insert(call.clone(), self.last);
                self.last
            }
            RecordOutput::Stopped { .. } => self.running.remove(call).unwrap_or(0),
            _ => self.running.get(call).copied().unwrap_or(0),
        }
    }
}

/// An output taken from the router, ready to be copied to the caller (kept by the handle while
/// the caller's buffer is too small).
#[derive(Debug)]
pub(crate) struct Prepared {
    pub header: calls_output,
    /// What goes into the caller's buffer: datagram bytes, or JSON text with a trailing NUL.
    pub bytes: Vec<u8>,
    /// `bytes` ends with a NUL that `len` does not count.
    pub text: bool,
}

impl Prepared {
    /// Converts a router output; `to_us` maps the router's `Instant`s to the caller's clock,
    /// `recordings` numbers the recordings.
    pub fn new(
        output: Output,
        to_us: impl Fn(Instant) -> u64,
        recordings: &mut Recordings,
    ) -> Prepared {
        let mut header = calls_output {
            kind: calls_output_kind::Timeout,
            proto: calls_proto::None,
            event: calls_event_kind::None,
            session: 0,
            conn: 0,
            source: calls_address::NONE,
            destination: calls_address::NONE,
            len: 0,
            timeout_us: 0,
            record: calls_record_kind::None,
            recording: 0,
            file: 0,
        };
        match output {
            Output::Transmit(t) => {
                header.kind = calls_output_kind::Transmit;
                header.proto = match t.proto {
                    Proto::Udp => calls_proto::Udp,
                    Proto::Tcp => calls_proto::Tcp,
                };
                header.conn = t.conn.map_or(0, |c| c.0);
                header.source = t.source.into();
                header.destination = t.destination.into();
                Prepared {
                    header,
                    bytes: t.contents,
                    text: false,
                }
            }
            Output::Signal(session, msg) => {
                header.kind = calls_output_kind::Signal;
                header.session = session.0;
                Prepared::text(header, msg.to_json())
            }
            Output::Event(event) => {
                header.kind = calls_output_kind::Event;
                let (kind, session, json) = event_json(&event);
                header.event = kind;
                header.session = session;
                Prepared::text(header, json)
            }
            Output::Timeout(at) => {
                header.timeout_us = to_us(at);
                Prepared {
                    header,
                    bytes: Vec::new(),
                    text: false,
                }
            }
            Output::Record(out) => {
                header.kind = calls_output_kind::Record;
                header.recording = recordings.number(&out);
                record_prepared(header, out)
            }
            other => {
                // A newer core output this mapping does not know: report it as an event.
                header.kind = calls_output_kind::Event;
                header.event = calls_event_kind::Other;
                let json = json!({"type": "other", "session": 0, "debug": format!("{other:?}")});
                Prepared::text(header, json.to_string())
            }
        }
    }

    fn text(header: calls_output, json: String) -> Prepared {
        let mut bytes = json.into_bytes();
        bytes.push(0);
        Prepared {
            header,
            bytes,
            text: true,
        }
    }

    /// What `len` reports once copied.
    pub fn len(&self) -> usize {
        self.bytes.len() - usize::from(self.text)
    }
}

/// A record output: the file bytes as they are, everything else as JSON text.
fn record_prepared(mut header: calls_output, out: RecordOutput) -> Prepared {
    let recording = header.recording;
    let (kind, value) = match out {
        RecordOutput::Data { file, bytes, .. } => {
            header.record = calls_record_kind::Data;
            header.file = file.0;
            return Prepared {
                header,
                bytes,
                text: false,
            };
        }
        RecordOutput::Started { call, options } => (
            calls_record_kind::Started,
            json!({"type": "started", "recording": recording, "call": call, "options": options}),
        ),
        RecordOutput::FileStarted { call, file } => {
            header.file = file.id.0;
            (
                calls_record_kind::FileStarted,
                json!({"type": "file_started", "recording": recording, "call": call, "file": file}),
            )
        }
        RecordOutput::FileFinished { call, summary } => {
            header.file = summary.id.0;
            (
                calls_record_kind::FileFinished,
                json!({"type": "file_finished", "recording": recording, "call": call,
                       "summary": summary}),
            )
        }
        RecordOutput::Stopped { call } => (
            calls_record_kind::Stopped,
            json!({"type": "stopped", "recording": recording, "call": call}),
        ),
        other => (
            calls_record_kind::None,
            json!({"type": "other", "recording": recording, "call": other.call(),
                   "debug": "a recording output this version of the C API does not know"}),
        ),
    };
    header.record = kind;
    Prepared::text(header, value.to_string())
}

/// The event as (kind, session, JSON text).
fn event_json(event: &Event) -> (calls_event_kind, u64, String) {
    let (kind, session, value) = match event {
        Event::Joined {
            session,
            call,
            user,
        } => (
            calls_event_kind::Joined,
            session.0,
            json!({"type": "joined", "session": session, "call": call, "user": user}),
        ),
        Event::Connected { session } => (
            calls_event_kind::Connected,
            session.0,
            json!({"type": "connected", "session": session}),
        ),
        Event::Left {
            session,
            call,
            reason,
        } => {
            let reason = match reason {
                LeaveReason::Left => "left",
                LeaveReason::Disconnected => "disconnected",
                _ => "other",
            };
            (
                calls_event_kind::Left,
                session.0,
                json!({"type": "left", "session": session, "call": call, "reason": reason}),
            )
        }
        Event::TrackPublished {
            session,
            mid,
            source,
        } => (
            calls_event_kind::TrackPublished,
            session.0,
            json!({"type": "track_published", "session": session, "mid": mid, "source": source}),
        ),
        Event::TrackUnpublished { session, mid } => (
            calls_event_kind::TrackUnpublished,
            session.0,
            json!({"type": "track_unpublished", "session": session, "mid": mid}),
        ),
        Event::MuteChanged { session, muted } => (
            calls_event_kind::MuteChanged,
            session.0,
            json!({"type": "mute_changed", "session": session, "muted": muted}),
        ),
        Event::FlowAdmitted {
            session,
            proto,
            remote,
            local,
        } => (
            calls_event_kind::FlowAdmitted,
            session.0,
            json!({"type": "flow_admitted", "session": session, "proto": proto,
                   "remote": remote.to_string(), "local": local.to_string()}),
        ),
        Event::FlowRemoved {
            session,
            proto,
            remote,
            local,
        } => (
            calls_event_kind::FlowRemoved,
            session.0,
            json!({"type": "flow_removed", "session": session, "proto": proto,
                   "remote": remote.to_string(), "local": local.to_string()}),
        ),
        Event::FlowMoved {
            from,
            to,
            proto,
            remote,
            local,
        } => (
            calls_event_kind::FlowMoved,
            to.0,
            json!({"type": "flow_moved", "session": to, "from": from, "proto": proto,
                   "remote": remote.to_string(), "local": local.to_string()}),
        ),
        Event::SpeakerChanged { call, session } => (
            calls_event_kind::SpeakerChanged,
            session.map_or(0, |s| s.0),
            json!({"type": "speaker_changed", "session": session.map_or(0, |s| s.0),
                   "call": call, "speaker": session}),
        ),
        other => (
            calls_event_kind::Other,
            0,
            json!({"type": "other", "session": 0, "debug": format!("{other:?}")}),
        ),
    };
    (kind, session, value.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use calls_core::{CallId, SessionId};
    use serde_json::Value;

    use super::*;

    /// Converts an event the way `calls_router_poll_output` does: (header, parsed JSON).
    fn prepared_event(event: Event) -> (calls_output, Value) {
        let prepared = Prepared::new(Output::Event(event), |_| 0, &mut Recordings::default());
        assert_eq!(
            prepared.bytes.last(),
            Some(&0),
            "event text is NUL-terminated"
        );
        let json = serde_json::from_slice(&prepared.bytes[..prepared.len()]).unwrap();
        (prepared.header, json)
    }

    #[test]
    fn recordings_are_numbered_and_their_data_stays_binary() {
        use calls_core::record::{FileId, RecordOutput};
        use calls_core::RecordingOptions;

        let mut recordings = Recordings::default();
        let call = CallId::from("standup");
        let mut prepare =
            |out: RecordOutput| Prepared::new(Output::Record(out), |_| 0, &mut recordings);
        let started = prepare(RecordOutput::Started {
            call: call.clone(),
            options: RecordingOptions::everyone(),
        });
        let data = prepare(RecordOutput::Data {
            call: call.clone(),
            file: FileId(3),
            bytes: vec![0, b'O', 0xff],
        });
        let stopped = prepare(RecordOutput::Stopped { call: call.clone() });
        let again = prepare(RecordOutput::Started {
            call,
            options: RecordingOptions::everyone(),
        });

        assert_eq!(started.header.kind, calls_output_kind::Record);
        assert_eq!(started.header.record, calls_record_kind::Started);
        assert_eq!(started.header.recording, 1);
        let json: Value = serde_json::from_slice(&started.bytes[..started.len()]).unwrap();
        assert_eq!(json["type"], "started");
        assert_eq!(json["call"], "standup");
        assert_eq!(json["options"]["camera"], true);
        assert_eq!(data.header.record, calls_record_kind::Data);
        assert_eq!((data.header.recording, data.header.file), (1, 3));
        assert_eq!(
            data.bytes,
            [0, b'O', 0xff],
            "file bytes as they are, no NUL"
        );
        assert_eq!(data.len(), 3);
        assert_eq!(stopped.header.record, calls_record_kind::Stopped);
        assert_eq!(stopped.header.recording, 1);
        assert_eq!(again.header.recording, 2, "a new recording, a new number");
    }

    #[test]
    fn a_new_speaker_is_reported_with_its_session() {
        let (header, json) = prepared_event(Event::SpeakerChanged {
            call: CallId::from("standup"),
            session: Some(SessionId(2)),
        });
        assert_eq!(header.kind, calls_output_kind::Event);
        assert_eq!(header.event, calls_event_kind::SpeakerChanged);
        assert_eq!(header.session, 2);
        assert_eq!(
            json,
            json!({"type": "speaker_changed", "session": 2, "call": "standup", "speaker": 2})
        );
    }

    #[test]
    fn silence_is_reported_as_no_speaker_and_session_zero() {
        let (header, json) = prepared_event(Event::SpeakerChanged {
            call: CallId::from("standup"),
            session: None,
        });
        assert_eq!(header.event, calls_event_kind::SpeakerChanged);
        assert_eq!(header.session, 0);
        assert_eq!(
            json,
            json!({"type": "speaker_changed", "session": 0, "call": "standup", "speaker": null})
        );
    }
}
