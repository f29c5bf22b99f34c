//! Each decode answered in its own profile (docs/protocol.md §10): 0.5.23 decodes get
//! `KV_STATUS` and no notification, 0.5.20 ones notifications with our rank, failures and
//! acknowledgements wait until nothing of the room is in flight.

use nixl_wire::v2x::{self, Abort, AbortAck, AbortReply, DecodeInbound, KvStatus, MemKind};

use super::*;

fn register_v2x(name: &str, profile: nixl_wire::Profile) -> PrefillInbound {
    let peer = layout(0x9000_0000);
    PrefillInbound::RegisterV2x(v2x::KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 7100,
        agent: agent(name),
        metadata: Bytes::from_static(b"md"),
        kv_ptrs: peer.kv_ptrs.clone(),
        aux_ptrs: peer.aux_ptrs.clone(),
        state_ptrs: Vec::new(),
        gpu_id: GpuId::new(0),
        decode_tp_size: 1,
        decode_tp_rank: 0,
        dst_kv_item_len: 4096,
        state_item_lens: Vec::new(),
        state_dims: Vec::new(),
        staging: None,
        dst_num_slots: Some(64),
        kv_mem_kinds: vec![MemKind::Dram; 2],
        kv_item_lens: vec![4096; 2],
        state_layer_ids: Vec::new(),
        kv_layer_ids: Vec::new(),
        dcp_size: 1,
        dcp_rank: 0,
        state_data_lens: (profile == nixl_wire::Profile::Sglang0523).then(Vec::new),
        trailing: Vec::new(),
    })
}

fn info_v2x(room: u64, name: &str, pages: &[u32], prefix: u64) -> PrefillInbound {
    PrefillInbound::TransferV2x(v2x::TransferInfo {
        room: RoomId::new(room),
        local_ip: "127.0.0.1".into(),
        rank_port: 7100,
        agent: agent(name),
        dst_pages: pages.iter().copied().map(PageIndex::new).collect(),
        dst_aux_index: 2,
        required_dst_info_num: 1,
        state_indices: Vec::new(),
        decode_prefix_len: prefix,
        is_dummy: false,
        trailing: Vec::new(),
    })
}

fn prefill_with(
    name: &str,
    profile: nixl_wire::Profile,
    now: Instant,
) -> (PrefillCore, FakeDriver) {
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300));
    p.handle_inbound(register_v2x(name, profile), now);
    drv.run(&mut p);
    assert!(p.has_peer(&agent(name)));
    (p, drv)
}

/// The statuses sent so far, decoded as a 0.5.2x decode's listener reads them.
fn statuses(drv: &mut FakeDriver) -> Vec<(String, DecodeInbound)> {
    drv.statuses
        .drain(..)
        .map(|(ep, f)| (ep, DecodeInbound::decode(&f).unwrap()))
        .collect()
}

const LISTENER: &str = "tcp://127.0.0.1:7100";

#[test]
fn a_0523_decode_gets_no_notification_and_one_kv_status_after_the_last_write() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d23", nixl_wire::Profile::Sglang0523, now);
    let room = RoomId::new(41);
    p.sender_new(room, now);
    p.handle_inbound(info_v2x(41, "d23", &[10, 11, 12], 0), now);
    p.sender_init(room, 3, 1).unwrap();
    p.sender_send(room, &[1, 2], now).unwrap();
    p.sender_send(room, &[3], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    assert_eq!(posts.len(), 3, "two KV chunks and the aux rows");
    assert!(
        posts.iter().all(|c| c.notif.is_empty()),
        "0.5.23 reads no notification"
    );
    for _ in 0..2 {
        p.transfer_done(room, Ok(()));
        drv.run(&mut p);
        assert!(drv.statuses.is_empty(), "not before every WRITE completed");
    }
    p.transfer_done(room, Ok(()));
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    assert_eq!(
        statuses(&mut drv),
        vec![(
            LISTENER.into(),
            DecodeInbound::KvStatus(KvStatus::success(room, 0))
        )]
    );
    // Polling again or a late completion sends nothing more.
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    p.transfer_done(room, Ok(()));
    drv.run(&mut p);
    assert!(drv.statuses.is_empty(), "at most once per room");
}

