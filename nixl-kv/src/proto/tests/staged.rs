//! The staged path: the prefill's slot scheduling, the decode's accounting, both cores
//! together, and the freed-slot messages between them.

use super::*;

// ---- The staged path (docs/protocol.md §3.5): the decode's ring and its accounting. ----

const RING: nixl_wire::ext::Ring = nixl_wire::ext::Ring {
    addr: 0x7000_0000,
    slot_bytes: 8 * 8192,
    slots: 2,
    gpu: 0,
};

fn staged_decode(now: Instant) -> DecodeCore {
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    let mut me = identity();
    me.staging = Some(decode::DecodeStaging::new(RING, 1));
    DecodeCore::new(me, timers, now)
}

fn commands(d: &mut DecodeCore) -> Vec<decode::Command> {
    let mut out = Vec::new();
    d.drain_commands(&mut out);
    out
}

/// The transfer info in `cmds` (the last Send), decoded.
fn sent_info(cmds: &[decode::Command]) -> TransferInfo {
    cmds.iter()
        .rev()
        .find_map(|c| match c {
            decode::Command::Send { frames, .. } => match PrefillInbound::decode(frames) {
                Ok(PrefillInbound::Transfer(t)) => Some(t),
                _ => None,
            },
            _ => None,
        })
        .expect("a transfer info")
}

fn staged(room: u64, chunk: u32, last: bool, slot: u32, off: u32, pages: u32) -> Vec<u8> {
    nixl_wire::ext::StagedNotice {
        room: RoomId::new(room),
        chunk,
        last,
        slot,
        first_page_offset: off,
        pages,
        slice: None,
    }
    .encode()
}

/// A staged room `room` on a fresh or given decode, started with `pages`; returns its slots.
fn staged_room(d: &mut DecodeCore, room: u64, pages: &[u32], now: Instant) -> Vec<u32> {
    bootstrap(d, RoomId::new(room), 5000, now);
    d.receiver_init(RoomId::new(room), pages, 0, now);
    let t = sent_info(&commands(d));
    nixl_wire::ext::slots(&t.trailing, RING.slots).unwrap_or_default()
}

#[test]
fn staging_decode_announces_its_ring_and_grants_bounded_slots() {
    let now = Instant::now();
    let mut d = staged_decode(now);
    bootstrap(&mut d, RoomId::new(1), 5000, now);
    d.receiver_init(RoomId::new(1), &[4, 5], 0, now);
    let cmds = commands(&mut d);
    let decode::Command::Send { frames, .. } = &cmds[0] else {
        panic!("registration expected")
    };
    let Ok(PrefillInbound::Register(reg)) = PrefillInbound::decode(frames) else {
        panic!("registration expected")
    };
    assert_eq!(
        nixl_wire::ext::caps(&reg.trailing),
        vec!["proof", "staging"]
    );
    assert_eq!(nixl_wire::ext::Ring::find(&reg.trailing), Some(RING));
    assert_eq!(frames.len(), 14, "SGLang's 12 frames, caps and ring");
    let t = sent_info(&cmds);
    assert_eq!(nixl_wire::ext::slots(&t.trailing, 2), Some(vec![0]));
    assert_eq!(staged_room(&mut d, 2, &[6], now), vec![1]);
    // The ring is full: the third room takes the plain path.
    assert!(staged_room(&mut d, 3, &[7], now).is_empty());
    assert_eq!(d.free_slots(), Some(0));
    // Without a ring nothing changes: no staging capability, no slots frame, and staged
    // notifications are foreign.
    let mut plain = decode_core(now);
    bootstrap(&mut plain, RoomId::new(1), 5000, now);
    plain.receiver_init(RoomId::new(1), &[4], 0, now);
    let t = sent_info(&commands(&mut plain));
    assert!(t.trailing.is_empty());
    plain.handle_notification("p", &staged(1, 0, true, 0, 0, 1));
    assert!(commands(&mut plain).is_empty());
    assert_eq!(plain.poll(RoomId::new(1), now), KvPoll::WaitingForInput);
    assert_eq!(plain.free_slots(), None);
}

