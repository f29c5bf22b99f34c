//! Descriptor exhaustion (issue item D5): with the process's `RLIMIT_NOFILE` lowered (by
//! `prlimit`, on this test process only: this file holds one test so that nothing else shares
//! the limit), idle connections use up every descriptor, so the bootstrap server's and the
//! ZMQ listener's `accept` fail with `EMFILE`. Neither may panic or stop accepting: once the
//! connections close, both serve again.
#![allow(clippy::unwrap_used, reason = "test code")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nixl_kv::net::bootstrap::{BootstrapClient, BootstrapServer, Health};
use nixl_kv::net::zmtp::{PullLimits, PullListener};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Lowers this process's soft descriptor limit.
fn limit_fds(soft: usize) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={soft}:"))
        .output()
        .expect("prlimit (util-linux) is needed for this test");
    assert!(out.status.success(), "prlimit: {out:?}");
}

/// Connects until the process is out of descriptors (the servers' accepts then fail too).
fn exhaust(addr: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..4096 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    held
}

fn zmtp_message(port: u16, payload: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    s.write_all(&g)?;
    let mut ready = vec![0x04, 26, 5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&[0, 0, 0, 4]);
    ready.extend_from_slice(b"PUSH");
    s.write_all(&ready)?;
    let mut theirs = [0u8; 64 + 28];
    s.read_exact(&mut theirs)?;
    s.write_all(&[0x00, u8::try_from(payload.len()).unwrap()])?;
    s.write_all(payload)?;
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

#[test]
fn descriptor_exhaustion_degrades_and_recovers() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let (tx, rx) = mpsc::channel();
    let pull = PullListener::bind("tcp://127.0.0.1:0", PullLimits::default(), move |m| {
        let _ = tx.send(m);
    })
    .unwrap();
    let http = server.addr();
    let zmq = pull.local_addr();
    limit_fds(open_fds() + 96);

    for (round, target) in [http, zmq, http, zmq].into_iter().enumerate() {
        let held = exhaust(target);
        assert!(!held.is_empty());
        // Let both accept loops run into EMFILE for a while.
        std::thread::sleep(Duration::from_millis(500));
        drop(held);

        let t = Instant::now();
        loop {
            let c = BootstrapClient::new(&http.to_string(), Duration::from_millis(500));
            if c.health() == Health::Up {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "round {round}: the bootstrap server did not come back"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let t = Instant::now();
        loop {
            if zmtp_message(zmq.port(), b"back").is_ok()
                && let Ok(m) = rx.recv_timeout(Duration::from_millis(500))
            {
                assert_eq!(m, vec![&b"back"[..]]);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "round {round}: the ZMQ listener did not come back"
            );
        }
    }
}