#[test]
fn a_0520_decode_gets_notifications_with_our_rank_and_no_success_status() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d20", nixl_wire::Profile::Sglang0520, now);
    let room = RoomId::new(42);
    p.sender_new(room, now);
    p.handle_inbound(info_v2x(42, "d20", &[10, 11], 0), now);
    p.sender_init(room, 2, 1).unwrap();
    p.sender_send(room, &[1, 2], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    let notifs: Vec<&[u8]> = posts.iter().map(|c| c.notif.as_slice()).collect();
    assert_eq!(notifs, vec![&b"42_kv_0_1_0"[..], b"42_aux"]);
    p.transfer_done(room, Ok(()));
    p.transfer_done(room, Ok(()));
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    assert!(
        drv.statuses.is_empty(),
        "0.5.20–0.5.22 prefills send no KV_STATUS 4"
    );
}

#[test]
fn a_failure_reaches_a_0523_decode_as_kv_status_once_its_writes_settled() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d23", nixl_wire::Profile::Sglang0523, now);
    let room = RoomId::new(43);
    p.sender_new(room, now);
    p.handle_inbound(info_v2x(43, "d23", &[10, 11], 0), now);
    p.sender_init(room, 2, 1).unwrap();
    p.sender_send(room, &[1], now).unwrap();
    drv.run(&mut p);
    p.abort(room, FailureReason::Aborted("scheduler".into()));
    drv.run(&mut p);
    assert!(
        drv.notified.is_empty(),
        "no notification to SGLang's 0.5.23"
    );
    assert!(drv.statuses.is_empty(), "a WRITE is still in flight");
    p.transfer_done(room, Ok(()));
    drv.run(&mut p);
    let why = FailureReason::Aborted("scheduler".into()).to_string();
    assert_eq!(
        statuses(&mut drv),
        vec![(
            LISTENER.into(),
            DecodeInbound::KvStatus(KvStatus::failed(room, 0, &why))
        )]
    );
}

#[test]
fn a_failed_rooms_status_still_goes_when_its_sender_is_released_before_the_writes_settle() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d23", nixl_wire::Profile::Sglang0523, now);
    let room = RoomId::new(49);
    p.sender_new(room, now);
    p.handle_inbound(info_v2x(49, "d23", &[10, 11], 0), now);
    p.sender_init(room, 2, 1).unwrap();
    p.sender_send(room, &[1], now).unwrap();
    p.sender_send(room, &[2], now).unwrap();
    drv.run(&mut p);
    let died = FailureReason::Transfer {
        peer: "d23".into(),
        reason: "NIXL_ERR_REMOTE_DISCONNECT".into(),
    };
    p.transfer_done(room, Err(died.clone()));
    drv.run(&mut p);
    assert!(drv.statuses.is_empty(), "two WRITEs still in flight");
    // The scheduler saw Failed and dropped the sender; nothing reaps the WRITEs any more.
    p.release(room);
    drv.run(&mut p);
    assert_eq!(
        statuses(&mut drv),
        vec![(
            LISTENER.into(),
            DecodeInbound::KvStatus(KvStatus::failed(room, 0, &died.to_string()))
        )]
    );
}