#[test]
fn staged_pieces_count_only_after_their_scatter_and_free_their_slot() {
    let now = Instant::now();
    let mut d = staged_decode(now);
    let room = RoomId::new(1);
    assert_eq!(staged_room(&mut d, 1, &[10, 11, 12, 13], now), vec![0]);
    d.handle_notification("prefill-agent", &staged(1, 0, false, 0, 0, 3));
    assert_eq!(
        commands(&mut d),
        vec![decode::Command::Scatter {
            room,
            slot: 0,
            pages: vec![10, 11, 12],
            slice: None,
        }]
    );
    // Landed but not scattered: it does not count.
    d.handle_notification("p", &Notification::Aux { room }.encode());
    assert_eq!(d.poll(room, now), KvPoll::WaitingForInput);
    d.scatter_done(room, 0, Ok(()));
    let cmds = commands(&mut d);
    assert_eq!(cmds.len(), 1);
    let freed = freed_message(cmds.into_iter().next().unwrap());
    assert_eq!(freed.notice, nixl_wire::ext::FreedNotice { room, slot: 0 });
    assert_eq!(d.poll(room, now), KvPoll::Transferring);
    // A duplicate report changes nothing.
    d.scatter_done(room, 0, Ok(()));
    assert!(commands(&mut d).is_empty());
    d.handle_notification("prefill-agent", &staged(1, 1, true, 0, 3, 1));
    assert_eq!(commands(&mut d).len(), 1);
    assert_eq!(d.poll(room, now), KvPoll::Transferring);
    d.scatter_done(room, 0, Ok(()));
    assert_eq!(d.poll(room, now), KvPoll::Success);
    assert_eq!(d.free_slots(), Some(2), "a success frees its slots at once");
    d.release(room);
    assert_eq!(d.free_slots(), Some(2));
}

