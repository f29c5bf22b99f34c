//! One PUSH connection to a PULL peer: connecting (refused connects retried with back-off, as
//! zeromq's `connect` does), the handshake, writing messages, and the reader of what the peer
//! sends afterwards (a PULL sends nothing but commands; message frames are read and dropped).
//! Every length the peer announces is bounded before it is read; the caller bounds time.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::wire::{
    PeerError, command_reply, frame_header, greeting, proto, read_body, read_greeting, read_header,
    read_ready, ready, skip_body,
};

/// The first pause after a refused connect; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// The read buffer of a connection (a PULL peer sends only its greeting and commands).
const READ_BUF: usize = 512;
/// `PONG`s waiting to be written (the reader stops reading while this is full).
const PONGS: usize = 4;

/// A connected, handshaken PUSH connection.
pub(super) struct Link {
    writer: BufWriter<OwnedWriteHalf>,
    /// `PONG` frames from the reader; closed once the reader has ended.
    pongs: mpsc::Receiver<Vec<u8>>,
    reader: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Link {
    /// Connects to `tcp://HOST:PORT` and runs the handshake; the caller bounds the time.
    /// `max_command` bounds every command (and dropped frame) the peer sends.
    pub(super) async fn connect(endpoint: &str, max_command: u64) -> Result<Self, PeerError> {
        let (host, port) = super::parse_endpoint(endpoint)?;
        let mut delay = RETRY_FIRST;
        let stream = loop {
            match TcpStream::connect((host, port)).await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::trace!(%endpoint, "connection refused; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut r = BufReader::with_capacity(READ_BUF, r);
        let mut writer = BufWriter::new(w);
        handshake(&mut r, &mut writer, max_command).await?;
        let (tx, pongs) = mpsc::channel(PONGS);
        let peer = endpoint.to_owned();
        let reader = tokio::spawn(async move {
            match inbound(&mut r, max_command, &tx).await {
                Ok(()) => tracing::debug!(endpoint = %peer, "ZMQ PULL peer closed"),
                Err(PeerError::Closed) => {}
                Err(e) => tracing::warn!(endpoint = %peer, error = %e, "ZMQ PULL peer dropped"),
            }
        });
        Ok(Self {
            writer,
            pongs,
            reader,
        })
    }

    /// Whether the reader has ended (the peer closed, reset or broke the stream).
    pub(super) fn ended(&self) -> bool {
        self.reader.is_finished()
    }

    /// The next `PONG` to write; `None` once the reader has ended.
    pub(super) async fn next_pong(&mut self) -> Option<Vec<u8>> {
        self.pongs.recv().await
    }

    /// Writes `frame` (a `PONG`) and flushes.
    pub(super) async fn write_command(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(frame).await?;
        self.writer.flush().await
    }

    /// Writes one multipart message and flushes it to the socket. On an error or a cancel the
    /// stream may hold part of a message: drop the link.
    pub(super) async fn write_message(&mut self, frames: &[Bytes]) -> std::io::Result<()> {
        write_message(&mut self.writer, frames).await
    }
}

/// Writes `frames` as one message: MORE on all but the last, short headers up to 255 bytes.
pub(super) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    frames: &[Bytes],
) -> std::io::Result<()> {
    for (i, f) in frames.iter().enumerate() {
        let (h, n) = frame_header(i + 1 < frames.len(), f.len() as u64);
        w.write_all(&h[..n]).await?;
        w.write_all(f).await?;
    }
    w.flush().await
}

/// Our greeting, theirs (ZMTP 3.x, NULL), our `READY` (PUSH), theirs (must be PULL).
async fn handshake<R, W>(r: &mut R, w: &mut W, max_command: u64) -> Result<(), PeerError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&greeting()).await?;
    w.flush().await?;
    read_greeting(r).await?;
    w.write_all(&ready(b"PUSH")).await?;
    w.flush().await?;
    read_ready(r, max_command, b"PULL").await
}

