//! A Rust prefill and a Rust decode in one process: bootstrap HTTP, ZeroMQ and real NIXL
//! transfers over UCX (needs the NIXL runtime).
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::Duration;

use common::{AUX_ITEMS, Side, both, decode, exchange, prefill, reach, server, until};
use nixl_core::{HostBuffer, Registered};
use nixl_kv::{KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId};

const T: Duration = Duration::from_secs(30);

#[test]
fn chunked_request_lands_byte_for_byte() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 4, 64, 4096, ManagerConfig::default());
    let d = decode(4, 64, 4096, ManagerConfig::default());
    let room = RoomId::new(8_181_933_191_833_708_945);
    let src_pages: Vec<u32> = vec![3, 4, 5, 9, 10, 11, 40, 2];
    let dst_pages: Vec<u32> = vec![7, 8, 20, 21, 22, 50, 51, 0];

    let mut rx = KvReceiver::new(&d.mgr, &addr, room, None).unwrap();
    let mut tx = KvSender::new(&p.mgr, room).unwrap();
    assert_eq!(rx.poll(), KvPoll::WaitingForInput);
    rx.init(&dst_pages, 3);
    assert_eq!(
        reach(T, KvPoll::WaitingForInput, || tx.poll()),
        KvPoll::WaitingForInput,
        "prefill should see the decode's info"
    );
    tx.init(dst_pages.len() as u32, 5);
    // Two chunks: 5 pages, then 3.
    tx.send(&src_pages[..5]);
    tx.send(&src_pages[5..]);
    let states = both(T, &mut tx, &mut rx);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{:?} {:?}",
        tx.failure(),
        rx.failure()
    );

    for b in 0..4 {
        let src = p.kv[b].buffer().as_slice();
        let dst = d.kv[b].buffer().as_slice();
        for (s, t) in src_pages.iter().zip(&dst_pages) {
            let (s, t) = (*s as usize * 4096, *t as usize * 4096);
            assert_eq!(&dst[t..t + 4096], &src[s..s + 4096], "buffer {b} page {t}");
        }
    }
    // Both sides have SGLang's six aux buffers: every row goes.
    for (k, aux) in d.aux.iter().enumerate() {
        let item = AUX_ITEMS[k] as usize;
        let row = &aux.buffer().as_slice()[3 * item..4 * item];
        let src = &p.aux[k].buffer().as_slice()[5 * item..6 * item];
        assert_eq!(row, src, "aux buffer {k}");
    }
    drop((tx, rx));
    // Two KV chunks and the aux rows, all made by index from lists prepared once per peer.
    let paths = p.mgr.request_paths();
    assert_eq!((paths.prepared, paths.explicit), (3, 0));
    assert_eq!(p.mgr.table_sizes().prefill_rooms, 0, "prefill rooms freed");
    assert_eq!(d.mgr.table_sizes().decode_rooms, 0, "decode rooms freed");
}

#[test]
fn bad_page_indices_fail_the_room_and_the_decode_hears_it() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(42), None).unwrap();
    let mut tx = KvSender::new(&p.mgr, RoomId::new(42)).unwrap();
    rx.init(&[1, 2], 0);
    assert_eq!(
        reach(T, KvPoll::WaitingForInput, || tx.poll()),
        KvPoll::WaitingForInput
    );
    tx.init(2, 0);
    tx.send(&[1, 999]); // outside the prefill pool
    // Failure push: the decode fails with the prefill's reason instead of waiting.
    assert_eq!(both(T, &mut tx, &mut rx), (KvPoll::Failed, KvPoll::Failed));
    assert!(
        tx.failure().unwrap().to_string().contains("page index 999"),
        "{:?}",
        tx.failure()
    );
    assert!(
        rx.failure().unwrap().to_string().contains("page index 999"),
        "{:?}",
        rx.failure()
    );
}

