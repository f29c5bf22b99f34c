//! SGLang's bootstrap HTTP server and its client.
//!
//! Routes: `PUT /route` (a prefill rank registers), `GET /route?engine_rank=E&target_dp_group=G`
//! (a decode asks for the parallel sizes with `-1/-1`, else for rank E of group G), any other
//! method on `/route` → 405, and our addition `GET /health` → 200 `OK` for heartbeats. Bodies
//! are byte-identical to the Python server's (`json.dumps` style).
//!
//! # The server
//!
//! hyper's HTTP/1 server on a current-thread tokio runtime of its own thread, one task per
//! connection, so a slow or stalled client holds only its own connection. Every bound returns
//! an answer or closes one connection, never panics and never stops the accept loop
//! ([`ServerLimits`]): request heads (line and headers) are capped (431 above), bodies are capped
//! (413) and must arrive within a timeout (408), idle keep-alive connections and slow heads are
//! closed by hyper's header timeout, and at the connection cap new connections are closed at
//! once with a log line. Accept errors (`EMFILE` when the process is out of descriptors) are
//! logged and the loop backs off briefly. `Expect: 100-continue` is answered when the body is
//! read (hyper sends `100 Continue` then).
//!
//! # Who may overwrite a registration
//!
//! SGLang's server lets any `PUT /route` overwrite the entry of a (DP group, engine rank), so
//! anyone who can reach the port can send new decodes elsewhere. Ours keeps **the first
//! registration while its address still accepts TCP connections**:
//!
//! - a new (group, rank) is stored (as SGLang; the table has [`ServerLimits::max_entries`]
//!   entries at most, 503 beyond);
//! - the same address again is a no-op 200 (a prefill re-registering);
//! - a different address replaces the entry only if a TCP connect to the registered address
//!   fails within [`ServerLimits::probe_timeout`] (the registered rank is gone, e.g. it
//!   restarted on another port); while it answers, the PUT gets **409** `Rank already
//!   registered` and a warning naming the requester.
//!
//! A prefill that restarts on the same or another port therefore re-registers normally, and
//! while a rank is alive nobody can redirect its decodes. The TP and DP sizes are set by the
//! first PUT and never change, as in SGLang.
//!
//! # The client
//!
//! ureq, with a timeout per request and a bound on the bytes read from a server. Parallel
//! sizes outside `1..=`[`MAX_PARALLEL_SIZE`] are refused as errors: the decode sizes its
//! targeting from them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nixl_wire::http::{ParallelInfo, PrefillRegistration, RankInfo, RouteQuery, to_python_json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::net::gate::{AcceptGate, RateLog, tick};

/// Errors of the bootstrap server and client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// The server could not start.
    #[error("bootstrap server on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A request failed or got an unexpected answer.
    #[error("bootstrap {url}: {reason}")]
    Request {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// The largest TP or DP size a client accepts from a server.
pub const MAX_PARALLEL_SIZE: u32 = 65536;

/// The most bytes a client reads from one answer.
const MAX_ANSWER: u64 = 64 << 10;

/// Bounds of the bootstrap server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Bytes of a request's line and headers (431 above).
    pub max_head_bytes: usize,
    /// Bytes of a request body (413 above).
    pub max_body_bytes: usize,
    /// Time to receive a request's head, counted from the end of the previous request on a
    /// kept-alive connection (the connection is closed then).
    pub head_timeout: Duration,
    /// Time to receive a request's body (408 then).
    pub body_timeout: Duration,
    /// Registered (DP group, rank) entries (503 for new ones beyond).
    pub max_entries: usize,
    /// Time a TCP connect to a registered rank may take to prove it alive.
    pub probe_timeout: Duration,
}