/// Reads what the peer sends after the handshake until EOF: `PING`s are answered through
/// `pongs`, other commands ignored, message frames (a PULL sends none) read and dropped.
async fn inbound<R: AsyncRead + Unpin>(
    r: &mut R,
    max_command: u64,
    pongs: &mpsc::Sender<Vec<u8>>,
) -> Result<(), PeerError> {
    while let Some(h) = read_header(r).await? {
        if h.len > max_command {
            return Err(PeerError::Limit(format!(
                "{} of {} bytes from a PULL peer (max {max_command})",
                if h.command { "command" } else { "frame" },
                h.len
            )));
        }
        if !h.command {
            skip_body(r, h.len).await?;
            continue;
        }
        if h.more {
            return Err(proto("command with the MORE flag"));
        }
        let body = read_body(r, h.len).await?;
        if let Some(pong) = command_reply(&body)? {
            pongs.send(pong).await.map_err(|_| PeerError::Closed)?;
        }
    }
    Ok(())
}

/// What a PUSH connection did with one peer's byte stream: see [`replay_push`].
#[derive(Debug)]
#[non_exhaustive]
pub struct PushReplay {
    /// What the connection wrote: greeting, `READY`, the message (when the handshake held),
    /// then a `PONG` per `PING`.
    pub written: Vec<u8>,
    /// `Err` when the handshake failed (the send would fail) and why.
    pub handshake: Result<(), String>,
    /// How reading the rest of the stream ended (`Ok` on EOF); `None` if it never began.
    pub after: Option<Result<(), String>>,
}