#[test]
fn decode_with_bad_pages_or_unreachable_bootstrap_fails_cleanly() {
    let bs = server();
    let addr = bs.addr().to_string();
    let _p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(7), None).unwrap();
    rx.init(&[3, 16], 0); // 16 is outside the decode pool
    assert_eq!(rx.poll(), KvPoll::Failed);
    let mut lost = KvReceiver::new(&d.mgr, "127.0.0.1:1", RoomId::new(8), None).unwrap();
    assert_eq!(lost.poll(), KvPoll::Failed);
    assert!(
        lost.failure().unwrap().to_string().contains("127.0.0.1:1"),
        "{:?}",
        lost.failure()
    );
}

#[test]
fn a_dead_prefill_fails_waiting_rooms_within_two_heartbeats() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let cfg = ManagerConfig::default()
        .heartbeat(Duration::from_millis(200), 1)
        .waiting_timeout(None);
    let d = decode(2, 16, 1024, cfg);
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(9), None).unwrap();
    rx.init(&[1], 0);
    assert_eq!(rx.poll(), KvPoll::WaitingForInput);
    // The prefill never sends; its bootstrap server dies.
    drop(bs);
    drop(p);
    let start = std::time::Instant::now();
    assert_eq!(until(T, || rx.poll()), KvPoll::Failed);
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        rx.failure().unwrap().to_string().contains("unreachable"),
        "{:?}",
        rx.failure()
    );
}

#[test]
fn waiting_timeout_fails_a_room_the_prefill_never_serves() {
    let bs = server();
    let addr = bs.addr().to_string();
    let _p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(
        2,
        16,
        1024,
        ManagerConfig::default().waiting_timeout(Some(Duration::from_millis(300))),
    );
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(10), None).unwrap();
    rx.init(&[1], 0);
    assert_eq!(until(T, || rx.poll()), KvPoll::Failed);
    assert!(
        rx.failure().unwrap().to_string().contains("within"),
        "{:?}",
        rx.failure()
    );
}

#[test]
fn malformed_zmq_messages_are_dropped_and_the_listener_keeps_serving() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    // A hostile peer sends garbage to the prefill's PULL socket (through pyzmq-compatible ZMTP).
    let endpoint = format!("tcp://127.0.0.1:{}", p.mgr.rank_port());
    common::send_raw(&endpoint, vec![b"NixlMsgGuard".to_vec(), b"None".to_vec()]);
    common::send_raw(&endpoint, vec![b"garbage".to_vec()]);
    // A real exchange still works afterwards.
    let d = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 11, &[6], &[4], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
}

#[test]
fn thousands_of_rooms_leave_every_table_empty() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 64, 512, ManagerConfig::default());
    let d = decode(2, 64, 512, ManagerConfig::default());
    for room in 0..2000u64 {
        let id = RoomId::new(room);
        let mut rx = KvReceiver::new(&d.mgr, &addr, id, None).unwrap();
        let mut tx = KvSender::new(&p.mgr, id).unwrap();
        let pages = [(room % 60) as u32, (room % 60) as u32 + 1];
        rx.init(&pages, (room % 16) as u32);
        if room % 10 == 9 {
            // Some requests are aborted on the prefill side before sending.
            assert_eq!(
                reach(T, KvPoll::WaitingForInput, || tx.poll()),
                KvPoll::WaitingForInput
            );
            tx.abort("scheduler aborted");
            assert_eq!(
                both(T, &mut tx, &mut rx),
                (KvPoll::Failed, KvPoll::Failed),
                "room {room}"
            );
            continue;
        }
        assert_eq!(
            reach(T, KvPoll::WaitingForInput, || tx.poll()),
            KvPoll::WaitingForInput,
            "room {room}"
        );
        tx.init(2, (room % 16) as u32);
        tx.send(&pages);
        let states = both(T, &mut tx, &mut rx);
        assert_eq!(
            states,
            (KvPoll::Success, KvPoll::Success),
            "room {room}: {:?} {:?}",
            tx.failure(),
            rx.failure()
        );
    }
    assert_eq!(p.mgr.table_sizes().prefill_rooms, 0, "prefill rooms");
    assert_eq!(d.mgr.table_sizes().decode_rooms, 0, "decode rooms");
    assert_eq!(p.mgr.table_sizes().peers, 1, "one registered decode agent");
}