impl Default for ServerLimits {
    /// 512 connections, 16 KiB heads, 64 KiB bodies, 15 s for a head, 10 s for a body,
    /// 65,536 entries, 1 s probes.
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_head_bytes: 16 << 10,
            max_body_bytes: 64 << 10,
            head_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(10),
            max_entries: 65536,
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// Pause after an accept error such as `EMFILE`.
/// hyper refuses a read buffer smaller than this.
const MIN_READ_BUF: usize = 8192;

#[derive(Debug, Default)]
struct Table {
    tp_size: Option<u32>,
    dp_size: Option<u32>,
    ranks: HashMap<u32, HashMap<u32, RankInfo>>,
    entries: usize,
}

/// How a registration for a taken (group, rank) learns whether the registered rank is alive.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// A TCP connect to it ([`ServerLimits::probe_timeout`]).
    Tcp,
    /// No IO: this answer ([`serve_stream`]).
    Assume(bool),
}

#[derive(Debug)]
struct State {
    table: Mutex<Table>,
    limits: ServerLimits,
    health: bool,
    probe: Probe,
    /// Warnings that clients can trigger.
    warn: Mutex<RateLog>,
}

/// Logs a client-triggered warning, rate-limited.
macro_rules! warn_limited {
    ($state:expr, $($arg:tt)+) => {
        if let Some(suppressed) = tick(&$state.warn) {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

/// A running bootstrap server; stops when dropped.
pub struct BootstrapServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for BootstrapServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl BootstrapServer {
    /// Starts the server on `addr` (`0.0.0.0:8998` as SGLang; port 0 picks one).
    pub fn start(addr: &str) -> Result<Self, BootstrapError> {
        Self::launch(addr, true, ServerLimits::default())
    }

    /// Starts the server exactly like SGLang 0.5.1's, without the `/health` route (which then
    /// answers 404, and decodes turn heartbeats off for it).
    pub fn start_seed_compatible(addr: &str) -> Result<Self, BootstrapError> {
        Self::launch(addr, false, ServerLimits::default())
    }

    /// Like [`start`](Self::start), with other bounds.
    pub fn start_with_limits(addr: &str, limits: ServerLimits) -> Result<Self, BootstrapError> {
        Self::launch(addr, true, limits)
    }

    fn launch(addr: &str, health: bool, limits: ServerLimits) -> Result<Self, BootstrapError> {
        let err = |reason: String| BootstrapError::Bind {
            addr: addr.to_owned(),
            reason,
        };
        let std_listener = std::net::TcpListener::bind(addr).map_err(|e| err(e.to_string()))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        let bound = std_listener.local_addr().map_err(|e| err(e.to_string()))?;
        let state = Arc::new(State {
            table: Mutex::new(Table::default()),
            limits,
            health,
            probe: Probe::Tcp,
            warn: Mutex::new(RateLog::new(20)),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = crate::net::thread::spawn(
            "kv-bootstrap",
            {
                let ready_tx = ready_tx.clone();
                move |e| {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            },
            move || async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    () = accept_loop(listener, state) => {}
                    _ = stopped => {}
                }
            },
        )
        .map_err(|e| err(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| err("server thread ended".into()))?
            .map_err(err)?;
        tracing::info!(%bound, "bootstrap server listening");
        Ok(Self {
            addr: bound,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BootstrapServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut gate = AcceptGate::new(state.limits.max_connections, "bootstrap server");
    loop {
        let Some((stream, peer, permit)) = gate.accept(&listener).await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            connection(stream, peer, state).await;
            drop(permit);
        });
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, state: Arc<State>) {
    serve_io(stream, peer, state).await;
}

/// One client connection over any byte stream: hyper's HTTP/1 server with the limits, then
/// [`handle`] for every request.
async fn serve_io<I>(io: I, peer: SocketAddr, state: Arc<State>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let limits = &state.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_header_size(limits.max_head_bytes)
        .max_buf_size(limits.max_head_bytes.max(MIN_READ_BUF))
        .keep_alive(true);
    let svc_state = Arc::clone(&state);
    let svc = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&svc_state);
        async move { Ok::<_, Infallible>(handle(req, peer, &state).await) }
    });
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(%peer, error = %e, "bootstrap connection ended");
    }
}

fn respond(status: StatusCode, body: impl Into<String>, json: bool) -> Response<Full<Bytes>> {
    let ct = if json {
        "application/json; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    resp
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, state: &State) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (path.as_str(), req.method()) {
        ("/health", &Method::GET) if state.health => respond(StatusCode::OK, "OK", false),
        ("/route", &Method::PUT) => put_route(req, peer, state).await,
        ("/route", &Method::GET) => get_route(&query, state),
        ("/route", _) => respond(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", true),
        _ => respond(StatusCode::NOT_FOUND, "Not Found", false),
    }
}

fn get_route(query: &str, state: &State) -> Response<Full<Bytes>> {
    let Ok(q) = RouteQuery::parse(query) else {
        return respond(
            StatusCode::BAD_REQUEST,
            "Missing inputs for bootstrap server.",
            false,
        );
    };
    let t = state.table.lock().unwrap_or_else(|p| p.into_inner());
    if q.is_parallel_info() {
        let info = ParallelInfo {
            prefill_tp_size: t.tp_size,
            prefill_dp_size: t.dp_size,
        };
        drop(t);
        return respond(StatusCode::OK, to_python_json(&info), true);
    }
    let found = u32::try_from(q.target_dp_group)
        .ok()
        .zip(u32::try_from(q.engine_rank).ok())
        .and_then(|(g, e)| t.ranks.get(&g).and_then(|m| m.get(&e)).cloned());
    drop(t);
    match found {
        Some(info) => respond(StatusCode::OK, to_python_json(&info), true),
        None => respond(StatusCode::NOT_FOUND, "Bootstrap info not Found", false),
    }
}

async fn put_route(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &State,
) -> Response<Full<Bytes>> {
    let limits = &state.limits;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        warn_limited!(state, %peer, bytes = declared, "bootstrap registration body too large; refused");
        return respond(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body too large",
            false,
        );
    }
    let body = Limited::new(req.into_body(), limits.max_body_bytes).collect();
    let body = match tokio::time::timeout(limits.body_timeout, body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            warn_limited!(state, %peer, error = %e, "bootstrap registration body unreadable");
            return if e.is::<http_body_util::LengthLimitError>() {
                respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body too large",
                    false,
                )
            } else {
                respond(StatusCode::BAD_REQUEST, "Unreadable body", false)
            };
        }
        Err(_) => {
            warn_limited!(state, %peer, "bootstrap registration body timed out");
            return respond(StatusCode::REQUEST_TIMEOUT, "Request body timed out", false);
        }
    };
    let reg = match serde_json::from_slice::<PrefillRegistration>(&body) {
        Ok(reg) => reg,
        Err(e) => {
            warn_limited!(state, %peer, error = %e, "bad bootstrap registration; dropped");
            return respond(
                StatusCode::BAD_REQUEST,
                format!("Bad registration: {e}"),
                false,
            );
        }
    };
    match register(state, reg, peer).await {
        Registered::Ok => respond(StatusCode::OK, "OK", false),
        Registered::Conflict => respond(StatusCode::CONFLICT, "Rank already registered", false),
        Registered::Full => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "Bootstrap table full",
            false,
        ),
    }
}

