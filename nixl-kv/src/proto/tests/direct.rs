//! The direct path (docs/protocol.md §3.5): which decodes' pools a prefill maps, KV chunks to
//! a mapped decode lowered to page pairs with their usual notifications, and the fallbacks.

use nixl_wire::ext::{IpcAlloc, IpcPools};

use super::*;

fn ipc(host: &str, gpu: u32) -> IpcPools {
    IpcPools {
        host: host.into(),
        gpu,
        allocs: vec![IpcAlloc {
            base: 0x9000_0000,
            len: 0x20_0000,
            handle: [7; 64],
        }],
    }
}

fn direct_register(name: &str, pools: &IpcPools) -> PrefillInbound {
    let PrefillInbound::Register(mut r) = register(name) else {
        unreachable!()
    };
    r.trailing = vec![
        nixl_wire::ext::caps_frame(&["proof", "direct"]),
        pools.frame(),
    ];
    PrefillInbound::Register(r)
}

fn gpu_prefill(direct: bool) -> PrefillCore {
    let mut l = layout(0x1000_0000);
    l.kv_mem = MemType::Vram;
    let p = PrefillCore::new(l, Duration::from_secs(300)).with_staging(4 * 8192, 2);
    if direct { p.with_direct("node-a") } else { p }
}

#[test]
fn a_mapped_same_node_decode_gets_page_pairs_and_the_usual_notifications() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    drv.open_ok = Some(true);
    let mut p = gpu_prefill(true);
    p.handle_inbound(direct_register("d0", &ipc("node-a", 1)), now);
    drv.run(&mut p);
    assert_eq!(drv.opened, vec![agent("d0")]);
    let room = RoomId::new(1);
    let dst: Vec<u32> = (20..30).collect();
    p.handle_inbound(info(1, "d0", &dst, 1), now);
    p.sender_new(room, now);
    p.sender_init(room, 10, 1).unwrap();
    let src: Vec<u32> = (40..50).collect();
    p.sender_send(room, &src[..6], now).unwrap();
    p.sender_send(room, &src[6..], now).unwrap();
    drv.run(&mut p);
    assert!(drv.stages.is_empty(), "nothing staged");
    let posts = drv.take_posts();
    let kinds: Vec<ListKind> = posts.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, vec![ListKind::Kv, ListKind::Kv, ListKind::Aux]);
    for (i, (post, range)) in posts.iter().zip([0..6, 6..10]).enumerate() {
        assert_eq!(
            post.work,
            Work::Direct {
                src: src[range.clone()].to_vec(),
                dst: dst[range].to_vec(),
                slice: None,
            }
        );
        let want = Notification::Kv {
            room,
            chunk: (i as u32).into(),
            last: i == 1,
            pp: None,
        };
        assert_eq!(post.notif, want.encode());
    }
    assert!(
        !matches!(posts[2].work, Work::Direct { .. }),
        "aux goes by NIXL"
    );
    // Run as the driver runs them, the kernel copies move exactly the naive model's bytes.
    let mut ours = layout(0x1000_0000);
    ours.kv_mem = MemType::Vram;
    drv.with_pools(&ours, &[("d0", &layout(0x9000_0000))]);
    let pairs: Vec<(u32, u32)> = src.iter().copied().zip(dst.iter().copied()).collect();
    let mut ran: Vec<(u64, u64, u64)> = posts[..2].iter().flat_map(|q| drv.copies(q)).collect();
    ran.sort_unstable();
    let mut want = naive_kv(&ours, &layout(0x9000_0000), &pairs);
    want.sort_unstable();
    assert_eq!(merged(ran), merged(want));
    for _ in 0..3 {
        assert_ne!(p.sender_poll(room), KvPoll::Success);
        p.transfer_done(room, Ok(()));
    }
    assert_eq!(p.sender_poll(room), KvPoll::Success);
}

