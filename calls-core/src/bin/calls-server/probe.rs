//! `calls-server probe`: is a calls media port reachable, over UDP and over TCP?
//!
//! ```sh
//! calls-server probe HOST:8443 --ufrag PROBE_UFRAG --password PROBE_PASSWORD
//! ```
//!
//! Sends a STUN binding request authenticated with the server's probe credential
//! (`probe_ufrag`/`probe_password` in its configuration) and reports, for UDP and TCP:
//! - `reachable` — an authenticated answer came back: round-trip time and the address the server
//!   saw (compare it with your own to see NAT);
//! - `no server` — the host refused (ICMP port unreachable / TCP RST): nothing listens there;
//! - `blocked` — silence. A firewall drop and a wrong probe credential look the same from
//!   outside (the server answers only authenticated requests), so the text says both.
//!
//! Exit status 0 when both are reachable, 1 when either is not, 2 on usage errors.
//! `--json` prints one JSON object instead of text.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use calls_core::str0m::ice::{StunMessage, TransId};

/// What silence means: the server answers only requests signed with its probe credential, so a
/// wrong credential and a firewall's drop cannot be told apart from outside.
const SILENCE: &str = "no authenticated answer: wrong probe credential, or blocked";

#[derive(Debug)]
enum Verdict {
    Reachable {
        rtt: Duration,
        seen_as: Option<SocketAddr>,
    },
    NoServer(String),
    Blocked,
    Error(String),
}

impl Verdict {
    fn word(&self) -> &'static str {
        match self {
            Verdict::Reachable { .. } => "reachable",
            Verdict::NoServer(_) => "no server",
            Verdict::Blocked => "blocked",
            Verdict::Error(_) => "error",
        }
    }

    fn json(&self) -> String {
        match self {
            Verdict::Reachable { rtt, seen_as } => format!(
                r#"{{"result":"reachable","rtt_ms":{:.2},"seen_as":{}}}"#,
                rtt.as_secs_f64() * 1000.0,
                seen_as.map_or("null".to_owned(), |a| format!("\"{a}\""))
            ),
            Verdict::NoServer(d) => format!(r#"{{"result":"no server","detail":{d:?}}}"#),
            Verdict::Blocked => format!(r#"{{"result":"blocked","detail":{SILENCE:?}}}"#),
            Verdict::Error(d) => format!(r#"{{"result":"error","detail":{d:?}}}"#),
        }
    }
}

fn request(ufrag: &str, password: &str) -> (Vec<u8>, TransId) {
    let username = format!("{ufrag}:probe");
    let trans = TransId::new();
    let msg = StunMessage::binding_request(&username, trans, true, 0, 1, false);
    let mut buf = vec![0u8; 512];
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    let n = msg
        .to_bytes(Some(password.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        })
        .unwrap_or(0);
    buf.truncate(n);
    (buf, trans)
}

fn check_reply(bytes: &[u8], trans: TransId, password: &str) -> Option<Option<SocketAddr>> {
    let reply = StunMessage::parse(bytes).ok()?;
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    (reply.is_successful_binding_response()
        && reply.trans_id() == trans
        && reply.verify(password.as_bytes(), |k, p| hmac.sha1_hmac(k, p)))
    .then(|| reply.mapped_address())
}

fn probe_udp(target: SocketAddr, ufrag: &str, password: &str) -> Verdict {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let socket = match UdpSocket::bind(bind).and_then(|s| s.connect(target).map(|_| s)) {
        Ok(s) => s,
        Err(e) => return Verdict::Error(e.to_string()),
    };
    let mut buf = [0u8; 1024];
    // Three tries, 0.5 s / 1 s / 2 s.
    for wait in [500u64, 1000, 2000] {
        let (req, trans) = request(ufrag, password);
        let sent = Instant::now();
        if let Err(e) = socket.send(&req) {
            return Verdict::NoServer(e.to_string());
        }
        let _ = socket.set_read_timeout(Some(Duration::from_millis(wait)));
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    if let Some(seen_as) = check_reply(&buf[..n], trans, password) {
                        return Verdict::Reachable {
                            rtt: sent.elapsed(),
                            seen_as,
                        };
                    }
                }
                // ICMP port unreachable surfaces as ECONNREFUSED on a connected UDP socket.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Verdict::NoServer("port unreachable".into())
                }
                Err(_) => break, // timeout: try again
            }
        }
    }
    Verdict::Blocked
}

