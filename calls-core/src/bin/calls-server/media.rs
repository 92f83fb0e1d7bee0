//! Media I/O: one UDP socket and one TCP listener on the media port, shared by every call.
//! The UDP receive thread hands datagrams to the worker that owns their flow.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use calls_core::{ConnId, Proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::tcp_limits::{AcceptBackoff, TcpLimits};
use crate::worker::{Cmd, TcpWriter, TcpWriterTask, Workers};

/// Socket buffers large enough for bursts of video from many participants.
const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Largest ICE-TCP frame we peek at to route a new connection.
const MAX_FIRST_FRAME: usize = 2048;

/// Binds the UDP media socket with large buffers.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    let udp: UdpSocket = socket.into();
    if let (Ok(r), Ok(s)) = (
        socket2::SockRef::from(&udp).recv_buffer_size(),
        socket2::SockRef::from(&udp).send_buffer_size(),
    ) {
        tracing::info!(%addr, recv_buffer = r, send_buffer = s, "UDP media socket bound");
    }
    Ok(udp)
}

/// Receives UDP datagrams forever and dispatches them to workers. Uses `recvmmsg` and GRO
/// through quinn-udp where the platform has them (one syscall for up to `BATCH_SIZE` datagrams),
/// a single `recvmsg` elsewhere. Datagrams nobody would accept (no known flow, no ufrag of ours)
/// are dropped here without waking a worker.
pub fn run_udp(socket: UdpSocket, workers: Workers) {
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("UDP socket has no address: {e}");
            return;
        }
    };
    let state = match quinn_udp::UdpSocketState::new((&socket).into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("UDP socket setup failed: {e}");
            return;
        }
    };
    // quinn-udp made the socket non-blocking; wait for it with mio, registered for
    // readability only. The workers send on this same socket (clones of it), and every
    // datagram they send frees send-buffer space, which wakes whoever waits on the socket for
    // writability: a tokio `UdpSocket` registers both, so this thread was woken about 20 times
    // for each datagram it received, preempting the workers each time (7,800 wake-ups a
    // second with 400 listeners).
    let mut poll = match mio::Poll::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("UDP poll: {e}");
            return;
        }
    };
    let fd = socket.as_raw_fd();
    let registered = poll.registry().register(
        &mut mio::unix::SourceFd(&fd),
        mio::Token(0),
        mio::Interest::READABLE,
    );
    if let Err(e) = registered {
        tracing::error!("UDP poll registration: {e}");
        return;
    }
    tracing::info!(
        batch = quinn_udp::BATCH_SIZE,
        gro_segments = state.gro_segments(),
        "UDP receive path ready"
    );
    let gro = state.gro_segments().max(1);
    let slot = 2048 * gro;
    let mut storage = vec![0u8; slot * quinn_udp::BATCH_SIZE];
    let mut meta = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
    // Made once: every receive refills the same buffers.
    let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage
        .chunks_mut(slot)
        .map(std::io::IoSliceMut::new)
        .collect();
    let mut events = mio::Events::with_capacity(4);
    loop {
        // Edge-triggered: read until the socket is empty, then wait for the next datagram.
        // Errors (an ICMP error reported on the socket) are consumed by the read that returns
        // them; a run of them waits for the next poll instead of spinning.
        let mut errors = 0;
        loop {
            let count = match state.recv((&socket).into(), &mut bufs, &mut meta) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("udp recv: {e}");
                    errors += 1;
                    if errors > 64 {
                        break;
                    }
                    continue;
                }
            };
            let at = Instant::now();
            for (m, buf) in meta.iter().zip(bufs.iter()).take(count) {
                let stride = m.stride.max(1);
                // With GRO one buffer holds several datagrams of `stride` bytes (the last shorter).
                for datagram in buf[..m.len].chunks(stride) {
                    match workers.route(Proto::Udp, m.addr, datagram) {
                        Some(w) => workers.send_datagram(
                            w,
                            Cmd::Datagram {
                                source: m.addr,
                                destination: local,
                                bytes: datagram.to_vec(),
                                at,
                            },
                            calls_core::demux::is_rtp_media(datagram),
                        ),
                        None => tracing::trace!(source = %m.addr, "unroutable datagram dropped"),
                    }
                }
            }
        }
        // After a run of errors, look again in a moment even without a new edge.
        let timeout = (errors > 64).then_some(Duration::from_millis(10));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("UDP poll: {e}");
                return;
            }
        }
    }
}

/// A write to an ICE-TCP client that has not completed in this long closes the connection
/// (counted as a write stall): its receive window stayed shut (it does not read), so queued
/// media would only go stale. A client sent enough to fill its queue first is closed then.
const TCP_WRITE_STALL: Duration = Duration::from_secs(10);

