//! Bounded ZMTP 3.x (NULL mechanism), both ends of SGLang's one ZeroMQ pattern: the prefill's
//! PULL listener ([`PullListener`]) and the decode's PUSH connections ([`PushClient`]).
//!
//! # Why our own ZMTP
//!
//! Both ends face peers we do not control: the prefill's PULL port faces the cluster network,
//! and a decode connects to whatever address a bootstrap server names. The `zeromq` 0.7 crate's
//! codec trusts the length a frame header announces: a 9-byte long-frame header saying 2^62
//! bytes makes it `reserve` that much and the allocator aborts the process, whether the header
//! comes from a PUSH peer or from a "prefill" answering a decode's handshake. Its
//! `SocketOptions` only tune read chunking (there is no `ZMQ_MAXMSGSIZE`), and after any
//! per-peer decode error its `PullSocket::recv` returns `Err` (it does drop the peer, but a
//! caller that stops on `Err` stops serving everyone). The alternatives were worse:
//!
//! - patching or vendoring the crate means carrying a fork of a whole socket library;
//! - a validating TCP proxy in front of a zeromq socket parses every stream twice, doubles
//!   the connections and still leaves the unbounded codec behind it.
//!
//! PUSH only sends and PULL only receives, so the part of ZMTP 3 they need is small: a 64-byte
//! greeting each way, one `READY` command each way, then frames with the MORE flag, plus
//! answering `PING`. `wire` is that grammar, once for both directions; every announced length
//! is checked against a limit *before* anything is allocated, and buffers grow only as bytes
//! actually arrive. `pull` is the listener, `push` and `push_link` the sending side.

#![allow(
    clippy::big_endian_bytes,
    reason = "ZMTP lengths are in network byte order"
)]

mod pull;
mod push;
mod push_link;
mod wire;

use std::io;

use tokio::net::TcpListener;

pub use pull::{PullLimits, PullListener, Replay, replay};
pub(crate) use pull::{QUEUE, deliver, serve};
pub use push::{PushClient, PushLimits};
pub(crate) use push::{Pusher, route};
pub use push_link::{PushReplay, replay_push};

/// Splits a ZeroMQ endpoint `tcp://HOST:PORT` into host (brackets of an IPv6 host removed) and
/// port.
fn parse_endpoint(endpoint: &str) -> io::Result<(&str, u16)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad endpoint {endpoint}"),
        )
    };
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

/// Binds a TCP listener for a ZeroMQ endpoint `tcp://HOST:PORT` (`*` for every interface, IPv6
/// in brackets, port 0 for any).
pub(crate) async fn bind(endpoint: &str) -> io::Result<TcpListener> {
    let (host, port) = parse_endpoint(endpoint)?;
    let host = if host == "*" { "0.0.0.0" } else { host };
    TcpListener::bind((host, port)).await
}

#[cfg(test)]
mod tests {
    use super::parse_endpoint;

    #[test]
    fn endpoints_parse_with_ipv6_brackets_removed() {
        assert_eq!(parse_endpoint("tcp://1.2.3.4:5").unwrap(), ("1.2.3.4", 5));
        assert_eq!(parse_endpoint("tcp://[::1]:7").unwrap(), ("::1", 7));
        assert_eq!(parse_endpoint("tcp://*:0").unwrap(), ("*", 0));
        for bad in [
            "1.2.3.4:5",
            "tcp://1.2.3.4",
            "tcp://:5",
            "tcp://h:99999",
            "ipc://x:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
