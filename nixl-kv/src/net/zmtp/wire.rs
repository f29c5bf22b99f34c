//! The ZMTP 3 grammar both directions share: the greeting, `READY` and the other commands,
//! frame headers (read with their announced length checked by the caller before any
//! allocation, and written in the short or long form).

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a connection was dropped.
#[derive(Debug, thiserror::Error)]
pub(super) enum PeerError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("over limit: {0}")]
    Limit(String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("EOF inside a frame or the handshake")]
    Truncated,
    #[error("the consumer stopped")]
    Closed,
}

pub(super) fn proto(s: impl Into<String>) -> PeerError {
    PeerError::Protocol(s.into())
}

/// Our greeting: ZMTP 3.0, NULL mechanism, not as-server.
pub(super) fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Our `READY` command frame with `Socket-Type: socket_type` (`PUSH` or `PULL`).
pub(super) fn ready(socket_type: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type);
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

pub(super) fn check_greeting(g: &[u8; 64]) -> Result<(), PeerError> {
    if g[0] != 0xff || g[9] & 0x01 == 0 {
        return Err(proto("not a ZMTP greeting"));
    }
    if g[10] < 3 {
        return Err(proto(format!("ZMTP {}.{} is not supported", g[10], g[11])));
    }
    let mech = &g[12..32];
    let end = mech.iter().position(|&b| b == 0).unwrap_or(mech.len());
    if &mech[..end] != b"NULL" || mech[end..].iter().any(|&b| b != 0) {
        return Err(proto(format!(
            "mechanism {:?} is not NULL",
            String::from_utf8_lossy(&mech[..end])
        )));
    }
    Ok(())
}

/// Reads the peer's 64-byte greeting and checks it (ZMTP 3.x, NULL).
pub(super) async fn read_greeting<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), PeerError> {
    let mut g = [0u8; 64];
    read_exact(r, &mut g).await?;
    check_greeting(&g)
}

/// Reads the peer's `READY` (at most `max_len` bytes) and checks that its `Socket-Type` is
/// `want`; an `ERROR` command instead is an error carrying the peer's reason.
pub(super) async fn read_ready<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u64,
    want: &[u8],
) -> Result<(), PeerError> {
    let h = read_header(r).await?.ok_or(PeerError::Truncated)?;
    if !h.command {
        return Err(proto("expected READY, got a message frame"));
    }
    if h.len > max_len {
        return Err(PeerError::Limit(format!("READY of {} bytes", h.len)));
    }
    let body = read_body(r, h.len).await?;
    let (name, props) = split_command(&body)?;
    if name == b"ERROR" {
        return Err(peer_error(props));
    }
    if name != b"READY" {
        return Err(proto(format!(
            "expected READY, got {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    match socket_type(props)? {
        Some(t) if t == want => Ok(()),
        Some(t) => Err(proto(format!(
            "socket type {:?} cannot talk to {}",
            String::from_utf8_lossy(t),
            if want == b"PUSH" { "PULL" } else { "PUSH" }
        ))),
        None => Err(proto("READY without Socket-Type")),
    }
}

/// An `ERROR` command's reason (one length byte, then the text).
fn peer_error(body: &[u8]) -> PeerError {
    proto(format!(
        "peer sent ERROR {:?}",
        String::from_utf8_lossy(body.get(1..).unwrap_or_default())
    ))
}

/// A ZMTP frame header.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    pub(super) more: bool,
    pub(super) command: bool,
    pub(super) len: u64,
}

/// Reads a frame header; `Ok(None)` on a clean EOF before its first byte.
pub(super) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Header>, PeerError> {
    let mut flags = [0u8; 1];
    if r.read(&mut flags).await? == 0 {
        return Ok(None);
    }
    let flags = flags[0];
    let long = flags & 0x02 != 0;
    let len = if long {
        let mut b = [0u8; 8];
        read_exact(r, &mut b).await?;
        u64::from_be_bytes(b)
    } else {
        let mut b = [0u8; 1];
        read_exact(r, &mut b).await?;
        u64::from(b[0])
    };
    Ok(Some(Header {
        more: flags & 0x01 != 0,
        command: flags & 0x04 != 0,
        len,
    }))
}

/// The header of a message frame of `len` bytes: the short form up to 255 bytes, else the
/// long one; MORE on every frame but a message's last. Returns the bytes and how many count.
pub(super) fn frame_header(more: bool, len: u64) -> ([u8; 9], usize) {
    let mut h = [0u8; 9];
    h[0] = u8::from(more);
    if let Ok(short) = u8::try_from(len) {
        h[1] = short;
        (h, 2)
    } else {
        h[0] |= 0x02;
        h[1..].copy_from_slice(&len.to_be_bytes());
        (h, 9)
    }
}

pub(super) async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), PeerError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(PeerError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads a frame body of `len` bytes (already checked against the limits), growing the buffer
/// only as bytes arrive.
pub(super) async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
) -> Result<Bytes, PeerError> {
    let mut buf = Vec::new();
    (&mut *r).take(len).read_to_end(&mut buf).await?;
    if (buf.len() as u64) < len {
        return Err(PeerError::Truncated);
    }
    Ok(Bytes::from(buf))
}

/// Reads and drops a frame body of `len` bytes without buffering it.
pub(super) async fn skip_body<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> Result<(), PeerError> {
    let n = tokio::io::copy(&mut (&mut *r).take(len), &mut tokio::io::sink()).await?;
    if n < len {
        return Err(PeerError::Truncated);
    }
    Ok(())
}

/// A parsed command: name and the rest of the body.
pub(super) fn split_command(body: &[u8]) -> Result<(&[u8], &[u8]), PeerError> {
    let (&n, rest) = body.split_first().ok_or_else(|| proto("empty command"))?;
    let n = usize::from(n);
    if n == 0 || rest.len() < n {
        return Err(proto("malformed command name"));
    }
    Ok(rest.split_at(n))
}

/// Parses `READY` properties and returns the value of `Socket-Type`.
pub(super) fn socket_type(mut props: &[u8]) -> Result<Option<&[u8]>, PeerError> {
    let mut found = None;
    while let Some((&n, rest)) = props.split_first() {
        let n = usize::from(n);
        if rest.len() < n + 4 {
            return Err(proto("malformed READY property"));
        }
        let (name, rest) = rest.split_at(n);
        let (len, rest) = rest.split_at(4);
        let mut l = [0u8; 4];
        l.copy_from_slice(len);
        let len = usize::try_from(u32::from_be_bytes(l)).map_err(|_| proto("property length"))?;
        if rest.len() < len {
            return Err(proto("malformed READY property value"));
        }
        let (value, rest) = rest.split_at(len);
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            found = Some(value);
        }
        props = rest;
    }
    Ok(found)
}

