//! What one participant may ask of the router through its offer: tracks per session (by
//! source), m-lines per offer and simulcast layers per track. Checked on the client's SDP text
//! before str0m parses it, so an offer beyond them costs a line scan and nothing else: every
//! sending m-line would become a track that every member of the call is offered.

use crate::config::Config;
use crate::error::SignalError;
use crate::ids::TrackSource;

/// The ICE credentials a client's offer carries (RFC 8839 §5.4), which the router needs to
/// send that client a consent check (see [`crate::consent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteIce {
    pub ufrag: String,
    pub pwd: String,
}

/// What the pre-pass learned from an offer it let through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct OfferFacts {
    /// The client's ICE credentials, if the offer names them.
    pub remote_ice: Option<RemoteIce>,
}

/// One m-section as the pre-pass sees it.
#[derive(Debug, Default)]
struct Section<'a> {
    kind: &'a str,
    rejected: bool,
    direction: Option<&'a str>,
    mid: Option<&'a str>,
    /// `a=rid:<id> send` lines.
    send_rids: usize,
    /// Streams in `a=simulcast:send …` (`;`-separated).
    simulcast_send: usize,
}

/// Checks a client's offer against the session limits of `config`. `screen_mid` is the m-line
/// the client says carries its screen (a video m-line counted as a screen, not a camera).
pub(crate) fn check_offer(
    sdp: &str,
    screen_mid: Option<&str>,
    config: &Config,
) -> Result<OfferFacts, SignalError> {
    let mut facts = OfferFacts::default();
    let mut ufrag = None;
    let mut pwd = None;
    let mut session_direction = None;
    let mut sections: Vec<Section<'_>> = Vec::new();
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("m=") {
            if sections.len() == config.max_mlines_per_offer {
                let count = sdp.lines().filter(|l| l.starts_with("m=")).count();
                return Err(SignalError::TooManyMLines {
                    count,
                    max: config.max_mlines_per_offer,
                });
            }
            let mut fields = rest.split(' ');
            let kind = fields.next().unwrap_or("");
            // RFC 8866 §5.14 / RFC 3264 §6: port 0 is a rejected (stopped) m-line.
            let rejected = fields.next().is_some_and(|port| port == "0");
            sections.push(Section {
                kind,
                rejected,
                ..Section::default()
            });
            continue;
        }
        let Some(attribute) = line.strip_prefix("a=") else {
            continue;
        };
        if let Some(v) = attribute.strip_prefix("ice-ufrag:") {
            ufrag.get_or_insert(v.trim());
            continue;
        }
        if let Some(v) = attribute.strip_prefix("ice-pwd:") {
            pwd.get_or_insert(v.trim());
            continue;
        }
        let direction = matches!(attribute, "sendrecv" | "sendonly" | "recvonly" | "inactive");
        let Some(section) = sections.last_mut() else {
            if direction {
                session_direction = Some(attribute);
            }
            continue;
        };
        if direction {
            section.direction = Some(attribute);
        } else if let Some(mid) = attribute.strip_prefix("mid:") {
            section.mid = Some(mid.trim());
        } else if let Some(rid) = attribute.strip_prefix("rid:") {
            // RFC 8851 §4: `a=rid:<rid-id> <direction> [params]`.
            if rid.split(' ').nth(1) == Some("send") {
                section.send_rids += 1;
            }
        } else if let Some(simulcast) = attribute.strip_prefix("simulcast:") {
            // RFC 8853 §5.1: `a=simulcast:send <streams> [recv <streams>]`, streams `;`-separated.
            let mut words = simulcast.split(' ');
            while let Some(word) = words.next() {
                let streams = words.next().unwrap_or("");
                if word == "send" {
                    section.simulcast_send = streams.split(';').count();
                }
            }
        }
    }
    let mut microphones = 0;
    let mut cameras = 0;
    let mut screens = 0;
    for section in &sections {
        // RFC 3264 §5.1: without a direction attribute a stream is sendrecv.
        let direction = section
            .direction
            .or(session_direction)
            .unwrap_or("sendrecv");
        if section.rejected || !matches!(direction, "sendrecv" | "sendonly") {
            continue;
        }
        let source = match section.kind {
            "audio" => TrackSource::Microphone,
            "video" if section.mid.is_some() && section.mid == screen_mid => TrackSource::Screen,
            "video" => TrackSource::Camera,
            _ => continue,
        };
        let layers = section.send_rids.max(section.simulcast_send);
        if layers > config.max_simulcast_layers {
            return Err(SignalError::TooManyLayers {
                mid: section.mid.unwrap_or("").to_owned(),
                count: layers,
                max: config.max_simulcast_layers,
            });
        }
        let (count, max) = match source {
            TrackSource::Microphone => (&mut microphones, config.max_microphones_per_session),
            TrackSource::Camera => (&mut cameras, config.max_cameras_per_session),
            TrackSource::Screen => (&mut screens, config.max_screens_per_session),
        };
        *count += 1;
        if *count > max {
            return Err(SignalError::TooManyTracks {
                track: source,
                count: *count,
                max,
            });
        }
    }
    if let (Some(ufrag), Some(pwd)) = (ufrag, pwd) {
        facts.remote_ice = Some(RemoteIce {
            ufrag: ufrag.to_owned(),
            pwd: pwd.to_owned(),
        });
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(sections: &[&str]) -> String {
        let mut sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\n".to_owned();
        for (i, s) in sections.iter().enumerate() {
            let (kind, rest) = s.split_once(' ').unwrap_or((s, ""));
            sdp += &format!("m={kind} 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:{i}\r\n");
            for attr in rest.split(' ').filter(|a| !a.is_empty()) {
                sdp += &format!("a={attr}\r\n");
            }
        }
        sdp
    }

    /// Finding 2 (issue 16): a typical client (one microphone, a simulcast camera, a screen)
    /// passes the default limits, and its ICE credentials are read.
    #[test]
    fn a_typical_offer_passes_the_defaults() {
        let sdp = offer(&[
            "audio sendrecv",
            "video sendonly rid:h|send rid:m|send rid:l|send simulcast:send|h;m;l",
            "video sendonly",
            "video recvonly",
        ])
        .replace('|', " ");
        let facts = check_offer(&sdp, Some("2"), &Config::default()).unwrap();
        assert_eq!(
            facts.remote_ice,
            Some(RemoteIce {
                ufrag: "abcd".into(),
                pwd: "0123456789abcdefghijkl".into()
            })
        );
    }

    /// Finding 2 (issue 16): sending m-lines beyond the per-source caps are refused with a
    /// typed error naming the source; receive-only, inactive and rejected ones do not count.
    #[test]
    fn tracks_beyond_the_caps_are_refused() {
        let config = Config::default();
        let two_mics = offer(&["audio sendrecv", "audio"]);
        assert_eq!(
            check_offer(&two_mics, None, &config),
            Err(SignalError::TooManyTracks {
                track: TrackSource::Microphone,
                count: 2,
                max: 1
            })
        );
        let three_cameras = offer(&["video sendonly", "video sendonly", "video sendrecv"]);
        let err = check_offer(&three_cameras, None, &config).unwrap_err();
        assert_eq!(err.code(), "too_many_tracks");
        // The third video m-line is the screen: allowed.
        assert!(check_offer(&three_cameras, Some("2"), &config).is_ok());
        let mostly_receiving = offer(&[
            "audio sendrecv",
            "audio recvonly",
            "audio inactive",
            "video recvonly",
        ]);
        assert!(check_offer(&mostly_receiving, None, &config).is_ok());
        let stopped = offer(&["audio sendrecv"])
            + "m=audio 0 UDP/TLS/RTP/SAVPF 111\r\na=mid:9\r\na=sendrecv\r\n";
        assert!(check_offer(&stopped, None, &config).is_ok());
    }

    /// Finding 2 (issue 16): an offer with thousands of m-lines is refused before str0m parses
    /// it, whatever their direction.
    #[test]
    fn too_many_mlines_are_refused() {
        let many: Vec<&str> = std::iter::repeat_n("audio recvonly", 2000).collect();
        let err = check_offer(&offer(&many), None, &Config::default()).unwrap_err();
        assert_eq!(
            err,
            SignalError::TooManyMLines {
                count: 2000,
                max: Config::default().max_mlines_per_offer
            }
        );
        assert_eq!(err.code(), "too_many_mlines");
    }

    /// Finding 2 (issue 16): simulcast layers beyond `max_simulcast_layers` are refused,
    /// counted from `a=rid` send lines or the `a=simulcast` send list.
    #[test]
    fn too_many_simulcast_layers_are_refused() {
        let rids = offer(&["video sendonly rid:a|send rid:b|send rid:c|send rid:d|send"])
            .replace('|', " ");
        assert_eq!(
            check_offer(&rids, None, &Config::default()),
            Err(SignalError::TooManyLayers {
                mid: "0".into(),
                count: 4,
                max: 3
            })
        );
        let list = offer(&["video sendonly simulcast:send|a;b;c;d;e"]).replace('|', " ");
        assert_eq!(
            check_offer(&list, None, &Config::default())
                .unwrap_err()
                .code(),
            "too_many_layers"
        );
    }
}
