//! Log lines a peer can cause are bounded (issue 23 R8: 2 MB of junk wrote 187 MB of WARN
//! lines). A flood of malformed messages, registrations with unloadable metadata and
//! conflicting transfer infos reaches a prefill over one connection; every message is handled
//! (a marker info behind them is applied), and the warnings written stay within the budgets.
//! Needs the NIXL runtime.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{prefill, reach, registration, send_messages, server};
use nixl_kv::{KvPoll, KvSender, ManagerConfig, RoomId};

/// Lines written by the engine's `tracing` events at WARN and above.
static LINES: AtomicUsize = AtomicUsize::new(0);

struct Counting;

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LINES.fetch_add(
            buf.iter().filter(|&&b| b == b'\n').count(),
            Ordering::SeqCst,
        );
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const JUNK: usize = 3000;
const BAD_AGENTS: usize = 300;
const CONFLICTS: usize = 300;

#[test]
fn a_flood_of_bad_messages_writes_a_bounded_number_of_warnings() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(|| Counting)
        .init();
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 4096, ManagerConfig::default());
    let marker = RoomId::new(77);
    let mut tx = KvSender::new(&p.mgr, marker).unwrap();
    let info = |room: u64, agent: &str| {
        nixl_wire::TransferInfo {
            room: RoomId::new(room),
            local_ip: "127.0.0.1".into(),
            rank_port: 1,
            agent: nixl_wire::AgentName::new(agent).unwrap(),
            dst_pages: vec![nixl_wire::PageIndex::new(0)],
            dst_aux_index: 0,
            required_dst_info_num: 1,
            trailing: Vec::new(),
        }
        .encode()
    };
    let mut msgs: Vec<Vec<Bytes>> = (0..JUNK)
        .map(|i| vec![Bytes::from(vec![(i % 251) as u8, 0xff])])
        .collect();
    msgs.extend((0..BAD_AGENTS).map(|i| registration(&format!("r8-bad-{i}"), b"not metadata")));
    // One room claimed by a first agent; every other agent's info for it conflicts.
    msgs.extend((0..=CONFLICTS).map(|i| info(5, &format!("r8-claim-{i}"))));
    msgs.push(info(marker.get(), "r8-marker"));
    send_messages(&format!("tcp://127.0.0.1:{}", p.mgr.rank_port()), msgs);
    assert_eq!(
        reach(Duration::from_secs(60), KvPoll::WaitingForInput, || tx
            .poll()),
        KvPoll::WaitingForInput,
        "the prefill never handled the flood"
    );
    let lines = LINES.load(Ordering::SeqCst);
    let flood = JUNK + BAD_AGENTS + CONFLICTS;
    assert!(
        lines <= 200,
        "{lines} warning lines for {flood} bad messages (about one each without budgets)"
    );
}