enum Registered {
    Ok,
    Conflict,
    Full,
}

/// Stores a registration under the rule of the module doc.
async fn register(state: &State, reg: PrefillRegistration, peer: SocketAddr) -> Registered {
    let per = {
        let mut t = state.table.lock().unwrap_or_else(|p| p.into_inner());
        t.tp_size.get_or_insert(reg.tp_size);
        t.dp_size.get_or_insert(reg.dp_size);
        (reg.tp_size / reg.dp_size.max(1)).max(1)
    };
    if reg.role != "Prefill" {
        return Registered::Ok;
    }
    let (group, rank) = (reg.engine_rank / per, reg.engine_rank % per);
    let info = RankInfo {
        rank_ip: reg.rank_ip,
        rank_port: reg.rank_port,
    };
    let old = {
        let mut t = state.table.lock().unwrap_or_else(|p| p.into_inner());
        let old = t.ranks.get(&group).and_then(|m| m.get(&rank)).cloned();
        match old {
            Some(old) if old == info => return Registered::Ok,
            Some(old) => old,
            None => {
                if t.entries >= state.limits.max_entries {
                    warn_limited!(state, %peer, group, rank, "bootstrap table full; registration refused");
                    return Registered::Full;
                }
                t.entries += 1;
                t.ranks.entry(group).or_default().insert(rank, info);
                return Registered::Ok;
            }
        }
    };
    let alive = match state.probe {
        Probe::Tcp => accepts_connections(&old, state.limits.probe_timeout).await,
        Probe::Assume(alive) => alive,
    };
    if alive {
        warn_limited!(
            state,
            %peer,
            group,
            rank,
            registered = %format!("{}:{}", old.rank_ip, old.rank_port),
            offered = %format!("{}:{}", info.rank_ip, info.rank_port),
            "registration for a live rank from elsewhere refused"
        );
        return Registered::Conflict;
    }
    let mut t = state.table.lock().unwrap_or_else(|p| p.into_inner());
    let Some(slot) = t.ranks.get_mut(&group).and_then(|m| m.get_mut(&rank)) else {
        return Registered::Conflict;
    };
    if *slot != old {
        // Someone else replaced it meanwhile.
        return Registered::Conflict;
    }
    tracing::info!(
        %peer,
        group,
        rank,
        old = %format!("{}:{}", old.rank_ip, old.rank_port),
        new = %format!("{}:{}", info.rank_ip, info.rank_port),
        "registered rank no longer answers; registration replaced"
    );
    *slot = info;
    Registered::Ok
}