#[test]
fn pools_are_mapped_only_on_our_node_and_a_failed_mapping_keeps_the_plain_path() {
    let now = Instant::now();
    // Another node, another GPU than the registration names, or the direct path off: not
    // even asked.
    for (pools, on) in [
        (ipc("node-b", 1), true),
        (ipc("node-a", 0), true),
        (ipc("node-a", 1), false),
    ] {
        let mut drv = FakeDriver::new();
        drv.open_ok = Some(true);
        let mut p = gpu_prefill(on);
        p.handle_inbound(direct_register("d0", &pools), now);
        drv.run(&mut p);
        assert!(drv.opened.is_empty(), "{pools:?} on={on}");
    }
    // A mapping that fails: the room takes the plain path (NIXL descriptors).
    let mut drv = FakeDriver::new();
    drv.open_ok = Some(false);
    let mut p = gpu_prefill(true);
    p.handle_inbound(direct_register("d0", &ipc("node-a", 1)), now);
    drv.run(&mut p);
    assert_eq!(drv.opened.len(), 1);
    let room = RoomId::new(2);
    p.handle_inbound(info(2, "d0", &[3, 4], 1), now);
    p.sender_new(room, now);
    p.sender_init(room, 2, 1).unwrap();
    p.sender_send(room, &[8, 9], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    assert_eq!(posts.len(), 2);
    assert!(posts.iter().all(|p| !matches!(p.work, Work::Direct { .. })));
    // A malformed ipc frame is no ipc frame.
    let PrefillInbound::Register(mut r) = register("d1") else {
        unreachable!()
    };
    r.trailing = vec![
        nixl_wire::ext::caps_frame(&["direct"]),
        Bytes::from_static(b"nixl-rs:ipc:node-a;1;1,2,zz"),
    ];
    let mut drv = FakeDriver::new();
    drv.open_ok = Some(true);
    let mut p = gpu_prefill(true);
    p.handle_inbound(PrefillInbound::Register(r), now);
    drv.run(&mut p);
    assert!(drv.opened.is_empty());
    assert_eq!(
        p.peer(&agent("d1")).map(|peer| peer.ipc.clone()),
        Some(None)
    );
}

#[test]
fn both_cores_end_a_direct_room_in_success_from_the_usual_notifications() {
    let now = Instant::now();
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    let mut me = identity();
    me.direct = Some(ipc("node-a", 0));
    let mut d = DecodeCore::new(me, timers, now);
    let room = RoomId::new(9);
    bootstrap(&mut d, room, 5000, now);
    d.receiver_init(room, &[4, 5, 6], 0, now);
    let mut cmds = Vec::new();
    d.drain_commands(&mut cmds);
    let mut p = gpu_prefill(true);
    let mut drv = FakeDriver::new();
    drv.open_ok = Some(true);
    for c in cmds {
        let decode::Command::Send { frames, .. } = c else {
            continue;
        };
        let msg = PrefillInbound::decode(&frames).unwrap();
        if let PrefillInbound::Register(r) = &msg {
            assert_eq!(nixl_wire::ext::caps(&r.trailing), vec!["proof", "direct"]);
            assert_eq!(IpcPools::find(&r.trailing), Some(ipc("node-a", 0)));
            assert_eq!(frames.len(), 14, "SGLang's 12 frames, caps and ipc");
        }
        p.handle_inbound(msg, now);
        drv.run(&mut p);
    }
    assert_eq!(drv.opened, vec![agent("dec")]);
    p.sender_new(room, now);
    p.sender_init(room, 3, 1).unwrap();
    p.sender_send(room, &[30, 31, 32], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    assert_eq!(
        posts[0].work,
        Work::Direct {
            src: vec![30, 31, 32],
            dst: vec![4, 5, 6],
            slice: None,
        }
    );
    for post in &posts {
        assert_ne!(d.poll(room, now), KvPoll::Success);
        p.transfer_done(room, Ok(()));
        d.handle_notification("prefill", &post.notif);
    }
    assert_eq!(d.poll(room, now), KvPoll::Success);
    assert_eq!(p.sender_poll(room), KvPoll::Success);
}
