//! A bounded ZMTP 3.x PULL listener (NULL mechanism): the prefill's receiving ZeroMQ socket.
//!
//! # Why our own reader
//!
//! The prefill's PULL port faces the cluster network. The `zeromq` 0.7 crate's codec trusts the
//! length a frame header announces: a 9-byte long-frame header saying 2^62 bytes makes it
//! `reserve` that much and the allocator aborts the process. Its `SocketOptions` only tune read
//! chunking (there is no `ZMQ_MAXMSGSIZE`), and after any per-peer decode error its
//! `PullSocket::recv` returns `Err` (it does drop the peer, but a caller that stops on `Err`
//! stops serving everyone). The alternatives were worse:
//!
//! - patching or vendoring the crate means carrying a fork of a whole socket library;
//! - a validating TCP proxy in front of a zeromq `PullSocket` parses every stream twice, doubles
//!   the connections and still leaves the unbounded codec behind it.
//!
//! A PULL socket only receives, so the part of ZMTP 3 it needs is small: a 64-byte greeting each
//! way, one `READY` command each way, then frames with the MORE flag, plus answering `PING`.
//! This module implements exactly that on tokio, checking every announced length against
//! [`PullLimits`] *before* it allocates, and growing buffers only as bytes actually arrive. The
//! sending side (PUSH) stays on the `zeromq` crate.
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

#![allow(
    clippy::big_endian_bytes,
    reason = "ZMTP lengths are in network byte order"
)]

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

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
    /// Frames ≤ 64 MiB (NIXL agent metadata is KB to a few MB), ≤ 16 frames a message (SGLang
    /// sends 8 to 13; trailing frames must not be refused here), messages ≤ 128 MiB, 1024 peers,
    /// 10 s for the handshake, 60 s for one message.
    fn default() -> Self {
        Self {
            max_frame: 64 << 20,
            max_frames: 16,
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
/// Pause after an accept error such as `EMFILE`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The window of [`RateLog`].
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Binds a TCP listener for a ZeroMQ endpoint `tcp://HOST:PORT` (`*` for every interface, IPv6
/// in brackets, port 0 for any).
pub(crate) async fn bind(endpoint: &str) -> io::Result<TcpListener> {
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
    let host = if host == "*" { "0.0.0.0" } else { host };
    TcpListener::bind((host, port)).await
}

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

/// Accepts connections under a cap of concurrent ones. Accept errors (EMFILE and the like)
/// back off; connections past the cap are closed at once; both are logged at most once per
/// [`LOG_EVERY`]. The accept loop itself never ends on either.
pub(crate) struct AcceptGate {
    permits: Arc<Semaphore>,
    cap: usize,
    what: &'static str,
    refused: RateLog,
    failed: RateLog,
}

impl AcceptGate {
    pub(crate) fn new(cap: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            what,
            refused: RateLog::new(1),
            failed: RateLog::new(1),
        }
    }

    /// The next connection and its permit (held while it is served), or `None` after an error
    /// or a refusal.
    pub(crate) async fn accept(
        &mut self,
        listener: &TcpListener,
    ) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                if let Some(n) = self.failed.tick() {
                    tracing::warn!(error = %e, suppressed = n, "{} accept failed; backing off", self.what);
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                return None;
            }
        };
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            if let Some(n) = self.refused.tick() {
                tracing::warn!(
                    %peer,
                    cap = self.cap,
                    suppressed = n,
                    "{} at its connection cap; connection closed",
                    self.what
                );
            }
            drop(stream);
            return None;
        };
        Some((stream, peer, permit))
    }
}