/// The registration table after [`serve_stream`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TableSnapshot {
    /// The TP size set by the first registration.
    pub tp_size: Option<u32>,
    /// The DP size set by the first registration.
    pub dp_size: Option<u32>,
    /// Every (DP group, rank) entry, sorted.
    pub ranks: Vec<(u32, u32, RankInfo)>,
    /// The table's count of entries (always `ranks.len()`).
    pub entries: usize,
}

/// Serves one client's byte stream with exactly the server's per-connection handling (hyper
/// with [`ServerLimits`]' head, body and timeout bounds, then the routes and the registration
/// rule) on a fresh table, without sockets; for fuzzing and tests. No TCP probe is made: a
/// registered rank counts as alive when `registered_alive`. The client is `127.0.0.1:1`.
///
/// Runs until the connection ends (the client closes, or a timeout closes it: run it on a
/// runtime with time enabled, paused time makes the timeouts instant). Returns the table.
pub async fn serve_stream<I>(io: I, limits: ServerLimits, registered_alive: bool) -> TableSnapshot
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let state = Arc::new(State {
        table: Mutex::new(Table::default()),
        limits,
        health: true,
        probe: Probe::Assume(registered_alive),
        warn: Mutex::new(RateLog::new(20)),
    });
    serve_io(
        io,
        SocketAddr::from(([127, 0, 0, 1], 1)),
        Arc::clone(&state),
    )
    .await;
    let t = state.table.lock().unwrap_or_else(|p| p.into_inner());
    let mut ranks: Vec<(u32, u32, RankInfo)> = t
        .ranks
        .iter()
        .flat_map(|(&g, m)| m.iter().map(move |(&r, i)| (g, r, i.clone())))
        .collect();
    ranks.sort_by_key(|&(g, r, _)| (g, r));
    TableSnapshot {
        tp_size: t.tp_size,
        dp_size: t.dp_size,
        ranks,
        entries: t.entries,
    }
}

