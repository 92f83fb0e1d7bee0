//! The workers' UDP send path. The datagrams a router emits during one drain are queued and sent
//! together: with `sendmmsg(2)` on Linux, up to [`MAX_PER_CALL`] per syscall, to any mix of
//! destinations (an SFU's fan-out goes to many subscribers, so UDP GSO, which sends to one
//! destination, does not apply); with one `send_to` per datagram elsewhere.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};

/// Most datagrams handed to the kernel in one `sendmmsg`; the queue is sent when it holds this
/// many, so it never grows past it.
pub const MAX_PER_CALL: usize = 64;

/// A UDP socket with a queue of datagrams to send on it.
#[derive(Debug)]
pub struct UdpSender {
    socket: UdpSocket,
    /// The socket's address family is IPv6 (the server binds `[::]` dual-stack for an IPv6
    /// `media_bind`), so IPv4 destinations go out as IPv4-mapped addresses.
    ipv6: bool,
    destinations: Vec<SocketAddr>,
    contents: Vec<Vec<u8>>,
    /// Reused for every call: the addresses of `destinations` in the socket's family.
    #[cfg(target_os = "linux")]
    wire_addrs: Vec<rustix::net::SocketAddrAny>,
}

impl UdpSender {
    pub fn new(socket: UdpSocket) -> Self {
        let ipv6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
        UdpSender {
            socket,
            ipv6,
            destinations: Vec::with_capacity(MAX_PER_CALL),
            contents: Vec::with_capacity(MAX_PER_CALL),
            #[cfg(target_os = "linux")]
            wire_addrs: Vec::with_capacity(MAX_PER_CALL),
        }
    }

    /// Queues one datagram (the router's buffer is kept, not copied); sends the queue when it is
    /// full. Call [`flush`](Self::flush) when the drain ends.
    pub fn push(&mut self, destination: SocketAddr, contents: Vec<u8>) {
        #[cfg(target_os = "linux")]
        self.wire_addrs
            .push(wire_address(destination, self.ipv6).into());
        self.destinations.push(destination);
        self.contents.push(contents);
        if self.contents.len() >= MAX_PER_CALL {
            self.flush();
        }
    }

    /// Sends every queued datagram, in queue order. A datagram the kernel refuses (no route,
    /// a firewall's EPERM, a bad address) is logged at debug and dropped; the ones after it are
    /// still sent. Each syscall sends or drops at least one datagram, so this never spins.
    pub fn flush(&mut self) {
        let mut next = 0;
        while next < self.contents.len() {
            match self.send_from(next) {
                Ok(sent) if sent > 0 => next += sent,
                Ok(_) => {
                    tracing::debug!(
                        "udp send to {} sent nothing; dropped",
                        self.destinations[next]
                    );
                    next += 1;
                }
                Err(e) => {
                    // sendmmsg(2): the error belongs to the first datagram not sent.
                    tracing::debug!("udp send to {} failed: {e}", self.destinations[next]);
                    next += 1;
                }
            }
        }
        self.destinations.clear();
        self.contents.clear();
        #[cfg(target_os = "linux")]
        self.wire_addrs.clear();
    }

    /// Sends queued datagrams from index `first` on with one `sendmmsg`; returns how many the
    /// kernel took (fewer than offered after an error on the next one, which a further call
    /// reports).
    #[cfg(target_os = "linux")]
    fn send_from(&self, first: usize) -> io::Result<usize> {
        use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags};

        let end = self.contents.len().min(first + MAX_PER_CALL);
        let iovs: Vec<io::IoSlice<'_>> = self.contents[first..end]
            .iter()
            .map(|c| io::IoSlice::new(c))
            .collect();
        // No control messages; MMsgHdr wants an (empty) buffer of its own for each datagram.
        let mut controls: [SendAncillaryBuffer<'_, '_, '_>; MAX_PER_CALL] =
            std::array::from_fn(|_| SendAncillaryBuffer::default());
        let mut msgs: Vec<MMsgHdr<'_>> = self.wire_addrs[first..end]
            .iter()
            .zip(&iovs)
            .zip(controls.iter_mut())
            .map(|((addr, iov), control)| {
                MMsgHdr::new_with_addr(addr, std::slice::from_ref(iov), control)
            })
            .collect();
        sendmmsg(&self.socket, &mut msgs, SendFlags::empty()).map_err(io::Error::from)
    }

    /// Sends the datagram at `first` with `send_to`.
    #[cfg(not(target_os = "linux"))]
    fn send_from(&self, first: usize) -> io::Result<usize> {
        let destination = wire_address(self.destinations[first], self.ipv6);
        self.socket
            .send_to(&self.contents[first], destination)
            .map(|_| 1)
    }
}

