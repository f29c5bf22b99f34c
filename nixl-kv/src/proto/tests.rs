//! Simulated prefill/decode pairs over the sans-IO core, with a virtual clock.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nixl_wire::{
    AgentName, GpuId, KvArgsRegister, Notification, PageIndex, PrefillInbound, RoomId, TransferInfo,
};

use super::decode::DecodeCore;
use super::prefill::{Command, PrefillCore};
use super::{KvPoll, Layout};

fn layout(base: u64) -> Layout {
    Layout {
        kv_ptrs: vec![base, base + 0x10_0000],
        kv_item_lens: vec![4096, 4096],
        kv_pages: 64,
        aux_ptrs: vec![base + 0x100_0000],
        aux_item_lens: vec![64],
        aux_slots: 8,
        gpu_id: 0,
    }
}

fn agent(n: &str) -> AgentName {
    AgentName::new(n).unwrap()
}

fn register(name: &str) -> PrefillInbound {
    PrefillInbound::Register(KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: agent(name),
        metadata: Bytes::from_static(b"md"),
        kv_ptrs: layout(0x9000_0000).kv_ptrs,
        aux_ptrs: layout(0x9000_0000).aux_ptrs,
        gpu_id: GpuId::new(1),
        tp_info: None,
    })
}

fn info(room: u64, name: &str, pages: &[u32], required: u32) -> PrefillInbound {
    PrefillInbound::Transfer(TransferInfo {
        room: RoomId::new(room),
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: agent(name),
        dst_pages: pages.iter().copied().map(PageIndex::new).collect(),
        dst_aux_index: 2,
        required_dst_info_num: required,
    })
}

fn prefill_with_peer(now: Instant) -> PrefillCore {
    let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300));
    let cmd = p.handle_inbound(register("d0"), now);
    assert!(matches!(cmd, Some(Command::LoadRemote { .. })));
    p.remote_loaded(&agent("d0"), true);
    // A second registration of the same agent is ignored (metadata not reloaded).
    assert_eq!(p.handle_inbound(register("d0"), now), None);
    p
}

#[test]
fn status_is_max_merged_whatever_arrives_first() {
    let now = Instant::now();
    let mut p = prefill_with_peer(now);
    let room = RoomId::new(5);
    // The info can arrive before the sender exists (SGLang's reason for the max rule).
    p.handle_inbound(info(5, "d0", &[1, 2], 1), now);
    p.sender_new(room, now);
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    let room2 = RoomId::new(6);
    p.sender_new(room2, now);
    assert_eq!(p.sender_poll(room2), KvPoll::Bootstrapping);
}

#[test]
fn full_exchange_plans_chunks_and_completes_on_notifications() {
    let now = Instant::now();
    let mut p = prefill_with_peer(now);
    let mut d = DecodeCore::new(Some(Duration::from_secs(10)));
    let room = RoomId::new(77);
    d.receiver_new(room, "b:1", now);
    assert_eq!(d.poll(room, now), KvPoll::WaitingForInput);
    p.sender_new(room, now);
    p.handle_inbound(info(77, "d0", &[10, 11, 12, 30], 1), now);
    d.receiver_started(room, now);
    p.sender_init(room, 4, 3).unwrap();
    let c0 = p.sender_send(room, &[1, 2], now).unwrap();
    assert_eq!(c0.len(), 1);
    assert_eq!(c0[0].notif, b"77_kv_0_0");
    // Two buffers × one run of two pages.
    assert_eq!(c0[0].ops.len(), 2);
    assert_eq!(c0[0].ops[0].src, 0x1000_0000 + 4096);
    assert_eq!(c0[0].ops[0].dst, 0x9000_0000 + 10 * 4096);
    assert_eq!(c0[0].ops[0].len, 2 * 4096);
    let c1 = p.sender_send(room, &[3, 9], now).unwrap();
    assert_eq!(c1.len(), 2, "last chunk: KV and aux");
    assert_eq!(c1[0].notif, b"77_kv_1_1");
    assert_eq!(c1[1].notif, b"77_aux");
    assert_eq!(c1[1].ops[0].src, 0x1100_0000 + 3 * 64);
    assert_eq!(c1[1].ops[0].dst, 0x9100_0000 + 2 * 64);
    // Transfers still running: WaitingForInput, as SGLang reports.
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    for _ in 0..3 {
        p.transfer_done(room, Ok(()));
    }
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    // Out of order and duplicated notifications still complete the decode exactly once.
    for n in ["77_aux", "77_kv_1_1", "77_kv_1_1", "77_kv_0_0"] {
        assert_ne!(d.poll(room, now), KvPoll::Success);
        d.handle_notification("p", n.as_bytes());
    }
    assert_eq!(d.poll(room, now), KvPoll::Success);
    p.release(room);
    d.release(room);
    assert_eq!((p.rooms(), d.rooms()), (0, 0));
}

