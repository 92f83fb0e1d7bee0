//! Public-IP discovery with one STUN binding request at start-up (non-fatal).

use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use calls_core::str0m::ice::{StunMessage, StunMessageBuilder, TransId};

/// Asks `server` (`host:port`) for our public address. Logs and returns `None` on any failure.
pub fn discover_public_ip(server: &str) -> Option<IpAddr> {
    let result = (|| -> Result<IpAddr, String> {
        let target = server
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {server}: {e}"))?
            .next()
            .ok_or_else(|| format!("{server} resolves to nothing"))?;
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .map_err(|e| e.to_string())?;
        let request = StunMessageBuilder::new()
            .binding()
            .request()
            .build(TransId::new());
        let mut out = vec![0u8; 256];
        let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
        let n = request
            .to_bytes(None, &mut out, |k, p| hmac.sha1_hmac(k, p))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1024];
        for _attempt in 0..3 {
            socket
                .send_to(&out[..n], target)
                .map_err(|e| e.to_string())?;
            if let Ok((len, _)) = socket.recv_from(&mut buf) {
                let reply = StunMessage::parse(&buf[..len]).map_err(|e| e.to_string())?;
                return reply
                    .mapped_address()
                    .map(|a| a.ip())
                    .ok_or_else(|| "reply has no mapped address".to_owned());
            }
        }
        Err("no reply".to_owned())
    })();
    match result {
        Ok(ip) => {
            tracing::info!(%ip, server, "STUN discovered the public address; advertising it");
            Some(ip)
        }
        Err(e) => {
            tracing::warn!(
                server,
                "STUN discovery failed ({e}); advertising configured addresses only"
            );
            None
        }
    }
}
