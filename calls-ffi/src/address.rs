//! `calls_address`: an IPv4 or IPv6 socket address as plain integers (no `sockaddr` casts,
//! the same layout on every platform).

use std::ffi::c_char;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use crate::boundary::{self, Failure};
use crate::result::calls_result;

/// `calls_address.family` of an IPv4 address.
pub const CALLS_ADDRESS_IPV4: u8 = 4;
/// `calls_address.family` of an IPv6 address.
pub const CALLS_ADDRESS_IPV6: u8 = 6;

/// A socket address. From a `struct sockaddr_in`: `family = CALLS_ADDRESS_IPV4`, the 4 bytes
/// of `sin_addr` in `ip[0..4]`, `port = ntohs(sin_port)`. From a `struct sockaddr_in6`:
/// `family = CALLS_ADDRESS_IPV6`, the 16 bytes of `sin6_addr` in `ip`, `port =
/// ntohs(sin6_port)`, `scope_id = sin6_scope_id`. `calls_address_parse` and
/// `calls_address_format` convert from and to text.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct calls_address {
    /// `CALLS_ADDRESS_IPV4` or `CALLS_ADDRESS_IPV6`; anything else is
    /// `CALLS_RESULT_INVALID_ADDRESS`.
    pub family: u8,
    /// The port in host byte order.
    pub port: u16,
    /// The address bytes in network order (IPv4: the first 4 bytes, the rest ignored).
    pub ip: [u8; 16],
    /// The IPv6 scope id (0 for IPv4 and for global IPv6 addresses).
    pub scope_id: u32,
}

impl From<SocketAddr> for calls_address {
    fn from(addr: SocketAddr) -> Self {
        let mut ip = [0u8; 16];
        match addr {
            SocketAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.ip().octets());
                calls_address {
                    family: CALLS_ADDRESS_IPV4,
                    port: v4.port(),
                    ip,
                    scope_id: 0,
                }
            }
            SocketAddr::V6(v6) => {
                ip.copy_from_slice(&v6.ip().octets());
                calls_address {
                    family: CALLS_ADDRESS_IPV6,
                    port: v6.port(),
                    ip,
                    scope_id: v6.scope_id(),
                }
            }
        }
    }
}

impl calls_address {
    /// The Rust address, or `CALLS_RESULT_INVALID_ADDRESS` for an unknown family.
    pub(crate) fn to_socket_addr(self, name: &str) -> Result<SocketAddr, Failure> {
        match self.family {
            CALLS_ADDRESS_IPV4 => {
                let [a, b, c, d, ..] = self.ip;
                Ok(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
                    self.port,
                ))
            }
            CALLS_ADDRESS_IPV6 => Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.ip),
                self.port,
                0,
                self.scope_id,
            ))),
            other => Err(Failure::new(
                calls_result::InvalidAddress,
                format!("`{name}` has family {other}: neither CALLS_ADDRESS_IPV4 (4) nor CALLS_ADDRESS_IPV6 (6)"),
            )),
        }
    }

    /// An all-zero address (family 0), for outputs that carry none.
    pub(crate) const NONE: calls_address = calls_address {
        family: 0,
        port: 0,
        ip: [0; 16],
        scope_id: 0,
    };
}

/// Reads a `calls_address` argument and converts it.
pub(crate) fn socket_addr_arg(
    address: *const calls_address,
    name: &str,
) -> Result<SocketAddr, Failure> {
    boundary::read_arg(address, name)?.to_socket_addr(name)
}

/// Parses `"192.0.2.1:8443"` or `"[2001:db8::1]:8443"` into `*out`. Thread-safe.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_UTF8`,
/// `CALLS_RESULT_INVALID_ADDRESS` (not an IP address with a port).
#[no_mangle]
pub extern "C" fn calls_address_parse(
    text: *const c_char,
    out: *mut calls_address,
) -> calls_result {
    boundary::guard(|| {
        boundary::require_out(out, "out")?;
        let text = boundary::str_arg(text, "text")?;
        let addr: SocketAddr = text.parse().map_err(|e| {
            Failure::new(
                calls_result::InvalidAddress,
                format!("{text:?} is not an address with a port: {e}"),
            )
        })?;
        boundary::write_out(out, calls_address::from(addr), "out")
    })
}

/// Formats an address as text (`"192.0.2.1:8443"`, `"[2001:db8::1]:8443"`) into `buf`,
/// NUL-terminated; its length without the NUL goes to `*out_len`. 64 bytes always suffice.
/// Thread-safe.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_ADDRESS`,
/// `CALLS_RESULT_BUFFER_TOO_SMALL` (the size needed, with the NUL, is in `*out_len`).
#[no_mangle]
pub extern "C" fn calls_address_format(
    address: *const calls_address,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> calls_result {
    boundary::guard(|| {
        let addr = socket_addr_arg(address, "address")?;
        boundary::copy_text(&addr.to_string(), buf, buf_len, out_len)
    })
}
