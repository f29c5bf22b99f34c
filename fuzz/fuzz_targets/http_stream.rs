//! Fuzzes the bootstrap server with raw HTTP: `nixl_kv::net::bootstrap::serve_stream` runs exactly
//! the server's per-connection code (hyper with the head, body and timeout limits, the routes,
//! the registration rule) over an in-memory duplex stream, on a current-thread runtime with
//! paused time, so that stalled heads and bodies hit their timeouts at once instead of in
//! seconds. Nothing may panic or hang; the table must stay consistent and bounded; every
//! stored rank must come back from `GET /route` as the same value (Python-style JSON); the
//! answers must start as an HTTP/1.x response and carry no 5xx status other than 503.
//!
//! Input: byte 0: bit 0 whether the client closes its sending half after the bytes (else it
//! stalls and the server's timeouts end the connection), bit 1 whether a registered rank
//! counts as alive (a conflicting PUT gets 409) or dead (it replaces the entry), bits 2..8 the
//! write size (1..=64 bytes a write, each write followed by a yield); the rest is the request
//! stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_kv::net::bootstrap::{ServerLimits, serve_stream};
use nixl_wire::http::{RankInfo, to_python_json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    let close = knobs & 0x01 != 0;
    let alive = knobs & 0x02 != 0;
    let step = usize::from(knobs >> 2) + 1;
    let limits = ServerLimits::default();
    let max_entries = limits.max_entries;
    let (client, server) = tokio::io::duplex(64 << 10);
    let (mut rd, mut wr) = tokio::io::split(client);
    let (table, answers) = RT.with(|rt| {
        rt.block_on(async {
            let serve = serve_stream(server, limits, alive);
            let write = async move {
                for chunk in stream.chunks(step) {
                    if wr.write_all(chunk).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                if close {
                    let _ = wr.shutdown().await;
                }
                // Else hold the sending half open until the server gives up on us.
                std::future::pending::<()>().await;
            };
            let read = async move {
                let mut answers = Vec::new();
                let _ = rd.read_to_end(&mut answers).await;
                answers
            };
            let done = async { tokio::join!(serve, read) };
            tokio::select! {
                out = done => out,
                () = write => unreachable!("the writer never ends first"),
            }
        })
    });
    assert_eq!(table.entries, table.ranks.len());
    assert!(table.entries <= max_entries);
    assert_eq!(table.tp_size.is_some(), table.dp_size.is_some());
    for (_, _, info) in &table.ranks {
        let json = to_python_json(info);
        let back: RankInfo = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("GET /route answer {json:?} does not parse: {e}"));
        assert_eq!(&back, info, "GET /route answer {json:?}");
    }
    let http = |w: &[u8]| w.starts_with(b"HTTP/1.1 ") || w.starts_with(b"HTTP/1.0 ");
    if !answers.is_empty() {
        assert!(http(&answers), "{:?}", String::from_utf8_lossy(&answers));
    }
    for w in answers.windows(12) {
        if http(w) && w[9] == b'5' {
            assert_eq!(&w[9..12], b"503", "{:?}", String::from_utf8_lossy(&answers));
        }
    }
});
