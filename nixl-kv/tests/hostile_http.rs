//! Hostile HTTP clients against the bootstrap server (issue items D4, D5, D11, D12) and a
//! hostile bootstrap server against the client (D18), over raw TCP from `std::net`.
#![allow(clippy::unwrap_used, reason = "test code")]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nixl_kv::net::bootstrap::{BootstrapClient, BootstrapServer, Health, ServerLimits};
use nixl_wire::http::PrefillRegistration;

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// `GET /health` on a fresh connection, answered 200 within `within`.
fn assert_health_within(addr: SocketAddr, within: Duration) {
    let t = Instant::now();
    let c = BootstrapClient::new(&addr.to_string(), within);
    assert_eq!(c.health(), Health::Up, "after {:?}", t.elapsed());
    assert!(t.elapsed() <= within, "health took {:?}", t.elapsed());
}

/// Reads a response head (through the blank line) and returns it.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            Ok(_) => break,
            Err(e) => panic!("reading a response: {e} (so far {head:?})"),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads a whole `Content-Length` response: (status, body).
fn read_response(s: &mut TcpStream) -> (u16, String) {
    let head = read_head(s);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// The server answers with an error status or closes the connection, within the read timeout.
fn assert_refused(s: &mut TcpStream, statuses: &[u16]) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&b[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server neither answered nor closed the connection")
            }
            Err(_) => break,
        }
    }
    if !buf.is_empty() {
        let head = String::from_utf8_lossy(&buf);
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!(statuses.contains(&status), "unexpected answer {head:?}");
    }
}

fn reg(rank: u32, port: u16) -> PrefillRegistration {
    PrefillRegistration {
        role: "Prefill".into(),
        tp_size: 2,
        dp_size: 1,
        rank_ip: "127.0.0.1".into(),
        rank_port: port,
        engine_rank: rank,
    }
}

/// D4: one stalled request body (and one stalled `Expect: 100-continue`) used to block the
/// server's only request thread.
#[test]
fn a_stalled_body_does_not_block_other_requests() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let addr = server.addr();
    let mut stalled = connect(addr);
    stalled
        .write_all(
            b"PUT /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100000\r\n\r\n{",
        )
        .unwrap();
    let mut expecting = connect(addr);
    expecting
        .write_all(
            b"PUT /route HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
              Content-Length: 100\r\n\r\n",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        assert_health_within(addr, Duration::from_secs(1));
    }
    // A registration on another connection goes through meanwhile.
    let c = BootstrapClient::new(&addr.to_string(), Duration::from_secs(1));
    c.register(&reg(0, 1)).unwrap();
    assert_eq!(c.rank_info(0, 0).unwrap().rank_port, 1);
    drop((stalled, expecting));
}

#[test]
fn a_stalled_body_times_out_with_408() {
    let limits = {
        let mut l = ServerLimits::default();
        l.body_timeout = Duration::from_millis(300);
        l
    };
    let server = BootstrapServer::start_with_limits("127.0.0.1:0", limits).unwrap();
    let mut s = connect(server.addr());
    s.write_all(b"PUT /route HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"role\"")
        .unwrap();
    let t = Instant::now();
    let (status, _) = read_response(&mut s);
    assert_eq!(status, 408);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn expect_100_continue_is_answered() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let body = r#"{"role": "Prefill", "tp_size": 1, "dp_size": 1, "rank_ip": "127.0.0.1", "rank_port": 41943, "engine_rank": 0}"#;
    let mut s = connect(server.addr());
    write!(
        s,
        "PUT /route HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 100"), "{head:?}");
    s.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s), (200, "OK".into()));
    // The same connection serves the next request.
    s.write_all(b"GET /route?engine_rank=0&target_dp_group=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_response(&mut s),
        (
            200,
            r#"{"rank_ip": "127.0.0.1", "rank_port": 41943}"#.into()
        )
    );
}