#[test]
fn abort_fails_the_room_and_is_acknowledged_with_its_generation_once_drained() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d23", nixl_wire::Profile::Sglang0523, now);
    let room = RoomId::new(44);
    p.sender_new(room, now);
    p.handle_inbound(info_v2x(44, "d23", &[10, 11], 0), now);
    p.sender_init(room, 2, 1).unwrap();
    p.sender_send(room, &[1], now).unwrap();
    drv.run(&mut p);
    let abort = |room: RoomId| {
        PrefillInbound::Abort(Abort {
            room,
            reply: Some(AbortReply {
                ip: "127.0.0.1".into(),
                port: 7100,
                generation: Some(3),
            }),
        })
    };
    p.handle_inbound(abort(room), now);
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    assert_eq!(p.failure(room), Some(&FailureReason::AbortedByDecode));
    assert!(drv.statuses.is_empty(), "not while a WRITE is in flight");
    p.transfer_done(room, Ok(()));
    drv.run(&mut p);
    let ack = AbortAck {
        room,
        prefill_rank: 0,
        generation: Some(3),
    };
    assert_eq!(
        statuses(&mut drv),
        vec![(LISTENER.into(), DecodeInbound::AbortAck(ack))],
        "the ACK and no KV_STATUS: the decode itself gave up"
    );
    // A room this prefill does not hold (or no longer holds) is acknowledged at once.
    let other = RoomId::new(45);
    p.handle_inbound(abort(other), now);
    drv.run(&mut p);
    assert!(
        matches!(&statuses(&mut drv)[..], [(_, DecodeInbound::AbortAck(a))] if a.room == other)
    );
    // Without a generation the decode waits for nothing: no ACK.
    p.handle_inbound(
        PrefillInbound::Abort(Abort {
            room: RoomId::new(46),
            reply: None,
        }),
        now,
    );
    drv.run(&mut p);
    assert!(drv.statuses.is_empty());
}

#[test]
fn what_we_do_not_transfer_fails_the_room_on_both_sides_with_the_feature_named() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d23", nixl_wire::Profile::Sglang0523, now);
    let room = RoomId::new(47);
    p.sender_new(room, now);
    p.handle_inbound(info_v2x(47, "d23", &[], 16), now);
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    let why = p.failure(room).unwrap().to_string();
    assert!(why.contains("decode_prefix_len"), "{why}");
    let sent = statuses(&mut drv);
    assert!(
        matches!(&sent[..], [(ep, DecodeInbound::KvStatus(s))]
            if ep == LISTENER && s.status == KvStatus::FAILED && s.reason.as_deref() == Some(why.as_str())),
        "{sent:?}"
    );
    // A decode whose registration announced hybrid state: every room to it fails.
    let PrefillInbound::RegisterV2x(mut r) = register_v2x("hybrid", nixl_wire::Profile::Sglang0523)
    else {
        unreachable!()
    };
    r.state_ptrs = vec![vec![0x5000]];
    p.handle_inbound(PrefillInbound::RegisterV2x(r), now);
    drv.run(&mut p);
    let room = RoomId::new(48);
    p.handle_inbound(info_v2x(48, "hybrid", &[1], 0), now);
    p.sender_new(room, now);
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    assert!(
        p.failure(room)
            .unwrap()
            .to_string()
            .contains("hybrid-model state")
    );
}

#[test]
fn one_prefill_answers_a_051_and_a_0523_decode_each_in_its_own_way() {
    let now = Instant::now();
    let (mut p, mut drv) = prefill_with("d23", nixl_wire::Profile::Sglang0523, now);
    p.handle_inbound(register("d51"), now);
    drv.run(&mut p);
    let (a, b) = (RoomId::new(50), RoomId::new(51));
    p.handle_inbound(info_v2x(50, "d23", &[1], 0), now);
    p.handle_inbound(info(51, "d51", &[1], 1), now);
    for room in [a, b] {
        p.sender_new(room, now);
        p.sender_init(room, 1, 0).unwrap();
        p.sender_send(room, &[4], now).unwrap();
    }
    drv.run(&mut p);
    let posts = drv.take_posts();
    let of = |room: RoomId| -> Vec<Vec<u8>> {
        posts
            .iter()
            .filter(|c| c.room == room)
            .map(|c| c.notif.clone())
            .collect()
    };
    assert_eq!(of(a), vec![Vec::<u8>::new(), Vec::new()]);
    assert_eq!(of(b), vec![b"51_kv_0_1".to_vec(), b"51_aux".to_vec()]);
    for room in [a, a, b, b] {
        p.transfer_done(room, Ok(()));
    }
    drv.run(&mut p);
    let sent = statuses(&mut drv);
    assert_eq!(
        sent.len(),
        1,
        "only the 0.5.23 decode gets a KV_STATUS: {sent:?}"
    );
    assert!(matches!(&sent[0].1, DecodeInbound::KvStatus(s) if s.room == a));
}

