//! The prefill's PULL listener: accepts PUSH peers, one task each, and queues their complete
//! messages.
//!
//! # Behaviour per peer
//!
//! Each accepted connection is its own task. Anything wrong with a connection (a bad greeting, a
//! mechanism other than NULL, a peer that is not PUSH, a malformed command, a frame, message or
//! frame count over the limits, a reset, EOF in the middle of a message, a handshake or message
//! that takes too long) ends that connection only, with one `warn` naming the peer. The accept
//! loop never ends on an error: at the peer cap a new connection is closed at once (logged,
//! rate-limited); `EMFILE` and similar accept errors are logged and the loop backs off briefly.
//! Well-formed commands other than `PING` (`PONG`, `SUBSCRIBE`, unknown names) are ignored, as
//! libzmq does.
//!
//! Complete messages go into a bounded queue, so a slow consumer pushes back on the TCP peers
//! instead of buffering without limit (as a ZeroMQ high-water mark would).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::wire::{
    Header, PeerError, command_reply, greeting, proto, read_body, read_greeting, read_header,
    read_ready, ready,
};
use crate::net::gate::{AcceptGate, RateLog, tick};

/// Bounds on what one peer may send.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PullLimits {
    /// Largest frame, in bytes (commands included).
    pub max_frame: u64,
    /// Most frames in one multipart message.
    pub max_frames: usize,
    /// Largest message (all its frames), in bytes.
    pub max_message: u64,
    /// Most connections at once; more are closed on accept.
    pub max_peers: usize,
    /// Time from accept to the end of the `READY` exchange.
    pub handshake_timeout: Duration,
    /// Time from a message's first frame header to its last byte.
    pub message_timeout: Duration,
}

impl Default for PullLimits {
    /// Frames ≤ 64 MiB (NIXL agent metadata is KB to a few MB), ≤ 32 frames a message (SGLang
    /// 0.5.1 sends 8 to 13, 0.5.23 up to 25, ours add up to three; trailing frames must not be
    /// refused here), messages ≤ 128 MiB, 1024 peers,
    /// 10 s for the handshake, 60 s for one message.
    fn default() -> Self {
        Self {
            max_frame: 64 << 20,
            max_frames: 32,
            max_message: 128 << 20,
            max_peers: 1024,
            handshake_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(60),
        }
    }
}

/// How many complete messages may wait for the consumer.
pub(crate) const QUEUE: usize = 16;
/// The read buffer of one connection (large frames bypass it).
const READ_BUF: usize = 8 << 10;
/// Accepts PUSH peers on `listener` forever and sends every complete message to `sink`. Ends
/// only when `sink` is closed.
pub(crate) async fn serve(
    listener: TcpListener,
    limits: PullLimits,
    sink: mpsc::Sender<Vec<Bytes>>,
) {
    let limits = Arc::new(limits);
    let mut gate = AcceptGate::new(limits.max_peers, "ZMQ PULL");
    let dropped = Arc::new(Mutex::new(RateLog::new(20)));
    loop {
        if sink.is_closed() {
            return;
        }
        let Some((stream, peer, permit)) = gate.accept(&listener).await else {
            continue;
        };
        let limits = Arc::clone(&limits);
        let sink = sink.clone();
        let dropped = Arc::clone(&dropped);
        tokio::spawn(async move {
            match connection(stream, &limits, &sink).await {
                Ok(()) => tracing::debug!(%peer, "ZMQ peer disconnected"),
                Err(e) => {
                    if let Some(n) = tick(&dropped) {
                        tracing::warn!(%peer, error = %e, suppressed = n, "ZMQ peer dropped");
                    } else {
                        tracing::debug!(%peer, error = %e, "ZMQ peer dropped");
                    }
                }
            }
            drop(permit);
        });
    }
}

/// One peer: greeting, `READY`, then messages until EOF or an error.
async fn connection(
    stream: TcpStream,
    limits: &PullLimits,
    sink: &mpsc::Sender<Vec<Bytes>>,
) -> Result<(), PeerError> {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    session(r, w, limits, sink).await
}