/// Whether a TCP connect to a registered rank succeeds within `timeout`.
async fn accepts_connections(info: &RankInfo, timeout: Duration) -> bool {
    let host = info
        .rank_ip
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&info.rank_ip);
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect((host, info.rank_port))).await,
        Ok(Ok(_))
    )
}

/// A blocking client for one bootstrap server (`host:port`).
#[derive(Debug, Clone)]
pub struct BootstrapClient {
    base: String,
    agent: ureq::Agent,
}

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// 200.
    Up,
    /// 404: a seed SGLang server without `/health`; heartbeats cannot be used.
    NoRoute,
    /// Unreachable or another status.
    Down(String),
}

impl BootstrapClient {
    /// A client for `host:port`, with `timeout` per request (SGLang's has none).
    pub fn new(addr: &str, timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build();
        Self {
            base: format!("http://{addr}"),
            agent: config.into(),
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String), BootstrapError> {
        let url = format!("{}{path}", self.base);
        let err = |reason: String| BootstrapError::Request {
            url: url.clone(),
            reason,
        };
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(|e| err(e.to_string()))?;
        Ok((status, body))
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, BootstrapError> {
        let (status, body) = self.get(path)?;
        let url = format!("{}{path}", self.base);
        if status != 200 {
            return Err(BootstrapError::Request {
                url,
                reason: format!("status {status}: {body}"),
            });
        }
        serde_json::from_str(&body).map_err(|e| BootstrapError::Request {
            url,
            reason: e.to_string(),
        })
    }

    /// `PUT /route` with a prefill rank's registration.
    pub fn register(&self, reg: &PrefillRegistration) -> Result<(), BootstrapError> {
        let url = format!("{}/route", self.base);
        let err = |reason: String| BootstrapError::Request {
            url: url.clone(),
            reason,
        };
        let body = to_python_json(reg);
        let resp = self
            .agent
            .put(&url)
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .map_err(|e| err(e.to_string()))?;
        match resp.status().as_u16() {
            200 => Ok(()),
            s => Err(err(format!("status {s}"))),
        }
    }

    /// The prefill's TP and DP sizes (`None` before any prefill registered); a size outside
    /// `1..=`[`MAX_PARALLEL_SIZE`] is an error.
    pub fn parallel_info(&self) -> Result<ParallelInfo, BootstrapError> {
        let path = format!("/route?{}", RouteQuery::PARALLEL_INFO.to_query_string());
        let info: ParallelInfo = self.get_json(&path)?;
        for (name, v) in [
            ("prefill_tp_size", info.prefill_tp_size),
            ("prefill_dp_size", info.prefill_dp_size),
        ] {
            if let Some(v) = v.filter(|v| !(1..=MAX_PARALLEL_SIZE).contains(v)) {
                return Err(BootstrapError::Request {
                    url: format!("{}{path}", self.base),
                    reason: format!("{name} {v} is outside 1..={MAX_PARALLEL_SIZE}"),
                });
            }
        }
        Ok(info)
    }

    /// Where rank `engine_rank` of DP group `dp_group` listens.
    pub fn rank_info(&self, engine_rank: u32, dp_group: u32) -> Result<RankInfo, BootstrapError> {
        let q = RouteQuery {
            engine_rank: i64::from(engine_rank),
            target_dp_group: i64::from(dp_group),
        };
        self.get_json(&format!("/route?{}", q.to_query_string()))
    }

    /// `GET /health`.
    pub fn health(&self) -> Health {
        match self.get("/health") {
            Ok((200, _)) => Health::Up,
            Ok((404, _)) => Health::NoRoute,
            Ok((s, body)) => Health::Down(format!("status {s}: {body}")),
            Err(e) => Health::Down(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_like_sglang() {
        let server = BootstrapServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr().to_string();
        let c = BootstrapClient::new(&addr, Duration::from_secs(5));
        // Nobody registered yet: nulls.
        assert_eq!(
            c.parallel_info().unwrap(),
            ParallelInfo {
                prefill_tp_size: None,
                prefill_dp_size: None
            }
        );
        let reg = |rank: u32, port: u16| PrefillRegistration {
            role: "Prefill".into(),
            tp_size: 2,
            dp_size: 1,
            rank_ip: "127.0.0.1".into(),
            rank_port: port,
            engine_rank: rank,
        };
        c.register(&reg(0, 41943)).unwrap();
        c.register(&reg(1, 41944)).unwrap();
        let (status, body) = c.get("/route?engine_rank=-1&target_dp_group=-1").unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"prefill_tp_size": 2, "prefill_dp_size": 1}"#)
        );
        let (status, body) = c.get("/route?engine_rank=1&target_dp_group=0").unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"rank_ip": "127.0.0.1", "rank_port": 41944}"#)
        );
        assert_eq!(
            c.get("/route?engine_rank=0").unwrap(),
            (400, "Missing inputs for bootstrap server.".into())
        );
        assert_eq!(
            c.get("/route?engine_rank=5&target_dp_group=0").unwrap().0,
            404
        );
        assert_eq!(c.health(), Health::Up);
        let resp = c
            .agent
            .post(&format!("{}/route", c.base))
            .send("x")
            .unwrap();
        assert_eq!(resp.status().as_u16(), 405);
        // Garbage registration: 400, and the server keeps serving.
        let resp = c
            .agent
            .put(&format!("{}/route", c.base))
            .send("{not json")
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        assert_eq!(c.rank_info(0, 0).unwrap().rank_port, 41943);
    }

    fn serve(input: &[u8], alive: bool) -> (TableSnapshot, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (mut rd, mut wr) = tokio::io::split(client);
            let input = input.to_vec();
            let write = async move {
                // Not shut down: hyper (without half-close) would drop pipelined requests.
                wr.write_all(&input).await.unwrap();
                wr
            };
            let read = async move {
                let mut out = Vec::new();
                rd.read_to_end(&mut out).await.unwrap();
                String::from_utf8_lossy(&out).into_owned()
            };
            let (table, _wr, out) = tokio::join!(
                serve_stream(server, ServerLimits::default(), alive),
                write,
                read
            );
            (table, out)
        })
    }

    #[test]
    fn serve_stream_is_the_server_without_sockets() {
        let body = |port: u16| {
            format!(
                r#"{{"role": "Prefill", "tp_size": 1, "dp_size": 1, "rank_ip": "127.0.0.1", "rank_port": {port}, "engine_rank": 0}}"#
            )
        };
        let put = |port| {
            let b = body(port);
            format!(
                "PUT /route HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        };
        let get = "GET /route?engine_rank=0&target_dp_group=0 HTTP/1.1\r\nHost: x\r\n\
                   Connection: close\r\n\r\n";
        let input = format!("{}{}{get}", put(41000), put(41001));
        // The registered rank is alive: the second PUT is refused and the first stays.
        let (table, out) = serve(input.as_bytes(), true);
        assert_eq!(table.entries, 1);
        assert_eq!(table.ranks[0].2.rank_port, 41000);
        assert!(out.contains("409 Conflict"), "{out}");
        assert!(out.contains(r#"{"rank_ip": "127.0.0.1", "rank_port": 41000}"#));
        // Dead: it is replaced.
        let (table, out) = serve(input.as_bytes(), false);
        assert_eq!(table.ranks[0].2.rank_port, 41001);
        assert!(!out.contains("409"), "{out}");
        // Garbage gets a 400 and leaves the table empty.
        let (table, out) = serve(b"\x00\x01 nonsense\r\n\r\n", true);
        assert_eq!(table.entries, 0);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }

    #[test]
    fn a_dead_server_is_down() {
        let addr = {
            let s = BootstrapServer::start("127.0.0.1:0").unwrap();
            s.addr().to_string()
        };
        let c = BootstrapClient::new(&addr, Duration::from_millis(500));
        assert!(matches!(c.health(), Health::Down(_)));
        assert!(c.parallel_info().is_err());
    }
}