#[test]
fn staged_rooms_fail_on_bad_pieces_and_release_slots_in_every_end() {
    let now = Instant::now();
    let q = crate::proto::staging::QUARANTINE;
    let mut d = staged_decode(now);

    // An overwrite of a slot still scattering fails the room.
    let r1 = RoomId::new(1);
    assert_eq!(staged_room(&mut d, 1, &[1, 2], now), vec![0]);
    d.handle_notification("p", &staged(1, 0, false, 0, 0, 1));
    d.handle_notification("p", &staged(1, 1, true, 0, 1, 1));
    assert_eq!(d.poll(r1, now), KvPoll::Failed);
    assert!(matches!(d.failure(r1), Some(FailureReason::Staging(_))));
    // Its slot drains with the running scatter, then sits out the quarantine.
    d.scatter_done(r1, 0, Ok(()));
    assert_eq!(d.free_slots(), Some(1));

    // A piece larger than a slot (8 pages of 2 × 4096 bytes).
    let mut big = staged_decode(now);
    let pages: Vec<u32> = (0..9).collect();
    assert_eq!(staged_room(&mut big, 1, &pages, now), vec![0]);
    big.handle_notification("p", &staged(1, 0, true, 0, 0, 9));
    assert!(commands(&mut big).is_empty());
    assert_eq!(big.poll(r1, now), KvPoll::Failed);

    // Pages outside the room, another room's slot, and a failed scatter.
    let r2 = RoomId::new(2);
    assert_eq!(staged_room(&mut d, 2, &[3], now), vec![1]);
    d.handle_notification("p", &staged(2, 0, true, 1, 0, 2));
    assert_eq!(d.poll(r2, now), KvPoll::Failed);
    d.release(r2);
    d.release(r1);
    assert_eq!(d.free_slots(), Some(0), "both quarantined");
    assert!(
        staged_room(&mut d, 3, &[4], now).is_empty(),
        "plain path meanwhile"
    );
    // The quarantine counts from the first grant that saw it (room 3's, at `now`).
    assert!(staged_room(&mut d, 4, &[4], now + q / 2).is_empty());
    let after = now + q;
    assert_eq!(staged_room(&mut d, 5, &[4], after), vec![0]);
    assert_eq!(staged_room(&mut d, 6, &[4], after), vec![1]);
    d.handle_notification("p", &staged(5, 0, true, 1, 0, 1));
    assert_eq!(
        d.poll(RoomId::new(5), after),
        KvPoll::Failed,
        "room 6's slot"
    );
    d.handle_notification("p", &staged(6, 0, true, 1, 0, 1));
    d.scatter_done(RoomId::new(6), 1, Err("launch failed".into()));
    assert_eq!(d.poll(RoomId::new(6), after), KvPoll::Failed);
    assert_eq!(
        d.failure(RoomId::new(6)).map(ToString::to_string),
        Some("staging: scatter: launch failed".into())
    );

    // Abort, the prefill's failure push, the waiting timeout: each ends the room's slots.
    let mut d = staged_decode(now);
    for (room, end) in [(1, "abort"), (2, "push"), (3, "timeout")] {
        let t = now + q * 3 * room as u32;
        assert_eq!(staged_room(&mut d, room, &[1], t).len(), 1, "{end}");
        let free = d.free_slots();
        let id = RoomId::new(room);
        match end {
            "abort" => d.fail(id, FailureReason::Aborted("x".into())),
            "push" => d.handle_notification("p", &Notification::fail(id, "oom").encode()),
            _ => assert_eq!(d.poll(id, t + Duration::from_secs(6)), KvPoll::Failed),
        }
        assert_eq!(d.poll(id, t), KvPoll::Failed, "{end}");
        assert_eq!(
            d.free_slots(),
            free,
            "{end}: its slot is quarantined, not free"
        );
        // A late piece of the ended room is dropped, not scattered.
        d.handle_notification("p", &staged(room, 0, true, 0, 0, 1));
        assert!(commands(&mut d).is_empty(), "{end}");
        d.release(id);
    }
    // A receiver dropped mid-transfer quarantines its slots too; unknown rooms change nothing.
    let t = now + q * 20;
    assert_eq!(staged_room(&mut d, 9, &[1], t).len(), 1);
    d.release(RoomId::new(9));
    d.handle_notification("p", &staged(9, 0, true, 0, 0, 1));
    d.scatter_done(RoomId::new(9), 0, Ok(()));
    assert!(commands(&mut d).is_empty());
    assert_eq!(d.rooms(), 0);
    assert_eq!(
        staged_room(&mut d, 10, &[1], t + q * 2).len(),
        1,
        "back after quarantine"
    );
}

// ---- The prefill's slot scheduling, and both cores together. ----

fn gpu_layout(base: u64) -> Layout {
    let mut l = layout(base);
    l.kv_mem = MemType::Vram;
    l
}

fn staged_register(name: &str, ring: nixl_wire::ext::Ring) -> PrefillInbound {
    let PrefillInbound::Register(mut r) = register(name) else {
        unreachable!()
    };
    r.trailing = vec![
        nixl_wire::ext::caps_frame(&["proof", "staging"]),
        ring.frame(),
    ];
    PrefillInbound::Register(r)
}

fn staged_info(room: u64, name: &str, pages: &[u32], slots: &[u32]) -> PrefillInbound {
    let PrefillInbound::Transfer(mut t) = info(room, name, pages, 1) else {
        unreachable!()
    };
    t.trailing = vec![nixl_wire::ext::slots_frame(slots)];
    PrefillInbound::Transfer(t)
}

/// A VRAM prefill staging 4-page pieces (its slots hold 4 pages of 2 × 4096 bytes), two local
/// slots, with a registered staging decode "d0".
fn staged_prefill(now: Instant, drv: &mut FakeDriver) -> PrefillCore {
    let mut p = PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300))
        .with_staging(4 * 8192, 2);
    p.handle_inbound(staged_register("d0", RING), now);
    drv.run(&mut p);
    assert!(
        p.peer(&agent("d0"))
            .is_some_and(|peer| peer.ring == Some(RING))
    );
    p
}