fn probe_tcp(target: SocketAddr, ufrag: &str, password: &str) -> Verdict {
    let sent = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Verdict::NoServer("connection refused".into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Verdict::Blocked,
        Err(e) => return Verdict::Error(e.to_string()),
    };
    let (req, trans) = request(ufrag, password);
    let mut framed = (req.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&req);
    if let Err(e) = stream.write_all(&framed) {
        return Verdict::Error(e.to_string());
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut head = [0u8; 2];
    if stream.read_exact(&mut head).is_err() {
        // Something accepted the connection but no calls server answered the probe.
        return Verdict::NoServer(
            "connected, but no authenticated answer: wrong probe credential, or not a calls server"
                .into(),
        );
    }
    let mut body = vec![0u8; u16::from_be_bytes(head) as usize];
    if stream.read_exact(&mut body).is_err() {
        return Verdict::NoServer("truncated answer".into());
    }
    match check_reply(&body, trans, password) {
        Some(seen_as) => Verdict::Reachable {
            rtt: sent.elapsed(),
            seen_as,
        },
        None => Verdict::NoServer("answer not authenticated (wrong probe password?)".into()),
    }
}

/// The probe's command line (`calls-server probe --help`).
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The media port to probe, `HOST:PORT` (the server's `udp_port`/`tcp_port`, 8443 by default).
    #[arg(value_name = "HOST:PORT")]
    target: String,
    /// The server's `probe_ufrag`.
    #[arg(long, env = "CALLS_PROBE_UFRAG")]
    ufrag: String,
    /// The server's `probe_password`.
    #[arg(long, env = "CALLS_PROBE_PASSWORD", hide_env_values = true)]
    password: String,
    /// Probe UDP only.
    #[arg(long, conflicts_with = "tcp_only")]
    udp_only: bool,
    /// Probe TCP (ICE-TCP, RFC 4571 framing) only.
    #[arg(long)]
    tcp_only: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs the probe and returns the process exit status: 0 when every probed transport is
/// reachable, 1 when one is not, 2 when the target does not resolve.
pub fn run(args: &ProbeArgs) -> i32 {
    let target = &args.target;
    let Some(addr) = target.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        eprintln!("cannot resolve {target}");
        return 2;
    };
    let (ufrag, password) = (&args.ufrag, &args.password);
    let udp = (!args.tcp_only).then(|| probe_udp(addr, ufrag, password));
    let tcp = (!args.udp_only).then(|| probe_tcp(addr, ufrag, password));
    if args.json {
        let field = |v: &Option<Verdict>| v.as_ref().map_or("null".to_owned(), Verdict::json);
        println!(
            r#"{{"target":"{addr}","udp":{},"tcp":{}}}"#,
            field(&udp),
            field(&tcp)
        );
    } else {
        for (name, verdict) in [("UDP", &udp), ("TCP", &tcp)] {
            let Some(v) = verdict else { continue };
            match v {
                Verdict::Reachable { rtt, seen_as } => println!(
                    "{name} {addr}: reachable, rtt {:.1} ms, server saw us as {}",
                    rtt.as_secs_f64() * 1000.0,
                    seen_as.map_or("?".to_owned(), |a| a.to_string())
                ),
                Verdict::NoServer(d) => println!("{name} {addr}: no server ({d})"),
                Verdict::Blocked => println!("{name} {addr}: {SILENCE}"),
                Verdict::Error(d) => println!("{name} {addr}: error ({d})"),
            }
        }
    }
    let ok = [&udp, &tcp]
        .iter()
        .all(|v| v.as_ref().is_none_or(|v| v.word() == "reachable"));
    if ok {
        0
    } else {
        1
    }
}