#[test]
fn against_a_seed_bootstrap_server_heartbeats_are_off_and_the_waiting_timeout_applies() {
    let bs = nixl_kv::BootstrapServer::start_seed_compatible("127.0.0.1:0").unwrap();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let cfg = ManagerConfig::default()
        .heartbeat(Duration::from_millis(100), 1)
        .waiting_timeout(Some(Duration::from_millis(800)));
    let d = decode(2, 16, 1024, cfg);
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(12), None).unwrap();
    rx.init(&[1], 0);
    // Several heartbeat rounds hit the 404: the room is not failed for it.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(rx.poll(), KvPoll::WaitingForInput, "{:?}", rx.failure());
    // The prefill never serves the room: the waiting timeout fails it.
    assert_eq!(until(T, || rx.poll()), KvPoll::Failed);
    assert!(
        rx.failure().unwrap().to_string().contains("within"),
        "{:?}",
        rx.failure()
    );
    // A served room still works against the seed-style server.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 13, &[3], &[2], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
}

#[test]
fn a_decode_that_dies_mid_request_fails_the_prefill_room_instead_of_hanging() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(14), None).unwrap();
    let mut tx = KvSender::new(&p.mgr, RoomId::new(14)).unwrap();
    rx.init(&[1, 2], 0);
    assert_eq!(
        reach(T, KvPoll::WaitingForInput, || tx.poll()),
        KvPoll::WaitingForInput
    );
    tx.init(2, 0);
    // The decode goes away (its agent is destroyed) before the prefill sends. Its memory is
    // deregistered but stays mapped until the end of the test: both sides share this process,
    // and a dead decode process's memory would never be ours to free under UCX's feet.
    drop(rx);
    let Side { mgr, kv, aux, .. } = d;
    let kept: Vec<HostBuffer> = kv
        .into_iter()
        .chain(aux)
        .map(Registered::into_inner)
        .collect();
    drop(mgr);
    tx.send(&[1]);
    tx.send(&[2]);
    let state = until(T, || tx.poll());
    assert_eq!(
        state,
        KvPoll::Failed,
        "writes into a destroyed decode must fail"
    );
    assert!(tx.failure().is_some());
    drop(kept);
}

#[test]
fn a_registration_carrying_another_decodes_metadata_does_not_disconnect_it() {
    use nixl_wire::{AgentName, GpuId, KvArgsRegister};

    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    // The real decode registers and completes a room.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 21, &[2], &[1], 0);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    // A hostile peer replays the decode's metadata under another name.
    let evil = KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: AgentName::new("evil").unwrap(),
        metadata: d.mgr.agent().local_metadata().unwrap().into_bytes().into(),
        kv_ptrs: vec![0, 0],
        aux_ptrs: vec![0, 0],
        gpu_id: GpuId::new(0),
        tp_info: None,
        trailing: Vec::new(),
    };
    let endpoint = format!("tcp://127.0.0.1:{}", p.mgr.rank_port());
    let frames = evil.encode().into_iter().map(|b| b.to_vec()).collect();
    common::send_raw(&endpoint, frames);
    std::thread::sleep(Duration::from_millis(200));
    // The real decode still gets its pages.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 22, &[4], &[3], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    assert_eq!(
        p.mgr.table_sizes().peers,
        1,
        "the impostor is not a registered peer"
    );
}

#[test]
fn a_transfer_info_with_huge_indices_fails_its_room_without_sizing_anything() {
    use nixl_wire::{AgentName, PageIndex, TransferInfo};

    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    // The decode registers for real.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 31, &[2], &[1], 0);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    // A spoofed info names that agent with a page index and an aux row near 2^31: once these
    // sized the prefill's descriptor lists (hundreds of GB, an abort).
    let endpoint = format!("tcp://127.0.0.1:{}", p.mgr.rank_port());
    for (room, page, aux) in [(32u64, i32::MAX as u32, 0), (33, 3, i32::MAX as u32)] {
        let info = TransferInfo {
            room: RoomId::new(room),
            local_ip: "127.0.0.1".into(),
            rank_port: 1,
            agent: AgentName::new(d.mgr.agent().name()).unwrap(),
            dst_pages: vec![PageIndex::new(page)],
            dst_aux_index: aux,
            required_dst_info_num: 1,
            trailing: Vec::new(),
        };
        common::send_raw(
            &endpoint,
            info.encode().into_iter().map(|b| b.to_vec()).collect(),
        );
        let id = RoomId::new(room);
        let seen = reach(T, KvPoll::WaitingForInput, || {
            if p.mgr.unclaimed_rooms().iter().any(|u| u.room == id) {
                KvPoll::WaitingForInput
            } else {
                KvPoll::Bootstrapping
            }
        });
        assert_eq!(seen, KvPoll::WaitingForInput, "room {room} never arrived");
        let mut tx = KvSender::new(&p.mgr, id).unwrap();
        tx.init(1, 0);
        tx.send(&[0]);
        assert_eq!(until(T, || tx.poll()), KvPoll::Failed, "room {room}");
    }
    // The prefill and its lists are intact: the real decode is still served.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 34, &[5], &[6], 2);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
}