/// A decode core speaking `profile`, bootstrapped for `room` against one prefill rank.
fn decode_speaking(profile: nixl_wire::Profile, room: RoomId, now: Instant) -> DecodeCore {
    let mut me = identity();
    me.profile = profile;
    me.rank_port = 7100;
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    let mut d = DecodeCore::new(me, timers, now);
    bootstrap_v2x(&mut d, room, profile, now);
    d
}

/// Bootstraps `room` against "b:1" whose server answered in `profile`'s form (0.5.23's has
/// `enable_kv_cache_sharding`), one prefill rank on port 5000.
fn bootstrap_v2x(d: &mut DecodeCore, room: RoomId, profile: nixl_wire::Profile, now: Instant) {
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    let mut info = serde_json::json!({
        "attn_tp_size": 1, "attn_cp_size": 1, "dp_size": 1, "pp_size": 1, "page_size": 16,
        "kv_cache_dtype": "bfloat16", "follow_bootstrap_room": true,
        "enable_dsa_cache_layer_split": false, "prefill_http_port": null, "target_tp_rank": null,
        "target_tp_ranks": null, "target_cp_ranks": null, "target_pp_ranks": null,
        "required_dst_info_num": null, "required_prefill_response_num": null
    });
    if profile == nixl_wire::Profile::Sglang0523 {
        info["enable_kv_cache_sharding"] = false.into();
    }
    loop {
        match d.next_lookup(room) {
            Lookup::Parallel(_) => {
                d.server_info_learned(room, Ok(serde_json::from_value(info.clone()).unwrap()));
            }
            Lookup::Ranks { key, .. } => d.ranks_learned(room, key, Ok(vec![rank_info(5000)])),
            _ => break,
        }
    }
    assert_eq!(
        d.profile_of(room),
        profile,
        "the server's answer tells the profile"
    );
}

/// Runs everything the decode queued through the prefill (its registration and infos).
fn deliver(d: &mut DecodeCore, p: &mut PrefillCore, drv: &mut FakeDriver, now: Instant) {
    for (_, frames) in sends(d) {
        p.handle_inbound(PrefillInbound::decode(&frames).unwrap(), now);
        drv.run(p);
    }
}

#[test]
fn our_0523_decode_and_our_prefill_complete_by_kv_status_and_abort_each_other_cleanly() {
    let now = Instant::now();
    let room = RoomId::new(60);
    let mut d = decode_speaking(nixl_wire::Profile::Sglang0523, room, now);
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300));
    d.receiver_init(room, &[3, 4], 1, now);
    let frames = sends(&mut d);
    assert_eq!(frames.len(), 2, "registration and TransferInfo");
    assert_eq!(frames[0].1.len(), 26, "25 frames and our capability frame");
    assert!(matches!(
        PrefillInbound::decode(&frames[0].1),
        Ok(PrefillInbound::RegisterV2x(r)) if r.profile() == nixl_wire::Profile::Sglang0523 && r.rank_port == 7100
    ));
    for (_, f) in &frames {
        p.handle_inbound(PrefillInbound::decode(f).unwrap(), now);
        drv.run(&mut p);
    }
    p.sender_new(room, now);
    p.sender_init(room, 2, 0).unwrap();
    p.sender_send(room, &[8, 9], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    assert!(
        posts.iter().all(|c| !c.notif.is_empty()),
        "a decode of ours reads notifications in every profile"
    );
    assert_ne!(d.poll(room, now), KvPoll::Success, "nothing arrived yet");
    p.transfer_done(room, Ok(()));
    p.transfer_done(room, Ok(()));
    drv.run(&mut p);
    let (endpoint, status) = drv.statuses.pop().unwrap();
    assert_eq!(endpoint, "tcp://127.0.0.1:7100");
    d.handle_listener(&status, Instant::now());
    assert_eq!(
        d.poll(room, now),
        KvPoll::Success,
        "KV_STATUS alone completes it"
    );

    // A second room fails here (the scheduler aborts it): ABORT with a generation goes to the
    // prefill, which fails the room and acknowledges.
    let room = RoomId::new(61);
    bootstrap_v2x(&mut d, room, nixl_wire::Profile::Sglang0523, now);
    d.receiver_init(room, &[5], 1, now);
    deliver(&mut d, &mut p, &mut drv, now);
    p.sender_new(room, now);
    d.fail(room, FailureReason::Aborted("client went away".into()));
    let abort = sends(&mut d);
    assert_eq!(abort.len(), 1);
    assert!(matches!(
        PrefillInbound::decode(&abort[0].1),
        Ok(PrefillInbound::Abort(Abort {
            reply: Some(AbortReply {
                generation: Some(1),
                ..
            }),
            ..
        }))
    ));
    p.handle_inbound(PrefillInbound::decode(&abort[0].1).unwrap(), now);
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    let acks = statuses(&mut drv);
    assert!(matches!(&acks[..], [(_, DecodeInbound::AbortAck(a))] if a.generation == Some(1)));
    d.fail(room, FailureReason::Aborted("again".into()));
    assert!(sends(&mut d).is_empty(), "ABORT goes once");
}