/// One peer over any byte stream: what [`connection`] does after the socket is split.
async fn session<R, W>(
    r: R,
    mut w: W,
    limits: &PullLimits,
    sink: &mpsc::Sender<Vec<Bytes>>,
) -> Result<(), PeerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::with_capacity(READ_BUF, r);
    let greeted = tokio::time::timeout(limits.handshake_timeout, handshake(&mut r, &mut w, limits))
        .await
        .map_err(|_| PeerError::Timeout("handshake"))??;
    if !greeted {
        // Closed before sending a byte: a port probe, not a ZMTP peer.
        return Ok(());
    }
    messages(&mut r, &mut w, limits, sink).await
}

/// The greeting and `READY` exchange; `Ok(false)` if the peer closed before sending anything.
async fn handshake<R, W>(r: &mut R, w: &mut W, limits: &PullLimits) -> Result<bool, PeerError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Ours goes first and whole: libzmq sends its first 11 bytes, then waits for ours.
    w.write_all(&greeting()).await?;
    if r.fill_buf().await?.is_empty() {
        return Ok(false);
    }
    read_greeting(r).await?;
    w.write_all(&ready(b"PULL")).await?;
    read_ready(r, limits.max_frame, b"PUSH").await?;
    Ok(true)
}

async fn messages<R, W>(
    r: &mut R,
    w: &mut W,
    limits: &PullLimits,
    sink: &mpsc::Sender<Vec<Bytes>>,
) -> Result<(), PeerError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Between messages a peer may stay idle as long as it likes; once a message has begun
        // it must end within the message timeout.
        if r.fill_buf().await?.is_empty() {
            return Ok(());
        }
        let msg = tokio::time::timeout(limits.message_timeout, async {
            let first = read_header(r).await?.ok_or(PeerError::Truncated)?;
            message(r, w, limits, first).await
        })
        .await
        .map_err(|_| PeerError::Timeout("message"))??;
        if let Some(frames) = msg {
            sink.send(frames).await.map_err(|_| PeerError::Closed)?;
        }
    }
}

/// Reads the rest of a message or command starting with `first`; `None` for a command.
async fn message<R, W>(
    r: &mut R,
    w: &mut W,
    limits: &PullLimits,
    first: Header,
) -> Result<Option<Vec<Bytes>>, PeerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if first.command {
        command(r, w, limits, first).await?;
        return Ok(None);
    }
    let mut frames = Vec::new();
    let mut total = 0u64;
    let mut h = first;
    loop {
        if h.command {
            return Err(proto("command inside a multipart message"));
        }
        if h.len > limits.max_frame {
            return Err(PeerError::Limit(format!(
                "frame of {} bytes (max {})",
                h.len, limits.max_frame
            )));
        }
        if frames.len() >= limits.max_frames {
            return Err(PeerError::Limit(format!(
                "more than {} frames in a message",
                limits.max_frames
            )));
        }
        total = total.saturating_add(h.len);
        if total > limits.max_message {
            return Err(PeerError::Limit(format!(
                "message of more than {} bytes",
                limits.max_message
            )));
        }
        frames.push(read_body(r, h.len).await?);
        if !h.more {
            return Ok(Some(frames));
        }
        h = read_header(r).await?.ok_or(PeerError::Truncated)?;
    }
}

async fn command<R, W>(
    r: &mut R,
    w: &mut W,
    limits: &PullLimits,
    h: Header,
) -> Result<(), PeerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if h.more {
        return Err(proto("command with the MORE flag"));
    }
    if h.len > limits.max_frame {
        return Err(PeerError::Limit(format!("command of {} bytes", h.len)));
    }
    let body = read_body(r, h.len).await?;
    if let Some(reply) = command_reply(&body)? {
        w.write_all(&reply).await?;
    }
    Ok(())
}

/// What one peer's byte stream did to the listener: see [`replay`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Replay {
    /// The complete messages the listener would have delivered, in order.
    pub messages: Vec<Vec<Bytes>>,
    /// What the listener wrote back (its greeting, `READY`, `PONG`s).
    pub written: Vec<u8>,
    /// How the connection ended: `Ok` on a clean EOF between messages, else why it was dropped.
    pub outcome: Result<(), String>,
}