/// D5: connections beyond the cap are closed, and once they go the server answers again.
#[test]
fn idle_connections_beyond_the_cap_are_closed_and_service_resumes() {
    let limits = {
        let mut l = ServerLimits::default();
        l.max_connections = 8;
        l
    };
    let server = BootstrapServer::start_with_limits("127.0.0.1:0", limits).unwrap();
    let addr = server.addr();
    let idle: Vec<TcpStream> = (0..8).map(|_| connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(100));
    // Beyond the cap: closed at once (EOF), not left hanging.
    let mut extra: Vec<TcpStream> = (0..40).map(|_| connect(addr)).collect();
    for s in &mut extra {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap_or(());
        assert_refused(s, &[]);
    }
    drop(idle);
    drop(extra);
    let t = Instant::now();
    loop {
        let c = BootstrapClient::new(&addr.to_string(), Duration::from_millis(500));
        if c.health() == Health::Up {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the server did not come back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_keep_alive_connections_are_closed_at_the_head_timeout() {
    let limits = {
        let mut l = ServerLimits::default();
        l.head_timeout = Duration::from_millis(300);
        l
    };
    let server = BootstrapServer::start_with_limits("127.0.0.1:0", limits).unwrap();
    // Silent from the start, and slowloris (a head that never ends).
    let mut silent = connect(server.addr());
    let mut slow = connect(server.addr());
    slow.write_all(b"GET /health HTTP/1.1\r\nX-A: ").unwrap();
    let t = Instant::now();
    assert_refused(&mut silent, &[408]);
    assert_refused(&mut slow, &[408]);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// D11: heads beyond the limit are refused before they are read whole (the old server read a
/// 300 MB header into memory).
#[test]
fn oversized_heads_and_bodies_are_refused() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let addr = server.addr();
    // A 64 KiB header that has not ended yet: refused without waiting for its end.
    let mut s = connect(addr);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        .unwrap();
    s.write_all(&vec![b'a'; 64 << 10]).unwrap_or(());
    assert_refused(&mut s, &[431, 400]);
    // A 64 KiB URL.
    let mut s = connect(addr);
    let url = format!("/route?engine_rank=0&x={}", "b".repeat(64 << 10));
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap_or(());
    assert_refused(&mut s, &[431, 414, 400]);
    // Thousands of small headers.
    let mut s = connect(addr);
    let mut req = String::from("GET /health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..2000 {
        req.push_str(&format!("X-{i}: y\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap_or(());
    assert_refused(&mut s, &[431, 400]);
    // A body announced larger than the limit: 413 at once, nothing read.
    let mut s = connect(addr);
    s.write_all(b"PUT /route HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).0, 413);
    // A chunked body that grows past the limit.
    let mut s = connect(addr);
    s.write_all(b"PUT /route HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 32 << 10, "c".repeat(32 << 10));
    for _ in 0..3 {
        s.write_all(chunk.as_bytes()).unwrap_or(());
    }
    assert_refused(&mut s, &[413]);
    assert_health_within(addr, Duration::from_secs(1));
}

/// D12: a live rank's registration cannot be replaced from elsewhere; a dead one can.
#[test]
fn a_live_registration_cannot_be_replaced() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let c = BootstrapClient::new(&server.addr().to_string(), Duration::from_secs(5));
    // The genuine prefill rank 1: its ZMQ port accepts connections.
    let genuine = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = genuine.local_addr().unwrap().port();
    c.register(&reg(1, port)).unwrap();
    // Re-registering the same address is fine.
    c.register(&reg(1, port)).unwrap();
    // Someone else claims rank 1 elsewhere: refused, the entry stays.
    let attacker = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = attacker.local_addr().unwrap().port();
    let err = c.register(&reg(1, other)).unwrap_err().to_string();
    assert!(err.contains("409"), "{err}");
    assert_eq!(c.rank_info(1, 0).unwrap().rank_port, port);
    // The same as raw HTTP: status 409 and a plain-text body.
    let mut s = connect(server.addr());
    let body = format!(
        r#"{{"role": "Prefill", "tp_size": 2, "dp_size": 1, "rank_ip": "127.0.0.1", "rank_port": {other}, "engine_rank": 1}}"#
    );
    write!(
        s,
        "PUT /route HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    assert_eq!(
        read_response(&mut s),
        (409, "Rank already registered".into())
    );
    assert_eq!(c.rank_info(1, 0).unwrap().rank_port, port);
    // The genuine rank goes away (it restarts elsewhere): the new address is taken.
    drop(genuine);
    c.register(&reg(1, other)).unwrap();
    assert_eq!(c.rank_info(1, 0).unwrap().rank_port, other);
    // Other ranks are unaffected, and the sizes stay those of the first registration.
    c.register(&PrefillRegistration {
        tp_size: 64,
        ..reg(0, 7)
    })
    .unwrap();
    let info = c.parallel_info().unwrap();
    assert_eq!(
        (info.prefill_tp_size, info.prefill_dp_size),
        (Some(2), Some(1))
    );
}

/// A one-shot HTTP server answering every connection with `body` (status 200, JSON).
fn fake_server(body: String) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body.as_bytes());
        }
    });
    (addr, t)
}

/// D18: parallel sizes from a server are bounded before the decode sizes anything by them.
#[test]
fn absurd_parallel_sizes_from_a_server_are_errors() {
    for body in [
        r#"{"prefill_tp_size": 4294967295, "prefill_dp_size": 1}"#,
        r#"{"prefill_tp_size": 8, "prefill_dp_size": 65537}"#,
        r#"{"prefill_tp_size": 0, "prefill_dp_size": 1}"#,
    ] {
        let (addr, t) = fake_server(body.into());
        let c = BootstrapClient::new(&addr.to_string(), Duration::from_secs(5));
        let err = c.parallel_info().unwrap_err().to_string();
        assert!(err.contains("outside"), "{body}: {err}");
        t.join().unwrap();
    }
    let (addr, t) = fake_server(r#"{"prefill_tp_size": 65536, "prefill_dp_size": 8}"#.into());
    let c = BootstrapClient::new(&addr.to_string(), Duration::from_secs(5));
    assert_eq!(c.parallel_info().unwrap().prefill_tp_size, Some(65536));
    t.join().unwrap();
    // An answer far larger than any bootstrap body is not read whole.
    let (addr, t) = fake_server(format!(
        r#"{{"rank_ip": "{}", "rank_port": 1}}"#,
        "1".repeat(1 << 20)
    ));
    let c = BootstrapClient::new(&addr.to_string(), Duration::from_secs(5));
    assert!(c.rank_info(0, 0).is_err());
    t.join().unwrap();
}