/// Runs one "PULL peer"'s byte stream through exactly the PUSH connection's logic (handshake
/// with `max_command`, the message `frames`, then the reader of what follows) over in-memory
/// IO, without sockets or timeouts; for fuzzing and tests. `PONG`s are written in order.
pub async fn replay_push<R: AsyncRead + Unpin>(
    input: R,
    max_command: u64,
    frames: &[Bytes],
) -> PushReplay {
    let mut r = BufReader::with_capacity(READ_BUF, input);
    let mut w = BufWriter::new(Vec::new());
    let handshake = handshake(&mut r, &mut w, max_command).await;
    if let Err(e) = handshake {
        return PushReplay {
            written: w.into_inner(),
            handshake: Err(e.to_string()),
            after: None,
        };
    }
    let mut after = write_message(&mut w, frames).await.map_err(PeerError::from);
    if after.is_ok() {
        let (tx, mut rx) = mpsc::channel(PONGS);
        let read = async {
            let res = inbound(&mut r, max_command, &tx).await;
            drop(tx);
            res
        };
        let write = async {
            while let Some(pong) = rx.recv().await {
                let _ = w.write_all(&pong).await;
            }
            let _ = w.flush().await;
        };
        after = tokio::join!(read, write).0;
    }
    PushReplay {
        written: w.into_inner(),
        handshake: Ok(()),
        after: Some(after.map_err(|e| e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::zmtp::{PullLimits, replay};

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn encode(frames: &[Bytes]) -> Vec<u8> {
        let mut w = BufWriter::new(Vec::new());
        block_on(write_message(&mut w, frames)).unwrap();
        w.into_inner()
    }

    /// A PULL peer's side of the handshake, then `rest`.
    fn pull_stream(socket_type: &[u8], rest: &[u8]) -> Vec<u8> {
        let mut s = greeting().to_vec();
        s.extend_from_slice(&ready(socket_type));
        s.extend_from_slice(rest);
        s
    }

    const MAX: u64 = 64 << 10;

    #[test]
    fn messages_are_encoded_byte_exact() {
        let long = Bytes::from(vec![7u8; 256]);
        let frames = [
            Bytes::from_static(b"NixlMsgGuard"),
            Bytes::new(),
            Bytes::from(vec![9u8; 255]),
            long.clone(),
        ];
        let mut want = vec![0x01, 12];
        want.extend_from_slice(b"NixlMsgGuard");
        want.extend_from_slice(&[0x01, 0]);
        want.extend_from_slice(&[0x01, 255]);
        want.extend_from_slice(&[9u8; 255]);
        want.extend_from_slice(&[0x02, 0, 0, 0, 0, 0, 0, 1, 0]);
        want.extend_from_slice(&long);
        assert_eq!(encode(&frames), want);
        assert_eq!(encode(&[Bytes::from_static(b"x")]), [0x00, 1, b'x']);
    }

    #[test]
    fn our_listener_decodes_what_we_encode() {
        let frames = vec![
            Bytes::from_static(b"NixlMsgGuard"),
            Bytes::from_static(b"None"),
            Bytes::new(),
            Bytes::from(vec![3u8; 70_000]),
        ];
        let mut push = greeting().to_vec();
        push.extend_from_slice(&ready(b"PUSH"));
        push.extend_from_slice(&encode(&frames));
        let r = block_on(replay(&push[..], &PullLimits::default()));
        assert_eq!(r.outcome, Ok(()));
        assert_eq!(r.messages, vec![frames]);
    }

    #[test]
    fn a_pull_peer_is_served_and_its_pings_answered() {
        let mut ping = b"\x04\x0a\x04PING\x00\x0actx".to_vec();
        // A frame a PULL should not send: read and dropped.
        ping.extend_from_slice(&[0x00, 3, b'a', b'b', b'c']);
        let frames = [Bytes::from_static(b"hi")];
        let r = block_on(replay_push(&pull_stream(b"PULL", &ping)[..], MAX, &frames));
        assert_eq!(r.handshake, Ok(()));
        assert_eq!(r.after, Some(Ok(())));
        let mut want = greeting().to_vec();
        want.extend_from_slice(&ready(b"PUSH"));
        want.extend_from_slice(&[0x00, 2, b'h', b'i']);
        want.extend_from_slice(b"\x04\x08\x04PONGctx");
        assert_eq!(r.written, want);
    }

    #[test]
    fn hostile_pull_peers_fail_before_any_allocation() {
        let frames = [Bytes::from_static(b"hi")];
        let run = |s: &[u8]| block_on(replay_push(s, MAX, &frames));
        let huge = [0x06, 0x40, 0, 0, 0, 0, 0, 0, 0];
        let mut s = greeting().to_vec();
        s.extend_from_slice(&huge);
        assert!(run(&s).handshake.unwrap_err().contains("over limit"));
        let mut s = greeting().to_vec();
        s.extend_from_slice(&[0x02, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        assert!(run(&s).handshake.unwrap_err().contains("message frame"));
        // A READY property announcing 4 GiB inside a 30-byte command.
        let mut bad = ready(b"PULL");
        bad[20..24].copy_from_slice(&[0xff; 4]);
        let mut s = greeting().to_vec();
        s.extend_from_slice(&bad);
        assert!(run(&s).handshake.unwrap_err().contains("malformed"));
        assert!(run(&pull_stream(b"PUSH", b"")).handshake.is_err());
        assert!(run(b"HTTP/1.1 400 Bad Request\r\n\r\n").handshake.is_err());
        assert!(run(&greeting()[..30]).handshake.is_err());
        let r = run(&pull_stream(b"PULL", b"\x04\x09\x05ERROR\x02no"));
        assert!(r.after.unwrap().unwrap_err().contains("ERROR"));
        // After the handshake: a command or a frame over the limit ends the reader.
        let r = run(&pull_stream(b"PULL", &huge));
        assert!(r.after.unwrap().unwrap_err().contains("over limit"));
        let r = run(&pull_stream(b"PULL", &[0x02, 0x40, 0, 0, 0, 0, 0, 0, 0]));
        assert!(r.after.unwrap().unwrap_err().contains("over limit"));
    }
}