/// Accepts ICE-TCP connections. The first RFC 4571 frame (a STUN binding request) picks the
/// worker by its ufrag; from then on the connection's bytes go to that worker unparsed.
/// Connections beyond `limits` (per source IP, in total) are closed at once; a failing
/// `accept` backs off instead of spinning.
pub async fn run_tcp(
    listener: TcpListener,
    workers: Workers,
    limits: TcpLimits,
    queue_frames: usize,
) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    let mut backoff = AcceptBackoff::default();
    loop {
        let (mut stream, remote) = match listener.accept().await {
            Ok(r) => {
                backoff.succeeded();
                r
            }
            Err(e) => {
                // EMFILE/ENFILE clear only when connections close: retrying at once would spin
                // this runtime thread, which also serves signaling.
                limits
                    .counters
                    .accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                let pause = backoff.failed();
                tracing::debug!(pause_ms = pause.as_millis() as u64, "tcp accept: {e}");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Some(slot) = limits.admit(remote.ip()) else {
            tracing::trace!(%remote, "ICE-TCP connection over the limits closed");
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let workers = workers.clone();
        let counters = limits.counters.clone();
        tokio::spawn(async move {
            let _slot = slot; // freed when this connection ends
                              // Peek the first frame to route the connection.
            let mut head = [0u8; 2];
            let routed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                stream.read_exact(&mut head).await.ok()?;
                let len = u16::from_be_bytes(head) as usize;
                if len == 0 || len > MAX_FIRST_FRAME {
                    return None;
                }
                let mut frame = vec![0u8; len];
                stream.read_exact(&mut frame).await.ok()?;
                let worker = workers.route(Proto::Tcp, remote, &frame)?;
                Some((worker, frame))
            })
            .await;
            let Ok(Some((worker, frame))) = routed else {
                tracing::debug!(%remote, "TCP connection without a STUN request of ours closed");
                return;
            };
            let conn = ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed));
            let (mut reader, mut writer) = stream.into_split();
            // Bounded: the worker closes the connection when it is full (the client does not
            // read), instead of queueing without end.
            let (tx, writes) = TcpWriter::new(queue_frames);
            let accepted = Cmd::TcpAccepted {
                conn,
                remote,
                local,
                writer: tx,
            };
            if workers.send(worker, accepted).is_err() {
                tracing::debug!(%remote, worker, "worker queue full: ICE-TCP connection closed");
                return;
            }
            let mut first = head.to_vec();
            first.extend_from_slice(&frame);
            let data = Cmd::TcpData {
                conn,
                bytes: first,
                at: Instant::now(),
            };
            if workers.send(worker, data).is_err() {
                workers.send_release(worker, Cmd::TcpClosed { conn });
                return;
            }
            // Dropped when the write task ends, which wakes the read loop below.
            let (writer_done, mut writer_gone) = tokio::sync::oneshot::channel::<()>();
            let write_task = tokio::spawn(async move {
                let _writer_done = writer_done;
                let TcpWriterTask {
                    mut queue,
                    mut dropped,
                } = writes;
                // Biased: what is queued is written while the socket takes it, also after the
                // worker dropped the writer (a session that left); a write that has to wait
                // stops at once then, not TCP_WRITE_STALL later: the worker gave up on this
                // client (its queue filled up behind that write).
                loop {
                    let bytes = tokio::select! {
                        biased;
                        frame = queue.recv() => match frame {
                            Some(bytes) => bytes,
                            None => break,
                        },
                        _ = &mut dropped => break,
                    };
                    let written = tokio::select! {
                        biased;
                        written = tokio::time::timeout(TCP_WRITE_STALL, writer.write_all(&bytes)) => written,
                        _ = &mut dropped => break,
                    };
                    match written {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {
                            counters.write_stalls.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%remote, %conn, "ICE-TCP write stalled; closing");
                            break;
                        }
                    }
                }
                // The worker dropped the writer (bad framing, full queue, session gone), or
                // the client stopped reading: close our half.
                let _ = writer.shutdown().await;
            });
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    read = reader.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let data = Cmd::TcpData {
                                conn,
                                bytes: buf[..n].to_vec(),
                                at: Instant::now(),
                            };
                            // A lost chunk would break the RFC 4571 framing: a worker too far
                            // behind to take it loses the connection instead (counted).
                            if workers.send(worker, data).is_err() {
                                tracing::debug!(%remote, worker, "worker queue full: ICE-TCP connection closed");
                                break;
                            }
                        }
                    },
                    // The writer gave up: stop reading too, so the socket (and its slot) goes.
                    _ = &mut writer_gone => break,
                }
            }
            workers.send_release(worker, Cmd::TcpClosed { conn });
            write_task.abort();
        });
    }
}

/// Keeps the UDP socket shared between the receive thread and the workers' sends.
pub fn clone_udp(socket: &UdpSocket) -> Option<UdpSocket> {
    socket.try_clone().ok()
}
