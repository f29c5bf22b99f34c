//! A rank that has not registered yet cannot be squatted (issue 23 R10): a bootstrap server
//! started with a token takes registrations only with it, so a stranger's `PUT /route` gets
//! 403 and the real rank then registers; without a token, a live squatter makes the real
//! rank's registration fail with the conflict named, after its retries.

#![allow(clippy::unwrap_used, reason = "test code")]

#[cfg(feature = "nixl-runtime-tests")]
mod common;

use std::net::TcpListener;
use std::time::Duration;

use nixl_kv::BootstrapServer;
use nixl_kv::net::bootstrap::{BootstrapClient, BootstrapError};
use nixl_wire::http::PrefillRegistration;

const TOKEN: &str = "a-secret-the-first-rank-hands-out";

fn reg(port: u16) -> PrefillRegistration {
    PrefillRegistration {
        role: "Prefill".into(),
        tp_size: 2,
        dp_size: 1,
        rank_ip: "127.0.0.1".into(),
        rank_port: port,
        engine_rank: 1,
    }
}

fn client(server: &BootstrapServer, token: Option<&str>) -> BootstrapClient {
    BootstrapClient::new(&server.addr().to_string(), Duration::from_secs(5))
        .with_token(token.map(str::to_owned))
}

#[test]
fn with_a_token_strangers_cannot_register_a_rank_first() {
    let server = BootstrapServer::start_with_token("127.0.0.1:0", TOKEN).unwrap();
    // The squatter's address is alive: without the token rule it would keep the rank.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    for token in [
        None,
        Some("wrong"),
        Some("a-secret-the-first-rank-hands-ouT"),
    ] {
        let err = client(&server, token).register(&reg(port)).unwrap_err();
        assert!(err.to_string().contains("403"), "{token:?}: {err}");
    }
    let info = client(&server, None).parallel_info().unwrap();
    assert_eq!(
        info.prefill_tp_size, None,
        "a refused PUT registered something"
    );
    // The real rank, with the token.
    let real = TcpListener::bind("127.0.0.1:0").unwrap();
    let real_port = real.local_addr().unwrap().port();
    client(&server, Some(TOKEN))
        .register(&reg(real_port))
        .unwrap();
    assert_eq!(
        client(&server, None).rank_info(1, 0).unwrap().rank_port,
        real_port
    );
}

#[test]
fn without_a_token_a_live_squatter_is_a_named_conflict() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    client(&server, None).register(&reg(port)).unwrap();
    let real = TcpListener::bind("127.0.0.1:0").unwrap();
    let err = client(&server, None)
        .register(&reg(real.local_addr().unwrap().port()))
        .unwrap_err();
    assert!(matches!(err, BootstrapError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("already registered"), "{err}");
}

/// Our prefill manager sends the token it is configured with (NIXL_RS_BOOTSTRAP_TOKEN by
/// default) and registers where a stranger could not.
#[cfg(feature = "nixl-runtime-tests")]
#[test]
fn our_prefill_registers_with_its_token() {
    let server = BootstrapServer::start_with_token("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.addr().to_string();
    let config = nixl_kv::ManagerConfig::default().bootstrap_token(Some(TOKEN.into()));
    let p = common::prefill(&addr, 2, 16, 4096, config);
    let info = client(&server, None).rank_info(0, 0).unwrap();
    assert_eq!(info.rank_port, p.mgr.rank_port());
}