#[test]
fn a_spoofed_transfer_info_naming_a_proven_decode_is_refused() {
    use nixl_wire::{AgentName, PageIndex, TransferInfo};

    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    // Two real rooms: by the second the decode has the prefill's proof and echoes it.
    for room in [41u64, 42] {
        let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, room, &[2], &[1], 0);
        assert_eq!(
            states,
            (KvPoll::Success, KvPoll::Success),
            "{tx_err:?} {rx_err:?}"
        );
    }
    // An impostor names the decode's agent and points room 43 at the decode's pages.
    let spoof = TransferInfo {
        room: RoomId::new(43),
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: AgentName::new(d.mgr.agent().name()).unwrap(),
        dst_pages: vec![PageIndex::new(5)],
        dst_aux_index: 0,
        required_dst_info_num: 1,
        trailing: Vec::new(),
    };
    let endpoint = format!("tcp://127.0.0.1:{}", p.mgr.rank_port());
    common::send_raw(
        &endpoint,
        spoof.encode().into_iter().map(|b| b.to_vec()).collect(),
    );
    // A genuine room sent after it arrives; the spoofed one never becomes claimable.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 44, &[3], &[4], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    assert!(
        p.mgr.unclaimed_rooms().is_empty(),
        "{:?}",
        p.mgr.unclaimed_rooms()
    );
}

#[test]
fn a_prefill_can_wait_for_rooms_instead_of_polling() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    assert!(
        !p.mgr.wait_unclaimed(Duration::from_millis(50)),
        "no room yet"
    );
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(51), None).unwrap();
    rx.init(&[3], 0);
    let start = std::time::Instant::now();
    assert!(
        p.mgr.wait_unclaimed(T),
        "the decode's info completes a room"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(p.mgr.unclaimed_rooms()[0].room, RoomId::new(51));
    assert!(
        !d.mgr.wait_unclaimed(Duration::from_secs(5)),
        "a decode has none, at once"
    );
}

#[test]
fn busy_polling_managers_serve_rooms_back_to_back_and_still_time_out_when_idle() {
    let bs = server();
    let addr = bs.addr().to_string();
    let cfg = ManagerConfig::default().busy_poll(Duration::from_millis(20));
    let p = prefill(&addr, 2, 16, 1024, cfg.clone());
    let d = decode(2, 16, 1024, cfg);
    for room in 1..=20u32 {
        let (states, tx_err, rx_err) = exchange(
            &p.mgr,
            &d.mgr,
            &addr,
            u64::from(room),
            &[room % 16],
            &[(room + 5) % 16],
            1,
        );
        assert_eq!(
            states,
            (KvPoll::Success, KvPoll::Success),
            "room {room}: {tx_err:?} {rx_err:?}"
        );
    }
    // Nothing to claim: a wait inside the last message's window and one past it both end.
    assert!(!p.mgr.wait_unclaimed(Duration::from_millis(5)));
    assert!(!p.mgr.wait_unclaimed(Duration::from_millis(50)));
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(99), None).unwrap();
    rx.init(&[3], 0);
    assert!(p.mgr.wait_unclaimed(T), "a room after the window is found");
    assert_eq!(p.mgr.unclaimed_rooms()[0].room, RoomId::new(99));
}