#[test]
fn staged_prefill_splits_chunks_waits_for_freed_slots_and_sends_aux_last() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = staged_prefill(now, &mut drv);
    let room = RoomId::new(1);
    let dst: Vec<u32> = (20..30).collect();
    p.handle_inbound(staged_info(1, "d0", &dst, &[1, 0]), now);
    p.sender_new(room, now);
    p.sender_init(room, 10, 1).unwrap();
    let src: Vec<u32> = (40..50).collect();
    p.sender_send(room, &src[..6], now).unwrap();
    drv.run(&mut p);
    assert!(drv.take_posts().is_empty(), "no plain KV post");
    let st = std::mem::take(&mut drv.stages);
    assert_eq!(st.len(), 2);
    assert_eq!(
        (st[0].src_pages.clone(), st[0].local_slot, st[0].bytes),
        (src[..4].to_vec(), 0, 4 * 8192)
    );
    assert_eq!(st[0].remote_addr, RING.slot_addr(1).unwrap());
    assert_eq!(st[1].remote_addr, RING.slot_addr(0).unwrap());
    assert_eq!(
        nixl_wire::ext::StagedNotice::decode(&st[1].notif),
        Some(nixl_wire::ext::StagedNotice {
            room,
            chunk: 1,
            last: false,
            slot: 0,
            first_page_offset: 4,
            pages: 2,
            slice: None,
        })
    );
    // The last chunk waits: both granted slots hold unscattered pieces.
    p.sender_send(room, &src[6..], now).unwrap();
    drv.run(&mut p);
    assert!(drv.stages.is_empty() && drv.take_posts().is_empty());
    p.staged_done(room, 0, Ok(()), now);
    p.staged_done(room, 1, Ok(()), now);
    drv.run(&mut p);
    assert!(drv.stages.is_empty(), "WRITE done is not slot freed");
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    // Freed by someone else, or twice, changes nothing.
    let freed = |agent: &str, slot| {
        PrefillInbound::Freed(nixl_wire::ext::FreedMessage {
            notice: nixl_wire::ext::FreedNotice { room, slot },
            agent: AgentName::new(agent).unwrap(),
            trailing: Vec::new(),
        })
    };
    p.handle_inbound(freed("impostor", 0), now);
    // A freed notice over NIXL is not the protocol's (a decode cannot send one) and is ignored.
    let notice = nixl_wire::ext::FreedNotice { room, slot: 0 }.encode();
    p.handle_notification("d0", &notice, now);
    drv.run(&mut p);
    assert!(drv.stages.is_empty());
    p.handle_inbound(freed("d0", 0), now);
    p.handle_inbound(freed("d0", 0), now);
    drv.run(&mut p);
    let st = std::mem::take(&mut drv.stages);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].src_pages, src[6..].to_vec());
    let n = nixl_wire::ext::StagedNotice::decode(&st[0].notif).unwrap();
    assert!(n.last && n.chunk == 2 && n.first_page_offset == 6 && n.slot == 0);
    let aux = drv.take_posts();
    assert_eq!(aux.len(), 1);
    assert_eq!(aux[0].kind, ListKind::Aux);
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    p.staged_done(room, st[0].local_slot, Ok(()), now);
    p.transfer_done(room, Ok(()));
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    assert_eq!(p.free_staging_slots(), Some(2));
}

