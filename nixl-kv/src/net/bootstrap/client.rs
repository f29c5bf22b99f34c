//! The bootstrap client: ureq with a timeout per request and a bound on the bytes read.

use std::time::Duration;

use nixl_wire::http::{ParallelInfo, PrefillRegistration, RankInfo, RouteQuery, to_python_json};

use super::{BootstrapError, MAX_PARALLEL_SIZE};

/// The most bytes a client reads from one answer.
const MAX_ANSWER: u64 = 64 << 10;

/// A blocking client for one bootstrap server (`host:port`).
#[derive(Debug, Clone)]
pub struct BootstrapClient {
    pub(super) base: String,
    pub(super) agent: ureq::Agent,
    /// Sent with registrations in [`super::TOKEN_HEADER`].
    token: Option<String>,
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
            token: None,
        }
    }

    /// Sends `token` with registrations (a server started with
    /// [`BootstrapServer::start_with_token`](super::BootstrapServer::start_with_token) takes
    /// no other).
    #[must_use]
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub(super) fn get(&self, path: &str) -> Result<(u16, String), BootstrapError> {
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
        self.register_body(&to_python_json(reg))
    }

    /// `PUT /route` with a registration body already written (one that every release's server
    /// reads, `nixl_wire::http::v2x::PrefillRegistration::body_for_every_release`).
    pub fn register_body(&self, body: &str) -> Result<(), BootstrapError> {
        let url = format!("{}/route", self.base);
        let err = |reason: String| BootstrapError::Request {
            url: url.clone(),
            reason,
        };
        let mut put = self
            .agent
            .put(&url)
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token {
            put = put.header(super::TOKEN_HEADER, t.as_str());
        }
        let resp = put.send(body.as_bytes()).map_err(|e| err(e.to_string()))?;
        match resp.status().as_u16() {
            200 => Ok(()),
            409 => Err(BootstrapError::Conflict { url }),
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

    /// A 0.5.2x server's parallel info (`PrefillServerInfo`, docs/protocol.md §10.7); a
    /// server still waiting for ranks answers 503, an error here.
    pub fn server_info(&self) -> Result<nixl_wire::http::v2x::PrefillServerInfo, BootstrapError> {
        let q = nixl_wire::http::v2x::RouteQuery::PARALLEL_INFO;
        self.get_json(&format!("/route?{}", q.to_query_string()))
    }

    /// Where TP rank `tp_rank` of DP group `dp_group` listens, asked as 0.5.2x decodes ask
    /// (context and pipeline rank 0).
    pub fn rank_info_v2x(&self, tp_rank: u32, dp_group: u32) -> Result<RankInfo, BootstrapError> {
        let q = nixl_wire::http::v2x::RouteQuery {
            prefill_dp_rank: i64::from(dp_group),
            prefill_cp_rank: 0,
            target_tp_rank: i64::from(tp_rank),
            target_pp_rank: 0,
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
