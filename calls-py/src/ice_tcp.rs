//! ICE-TCP for the load tester: a TCP-only participant's one connection to the server's passive
//! TCP candidate, carrying RFC 4571 frames (a 2-byte big-endian length, then one datagram).
//!
//! The socket is bound before the peer exists, so the peer's active TCP host candidate is the
//! connection's real local address (the remote address the server sees); it connects,
//! non-blocking, on the peer's first TCP transmit and is then polled with the participant's
//! other sockets. Outgoing frames wait in a bounded buffer until the socket takes them;
//! incoming bytes are de-framed across reads by [`Deframer`], which holds at most one partial
//! frame.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};

use calls_core::demux::MAX_DATAGRAM_BYTES;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

/// The longest frame accepted from the server: the largest datagram the router handles (it
/// sends nothing longer). A longer announced length means the stream is not RFC 4571 (a 16-bit
/// length can never announce more than 64 KiB, so this is also what bounds the buffer).
pub const MAX_FRAME: usize = MAX_DATAGRAM_BYTES;

/// Framed bytes that may wait for the socket (about a second of a simulcast camera); frames
/// that do not fit are dropped and counted, as a full send buffer would.
pub const MAX_QUEUED: usize = 256 * 1024;

/// Why a participant's ICE-TCP connection is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpLinkError {
    /// The server closed the connection (a read returned end of stream).
    Closed,
    /// The server announced a frame longer than [`MAX_FRAME`]; the stream cannot be
    /// resynchronised after that.
    FrameTooLarge(usize),
    /// Connecting, reading or writing failed (refused, reset, …).
    Io(String),
}

impl std::fmt::Display for TcpLinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpLinkError::Closed => write!(f, "the server closed the connection"),
            TcpLinkError::FrameTooLarge(len) => {
                write!(
                    f,
                    "the server announced a {len}-byte frame (max {MAX_FRAME})"
                )
            }
            TcpLinkError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TcpLinkError {}

/// Reassembles RFC 4571 frames from reads split anywhere: the core's framer (the same limit,
/// [`MAX_FRAME`]).
pub use calls_core::tcp::Framer as Deframer;

#[derive(Debug)]
enum State {
    /// Bound to the peer's candidate address, not connected yet.
    Bound(Socket),
    /// Connecting or connected to the server's TCP candidate.
    Open {
        stream: TcpStream,
        server: SocketAddr,
    },
    /// Failed or closed: sends are dropped.
    Closed,
}

/// A TCP-only participant's ICE-TCP connection.
#[derive(Debug)]
pub struct TcpLink {
    state: State,
    /// Framed bytes the socket has not taken yet.
    outgoing: Vec<u8>,
    frames_dropped: u64,
}

impl TcpLink {
    /// A non-blocking TCP socket bound to an ephemeral port of `ip`, and its address (the
    /// peer's candidate).
    pub fn bind(ip: IpAddr) -> std::io::Result<(TcpLink, SocketAddr)> {
        let local = SocketAddr::new(ip, 0);
        let socket = Socket::new(
            Domain::for_address(local),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        socket.bind(&local.into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("bound TCP socket has no IP address"))?;
        let link = TcpLink {
            state: State::Bound(socket),
            outgoing: Vec::new(),
            frames_dropped: 0,
        };
        Ok((link, addr))
    }

    /// The server's TCP candidate, once connecting.
    pub fn server(&self) -> Option<SocketAddr> {
        match &self.state {
            State::Open { server, .. } => Some(*server),
            _ => None,
        }
    }

    /// Frames that were not sent: the buffer was full, or they were for another address than
    /// the connection's.
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped
    }

    /// Queues one datagram for `destination`, framed. The first one connects to it
    /// (non-blocking) and registers the stream with `registry` under `token`; datagrams for
    /// other destinations are dropped (one connection per participant). Call
    /// [`TcpLink::write`] to hand the queue to the socket.
    pub fn send(
        &mut self,
        destination: SocketAddr,
        datagram: &[u8],
        registry: &Registry,
        token: Token,
    ) -> Result<(), TcpLinkError> {
        if matches!(self.state, State::Bound(_)) {
            self.connect(destination, registry, token)?;
        }
        let State::Open { server, .. } = &self.state else {
            return Ok(());
        };
        let len = match u16::try_from(datagram.len()) {
            Ok(len) if *server == destination => len,
            _ => {
                self.frames_dropped += 1;
                return Ok(());
            }
        };
        if self.outgoing.len() + 2 + datagram.len() > MAX_QUEUED {
            self.frames_dropped += 1;
            return Ok(());
        }
        self.outgoing.extend_from_slice(&len.to_be_bytes());
        self.outgoing.extend_from_slice(datagram);
        Ok(())
    }