/// What to do about a command received after the handshake: `Some(frame)` to write back (the
/// `PONG` for a `PING`), `None` to ignore it (`PONG`, `SUBSCRIBE`, unknown names, as libzmq
/// does); an `ERROR` or a malformed command is an error.
pub(super) fn command_reply(body: &[u8]) -> Result<Option<Vec<u8>>, PeerError> {
    let (name, rest) = split_command(body)?;
    match name {
        b"PING" => {
            // TTL (2 bytes), then a context of up to 16 bytes that PONG echoes.
            let context = rest.get(2..).unwrap_or_default();
            let context = &context[..context.len().min(16)];
            let mut pong = vec![0x04, (5 + context.len()) as u8, 4];
            pong.extend_from_slice(b"PONG");
            pong.extend_from_slice(context);
            Ok(Some(pong))
        }
        b"ERROR" => Err(peer_error(rest)),
        other => {
            tracing::debug!(command = %String::from_utf8_lossy(other), "ZMTP command ignored");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_handshake_frames() {
        let g = greeting();
        assert!(check_greeting(&g).is_ok());
        for t in [&b"PULL"[..], b"PUSH"] {
            let r = ready(t);
            assert_eq!(r[0], 0x04);
            assert_eq!(usize::from(r[1]), r.len() - 2);
            let (name, props) = split_command(&r[2..]).unwrap();
            assert_eq!(name, b"READY");
            assert_eq!(socket_type(props).unwrap(), Some(t));
        }
    }

    #[test]
    fn malformed_commands_are_errors() {
        assert!(split_command(b"").is_err());
        assert!(split_command(&[0]).is_err());
        assert!(split_command(&[9, b'R']).is_err());
        assert!(socket_type(&[11, b'S']).is_err());
        assert!(socket_type(&[1, b'a', 0, 0, 0, 9, b'x']).is_err());
        assert!(socket_type(&[1, b'a', 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(command_reply(b"\x05ERROR\x03bad").is_err());
        assert_eq!(command_reply(b"\x04PONG").unwrap(), None);
    }

    #[test]
    fn ping_gets_a_pong_echoing_at_most_16_bytes_of_context() {
        let mut ping = b"\x04PING\x00\x0a".to_vec();
        ping.extend_from_slice(&[7u8; 20]);
        let pong = command_reply(&ping).unwrap().unwrap();
        assert_eq!(&pong[..7], b"\x04\x15\x04PONG");
        assert_eq!(&pong[7..], &[7u8; 16]);
    }

    #[test]
    fn frame_headers_are_short_up_to_255_bytes_then_long() {
        let (h, n) = frame_header(false, 0);
        assert_eq!(&h[..n], [0x00, 0]);
        let (h, n) = frame_header(true, 255);
        assert_eq!(&h[..n], [0x01, 255]);
        let (h, n) = frame_header(false, 256);
        assert_eq!(&h[..n], [0x02, 0, 0, 0, 0, 0, 0, 1, 0]);
        let (h, n) = frame_header(true, 1 << 62);
        assert_eq!(&h[..n], [0x03, 0x40, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn greetings_other_than_zmtp3_null_are_refused() {
        let mut g = greeting();
        g[10] = 2;
        assert!(check_greeting(&g).is_err());
        let mut g = greeting();
        g[12..17].copy_from_slice(b"PLAIN");
        assert!(check_greeting(&g).is_err());
        let mut g = greeting();
        g[0] = 0;
        assert!(check_greeting(&g).is_err());
    }
}
