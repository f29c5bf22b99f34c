//! SGLang's bootstrap HTTP server ([`BootstrapServer`]) and its client ([`BootstrapClient`]).
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
//! A rank that has not registered yet (a `--join` rank starting, a rank that died) can still be
//! taken by whoever registers it first. A server started with a token
//! ([`BootstrapServer::start_with_token`]; `nixl-pd` and the Python wheel do it when
//! `NIXL_RS_BOOTSTRAP_TOKEN` is set) takes a `PUT /route` only with the token in the
//! [`TOKEN_HEADER`] header and answers 403 otherwise; our prefills send
//! [`ManagerConfig::bootstrap_token`](crate::ManagerConfig::bootstrap_token). A prefill whose
//! registration gets 409 tries three more times over 3 s (its own previous process may still
//! hold the old socket), then fails with [`BootstrapError::Conflict`].
//!
//! # The client
//!
//! ureq, with a timeout per request and a bound on the bytes read from a server. Parallel
//! sizes outside `1..=`[`MAX_PARALLEL_SIZE`] are refused as errors: the decode sizes its
//! targeting from them.

mod client;
mod server;

pub use client::{BootstrapClient, Health};
pub use server::{BootstrapServer, ServerLimits, TOKEN_HEADER, TableSnapshot, serve_stream};

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
    /// `PUT /route` answered 409: the rank is registered from another address that still
    /// answers.
    #[error(
        "bootstrap {url}: the rank is already registered from another address that still answers (409)"
    )]
    Conflict {
        /// The URL.
        url: String,
    },
}

/// The largest TP or DP size a client accepts from a server (the decode core's own bound).
pub use crate::proto::decode::MAX_PARALLEL_SIZE;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nixl_wire::http::{ParallelInfo, PrefillRegistration};

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