/// Runs one peer's byte stream through exactly the per-connection logic of the listener
/// ([`PullListener`]: greeting, `READY`, frames, commands, every limit of `limits`) over
/// in-memory IO, without sockets; for fuzzing and tests.
///
/// Must run on a tokio runtime with time enabled (the handshake and message timeouts are
/// armed as on a socket).
pub async fn replay<R: AsyncRead + Unpin>(input: R, limits: &PullLimits) -> Replay {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let mut written = Vec::new();
    let run = async {
        let outcome = session(input, &mut written, limits, &tx).await;
        drop(tx);
        outcome
    };
    let collect = async {
        let mut messages = Vec::new();
        while let Some(m) = rx.recv().await {
            messages.push(m);
        }
        messages
    };
    let (outcome, messages) = tokio::join!(run, collect);
    Replay {
        messages,
        written,
        outcome: outcome.map_err(|e| e.to_string()),
    }
}

/// A PULL listener on its own thread (a current-thread tokio runtime) that hands every message
/// to a callback on that thread; stops when dropped.
pub struct PullListener {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PullListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PullListener {
    /// Binds `endpoint` (`tcp://HOST:PORT`, port 0 for any) and calls `on_message` with the
    /// frames of every complete message, in order per peer.
    pub fn bind<F>(endpoint: &str, limits: PullLimits, on_message: F) -> io::Result<Self>
    where
        F: FnMut(Vec<Bytes>) + Send + 'static,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let endpoint = endpoint.to_owned();
        let thread = crate::net::thread::spawn(
            "kv-zmtp-pull",
            {
                let ready_tx = ready_tx.clone();
                move |e| {
                    let _ = ready_tx.send(Err(e));
                }
            },
            move || async move {
                let listener = match super::bind(&endpoint).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                match listener.local_addr() {
                    Ok(a) => {
                        let _ = ready_tx.send(Ok(a));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(serve(listener, limits, tx));
                tokio::select! {
                    () = deliver(rx, on_message) => {}
                    _ = stopped => {}
                }
            },
        )?;
        let addr = ready_rx
            .recv()
            .map_err(|_| io::Error::other("listener thread ended"))??;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PullListener {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Calls `on_message` for every queued message until every sender is gone.
pub(crate) async fn deliver<F: FnMut(Vec<Bytes>)>(
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    mut on_message: F,
) {
    while let Some(frames) = rx.recv().await {
        on_message(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_stream(frames: &[&[u8]], long_header: Option<u64>) -> Vec<u8> {
        let mut s = greeting().to_vec();
        let mut ready = vec![0x04, 0];
        ready.extend_from_slice(&[5, b'R', b'E', b'A', b'D', b'Y', 11]);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&4u32.to_be_bytes());
        ready.extend_from_slice(b"PUSH");
        ready[1] = (ready.len() - 2) as u8;
        s.extend_from_slice(&ready);
        for (i, f) in frames.iter().enumerate() {
            s.push(u8::from(i + 1 < frames.len()));
            s.push(f.len() as u8);
            s.extend_from_slice(f);
        }
        if let Some(len) = long_header {
            s.push(0x02);
            s.extend_from_slice(&len.to_be_bytes());
        }
        s
    }

    fn run_replay(input: &[u8]) -> Replay {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(replay(input, &PullLimits::default()))
    }

    #[test]
    fn replay_delivers_what_the_listener_would() {
        let r = run_replay(&peer_stream(&[b"NixlMsgGuard", b"1", b""], None));
        assert_eq!(r.outcome, Ok(()));
        assert_eq!(
            r.messages,
            vec![vec![
                Bytes::from_static(b"NixlMsgGuard"),
                Bytes::from_static(b"1"),
                Bytes::new()
            ]]
        );
        assert!(r.written.starts_with(&greeting()));
        assert!(r.written.ends_with(&ready(b"PULL")));
        // A 2^62-byte header is refused before any allocation; earlier messages stand.
        let r = run_replay(&peer_stream(&[b"x"], Some(1 << 62)));
        assert_eq!(r.messages.len(), 1);
        assert!(r.outcome.unwrap_err().contains("over limit"));
        // Cut inside the handshake.
        assert!(run_replay(&greeting()[..30]).outcome.is_err());
        assert_eq!(run_replay(b"").outcome, Ok(()));
    }
}
