//! The bootstrap HTTP server: hyper on its own IO thread, the registration table and its
//! first-registration-wins rule (see the module above).

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
use nixl_wire::http::v2x::{self, PrefillServerInfo};
use nixl_wire::http::{ParallelInfo, PrefillRegistration, RankInfo, RouteQuery, to_python_json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::net::gate::{AcceptGate, RateLog, tick};

use super::BootstrapError;

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
    /// The first registration in SGLang 0.5.2x's form: what 0.5.2x decodes are told.
    v2x: Option<v2x::PrefillRegistration>,
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
    /// The secret a `PUT /route` must carry in [`TOKEN_HEADER`], when set.
    token: Option<String>,
}

/// The header a registration carries the bootstrap token in (see
/// [`BootstrapServer::start_with_token`]).
pub const TOKEN_HEADER: &str = "x-nixl-rs-bootstrap-token";

/// Whether `given` is the token, comparing every byte whatever differs first.
fn token_matches(token: &str, given: &[u8]) -> bool {
    token.len() == given.len()
        && token
            .bytes()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
        Self::launch(addr, true, ServerLimits::default(), None)
    }

    /// Like [`start`](Self::start), taking registrations (`PUT /route`) only with `token` in
    /// the [`TOKEN_HEADER`] header (403 otherwise), so that nobody but the ranks given the
    /// token can register a rank that has not registered yet. SGLang's own prefills send no
    /// token: give one only where every prefill rank is ours.
    pub fn start_with_token(addr: &str, token: &str) -> Result<Self, BootstrapError> {
        Self::launch(addr, true, ServerLimits::default(), Some(token.to_owned()))
    }

    /// Starts the server exactly like SGLang 0.5.1's, without the `/health` route (which then
    /// answers 404, and decodes turn heartbeats off for it).
    pub fn start_seed_compatible(addr: &str) -> Result<Self, BootstrapError> {
        Self::launch(addr, false, ServerLimits::default(), None)
    }

    /// Like [`start`](Self::start), with other bounds.
    pub fn start_with_limits(addr: &str, limits: ServerLimits) -> Result<Self, BootstrapError> {
        Self::launch(addr, true, limits, None)
    }

    fn launch(
        addr: &str,
        health: bool,
        limits: ServerLimits,
        token: Option<String>,
    ) -> Result<Self, BootstrapError> {
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
            token,
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
        ("/route", &Method::GET) if v2x::RouteQuery::is_v2x(&query) => get_route_v2x(&query, state),
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

/// A 0.5.20–0.5.23 decode's lookup (docs/protocol.md §10.7): 503 until every rank of a
/// prefill that registered in 0.5.2x's form is in, then the parallel info that every 0.5.2x
/// release reads, or a rank's address.
fn get_route_v2x(query: &str, state: &State) -> Response<Full<Bytes>> {
    let Ok(q) = v2x::RouteQuery::parse(query) else {
        return respond(
            StatusCode::BAD_REQUEST,
            "Missing inputs for bootstrap server.",
            false,
        );
    };
    let t = state.table.lock().unwrap_or_else(|p| p.into_inner());
    let ready = t.v2x.is_some() && t.tp_size.is_some_and(|n| t.entries as u64 >= u64::from(n));
    let Some(first) = t.v2x.clone().filter(|_| ready) else {
        let n = t.entries;
        drop(t);
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Prefill server not fully registered yet ({n} workers registered)."),
            false,
        );
    };
    if q.is_parallel_info() {
        drop(t);
        let info = PrefillServerInfo::for_every_profile(&first);
        return respond(StatusCode::OK, to_python_json(&info), true);
    }
    let found = (q.prefill_cp_rank == 0 && q.target_pp_rank == 0)
        .then(|| {
            let g = u32::try_from(q.prefill_dp_rank).ok()?;
            let r = u32::try_from(q.target_tp_rank).ok()?;
            t.ranks.get(&g).and_then(|m| m.get(&r)).cloned()
        })
        .flatten();
    drop(t);
    match found {
        Some(info) => respond(StatusCode::OK, to_python_json(&info), true),
        None => respond(
            StatusCode::NOT_FOUND,
            format!(
                "Bootstrap info not found for dp_rank={} cp_rank={} tp_rank={} pp_rank={}",
                q.prefill_dp_rank, q.prefill_cp_rank, q.target_tp_rank, q.target_pp_rank
            ),
            false,
        ),
    }
}

/// A `PUT /route` body in either release's form (a body with `attn_tp_size` is 0.5.2x's,
/// possibly with 0.5.1's keys as well), as 0.5.1's registration plus the 0.5.2x one.
fn parse_registration(
    body: &[u8],
) -> Result<(PrefillRegistration, Option<v2x::PrefillRegistration>), String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if value.get("attn_tp_size").is_none() {
        return serde_json::from_value(value)
            .map(|r| (r, None))
            .map_err(|e| e.to_string());
    }
    let v2: v2x::PrefillRegistration = serde_json::from_value(value).map_err(|e| e.to_string())?;
    if v2.attn_cp_size != 1 || v2.pp_size != 1 {
        return Err("context or pipeline parallel prefills are not supported".into());
    }
    if v2.attn_tp_size == 0 || v2.attn_tp_rank >= v2.attn_tp_size || v2.dp_size() == 0 {
        return Err("attention TP rank outside its size".into());
    }
    let seed = PrefillRegistration {
        role: "Prefill".into(),
        tp_size: v2.attn_tp_size.saturating_mul(v2.dp_size()),
        dp_size: v2.dp_size(),
        rank_ip: v2.rank_ip.clone(),
        rank_port: v2.rank_port,
        engine_rank: v2
            .dp_group()
            .saturating_mul(v2.attn_tp_size)
            .saturating_add(v2.attn_tp_rank),
    };
    Ok((seed, Some(v2)))
}

async fn put_route(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &State,
) -> Response<Full<Bytes>> {
    let limits = &state.limits;
    if let Some(token) = &state.token {
        let given = req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes());
        if !given.is_some_and(|g| token_matches(token, g)) {
            warn_limited!(state, %peer, "bootstrap registration without the token; refused");
            return respond(
                StatusCode::FORBIDDEN,
                "Registration needs the bootstrap token",
                false,
            );
        }
    }
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
    let reg = match parse_registration(&body) {
        Ok((reg, v2)) => {
            if let Some(v2) = v2 {
                let mut t = state.table.lock().unwrap_or_else(|p| p.into_inner());
                t.v2x.get_or_insert(v2);
            }
            reg
        }
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
        token: None,
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