#[test]
fn rooms_take_the_plain_path_unless_everything_fits() {
    let now = Instant::now();
    let plain_posts = |p: &mut PrefillCore, drv: &mut FakeDriver, room: u64, slots: &[u32]| {
        p.handle_inbound(staged_info(room, "d0", &[1, 2], slots), now);
        let id = RoomId::new(room);
        p.sender_new(id, now);
        p.sender_init(id, 2, 0).unwrap();
        p.sender_send(id, &[3, 4], now).unwrap();
        drv.run(p);
        let posts = drv.take_posts();
        (posts.len(), std::mem::take(&mut drv.stages).len())
    };
    // Staging on, but the info grants no slot, or a slot outside the ring.
    let mut drv = FakeDriver::new();
    let mut p = staged_prefill(now, &mut drv);
    assert_eq!(plain_posts(&mut p, &mut drv, 1, &[]), (2, 0));
    assert_eq!(plain_posts(&mut p, &mut drv, 2, &[2]), (2, 0));
    assert_eq!(
        plain_posts(&mut p, &mut drv, 3, &[0]),
        (1, 1),
        "the aux post and a piece"
    );
    // Staging off (the default), or host pools, or a decode without a ring.
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300));
    p.handle_inbound(staged_register("d0", RING), now);
    drv.run(&mut p);
    assert_eq!(plain_posts(&mut p, &mut drv, 1, &[0]), (2, 0));
    let mut drv = FakeDriver::new();
    let mut p =
        PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300)).with_staging(1 << 20, 2);
    p.handle_inbound(staged_register("d0", RING), now);
    drv.run(&mut p);
    assert_eq!(plain_posts(&mut p, &mut drv, 1, &[0]), (2, 0));
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300))
        .with_staging(1 << 20, 2);
    p.handle_inbound(register("d0"), now);
    drv.run(&mut p);
    assert_eq!(plain_posts(&mut p, &mut drv, 1, &[0]), (2, 0));
    // Our slots hold no page: plain.
    let mut drv = FakeDriver::new();
    let mut p =
        PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300)).with_staging(100, 2);
    p.handle_inbound(staged_register("d0", RING), now);
    drv.run(&mut p);
    assert_eq!(plain_posts(&mut p, &mut drv, 1, &[0]), (2, 0));
}

#[test]
fn staged_prefill_failures_end_rooms_and_return_slots() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = staged_prefill(now, &mut drv);
    let start = |p: &mut PrefillCore, drv: &mut FakeDriver, room: u64, t: Instant| {
        let id = RoomId::new(room);
        p.handle_inbound(staged_info(room, "d0", &[1, 2, 3, 4, 5, 6, 7, 8], &[0]), t);
        p.sender_new(id, t);
        p.sender_init(id, 8, 0).unwrap();
        p.sender_send(id, &[1, 2, 3, 4, 5, 6, 7, 8], t).unwrap();
        drv.run(p);
        std::mem::take(&mut drv.stages)
    };
    // A failed gather or WRITE fails the room; the waiting piece is never posted.
    let st = start(&mut p, &mut drv, 1, now);
    assert_eq!(st.len(), 1);
    let dead = FailureReason::Transfer {
        peer: "d0".into(),
        reason: "peer gone".into(),
    };
    p.staged_done(RoomId::new(1), st[0].local_slot, Err(dead.clone()), now);
    assert_eq!(p.sender_poll(RoomId::new(1)), KvPoll::Failed);
    assert_eq!(p.failure(RoomId::new(1)), Some(&dead));
    p.handle_notification(
        "d0",
        &nixl_wire::ext::FreedNotice {
            room: RoomId::new(1),
            slot: 0,
        }
        .encode(),
        now,
    );
    drv.run(&mut p);
    assert!(drv.stages.is_empty());
    assert_eq!(drv.notified.len(), 1, "the failure push");
    assert_eq!(p.free_staging_slots(), Some(2));

    // A decode that never frees its slot: the room fails after the stall timeout.
    let st = start(&mut p, &mut drv, 2, now);
    p.staged_done(RoomId::new(2), st[0].local_slot, Ok(()), now);
    assert!(
        p.poll_timeout() <= Some(now + STALL),
        "the driver wakes for the stall"
    );
    p.handle_timeout(now + STALL / 2);
    assert_eq!(p.sender_poll(RoomId::new(2)), KvPoll::WaitingForInput);
    let next = p.poll_timeout().unwrap();
    assert!(next > now + STALL / 2 && next <= now + STALL, "{next:?}");
    p.handle_timeout(now + STALL);
    assert_eq!(p.sender_poll(RoomId::new(2)), KvPoll::Failed);
    assert!(
        p.poll_timeout().is_none_or(|t| t > now + STALL),
        "no deadline in the past once the stall is handled"
    );
    assert!(matches!(
        p.failure(RoomId::new(2)),
        Some(FailureReason::Staging(_))
    ));

    // A decode forgotten mid-transfer; a sender dropped with a piece in flight.
    let st = start(&mut p, &mut drv, 3, now);
    p.release(RoomId::new(3));
    assert_eq!(p.free_staging_slots(), Some(1));
    p.staged_done(RoomId::new(3), st[0].local_slot, Ok(()), now);
    assert_eq!(p.free_staging_slots(), Some(2));
    start(&mut p, &mut drv, 4, now);
    p.remove_peer(&agent("d0"));
    assert_eq!(p.sender_poll(RoomId::new(4)), KvPoll::Failed);
}

