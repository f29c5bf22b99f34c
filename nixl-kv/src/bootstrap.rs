//! SGLang's bootstrap HTTP server and its client (SPEC.md §2.2).
//!
//! Routes: `PUT /route` (a prefill rank registers), `GET /route?engine_rank=E&target_dp_group=G`
//! (a decode asks for the parallel sizes with `-1/-1`, else for rank E of group G), any other
//! method on `/route` → 405, and our addition `GET /health` → 200 `OK` for heartbeats. Bodies
//! are byte-identical to the Python server's (`json.dumps` style).

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nixl_wire::http::{ParallelInfo, PrefillRegistration, RankInfo, RouteQuery, to_python_json};

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

#[derive(Debug, Default)]
struct Table {
    tp_size: Option<u32>,
    dp_size: Option<u32>,
    ranks: HashMap<u32, HashMap<u32, RankInfo>>,
}

/// A running bootstrap server; stops when dropped.
pub struct BootstrapServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
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
        Self::start_with(addr, true)
    }

    /// Starts the server exactly like SGLang 0.5.1's, without the `/health` route (which then
    /// answers 404, and decodes turn heartbeats off for it).
    pub fn start_seed_compatible(addr: &str) -> Result<Self, BootstrapError> {
        Self::start_with(addr, false)
    }

    fn start_with(addr: &str, health: bool) -> Result<Self, BootstrapError> {
        let err = |reason: String| BootstrapError::Bind {
            addr: addr.to_owned(),
            reason,
        };
        let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| err(e.to_string()))?);
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| err("not an IP listener".into()))?;
        let table = Arc::new(Mutex::new(Table::default()));
        let s = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("kv-bootstrap".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    handle(req, &table, health);
                }
            })
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(%bound, "bootstrap server listening");
        Ok(Self {
            server,
            addr: bound,
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
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond(req: tiny_http::Request, status: u16, body: String, json: bool) {
    let ct = if json {
        "application/json; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
    if let Some(h) = header("Content-Type", ct) {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        tracing::debug!(error = %e, "bootstrap reply not delivered");
    }
}

fn handle(mut req: tiny_http::Request, table: &Mutex<Table>, health: bool) {
    let url = req.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = req.method().clone();
    match (path, &method) {
        ("/health", tiny_http::Method::Get) if health => respond(req, 200, "OK".into(), false),
        ("/route", tiny_http::Method::Put) => {
            let mut body = String::new();
            if req
                .as_reader()
                .take(1 << 20)
                .read_to_string(&mut body)
                .is_err()
            {
                return respond(req, 400, "Unreadable body".into(), false);
            }
            match serde_json::from_str::<PrefillRegistration>(&body) {
                Ok(reg) => {
                    register(table, reg);
                    respond(req, 200, "OK".into(), false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad bootstrap registration; dropped");
                    respond(req, 400, format!("Bad registration: {e}"), false);
                }
            }
        }
        ("/route", tiny_http::Method::Get) => {
            let Ok(q) = RouteQuery::parse(query) else {
                return respond(
                    req,
                    400,
                    "Missing inputs for bootstrap server.".into(),
                    false,
                );
            };
            let t = table.lock().unwrap_or_else(|p| p.into_inner());
            if q.is_parallel_info() {
                let info = ParallelInfo {
                    prefill_tp_size: t.tp_size,
                    prefill_dp_size: t.dp_size,
                };
                drop(t);
                return respond(req, 200, to_python_json(&info), true);
            }
            let found = u32::try_from(q.target_dp_group)
                .ok()
                .zip(u32::try_from(q.engine_rank).ok())
                .and_then(|(g, e)| t.ranks.get(&g).and_then(|m| m.get(&e)).cloned());
            drop(t);
            match found {
                Some(info) => respond(req, 200, to_python_json(&info), true),
                None => respond(req, 404, "Bootstrap info not Found".into(), false),
            }
        }
        ("/route", _) => respond(req, 405, "Method not allowed".into(), true),
        _ => respond(req, 404, "Not Found".into(), false),
    }
}

fn register(table: &Mutex<Table>, reg: PrefillRegistration) {
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    t.tp_size.get_or_insert(reg.tp_size);
    t.dp_size.get_or_insert(reg.dp_size);
    let per = (reg.tp_size / reg.dp_size.max(1)).max(1);
    if reg.role == "Prefill" {
        let (group, rank) = (reg.engine_rank / per, reg.engine_rank % per);
        let info = RankInfo {
            rank_ip: reg.rank_ip,
            rank_port: reg.rank_port,
        };
        t.ranks.entry(group).or_default().insert(rank, info);
    }
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

    /// The prefill's TP and DP sizes.
    pub fn parallel_info(&self) -> Result<ParallelInfo, BootstrapError> {
        self.get_json(&format!(
            "/route?{}",
            RouteQuery::PARALLEL_INFO.to_query_string()
        ))
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