/// Rate-limits a kind of log line that peers can trigger: at most `burst` lines per
/// [`LOG_EVERY`], counting the ones left out.
#[derive(Debug)]
pub(crate) struct RateLog {
    burst: u32,
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLog {
    pub(crate) fn new(burst: u32) -> Self {
        Self {
            burst,
            window: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log this one, `n` having been left out since the last logged one.
    pub(crate) fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// [`RateLog::tick`] through a shared lock.
pub(crate) fn tick(log: &Mutex<RateLog>) -> Option<u64> {
    log.lock().unwrap_or_else(|p| p.into_inner()).tick()
}

/// Why a connection was dropped.
#[derive(Debug, thiserror::Error)]
enum PeerError {
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

fn proto(s: impl Into<String>) -> PeerError {
    PeerError::Protocol(s.into())
}

/// Our greeting: ZMTP 3.0, NULL mechanism, not as-server.
fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Our `READY` command frame: `Socket-Type: PULL`.
fn ready() -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&4u32.to_be_bytes());
    body.extend_from_slice(b"PULL");
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

fn check_greeting(g: &[u8; 64]) -> Result<(), PeerError> {
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

/// A ZMTP frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    more: bool,
    command: bool,
    len: u64,
}

/// Reads a frame header; `Ok(None)` on a clean EOF before its first byte.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Header>, PeerError> {
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

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), PeerError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(PeerError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads a frame body of `len` bytes (already checked against the limits), growing the buffer
/// only as bytes arrive.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> Result<Bytes, PeerError> {
    let mut buf = Vec::new();
    (&mut *r).take(len).read_to_end(&mut buf).await?;
    if (buf.len() as u64) < len {
        return Err(PeerError::Truncated);
    }
    Ok(Bytes::from(buf))
}

/// A parsed command: name and the rest of the body.
fn split_command(body: &[u8]) -> Result<(&[u8], &[u8]), PeerError> {
    let (&n, rest) = body.split_first().ok_or_else(|| proto("empty command"))?;
    let n = usize::from(n);
    if n == 0 || rest.len() < n {
        return Err(proto("malformed command name"));
    }
    Ok(rest.split_at(n))
}

/// Parses `READY` properties and returns the value of `Socket-Type`.
fn socket_type(mut props: &[u8]) -> Result<Option<&[u8]>, PeerError> {
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
    let mut g = [0u8; 64];
    read_exact(r, &mut g).await?;
    check_greeting(&g)?;
    w.write_all(&ready()).await?;
    let h = read_header(r).await?.ok_or(PeerError::Truncated)?;
    if !h.command {
        return Err(proto("expected READY, got a message frame"));
    }
    if h.len > limits.max_frame {
        return Err(PeerError::Limit(format!("READY of {} bytes", h.len)));
    }
    let body = read_body(r, h.len).await?;
    let (name, props) = split_command(&body)?;
    if name == b"ERROR" {
        return Err(proto(format!(
            "peer sent ERROR {:?}",
            String::from_utf8_lossy(props.get(1..).unwrap_or_default())
        )));
    }
    if name != b"READY" {
        return Err(proto(format!(
            "expected READY, got {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    match socket_type(props)? {
        Some(t) if t == b"PUSH" => Ok(true),
        Some(t) => Err(proto(format!(
            "socket type {:?} cannot talk to PULL",
            String::from_utf8_lossy(t)
        ))),
        None => Err(proto("READY without Socket-Type")),
    }
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
    let (name, rest) = split_command(&body)?;
    match name {
        b"PING" => {
            // TTL (2 bytes), then a context of up to 16 bytes that PONG echoes.
            let context = rest.get(2..).unwrap_or_default();
            let context = &context[..context.len().min(16)];
            let mut pong = vec![0x04, (5 + context.len()) as u8, 4];
            pong.extend_from_slice(b"PONG");
            pong.extend_from_slice(context);
            w.write_all(&pong).await?;
        }
        b"ERROR" => {
            return Err(proto(format!(
                "peer sent ERROR {:?}",
                String::from_utf8_lossy(rest.get(1..).unwrap_or_default())
            )));
        }
        other => tracing::debug!(command = %String::from_utf8_lossy(other), "ZMTP command ignored"),
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
        let thread = crate::runtime_thread::spawn(
            "kv-zmtp-pull",
            {
                let ready_tx = ready_tx.clone();
                move |e| {
                    let _ = ready_tx.send(Err(e));
                }
            },
            move || async move {
                let listener = match bind(&endpoint).await {
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

    #[test]
    fn our_handshake_frames() {
        let g = greeting();
        assert!(check_greeting(&g).is_ok());
        let r = ready();
        assert_eq!(r[0], 0x04);
        assert_eq!(usize::from(r[1]), r.len() - 2);
        let (name, props) = split_command(&r[2..]).unwrap();
        assert_eq!(name, b"READY");
        assert_eq!(socket_type(props).unwrap(), Some(&b"PULL"[..]));
    }

    #[test]
    fn malformed_commands_are_errors() {
        assert!(split_command(b"").is_err());
        assert!(split_command(&[0]).is_err());
        assert!(split_command(&[9, b'R']).is_err());
        assert!(socket_type(&[11, b'S']).is_err());
        assert!(socket_type(&[1, b'a', 0, 0, 0, 9, b'x']).is_err());
        assert!(socket_type(&[1, b'a', 0xff, 0xff, 0xff, 0xff]).is_err());
    }

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
        assert!(r.written.ends_with(&ready()));
        // A 2^62-byte header is refused before any allocation; earlier messages stand.
        let r = run_replay(&peer_stream(&[b"x"], Some(1 << 62)));
        assert_eq!(r.messages.len(), 1);
        assert!(r.outcome.unwrap_err().contains("over limit"));
        // Cut inside the handshake.
        assert!(run_replay(&greeting()[..30]).outcome.is_err());
        assert_eq!(run_replay(b"").outcome, Ok(()));
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