#[test]
fn a_kv_status_failure_fails_the_room_with_the_prefills_reason_and_junk_is_dropped() {
    let now = Instant::now();
    let room = RoomId::new(62);
    let mut d = decode_speaking(nixl_wire::Profile::Sglang0520, room, now);
    d.receiver_init(room, &[3], 1, now);
    let frames = sends(&mut d);
    assert!(matches!(
        PrefillInbound::decode(&frames[0].1),
        Ok(PrefillInbound::RegisterV2x(r)) if r.profile() == nixl_wire::Profile::Sglang0520
    ));
    assert!(matches!(
        PrefillInbound::decode(&frames[1].1),
        Ok(PrefillInbound::TransferV2x(_))
    ));
    for junk in [
        vec![Bytes::from_static(b"KV_STATUS")],
        vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"1")],
        Vec::new(),
    ] {
        d.handle_listener(&junk, Instant::now());
    }
    assert_eq!(d.poll(room, now), KvPoll::WaitingForInput);
    // 0.5.20 Success rides on notifications with the prefill's rank appended.
    d.handle_notification("p", b"62_kv_0_1_0");
    d.handle_notification("p", b"62_aux");
    assert_eq!(d.poll(room, now), KvPoll::Success);
    let room = RoomId::new(63);
    bootstrap_v2x(&mut d, room, nixl_wire::Profile::Sglang0520, now);
    d.receiver_init(room, &[4], 1, now);
    let _ = sends(&mut d);
    d.handle_listener(
        &KvStatus::failed(room, 0, "NIXL_ERR_INVALID_PARAM").encode(),
        Instant::now(),
    );
    assert_eq!(d.poll(room, now), KvPoll::Failed);
    assert_eq!(
        d.failure(room),
        Some(&FailureReason::PrefillFailed(
            "NIXL_ERR_INVALID_PARAM".into()
        ))
    );
    assert!(
        sends(&mut d).is_empty(),
        "no ABORT to a prefill that failed the room itself"
    );
}

#[test]
fn a_0520_prefills_parts_and_page_less_last_chunk_complete_a_room() {
    let now = Instant::now();
    let room = RoomId::new(64);
    let mut d = decode_speaking(nixl_wire::Profile::Sglang0520, room, now);
    d.receiver_init(room, &[3, 4], 1, now);
    let _ = sends(&mut d);
    for n in [
        "64_kv_0_0_0_part_1_2",
        "64_aux_nokv_0_1",
        "64_kv_0_0_0_part_1_2",
    ] {
        d.handle_notification("p", n.as_bytes());
        assert_ne!(
            d.poll(room, now),
            KvPoll::Success,
            "chunk 0 has one of two parts"
        );
    }
    d.handle_notification("p", b"64_kv_0_0_0_part_0_2");
    assert_eq!(d.poll(room, now), KvPoll::Success);
    // Hybrid-model state or SGLang's staging fail the room with the reason named.
    let room = RoomId::new(65);
    bootstrap_v2x(&mut d, room, nixl_wire::Profile::Sglang0520, now);
    d.receiver_init(room, &[5], 1, now);
    let _ = sends(&mut d);
    d.handle_notification("p", b"65_state_0_0");
    assert_eq!(d.poll(room, now), KvPoll::Failed);
    assert!(
        d.failure(room)
            .unwrap()
            .to_string()
            .contains("not supported")
    );
}

