//! Descriptors and decode metadata (issue item D6): UCX leaves one socket open in a worker for
//! every endpoint it tried to create, also when the creation failed (metadata naming a worker
//! that is gone) or the metadata was invalidated since, until the worker is destroyed. A
//! prefill flooded with registrations carrying such metadata must keep its open descriptors
//! bounded, and still serve a genuine decode afterwards. One test in this file, because it
//! counts the descriptors of its whole process.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{decode, exchange, prefill, reach, server};
use nixl_kv::{KvPoll, KvSender, ManagerConfig, RoomId};
use nixl_wire::{AgentName, GpuId, KvArgsRegister, PageIndex, TransferInfo};

const T: Duration = Duration::from_secs(30);

/// Registrations per flood.
const FLOOD: usize = 200;

/// How many more descriptors the prefill's process may hold after a flood than before it: a
/// probe agent's own (about a dozen) and one socket per load into it (16 at most) with room to
/// spare, far below one per registration.
const BOUND: usize = 48;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn registration(name: &str, metadata: &[u8]) -> Vec<Bytes> {
    KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: AgentName::new(name).unwrap(),
        metadata: Bytes::copy_from_slice(metadata),
        kv_ptrs: vec![0, 0],
        aux_ptrs: vec![0; 6],
        gpu_id: GpuId::new(0),
        tp_info: None,
        trailing: Vec::new(),
    }
    .encode()
}

/// Sends `FLOOD` registrations named `{prefix}-{i}` carrying `metadata`, then an info for a
/// fresh room, all over one connection, so that once the prefill applied the info it has
/// handled every registration (loaded or refused its metadata).
fn flood(p: &nixl_kv::KvManager, prefix: &str, metadata: &[u8], room: u64) {
    use zeromq::{Socket, SocketSend};
    let room = RoomId::new(room);
    let mut tx = KvSender::new(p, room).unwrap();
    let mut msgs: Vec<Vec<Bytes>> = (0..FLOOD)
        .map(|i| registration(&format!("{prefix}-{i}"), metadata))
        .collect();
    msgs.push(
        TransferInfo {
            room,
            local_ip: "127.0.0.1".into(),
            rank_port: 1,
            agent: AgentName::new(&format!("{prefix}-marker")).unwrap(),
            dst_pages: vec![PageIndex::new(0)],
            dst_aux_index: 0,
            required_dst_info_num: 1,
            trailing: Vec::new(),
        }
        .encode(),
    );
    let endpoint = format!("tcp://127.0.0.1:{}", p.rank_port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = zeromq::PushSocket::new();
        s.connect(&endpoint).await.unwrap();
        for m in msgs {
            s.send(zeromq::ZmqMessage::try_from(m).unwrap())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    drop(rt);
    assert_eq!(
        reach(T, KvPoll::WaitingForInput, || tx.poll()),
        KvPoll::WaitingForInput,
        "{prefix}: the prefill never applied the flood"
    );
}

#[test]
fn registrations_with_unloadable_metadata_leave_descriptors_bounded() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d1 = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d1.mgr, &addr, 1, &[2], &[1], 0);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    // Metadata of an agent that is gone: its worker's sockets are closed, so loading it fails.
    let dead = common::agent();
    let gone = dead.local_metadata().unwrap().into_bytes();
    drop(dead);
    // A live agent no registration names: its metadata loads, under its own name.
    let live = common::agent();
    let other = live.local_metadata().unwrap().into_bytes();

    let before = open_fds();
    flood(&p.mgr, "forged", &gone, 2);
    let after = open_fds();
    assert!(
        after < before + BOUND,
        "{FLOOD} failed metadata loads: open descriptors {before} -> {after}"
    );

    // Each of these loads, names `live`, and is refused; the live agent closes its side of the
    // connections once it is progressed and their other ends are closed.
    flood(&p.mgr, "misnamed", &other, 3);
    let start = Instant::now();
    let mut notifs = Vec::new();
    let settled = loop {
        live.drain_notifications(&mut notifs).unwrap();
        let n = open_fds();
        if n < before + BOUND || start.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        settled < before + BOUND,
        "{FLOOD} metadata loads naming another agent: open descriptors {before} -> {settled}"
    );
    assert_eq!(
        p.mgr.table_sizes().peers,
        1,
        "no flooded name is registered"
    );

    // A genuine decode registers and is served, and so is the first one still.
    let d2 = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d2.mgr, &addr, 4, &[3], &[5], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d1.mgr, &addr, 5, &[4], &[6], 2);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    assert_eq!(p.mgr.table_sizes().peers, 2);
}