const STALL: Duration = crate::proto::prefill::STAGED_STALL_TIMEOUT;

/// Both cores together, many rooms at once over a ring of 4 slots, 2 per room: every staged
/// room succeeds, each piece counted only after its scatter, every slot free at the end, and
/// a room that found the ring full goes plain.
#[test]
fn staged_rooms_between_both_cores_succeed_and_free_every_slot() {
    let now = Instant::now();
    let ring = nixl_wire::ext::Ring { slots: 4, ..RING };
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    let mut me = identity();
    me.staging = Some(decode::DecodeStaging::new(ring, 2));
    let mut d = DecodeCore::new(me, timers, now);
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300))
        .with_staging(4 * 8192, 3);
    let rooms: Vec<RoomId> = (1..=3).map(RoomId::new).collect();
    for (k, &room) in rooms.iter().enumerate() {
        bootstrap(&mut d, room, 5000, now);
        let dst: Vec<u32> = (0..10).map(|i| 10 * k as u32 + i).collect();
        d.receiver_init(room, &dst, k as u32, now);
        for c in commands(&mut d) {
            if let decode::Command::Send { frames, .. } = c {
                p.handle_inbound(PrefillInbound::decode(&frames).unwrap(), now);
                drv.run(&mut p);
            }
        }
        p.sender_new(room, now);
        p.sender_init(room, 10, 0).unwrap();
    }
    for &room in &rooms {
        p.sender_send(room, &[1, 2, 3, 4, 5], now).unwrap();
        p.sender_send(room, &[6, 7, 8, 9, 10], now).unwrap();
    }
    drv.run(&mut p);
    // Room 3 found the ring full: plain KV posts and its aux.
    let plain: Vec<Post> = drv.take_posts();
    assert!(plain.iter().all(|post| post.room == rooms[2]));
    assert_eq!(plain.len(), 3);
    for post in &plain {
        d.handle_notification("dec", &post.notif);
        p.transfer_done(post.room, Ok(()));
    }
    // Deliver staged WRITEs one at a time; scatter; relay freed notices.
    let mut rounds = 0;
    while !drv.stages.is_empty() || !drv.posts.is_empty() {
        rounds += 1;
        assert!(rounds < 100, "no progress");
        for w in std::mem::take(&mut drv.stages) {
            p.staged_done(w.room, w.local_slot, Ok(()), now);
            d.handle_notification("pre", &w.notif);
        }
        for post in drv.take_posts() {
            d.handle_notification("pre", &post.notif);
            p.transfer_done(post.room, Ok(()));
        }
        for c in commands(&mut d) {
            match c {
                decode::Command::Scatter {
                    room, slot, pages, ..
                } => {
                    assert!(!pages.is_empty() && pages.len() <= 4);
                    assert_ne!(d.poll(room, now), KvPoll::Success);
                    d.scatter_done(room, slot, Ok(()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        for c in commands(&mut d) {
            let m = freed_message(c);
            p.handle_inbound(PrefillInbound::Freed(m), now);
        }
        drv.run(&mut p);
    }
    for &room in &rooms {
        assert_eq!(d.poll(room, now), KvPoll::Success, "{room}");
        assert_eq!(p.sender_poll(room), KvPoll::Success, "{room}");
    }
    assert_eq!(d.free_slots(), Some(4));
    assert_eq!(p.free_staging_slots(), Some(3));
}

proptest! {
    /// Whatever the chunk sizes, the slots granted and the order in which WRITEs complete,
    /// scatters finish and freed notices arrive, both cores end in Success, the scatters cover
    /// the decode's pages exactly once and in order of the sender's pages, and every slot is free.
    #[test]
    fn staged_rooms_survive_any_event_order(
        chunks in prop::collection::vec(1u32..12, 1..6),
        per_room in 1u32..4,
        local_slots in 1u32..4,
        order in prop::collection::vec(0u8..4, 0..400),
    ) {
        let now = Instant::now();
        let total: u32 = chunks.iter().sum();
        prop_assume!(total <= 64);
        let ring = nixl_wire::ext::Ring { slots: 4, ..RING };
        let timers = DecodeTimers::new(None, Duration::from_secs(5), 2);
        let mut me = identity();
        me.staging = Some(decode::DecodeStaging::new(ring, per_room));
        let mut d = DecodeCore::new(me, timers, now);
        let mut drv = FakeDriver::new();
        let mut p = PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300))
            .with_staging(3 * 8192, local_slots);
        let room = RoomId::new(1);
        bootstrap(&mut d, room, 5000, now);
        let dst: Vec<u32> = (0..total).rev().collect();
        d.receiver_init(room, &dst, 0, now);
        for c in commands(&mut d) {
            if let decode::Command::Send { frames, .. } = c {
                p.handle_inbound(PrefillInbound::decode(&frames).unwrap(), now);
                drv.run(&mut p);
            }
        }
        p.sender_new(room, now);
        p.sender_init(room, total, 0).unwrap();
        let mut next = 0u32;
        for &c in &chunks {
            let src: Vec<u32> = (next..next + c).collect();
            p.sender_send(room, &src, now).unwrap();
            next += c;
        }
        drv.run(&mut p);
        // Queues of pending events; `order` picks which kind goes next.
        let mut writes: VecDeque<crate::proto::prefill::StagedWrite> = VecDeque::new();
        let mut scatters: VecDeque<(u32, Vec<u32>)> = VecDeque::new();
        let mut freed: VecDeque<nixl_wire::ext::FreedMessage> = VecDeque::new();
        let mut covered: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut pick = order.into_iter().chain(std::iter::repeat_n(0u8, 10_000));
        for _ in 0..10_000 {
            writes.extend(drv.stages.drain(..));
            for post in drv.take_posts() {
                d.handle_notification("pre", &post.notif);
                p.transfer_done(post.room, Ok(()));
            }
            for c in commands(&mut d) {
                match c {
                    decode::Command::Scatter { slot, pages, .. } => scatters.push_back((slot, pages)),
                    c @ decode::Command::Send { .. } => freed.push_back(freed_message(c)),
                }
            }
            if writes.is_empty() && scatters.is_empty() && freed.is_empty() {
                break;
            }
            match pick.next().unwrap_or(0) % 3 {
                0 if !writes.is_empty() => {
                    let w = writes.pop_front().unwrap();
                    let n = nixl_wire::ext::StagedNotice::decode(&w.notif).unwrap();
                    covered.push((n.first_page_offset, w.src_pages.clone()));
                    p.staged_done(w.room, w.local_slot, Ok(()), now);
                    d.handle_notification("pre", &w.notif);
                }
                1 if !scatters.is_empty() => {
                    let (slot, pages) = scatters.pop_front().unwrap();
                    prop_assert_ne!(d.poll(room, now), KvPoll::Success);
                    let start = pages.first().map(|&pg| total - 1 - pg).unwrap();
                    prop_assert_eq!(pages, dst[start as usize..][..pages_len(&covered, start)].to_vec());
                    d.scatter_done(room, slot, Ok(()));
                }
                _ if !freed.is_empty() => {
                    p.handle_inbound(PrefillInbound::Freed(freed.pop_front().unwrap()), now);
                }
                _ => {
                    // The picked queue is empty: take the first non-empty one.
                    if let Some(w) = writes.pop_front() {
                        let n = nixl_wire::ext::StagedNotice::decode(&w.notif).unwrap();
                        covered.push((n.first_page_offset, w.src_pages.clone()));
                        p.staged_done(w.room, w.local_slot, Ok(()), now);
                        d.handle_notification("pre", &w.notif);
                    } else if let Some((slot, _)) = scatters.pop_front() {
                        d.scatter_done(room, slot, Ok(()));
                    }
                }
            }
            drv.run(&mut p);
        }
        prop_assert_eq!(d.poll(room, now), KvPoll::Success);
        prop_assert_eq!(p.sender_poll(room), KvPoll::Success);
        covered.sort();
        let sent: Vec<u32> = covered.into_iter().flat_map(|(_, s)| s).collect();
        prop_assert_eq!(sent, (0..total).collect::<Vec<_>>());
        prop_assert_eq!(d.free_slots(), Some(4));
        prop_assert_eq!(p.free_staging_slots(), Some(local_slots));
    }
}

/// Pages of the piece starting at `start` among the written pieces.
fn pages_len(covered: &[(u32, Vec<u32>)], start: u32) -> usize {
    covered
        .iter()
        .find(|(off, _)| *off == start)
        .map_or(0, |(_, s)| s.len())
}

#[test]
fn freed_slots_need_the_proof_once_their_decode_proved_itself() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let proofs = crate::proto::prefill::Proofs {
        seed: [9; 32],
        endpoint: "tcp://127.0.0.1:5000".into(),
        strict: false,
    };
    let mut p = PrefillCore::new(gpu_layout(0x1000_0000), Duration::from_secs(300))
        .with_staging(4 * 8192, 2)
        .with_proofs(proofs);
    p.handle_inbound(staged_register("d0", RING), now);
    drv.run(&mut p);
    let secret = nixl_wire::ext::ProofNotice::decode(&drv.notified[0].1)
        .unwrap()
        .secret;
    let room = RoomId::new(1);
    let dst: Vec<u32> = (20..30).collect();
    let PrefillInbound::Transfer(mut t) = staged_info(1, "d0", &dst, &[1]) else {
        unreachable!()
    };
    t.trailing.insert(0, nixl_wire::ext::proof_frame(&secret));
    p.handle_inbound(PrefillInbound::Transfer(t), now);
    p.sender_new(room, now);
    p.sender_init(room, 10, 1).unwrap();
    let src: Vec<u32> = (40..50).collect();
    p.sender_send(room, &src, now).unwrap();
    drv.run(&mut p);
    // One granted slot: one piece at a time.
    let st = std::mem::take(&mut drv.stages);
    assert_eq!(st.len(), 1);
    p.staged_done(room, st[0].local_slot, Ok(()), now);
    drv.run(&mut p);
    assert!(drv.stages.is_empty());
    let freed = |trailing: Vec<Bytes>| {
        PrefillInbound::Freed(nixl_wire::ext::FreedMessage {
            notice: nixl_wire::ext::FreedNotice { room, slot: 1 },
            agent: agent("d0"),
            trailing,
        })
    };
    // The agent proved itself with its info: a freed slot without its proof, or with another,
    // is refused (anyone could send one to make the prefill overwrite a slot being scattered).
    p.handle_inbound(freed(Vec::new()), now);
    p.handle_inbound(freed(vec![nixl_wire::ext::proof_frame("0123")]), now);
    drv.run(&mut p);
    assert!(
        drv.stages.is_empty(),
        "a freed slot without the proof was taken"
    );
    p.handle_inbound(freed(vec![nixl_wire::ext::proof_frame(&secret)]), now);
    drv.run(&mut p);
    let st = std::mem::take(&mut drv.stages);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].src_pages, src[4..8].to_vec());
}
