//! Our PUSH client against a pyzmq (libzmq) PULL socket, as SGLang's Python prefill binds it:
//! short, long and empty frames arrive intact, and with ZMTP heartbeats on the PULL side our
//! `PONG`s keep the one connection alive. Needs the peer venv (`cargo xtask prereq`), which
//! the runtime tests' prerequisites provide.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use nixl_kv::net::zmtp::{PushClient, PushLimits};

/// Binds a PULL with heartbeats every 100 ms (1 s timeout), prints its port, then for each of
/// `n` messages its frame lengths and byte sums, then how many connections it accepted and
/// lost.
const PULL: &str = r#"
import json, sys, zmq
from zmq.utils.monitor import recv_monitor_message
n = int(sys.argv[1])
ctx = zmq.Context()
s = ctx.socket(zmq.PULL)
s.setsockopt(zmq.HEARTBEAT_IVL, 100)
s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)
mon = s.get_monitor_socket()
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
for _ in range(n):
    m = s.recv_multipart()
    print(json.dumps([[len(f), sum(f)] for f in m]), flush=True)
events = {"accepted": 0, "disconnected": 0}
while mon.poll(100):
    e = recv_monitor_message(mon)["event"]
    if e == zmq.EVENT_ACCEPTED:
        events["accepted"] += 1
    if e == zmq.EVENT_DISCONNECTED:
        events["disconnected"] += 1
print(json.dumps(events), flush=True)
"#;

/// Kills the Python peer if the test fails before it exits.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> PathBuf {
    std::env::var_os("NIXL_KV_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-peer-venv"))
        .join("bin/python")
}

fn summary(frames: &[Bytes]) -> String {
    let parts: Vec<String> = frames
        .iter()
        .map(|f| {
            format!(
                "[{}, {}]",
                f.len(),
                f.iter().map(|&b| u64::from(b)).sum::<u64>()
            )
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

#[test]
fn a_pyzmq_pull_receives_our_messages_and_keeps_the_connection_through_heartbeats() {
    let messages = [
        vec![
            Bytes::from_static(b"NixlMsgGuard"),
            Bytes::from_static(b"None"),
            Bytes::new(),
            Bytes::from(vec![7u8; 255]),
            Bytes::from(vec![9u8; 256]),
        ],
        vec![Bytes::from(
            (0..200_000u32).map(|i| i as u8).collect::<Vec<u8>>(),
        )],
        vec![Bytes::from_static(b"last")],
    ];
    let mut child = Reap(
        Command::new(python())
            .args(["-c", PULL, &messages.len().to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let push = PushClient::start(PushLimits::default()).unwrap();
    for (i, m) in messages.iter().enumerate() {
        push.send(&endpoint, m.clone()).unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), summary(m));
        if i == 0 {
            // Several heartbeat timeouts: without PONGs libzmq would drop the connection.
            std::thread::sleep(Duration::from_millis(2500));
        }
    }
    let events = lines.next().unwrap().unwrap();
    assert_eq!(events, r#"{"accepted": 1, "disconnected": 0}"#);
    assert!(child.0.wait().unwrap().success());
}