#[test]
fn dummy_targets_get_nothing_and_a_dummy_only_rank_succeeds_at_once() {
    let now = Instant::now();
    let mut p = prefill_with_peer(now);
    let room = RoomId::new(3);
    p.sender_new(room, now);
    p.handle_inbound(info(3, "d0", &[], 1), now);
    p.sender_init(room, 2, 0).unwrap();
    let t = p.sender_send(room, &[1, 2], now).unwrap();
    assert!(t.is_empty());
    assert_eq!(p.sender_poll(room), KvPoll::Success);
}

#[test]
fn required_dst_info_num_waits_for_every_decode() {
    let now = Instant::now();
    let mut p = prefill_with_peer(now);
    p.handle_inbound(register("d1"), now);
    p.remote_loaded(&agent("d1"), true);
    let room = RoomId::new(4);
    p.sender_new(room, now);
    p.handle_inbound(info(4, "d0", &[1], 2), now);
    assert_eq!(p.sender_poll(room), KvPoll::Bootstrapping);
    // A repeat from the same agent overwrites and does not count twice.
    p.handle_inbound(info(4, "d0", &[2], 2), now);
    assert_eq!(p.sender_poll(room), KvPoll::Bootstrapping);
    p.handle_inbound(info(4, "d1", &[5], 2), now);
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    p.sender_init(room, 1, 0).unwrap();
    let t = p.sender_send(room, &[7], now).unwrap();
    assert_eq!(
        t.iter().filter(|t| !t.aux).count(),
        2,
        "one KV write per decode"
    );
    assert_eq!(
        t[0].ops[0].dst,
        0x9000_0000 + 2 * 4096,
        "the overwritten info is used"
    );
}

#[test]
fn misuse_fails_the_room_with_a_reason() {
    let now = Instant::now();
    let mut p = prefill_with_peer(now);
    let room = RoomId::new(9);
    p.sender_new(room, now);
    // Sending before the decode asked.
    assert!(p.sender_send(room, &[1], now).is_err());
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    assert!(p.failure(room).unwrap().contains("before"));

    let room = RoomId::new(10);
    p.sender_new(room, now);
    p.handle_inbound(info(10, "ghost", &[1], 1), now);
    p.sender_init(room, 1, 0).unwrap();
    let err = p.sender_send(room, &[1], now).unwrap_err();
    assert!(err.reason.contains("not registered"), "{err}");

    let room = RoomId::new(11);
    p.sender_new(room, now);
    p.handle_inbound(info(11, "d0", &[1], 1), now);
    p.sender_init(room, 1, 0).unwrap();
    assert!(
        p.sender_send(room, &[1, 2], now).is_err(),
        "more pages than the request has"
    );
    assert!(
        p.sender_init(RoomId::new(12), 1, 99).is_err(),
        "aux slot outside the buffers"
    );
    // A transfer error fails the room; the agents to tell are returned by abort.
    let room = RoomId::new(13);
    p.sender_new(room, now);
    p.handle_inbound(info(13, "d0", &[1], 1), now);
    p.sender_init(room, 1, 0).unwrap();
    p.sender_send(room, &[1], now).unwrap();
    p.transfer_done(room, Err("peer died".into()));
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    assert_eq!(p.abort(room, "x"), vec![agent("d0")]);
    assert_eq!(p.failure(room), Some("peer died"));
}

