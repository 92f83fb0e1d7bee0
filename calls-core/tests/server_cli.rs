//! `calls-server`'s command line as an admin meets it: `--version`, refused flags, `--help`,
//! `--check-config` on a broken file, and a running server's `/version`, `calls_build_info` and
//! plain-text logs when stderr is not a terminal.
#![allow(clippy::unwrap_used)] // test: fail loudly

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SERVER: &str = env!("CARGO_BIN_EXE_calls-server");

/// Runs the server with `args` and no `CALLS_*` variables from the test's environment.
fn server(args: &[&str]) -> Output {
    let mut cmd = Command::new(SERVER);
    for (key, _) in std::env::vars() {
        if key.starts_with("CALLS_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_prints_version_and_commit_and_exits() {
    let out = server(&["--version"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "calls-server {} (commit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{stdout}"
    );
}

#[test]
fn an_unknown_flag_is_refused_with_usage() {
    let out = server(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--bogus") && stderr.contains("Usage"),
        "{stderr}"
    );
}

#[test]
fn help_lists_options_and_settings_with_variables_and_defaults() {
    let out = server(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "--config <FILE>",
        "[env: CALLS_CONFIG=]",
        "--check-config",
        "probe",
        "CALLS_MAX_PARTICIPANTS_PER_CALL",
        "\"127.0.0.1:8080\"",
    ] {
        assert!(help.contains(needle), "{needle} missing:\n{help}");
    }
    assert!(!help.contains('\x1b'), "colours in piped help:\n{help}");
}

#[test]
fn check_config_lists_every_problem_with_its_place() {
    let dir = std::env::temp_dir().join(format!("calls-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("calls.toml");
    std::fs::write(
        &file,
        "udp_port = \"8443\"\nworkers = 2\nlog_jsn = true\nhttp_listen = \"0.0.0.0:8080\"\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    let out = server(&["--config", file_arg, "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{file_arg}:1:1: `udp_port`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file_arg}:3:1: `log_jsn`")),
        "{stderr}"
    );
    // The keys that parsed still count: demo mode off loopback is refused too.
    assert!(stderr.contains("not loopback"), "{stderr}");

    std::fs::write(&file, "udp_port = 8443\ntcp_port 8443\n").unwrap();
    let out = server(&["--config", file_arg, "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("{file_arg}:2:")), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GET over plain HTTP/1.0; the body.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

#[test]
fn a_running_server_names_its_build_and_logs_plain_text() {
    let (http, media) = (18_650, 18_651);
    let mut child = Command::new(SERVER)
        .env("CALLS_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("CALLS_UDP_PORT", media.to_string())
        .env("CALLS_TCP_PORT", media.to_string())
        .env("CALLS_WORKERS", "1")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut version = None;
    for _ in 0..200 {
        version = get(http, "/version");
        if version.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = get(http, "/metrics");
    child.kill().unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child.wait().unwrap();

    let version: serde_json::Value = serde_json::from_str(&version.unwrap()).unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
    assert!(version["commit"].as_str().is_some_and(|c| !c.is_empty()));
    let metrics = metrics.unwrap();
    assert!(
        metrics.contains("# TYPE calls_build info\n")
            && metrics.contains(&format!(
                "calls_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                version["commit"].as_str().unwrap()
            )),
        "{metrics}"
    );
    assert!(logs.contains("calls server ready"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "colour codes in piped logs:\n{logs}"
    );
}
