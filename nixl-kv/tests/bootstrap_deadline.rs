//! A bootstrap server that names 1024 prefill ranks and answers each lookup slowly (each well
//! inside the HTTP timeout) must not hold a receiver's construction for the sum of them: the
//! whole bootstrap has a deadline, after which the room fails with the reason (needs the NIXL
//! runtime for the decode manager).
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::decode;
use nixl_kv::{FailureReason, KvPoll, KvReceiver, ManagerConfig, RoomId};

/// How long the fake server takes per rank answer: the slow server is the scenario, not a
/// wait of the test. 1024 of them would take 102 s.
const PER_ANSWER: Duration = Duration::from_millis(100);
const DEADLINE: Duration = Duration::from_secs(1);

/// Answers SGLang 0.5.1's parallel-info query at once with TP 1024, and every rank lookup
/// after [`PER_ANSWER`]; counts the rank lookups.
fn slow_server() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let lookups = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&lookups);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || serve(s, &seen));
        }
    });
    (addr, lookups)
}

fn serve(s: TcpStream, lookups: &AtomicUsize) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut out = s;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let body = if request.contains("engine_rank=-1") {
            r#"{"prefill_tp_size":1024,"prefill_dp_size":1}"#.to_owned()
        } else if request.contains("engine_rank=") {
            lookups.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(PER_ANSWER);
            r#"{"rank_ip":"127.0.0.1","rank_port":9}"#.to_owned()
        } else {
            "not found".to_owned()
        };
        let status = if body == "not found" {
            "404 Not Found"
        } else {
            "200 OK"
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if out
            .write_all(head.as_bytes())
            .and_then(|()| out.write_all(body.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn a_receiver_bootstrap_has_a_deadline_whatever_the_rank_count() {
    let (addr, lookups) = slow_server();
    // Head slicing lets a decode of TP 1 target all 1024 ranks of the prefill.
    let config = ManagerConfig::default()
        .sliced_tp(true)
        .http_timeout(Duration::from_secs(2))
        .bootstrap_deadline(DEADLINE);
    let d = decode(2, 16, 4096, config);
    let t = Instant::now();
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(5), None).unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the bootstrap held the caller {took:?} for 1024 slow ranks"
    );
    let asked = lookups.load(Ordering::SeqCst);
    assert!(asked > 0 && asked < 1024, "{asked} rank lookups");
    assert_eq!(rx.poll(), KvPoll::Failed);
    match rx.failure() {
        Some(FailureReason::Bootstrap { reason, .. }) => {
            assert!(reason.contains("deadline"), "{reason}");
        }
        other => panic!("failed with {other:?}"),
    }
}
