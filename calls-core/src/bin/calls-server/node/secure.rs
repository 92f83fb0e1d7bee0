//! Who may speak on the node relay: QUIC (quinn, TLS 1.3 by rustls on aws-lc-rs) with a
//! self-signed certificate per process, and the shared secret proven in both directions over
//! the TLS session (docs/security.md, "The node relay").
//!
//! A certificate alone proves nothing here (anyone can make one), so the TLS layer accepts
//! any; what authenticates is the first message each side sends on the control stream: an
//! HMAC-SHA256, keyed with `relay_secret`, over the TLS keying-material exporter (RFC 5705 /
//! RFC 8446 §7.5), the sender's role, node id and incarnation. The exporter is unique to this
//! TLS session: a man in the middle has two sessions with two different exporters and cannot
//! make either MAC without the secret, and a recorded MAC is worthless on another connection.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// ALPN of the node relay protocol.
const ALPN: &[u8] = b"calls-relay/1";
/// The exporter label (RFC 8446 §7.5); the context is empty.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-calls-relay-auth";
/// What the MAC covers before the variable parts: the protocol, so a MAC made for something
/// else with the same key never passes.
const MAC_CONTEXT: &[u8] = b"calls node relay v1";
/// The server name a dialer asks for (certificates are not checked by name).
pub const SERVER_NAME: &str = "calls-relay";
/// A connection that says nothing for this long is closed (keep-alives go every
/// [`KEEP_ALIVE`]): how fast a dead peer is noticed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const KEEP_ALIVE: Duration = Duration::from_millis(750);
/// Buffer for received datagrams per connection (quinn drops the oldest beyond it).
const DATAGRAM_RECEIVE_BYTES: usize = 2 * 1024 * 1024;
/// Buffer for datagrams waiting to be sent per connection (quinn drops the oldest beyond it).
const DATAGRAM_SEND_BYTES: usize = 2 * 1024 * 1024;

/// Which end of a connection a node is: part of what its MAC covers, so a MAC cannot be
/// reflected back to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Dialer => b'D',
            Role::Acceptor => b'A',
        }
    }

    pub fn other(self) -> Role {
        match self {
            Role::Dialer => Role::Acceptor,
            Role::Acceptor => Role::Dialer,
        }
    }
}

/// The TLS session's exporter value, 32 bytes; `None` if the session cannot give one.
pub fn exporter(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .ok()?;
    Some(out)
}

/// The MAC a node with `role`, `node` and `incarnation` sends on a session with `exporter`.
pub fn mac(secret: &[u8], role: Role, node: u8, incarnation: u64, exporter: &[u8; 32]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, &mac_input(role, node, incarnation, exporter));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `tag` is the MAC of `role`, `node`, `incarnation` on this session (constant time).
pub fn verify(
    secret: &[u8],
    role: Role,
    node: u8,
    incarnation: u64,
    exporter: &[u8; 32],
    tag: &[u8; 32],
) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &mac_input(role, node, incarnation, exporter), tag).is_ok()
}

fn mac_input(role: Role, node: u8, incarnation: u64, exporter: &[u8; 32]) -> Vec<u8> {
    let mut input = Vec::with_capacity(MAC_CONTEXT.len() + 2 + 8 + 32);
    input.extend_from_slice(MAC_CONTEXT);
    input.push(role.byte());
    input.push(node);
    input.extend_from_slice(&incarnation.to_be_bytes());
    input.extend_from_slice(exporter);
    input
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn transport() -> Result<Arc<quinn::TransportConfig>, String> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .map_err(|e| format!("idle timeout: {e}"))?,
    ))
    .keep_alive_interval(Some(KEEP_ALIVE))
    // One control stream, opened by the dialer; nothing else.
    .max_concurrent_bidi_streams(1u8.into())
    .max_concurrent_uni_streams(0u8.into())
    .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BYTES))
    .datagram_send_buffer_size(DATAGRAM_SEND_BYTES);
    Ok(Arc::new(t))
}

/// A QUIC endpoint on `listen` that accepts and dials relay connections, with a fresh
/// self-signed certificate.
pub fn endpoint(listen: std::net::SocketAddr) -> Result<quinn::Endpoint, String> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .map_err(|e| format!("relay certificate: {e}"))?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let transport = transport()?;

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("relay TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| format!("relay TLS: {e}"))?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let server_crypto =
        QuicServerConfig::try_from(server_tls).map_err(|e| format!("relay QUIC: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(Arc::clone(&transport));

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("relay TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let client_crypto =
        QuicClientConfig::try_from(client_tls).map_err(|e| format!("relay QUIC: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);

    let mut endpoint = quinn::Endpoint::server(server, listen)
        .map_err(|e| format!("cannot bind the node relay on UDP {listen}: {e}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Accepts any server certificate, but still checks the handshake signature made with its
/// key: identity comes from the shared-secret MAC over the session (see the module docs).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_proves_the_secret_the_role_and_the_session() {
        let exporter = [7u8; 32];
        let secret = b"0123456789abcdef-relay";
        let tag = mac(secret, Role::Dialer, 1, 99, &exporter);
        assert!(verify(secret, Role::Dialer, 1, 99, &exporter, &tag));
        assert!(!verify(
            b"another-secret-0123",
            Role::Dialer,
            1,
            99,
            &exporter,
            &tag
        ));
        assert!(
            !verify(secret, Role::Acceptor, 1, 99, &exporter, &tag),
            "reflected"
        );
        assert!(
            !verify(secret, Role::Dialer, 2, 99, &exporter, &tag),
            "other node"
        );
        assert!(!verify(secret, Role::Dialer, 1, 98, &exporter, &tag));
        assert!(
            !verify(secret, Role::Dialer, 1, 99, &[8u8; 32], &tag),
            "other session"
        );
    }
}
