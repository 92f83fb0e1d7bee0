//! The media-port probe against the reference server: it tells a reachable port from one where
//! no server listens and from one where datagrams vanish (a firewall's silent drop).
#![allow(clippy::unwrap_used)] // test: fail loudly

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PASSWORD: &str = "probe0password0123456789";

/// The server binary; `calls-server probe` is the probe.
const SERVER: &str = env!("CARGO_BIN_EXE_calls-server");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(http: u16, media: u16, udp: bool) -> Server {
    let child = Command::new(SERVER)
        .env("CALLS_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("CALLS_UDP_PORT", media.to_string())
        .env("CALLS_TCP_PORT", media.to_string())
        .env("CALLS_DISABLE_UDP", (!udp).to_string())
        .env("CALLS_PROBE_UFRAG", "probe")
        .env("CALLS_PROBE_PASSWORD", PASSWORD)
        .env("CALLS_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    // Ready when the TCP media port accepts.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", media)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not start");
}

fn probe(port: u16, password: &str) -> (serde_json::Value, i32) {
    let out = Command::new(SERVER)
        .args([
            "probe",
            &format!("127.0.0.1:{port}"),
            "--ufrag",
            "probe",
            "--password",
            password,
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    (
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn probe_tells_reachable_from_no_server_from_blocked() {
    // 1. Everything up: both reachable, with the address the server saw.
    {
        let _server = start_server(18_610, 18_611, true);
        let (report, code) = probe(18_611, PASSWORD);
        assert_eq!(code, 0, "{report}");
        for proto in ["udp", "tcp"] {
            assert_eq!(report[proto]["result"], "reachable", "{report}");
            assert!(report[proto]["seen_as"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"));
        }
        // A wrong credential gets silence too: the verdict says it may be either.
        let (report, code) = probe(18_611, "wrong0password0123456789");
        assert_eq!(code, 1);
        assert_eq!(report["udp"]["result"], "blocked", "{report}");
        let detail = report["udp"]["detail"].as_str().unwrap();
        assert!(
            detail.contains("wrong probe credential, or blocked"),
            "{report}"
        );
        assert!(!detail.contains("firewall"), "{report}");
    }

    // 2. The server runs without UDP: UDP has no server (ICMP unreachable), TCP still answers.
    {
        let _server = start_server(18_620, 18_621, false);
        let (report, code) = probe(18_621, PASSWORD);
        assert_eq!(code, 1);
        assert_eq!(report["udp"]["result"], "no server", "{report}");
        assert_eq!(report["tcp"]["result"], "reachable", "{report}");
    }

    // 3. Datagrams to the UDP port vanish (what a firewall's drop rule looks like from outside):
    //    a socket holds the port and never answers. The probe says blocked, not "open|filtered".
    {
        let _server = start_server(18_630, 18_631, false);
        let hole = UdpSocket::bind("127.0.0.1:18631").unwrap();
        let (report, _) = probe(18_631, PASSWORD);
        assert_eq!(report["udp"]["result"], "blocked", "{report}");
        assert_eq!(report["tcp"]["result"], "reachable", "{report}");
        drop(hole);
    }
}