#[test]
fn orphan_rooms_expire_and_senders_keep_theirs() {
    let now = Instant::now();
    let mut p = prefill_with_peer(now);
    p.handle_inbound(info(20, "d0", &[1], 1), now);
    p.sender_new(RoomId::new(21), now);
    assert_eq!(p.handle_timeout(now + Duration::from_secs(299)), 0);
    assert_eq!(p.handle_timeout(now + Duration::from_secs(301)), 1);
    assert_eq!(p.rooms(), 1);
}

#[test]
fn decode_failures_timeouts_and_dead_prefills() {
    let now = Instant::now();
    let mut d = DecodeCore::new(Some(Duration::from_secs(5)));
    for r in 1..=3 {
        d.receiver_new(RoomId::new(r), if r == 3 { "other:1" } else { "b:1" }, now);
        d.receiver_started(RoomId::new(r), now);
    }
    d.handle_notification("p", &Notification::fail(RoomId::new(1), "oom").encode());
    assert_eq!(d.poll(RoomId::new(1), now), KvPoll::Failed);
    assert!(d.failure(RoomId::new(1)).unwrap().contains("oom"));
    assert_eq!(
        d.live_bootstraps(),
        vec!["b:1".to_owned(), "other:1".to_owned()]
    );
    assert_eq!(d.fail_bootstrap("b:1", "dead"), 1);
    assert_eq!(d.poll(RoomId::new(2), now), KvPoll::Failed);
    assert_eq!(
        d.poll(RoomId::new(3), now + Duration::from_secs(4)),
        KvPoll::WaitingForInput
    );
    assert_eq!(
        d.poll(RoomId::new(3), now + Duration::from_secs(6)),
        KvPoll::Failed
    );
    // Unknown rooms and garbage are dropped without creating state.
    d.handle_notification("p", b"999_kv_0_1");
    d.handle_notification("p", b"\xff\xfe");
    assert_eq!(d.rooms(), 3);
}

#[test]
fn golden_frames_drive_the_prefill_and_golden_notifications_the_decode() {
    // The TransferInfo captured from SGLang 0.5.1.post3 (tests/data in nixl-wire).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nixl-wire/tests/data/transfer_info_32pages_a.json"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hex = |s: &str| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let frames: Vec<Bytes> = doc["frames_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| Bytes::from(hex(h.as_str().unwrap())))
        .collect();
    let msg = PrefillInbound::decode(&frames).unwrap();
    let PrefillInbound::Transfer(t) = &msg else {
        panic!("not a TransferInfo")
    };
    let now = Instant::now();
    let mut lay = layout(0x1000_0000);
    lay.kv_pages = 4096;
    lay.aux_slots = 512;
    let mut p = PrefillCore::new(lay, Duration::from_secs(300));
    let reg = register(t.agent.as_str());
    if let Some(Command::LoadRemote { agent, .. }) = p.handle_inbound(reg, now) {
        p.remote_loaded(&agent, true);
    }
    p.sender_new(t.room, now);
    p.handle_inbound(msg.clone(), now);
    assert_eq!(p.sender_poll(t.room), KvPoll::WaitingForInput);
    p.sender_init(t.room, 32, 0).unwrap();
    let src: Vec<u32> = (0..32).collect();
    let plan = p.sender_send(t.room, &src, now).unwrap();
    // The capture's KV write had 2048 descriptors for 64 buffers × 32 scattered pages; ours, with
    // two buffers, has 2 × 32 (no two destination pages are consecutive).
    assert_eq!(plan[0].ops.len(), 64);
    let sent: Vec<&str> = doc["nixl_notifs_sent_by_prefill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["notif_ascii"].as_str().unwrap())
        .collect();
    let ours: Vec<String> = plan
        .iter()
        .map(|t| String::from_utf8(t.notif.clone()).unwrap())
        .collect();
    assert_eq!(
        ours, sent,
        "the same notification strings as the Python prefill"
    );

    let mut d = DecodeCore::new(None);
    d.receiver_new(t.room, "b:1", now);
    d.receiver_started(t.room, now);
    for n in doc["nixl_notifs_received_by_decode"].as_array().unwrap() {
        d.handle_notification(
            n["peer"].as_str().unwrap(),
            n["notif_ascii"].as_str().unwrap().as_bytes(),
        );
    }
    assert_eq!(d.poll(t.room, now), KvPoll::Success);
}