/// `destination` in the address family of the socket: IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`)
/// on an IPv6 socket, which reaches IPv4 peers only when dual-stack; IPv4-mapped as plain IPv4 on
/// an IPv4 socket. Anything else unchanged (the kernel refuses an IPv6 peer on an IPv4 socket).
fn wire_address(destination: SocketAddr, ipv6_socket: bool) -> SocketAddr {
    match destination {
        SocketAddr::V4(v4) if ipv6_socket => {
            SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into()
        }
        SocketAddr::V6(v6) if !ipv6_socket => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddrV4::new(ip, v6.port()).into(),
            None => destination,
        },
        _ => destination,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test: fail loudly

    use std::net::{Ipv6Addr, UdpSocket};

    use super::*;

    fn receiver(addr: &str) -> UdpSocket {
        let r = UdpSocket::bind(addr).unwrap();
        r.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        r
    }

    fn dual_stack_socket() -> Option<UdpSocket> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .ok()?;
        socket.set_only_v6(false).ok()?;
        socket
            .bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())
            .ok()?;
        Some(socket.into())
    }

    fn has_ipv6_loopback() -> bool {
        UdpSocket::bind("[::1]:0").is_ok()
    }

    /// Sends `count` numbered datagrams round-robin to `destinations` through `sender`, as
    /// workers do (a flush after each drain of `per_drain` datagrams), then checks that every
    /// receiver got all of its datagrams, in order.
    fn send_round_robin_and_check(
        sender: &mut UdpSender,
        destinations: &[SocketAddr],
        receivers: &[Option<&UdpSocket>],
        count: u32,
        per_drain: u32,
    ) {
        for seq in 0..count {
            let to = destinations[seq as usize % destinations.len()];
            sender.push(to, seq.to_be_bytes().to_vec());
            if seq % per_drain == per_drain - 1 {
                sender.flush();
            }
        }
        sender.flush();
        let mut buf = [0u8; 16];
        for (i, r) in receivers.iter().enumerate() {
            let Some(r) = r else { continue };
            let expected: Vec<u32> = (0..count)
                .filter(|s| *s as usize % destinations.len() == i)
                .collect();
            let got: Vec<u32> = expected
                .iter()
                .map(|_| {
                    let n = r.recv(&mut buf).unwrap();
                    u32::from_be_bytes(buf[..n].try_into().unwrap())
                })
                .collect();
            assert_eq!(got, expected, "datagrams to {}", destinations[i]);
        }
    }

    #[test]
    fn batch_reaches_every_receiver_in_order_past_a_refused_destination() {
        let receivers = [
            receiver("127.0.0.1:0"),
            receiver("127.0.0.1:0"),
            receiver("127.0.0.1:0"),
        ];
        let mut destinations: Vec<SocketAddr> =
            receivers.iter().map(|r| r.local_addr().unwrap()).collect();
        // Port 0 is not a destination: the kernel refuses it with EINVAL.
        destinations.insert(1, "127.0.0.1:0".parse().unwrap());
        // An IPv6 peer on an IPv4 socket: EAFNOSUPPORT.
        destinations.push("[2001:db8::1]:9".parse().unwrap());
        let by_destination = [
            Some(&receivers[0]),
            None,
            Some(&receivers[1]),
            Some(&receivers[2]),
            None,
        ];
        let mut sender = UdpSender::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        // Drains of 150: the queue fills up to MAX_PER_CALL and is sent from `push`.
        send_round_robin_and_check(&mut sender, &destinations, &by_destination, 200, 150);
    }

    #[test]
    fn dual_stack_socket_sends_to_ipv4_mapped_and_ipv6_peers_in_one_batch() {
        if !has_ipv6_loopback() {
            eprintln!("skipped: no IPv6 loopback");
            return;
        }
        let Some(socket) = dual_stack_socket() else {
            eprintln!("skipped: no dual-stack IPv6 socket");
            return;
        };
        let v4 = receiver("127.0.0.1:0");
        let v4_seen_mapped = receiver("127.0.0.1:0");
        let v6 = receiver("[::1]:0");
        let mapped = match v4_seen_mapped.local_addr().unwrap() {
            SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            other => other,
        };
        let destinations = [
            v4.local_addr().unwrap(),
            "[::1]:0".parse().unwrap(),
            mapped,
            v6.local_addr().unwrap(),
        ];
        let by_destination = [Some(&v4), None, Some(&v4_seen_mapped), Some(&v6)];
        let mut sender = UdpSender::new(socket);
        send_round_robin_and_check(&mut sender, &destinations, &by_destination, 200, 7);
    }

    #[test]
    fn destinations_take_the_family_of_the_socket() {
        let v4: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        assert_eq!(wire_address(v4, true), mapped);
        assert_eq!(wire_address(mapped, true), mapped);
        assert_eq!(wire_address(v6, true), v6);
        assert_eq!(wire_address(v4, false), v4);
        assert_eq!(wire_address(mapped, false), v4);
        assert_eq!(wire_address(v6, false), v6);
    }
}