    fn connect(
        &mut self,
        server: SocketAddr,
        registry: &Registry,
        token: Token,
    ) -> Result<(), TcpLinkError> {
        let State::Bound(socket) = std::mem::replace(&mut self.state, State::Closed) else {
            return Ok(());
        };
        match socket.connect(&server.into()) {
            Ok(()) => {}
            // A non-blocking connect goes on in the background; writes wait for it.
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(TcpLinkError::Io(format!("connect {server}: {e}"))),
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket));
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| TcpLinkError::Io(format!("poll: {e}")))?;
        self.state = State::Open { stream, server };
        Ok(())
    }

    /// Writes as much of the queue as the socket takes now (nothing while still connecting).
    pub fn write(&mut self) -> Result<(), TcpLinkError> {
        let State::Open { stream, .. } = &mut self.state else {
            return Ok(());
        };
        let mut written = 0;
        while written < self.outgoing.len() {
            match stream.write(&self.outgoing[written..]) {
                Ok(0) => return Err(self.fail(TcpLinkError::Closed)),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(TcpLinkError::Io(format!("write: {e}")))),
            }
        }
        self.outgoing.drain(..written);
        Ok(())
    }

    /// Reads what has arrived into `buf`: `Ok(Some(n))` bytes to de-frame, `Ok(None)` when
    /// there is nothing more now (or no connection yet).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, TcpLinkError> {
        let State::Open { stream, .. } = &mut self.state else {
            return Ok(None);
        };
        loop {
            match stream.read(buf) {
                Ok(0) => return Err(self.fail(TcpLinkError::Closed)),
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(TcpLinkError::Io(format!("read: {e}")))),
            }
        }
    }

    /// Closes the connection (the participant leaves, or its media failed).
    pub fn close(&mut self) {
        self.state = State::Closed;
        self.outgoing = Vec::new();
    }

    fn fail(&mut self, error: TcpLinkError) -> TcpLinkError {
        self.close();
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u16).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn frames_survive_reads_split_at_every_point() {
        let a: Vec<u8> = (0..100).collect();
        let b = vec![7u8];
        let c: Vec<u8> = (0..=255).cycle().take(MAX_FRAME).collect();
        let stream = framed(&[&a, &b, &c]);
        for first in 0..=stream.len() {
            for second in [
                first,
                (first + 1).min(stream.len()),
                (first + 3).min(stream.len()),
            ] {
                let mut deframer = Deframer::default();
                let mut got: Vec<Vec<u8>> = Vec::new();
                for part in [&stream[..first], &stream[first..second], &stream[second..]] {
                    deframer
                        .push(part, |f| got.push(f.to_vec()))
                        .expect("valid frames");
                    assert!(deframer.pending() <= 2 + MAX_FRAME);
                }
                assert_eq!(
                    got,
                    vec![a.clone(), b.clone(), c.clone()],
                    "split {first}/{second}"
                );
                assert_eq!(deframer.pending(), 0);
            }
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_even_when_its_length_is_split() {
        let len = (MAX_FRAME as u16 + 1).to_be_bytes();
        let mut deframer = Deframer::default();
        assert_eq!(deframer.push(&len, |_| {}), Err(MAX_FRAME + 1));
        let mut deframer = Deframer::default();
        assert_eq!(deframer.push(&len[..1], |_| {}), Ok(()));
        assert_eq!(deframer.push(&len[1..], |_| {}), Err(MAX_FRAME + 1));
        let mut deframer = Deframer::default();
        assert_eq!(deframer.push(&[0xFF, 0xFF], |_| {}), Err(65_535));
    }

    #[test]
    fn a_link_carries_frames_both_ways_over_a_real_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let server = listener.local_addr().expect("addr");
        let poll = mio::Poll::new().expect("poll");
        let (mut link, local) = TcpLink::bind(server.ip()).expect("bind");
        assert_eq!(link.read(&mut [0; 16]), Ok(None), "not connected yet");
        link.send(server, b"hello", poll.registry(), Token(0))
            .expect("connects");
        link.send(server, b"", poll.registry(), Token(0))
            .expect("queued");
        let elsewhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        link.send(elsewhere, b"x", poll.registry(), Token(0))
            .expect("dropped");
        assert_eq!(link.frames_dropped(), 1);
        assert_eq!(link.server(), Some(server));
        let (mut accepted, remote) = listener.accept().expect("accept");
        assert_eq!(remote, local, "the candidate is the connection's local end");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !link.outgoing.is_empty() && std::time::Instant::now() < deadline {
            link.write().expect("writes");
        }
        let mut got = [0u8; 9];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"\x00\x05hello\x00\x00");
        // The server's frames, split across writes, come back whole.
        let mut deframer = Deframer::default();
        let mut frames: Vec<Vec<u8>> = Vec::new();
        accepted.write_all(&[0, 3, b'a']).expect("write");
        accepted.write_all(&[b'b', b'c', 0]).expect("write");
        accepted.write_all(&[1, b'z']).expect("write");
        let mut buf = [0u8; 4];
        while frames.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(n) = link.read(&mut buf).expect("reads") {
                deframer
                    .push(&buf[..n], |f| frames.push(f.to_vec()))
                    .expect("valid");
            }
        }
        assert_eq!(frames, vec![b"abc".to_vec(), b"z".to_vec()]);
        drop(accepted);
        let closed = loop {
            match link.read(&mut buf) {
                Ok(None) if std::time::Instant::now() < deadline => continue,
                other => break other,
            }
        };
        assert_eq!(closed, Err(TcpLinkError::Closed));
        assert_eq!(link.server(), None, "a closed link forgets its connection");
    }
}
