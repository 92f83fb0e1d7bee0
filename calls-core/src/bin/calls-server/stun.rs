//! Public-IP discovery with one STUN binding request at start-up (non-fatal).

use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use calls_core::str0m::ice::{StunMessageBuilder, TransId};

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
        // The transaction id is bytes 8..20 of the request.
        let transaction: [u8; 12] = out[8..20]
            .try_into()
            .map_err(|_| "short request".to_owned())?;
        let mut buf = [0u8; 1024];
        for _attempt in 0..3 {
            socket
                .send_to(&out[..n], target)
                .map_err(|e| e.to_string())?;
            if let Ok((len, _)) = socket.recv_from(&mut buf) {
                // A public STUN server's answer carries no MESSAGE-INTEGRITY, which str0m's
                // parser requires of binding replies; read the mapped address directly.
                return mapped_address(&buf[..len], &transaction).ok_or_else(|| {
                    "reply is not a binding success with a mapped address".to_owned()
                });
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

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// The (XOR-)MAPPED-ADDRESS of a STUN binding success response (RFC 5389 §15.1–15.2) for our
/// transaction, if it is one.
fn mapped_address(reply: &[u8], transaction: &[u8; 12]) -> Option<IpAddr> {
    let header = reply.get(..20)?;
    // Binding success response, magic cookie, our transaction.
    if header[0..2] != [0x01, 0x01] || header[4..8] != MAGIC_COOKIE || &header[8..20] != transaction
    {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut attrs = reply.get(20..20 + length)?;
    let mut plain = None;
    while attrs.len() >= 4 {
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + len)?;
        let family = *value.get(1)?;
        let ip = match (family, value.len()) {
            (0x01, 8) => {
                let mut a = [0u8; 4];
                a.copy_from_slice(&value[4..8]);
                Some(a.to_vec())
            }
            (0x02, 20) => Some(value[4..20].to_vec()),
            _ => None,
        };
        match (kind, ip) {
            // XOR-MAPPED-ADDRESS: XOR with the cookie (and the transaction id for IPv6).
            (0x0020, Some(mut ip)) => {
                let key: Vec<u8> = MAGIC_COOKIE
                    .iter()
                    .chain(transaction.iter())
                    .copied()
                    .collect();
                for (b, k) in ip.iter_mut().zip(key) {
                    *b ^= k;
                }
                return to_ip(&ip);
            }
            (0x0001, Some(ip)) => plain = to_ip(&ip),
            _ => {}
        }
        let padded = (len + 3) & !3;
        attrs = attrs.get(4 + padded..).unwrap_or(&[]);
    }
    plain
}

fn to_ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_xor_mapped_address_of_an_rfc5769_response() {
        // RFC 5769 §2.2 sample IPv4 response: XOR-MAPPED-ADDRESS 192.0.2.1:32853.
        let tx = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let mut reply = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        reply.extend_from_slice(&tx);
        reply.extend_from_slice(&[
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
        ]);
        assert_eq!(
            mapped_address(&reply, &tx),
            Some("192.0.2.1".parse().unwrap())
        );
        // Another transaction's answer is not ours.
        assert_eq!(mapped_address(&reply, &[0; 12]), None);
        // Truncated: nothing, no panic.
        assert_eq!(mapped_address(&reply[..25], &tx), None);
    }
}