/// A prefill core with one 0.5.23 decode of SGLang's ("d23") registered, for the capture replay.
pub(super) fn prefill_for_capture(now: Instant) -> (PrefillCore, FakeDriver) {
    prefill_with("d23", nixl_wire::Profile::Sglang0523, now)
}

/// A TransferInfo of "d23" for `room` and `pages` pages.
pub(super) fn info_for_capture(room: RoomId, pages: u32) -> PrefillInbound {
    let dst: Vec<u32> = (10..10 + pages).collect();
    info_v2x(room.get(), "d23", &dst, 0)
}

/// "d23"'s ABORT of `room`, armed with generation 1.
pub(super) fn abort_for_capture(room: RoomId) -> PrefillInbound {
    PrefillInbound::Abort(Abort {
        room,
        reply: Some(AbortReply {
            ip: "127.0.0.1".into(),
            port: 7100,
            generation: Some(1),
        }),
    })
}

#[test]
fn a_0523_decode_also_completes_on_a_0522_prefills_notifications() {
    let now = Instant::now();
    let room = RoomId::new(66);
    let mut d = decode_speaking(nixl_wire::Profile::Sglang0523, room, now);
    d.receiver_init(room, &[3, 4], 1, now);
    let _ = sends(&mut d);
    d.handle_notification("p", b"66_kv_0_1_0");
    assert_ne!(
        d.poll(room, now),
        KvPoll::Success,
        "the aux row is still missing"
    );
    d.handle_notification("p", b"66_aux");
    assert_eq!(d.poll(room, now), KvPoll::Success);
}

#[test]
fn the_bootstrap_answer_reveals_the_prefills_profile_whatever_ours() {
    let now = Instant::now();
    // Configured for 0.5.1, facing a 0.5.23 server: 0.5.23's frames and KV_STATUS.
    let room = RoomId::new(67);
    let mut me = identity();
    me.profile = nixl_wire::Profile::Sglang051;
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    let mut d = DecodeCore::new(me, timers, now);
    bootstrap_v2x(&mut d, room, nixl_wire::Profile::Sglang0523, now);
    d.receiver_init(room, &[3], 1, now);
    let frames = sends(&mut d);
    assert!(matches!(
        PrefillInbound::decode(&frames[0].1),
        Ok(PrefillInbound::RegisterV2x(r)) if r.profile() == nixl_wire::Profile::Sglang0523
    ));
    d.handle_listener(&KvStatus::success(room, 0).encode(), Instant::now());
    assert_eq!(d.poll(room, now), KvPoll::Success);
    // Configured for 0.5.23, facing a 0.5.1 server: 0.5.1's frames, notifications, no ABORT.
    let room = RoomId::new(68);
    let mut d = decode_speaking(nixl_wire::Profile::Sglang0523, RoomId::new(1), now);
    d.receiver_new(room, BootstrapAddr::new("old:1"), None, now);
    loop {
        match d.next_lookup(room) {
            Lookup::Parallel(_) => d.parallel_learned(room, Ok(parallel(1, 1))),
            Lookup::Ranks { key, .. } => d.ranks_learned(room, key, Ok(vec![rank_info(6000)])),
            _ => break,
        }
    }
    assert_eq!(d.profile_of(room), nixl_wire::Profile::Sglang051);
    d.receiver_init(room, &[4], 1, now);
    let frames: Vec<_> = sends(&mut d)
        .into_iter()
        .filter(|(ep, _)| ep.ends_with(":6000"))
        .collect();
    assert!(matches!(
        PrefillInbound::decode(&frames[0].1),
        Ok(PrefillInbound::Register(_))
    ));
    assert!(matches!(
        PrefillInbound::decode(&frames[1].1),
        Ok(PrefillInbound::Transfer(_))
    ));
    d.handle_listener(&KvStatus::success(room, 0).encode(), Instant::now());
    assert_ne!(
        d.poll(room, now),
        KvPoll::Success,
        "a 0.5.1 prefill's room completes by notifications"
    );
    d.fail(room, FailureReason::Aborted("gone".into()));
    assert!(sends(&mut d).is_empty(), "no ABORT to a 0.5.1 prefill");
}
