//! Heterogeneous TP in the cores: a prefill of TP 1 writes each of two decode ranks of TP 2 the
//! heads it owns (docs/protocol.md §5.6); a prefill without its heads, or a layout that does not
//! slice, fails the room with a reason.

use nixl_wire::DecodeTpInfo;

use super::*;
use crate::proto::route::PackArea;
use crate::proto::slicing::{HeadSlice, SliceParams};

/// 4 heads of 8 bytes per token, 2 tokens per page: 64-byte prefill pages, 32-byte decode
/// pages for decodes of TP 2.
const HEADS: u32 = 4;
const TOKENS: u32 = 2;
const HEAD_BYTES: u64 = 8;

fn prefill_layout(base: u64, heads: Option<(u32, u32)>) -> Layout {
    let mut l = layout(base);
    let item = u64::from(TOKENS) * u64::from(HEADS) * HEAD_BYTES;
    l.kv_item_lens = vec![item; l.kv_ptrs.len()];
    l.tp.heads = heads;
    l
}

fn sliced_register(name: &str, rank: u32, base: u64) -> PrefillInbound {
    let PrefillInbound::Register(mut r) = register_with(name, &layout(base)) else {
        unreachable!()
    };
    r.tp_info = Some(DecodeTpInfo {
        decode_tp_size: 2,
        decode_tp_rank: rank,
        dst_kv_item_len: u64::from(TOKENS) * 2 * HEAD_BYTES,
    });
    PrefillInbound::Register(r)
}

fn room_with_two_sliced_decodes(heads: Option<(u32, u32)>) -> (PrefillCore, FakeDriver) {
    let p = PrefillCore::new(prefill_layout(0x1000_0000, heads), Duration::from_secs(300));
    two_sliced_decodes_on(p)
}

/// Room 1 of 3 pages ([3, 4, 10]) sent by `p` to decode ranks d0 (pages 5, 6, 9) and d1
/// (pages 0, 1, 2) of TP 2, the commands run.
fn two_sliced_decodes_on(mut p: PrefillCore) -> (PrefillCore, FakeDriver) {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    p.handle_inbound(sliced_register("d0", 0, 0x9000_0000), now);
    p.handle_inbound(sliced_register("d1", 1, 0xa000_0000), now);
    drv.run(&mut p);
    p.handle_inbound(info(1, "d0", &[5, 6, 9], 2), now);
    p.handle_inbound(info(1, "d1", &[0, 1, 2], 2), now);
    let room = RoomId::new(1);
    p.sender_new(room, now);
    p.sender_init(room, 3, 0).unwrap();
    // A refusal fails the room and is returned too; the tests read it from the room.
    let _ = p.sender_send(room, &[3, 4, 10], now);
    drv.run(&mut p);
    (p, drv)
}

/// The byte model's copies of prefill pages `src` to decode rank `rank` (of TP 2, pool at
/// `base`) pages `dst`.
fn rank_copies(rank: u32, base: u64, src: &[u32], dst: &[u32]) -> Vec<(u64, u64, u64)> {
    let l = prefill_layout(0x1000_0000, None);
    let slice = HeadSlice::new(&SliceParams {
        prefill_tp: 1,
        decode_tp: 2,
        prefill_rank: 0,
        decode_rank: rank,
        kv_heads: HEADS,
        page_tokens: TOKENS,
        src_item: l.kv_item_lens[0],
        dst_item: u64::from(TOKENS) * 2 * HEAD_BYTES,
    })
    .unwrap();
    let pairs: Vec<(u32, u32)> = src.iter().copied().zip(dst.iter().copied()).collect();
    slice
        .copies(&l.kv_ptrs, &layout(base).kv_ptrs, &pairs)
        .unwrap()
}

/// Room `room` from decode infos `infos` (agent, its pages), our pages `src` sent in one chunk
/// with aux slot 0; returns the posts once the commands ran.
fn send_room(
    p: &mut PrefillCore,
    drv: &mut FakeDriver,
    room: u64,
    infos: &[(&str, &[u32])],
    src: &[u32],
) -> Vec<Post> {
    let now = Instant::now();
    for (name, pages) in infos {
        p.handle_inbound(info(room, name, pages, infos.len() as u32), now);
    }
    let id = RoomId::new(room);
    p.sender_new(id, now);
    p.sender_init(id, src.len() as u32, 0).unwrap();
    p.sender_send(id, src, now).unwrap();
    drv.run(p);
    drv.take_posts()
}

#[test]
fn a_smaller_prefill_writes_each_decode_rank_its_heads() {
    let (mut p, mut drv) = room_with_two_sliced_decodes(Some((HEADS, TOKENS)));
    let posts = drv.take_posts();
    let kv: Vec<&Post> = posts.iter().filter(|q| q.kind == ListKind::Kv).collect();
    assert_eq!(kv.len(), 2, "one KV post per decode rank");
    for post in kv {
        let (rank, dst, base) = match post.peer.as_str() {
            "d0" => (0, [5u32, 6, 9], 0x9000_0000u64),
            _ => (1, [0u32, 1, 2], 0xa000_0000u64),
        };
        let want = rank_copies(rank, base, &[3, 4, 10], &dst);
        // The first chunk to a decode: explicit, while the token lists are prepared.
        assert!(matches!(post.work, Work::Explicit { .. }));
        assert_eq!(drv.copies(post), want, "decode rank {rank}");
        // Rank 1 reads heads 2..4 of every prefill token: 16 bytes from offset 16.
        if rank == 1 {
            assert!(want.iter().all(|&(_, _, len)| len == 16));
        }
    }
    for post in posts {
        p.transfer_done(post.room, Ok(()));
    }
    assert_eq!(p.sender_poll(RoomId::new(1)), KvPoll::Success);
}

#[test]
fn later_chunks_take_their_head_slices_from_token_lists_prepared_once() {
    let (mut p, mut drv) = room_with_two_sliced_decodes(Some((HEADS, TOKENS)));
    for post in drv.take_posts() {
        p.transfer_done(post.room, Ok(()));
    }
    assert_eq!(p.sender_poll(RoomId::new(1)), KvPoll::Success);
    // Our token lists (one per rank's slice offset) and each rank's were prepared meanwhile.
    let tokens = |id: &ListId| {
        matches!(
            id,
            ListId::LocalTokens { .. }
                | ListId::Peer {
                    kind: ListKind::Tokens,
                    ..
                }
        )
    };
    assert_eq!(drv.lists.keys().filter(|id| tokens(id)).count(), 4);
    let infos: [(&str, &[u32]); 2] = [("d0", &[7, 8, 63]), ("d1", &[3, 12, 13])];
    let posts = send_room(&mut p, &mut drv, 2, &infos, &[0, 5, 63]);
    let kv: Vec<&Post> = posts.iter().filter(|q| q.kind == ListKind::Kv).collect();
    assert_eq!(kv.len(), 2, "one KV post per decode rank");
    for post in kv {
        let (rank, dst, base) = match post.peer.as_str() {
            "d0" => (0, [7u32, 8, 63], 0x9000_0000u64),
            _ => (1, [3u32, 12, 13], 0xa000_0000u64),
        };
        let Work::Indexed { local, remote, .. } = &post.work else {
            panic!("not indexed: {:?}", post.work)
        };
        assert!(tokens(local) && tokens(remote), "{local:?} {remote:?}");
        assert_eq!(
            drv.copies(post),
            rank_copies(rank, base, &[0, 5, 63], &dst),
            "decode rank {rank}"
        );
    }
    for post in posts {
        p.transfer_done(post.room, Ok(()));
    }
    assert_eq!(p.sender_poll(RoomId::new(2)), KvPoll::Success);
}

#[test]
fn a_prefill_without_its_heads_fails_the_room_with_a_reason() {
    let (p, mut drv) = room_with_two_sliced_decodes(None);
    assert!(drv.take_posts().is_empty());
    assert_eq!(p.sender_poll(RoomId::new(1)), KvPoll::Failed);
    let why = p.failure(RoomId::new(1)).unwrap().to_string();
    assert!(
        why.contains("head slicing") && why.contains("KvArgs::heads"),
        "{why}"
    );
}

#[test]
fn heads_that_do_not_split_fail_the_room_with_a_reason() {
    // 3 heads cannot be shared by 2 decode ranks.
    let (p, mut drv) = room_with_two_sliced_decodes(Some((3, TOKENS)));
    assert!(drv.take_posts().is_empty());
    let why = p.failure(RoomId::new(1)).unwrap().to_string();
    assert!(why.starts_with("head slicing:"), "{why}");
}

/// A decode of TP 1 with `sliced_tp`, bootstrapped against a prefill of TP 2 (ranks on ports
/// 5000 and 5001), its room started.
fn decode_fed_by_two(now: Instant) -> (DecodeCore, RoomId) {
    let (mut d, room) = decode_of(identity(), now);
    let infos: Vec<String> = sends(&mut d)
        .into_iter()
        .filter(|(_, f)| matches!(PrefillInbound::decode(f), Ok(PrefillInbound::Transfer(_))))
        .map(|(e, _)| e)
        .collect();
    assert_eq!(infos, vec!["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"]);
    (d, room)
}

/// A decode of TP 1 as `me` with `sliced_tp`, its room 9 of pages [3, 4] bootstrapped against
/// a prefill of TP 2 (ranks on ports 5000 and 5001) and started; its messages not drained.
fn decode_of(mut me: DecodeConfig, now: Instant) -> (DecodeCore, RoomId) {
    me.sliced_tp = true;
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    let mut d = DecodeCore::new(me, timers, now);
    let room = RoomId::new(9);
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    loop {
        match d.next_lookup(room) {
            Lookup::Parallel(_) => d.parallel_learned(room, Ok(parallel(2, 1))),
            Lookup::Ranks { key, ranks } => {
                assert_eq!(ranks, vec![0, 1], "both prefill ranks hold our heads");
                d.ranks_learned(room, key, Ok(vec![rank_info(5000), rank_info(5001)]));
            }
            _ => break,
        }
    }
    d.receiver_init(room, &[3, 4], 1, now);
    (d, room)
}

#[test]
fn a_room_written_by_two_prefill_ranks_waits_for_both() {
    let now = Instant::now();
    let (mut d, room) = decode_fed_by_two(now);
    let kv = |last| {
        Notification::Kv {
            room,
            chunk: 0.into(),
            last,
            pp: None,
        }
        .encode()
    };
    let aux = Notification::Aux { room }.encode();
    d.handle_notification("p0", &kv(true));
    d.handle_notification("p0", &aux);
    assert_eq!(
        d.poll(room, now),
        KvPoll::Transferring,
        "one writer is not enough"
    );
    d.handle_notification("p1", &kv(true));
    assert_eq!(d.poll(room, now), KvPoll::Transferring);
    // A third agent cannot be one of the room's two writers: ignored.
    d.handle_notification("p2", &aux);
    assert_eq!(d.poll(room, now), KvPoll::Transferring);
    d.handle_notification("p1", &aux);
    assert_eq!(d.poll(room, now), KvPoll::Success);
}

#[test]
fn without_sliced_tp_a_smaller_decode_still_fails() {
    let now = Instant::now();
    let mut d = decode_core(now);
    let room = RoomId::new(9);
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    assert!(matches!(d.next_lookup(room), Lookup::Parallel(_)));
    d.parallel_learned(room, Ok(parallel(2, 1)));
    assert!(matches!(d.next_lookup(room), Lookup::Failed));
    assert!(
        d.failure(room)
            .is_some_and(|f| f.to_string().contains("only supported for MLA"))
    );
}

#[test]
fn a_mapped_same_node_decode_rank_gets_its_heads_by_the_direct_path() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    drv.open_ok = Some(true);
    let mut l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    let mut p = PrefillCore::new(l.clone(), Duration::from_secs(300))
        .with_staging(1 << 20, 2)
        .with_direct("node-a");
    let PrefillInbound::Register(mut r) = sliced_register("d1", 1, 0xa000_0000) else {
        unreachable!()
    };
    let pools = nixl_wire::ext::IpcPools {
        host: "node-a".into(),
        gpu: 1,
        allocs: vec![nixl_wire::ext::IpcAlloc {
            base: 0xa000_0000,
            len: 0x20_0000,
            handle: [1; 64],
        }],
    };
    r.trailing = vec![nixl_wire::ext::caps_frame(&["direct"]), pools.frame()];
    p.handle_inbound(PrefillInbound::Register(r), now);
    drv.run(&mut p);
    assert_eq!(
        drv.opened,
        vec![agent("d1")],
        "sliced decodes are mapped too"
    );
    let posts = send_room(&mut p, &mut drv, 1, &[("d1", &[0, 1, 2])], &[3, 4, 10]);
    let want = HeadSlice::new(&SliceParams {
        prefill_tp: 1,
        decode_tp: 2,
        prefill_rank: 0,
        decode_rank: 1,
        kv_heads: HEADS,
        page_tokens: TOKENS,
        src_item: l.kv_item_lens[0],
        dst_item: u64::from(TOKENS) * 2 * HEAD_BYTES,
    })
    .unwrap();
    assert_eq!(
        posts[0].work,
        Work::Direct {
            src: vec![3, 4, 10],
            dst: vec![0, 1, 2],
            slice: Some(want.token_slice()),
        }
    );
    // Decode rank 1 owns heads 2 and 3: the second half of every prefill token slot.
    let t = want.token_slice();
    assert_eq!(
        (t.src_offset, t.dst_offset, t.len),
        (2 * HEAD_BYTES, 0, 2 * HEAD_BYTES)
    );
    // Run by the fake driver, the kernel's copies are the per-token byte model's.
    let mut decode = layout(0xa000_0000);
    decode.kv_item_lens = vec![u64::from(TOKENS) * 2 * HEAD_BYTES; decode.kv_ptrs.len()];
    drv.with_pools(&l, &[("d1", &decode)]);
    let mut ran = drv.copies(&posts[0]);
    ran.sort_unstable();
    let mut model = rank_copies(1, 0xa000_0000, &[3, 4, 10], &[0, 1, 2]);
    model.sort_unstable();
    assert_eq!(merged(ran), merged(model));
}

/// The bytes a packed post leaves in the decode's pools, run as the driver runs it: each
/// piece's gather (the kernel's table over our packing area) then its WRITE, with the source
/// byte at address `a` being `a`'s low byte mixed.
fn run_packed(post: &Post, prefill: &Layout) -> std::collections::BTreeMap<u64, u8> {
    use nixl_core::staging::StagingLayout;
    let byte = |a: u64| (a ^ (a >> 8) ^ (a >> 16)) as u8;
    let Work::Packed {
        slice,
        item,
        pieces,
        ..
    } = &post.work
    else {
        panic!("not packed: {post:?}");
    };
    let ours = crate::proto::staging::staging_layout(prefill).unwrap();
    let nb = prefill.kv_ptrs.len();
    let mut out = std::collections::BTreeMap::new();
    for piece in pieces {
        const AREA: u64 = 0x7000_0000;
        let n = piece.src.len();
        let area = StagingLayout::packed(AREA, nb, n, *item).unwrap();
        let dst: Vec<u32> = (0..n as u32).collect();
        let table = ours.sliced_table(&piece.src, &area, &dst, slice).unwrap();
        let mut packed = vec![None; nb * n * *item as usize];
        for (s, d, len) in table.copies() {
            for k in 0..len {
                packed[(d - AREA + k) as usize] = Some(byte(s + k));
            }
        }
        for &(off, dst, len) in &piece.copies {
            for k in 0..len {
                let b = packed[(off + k) as usize].expect("a packed byte the gather never wrote");
                assert!(out.insert(dst + k, b).is_none(), "a byte written twice");
            }
        }
    }
    out
}

#[test]
fn a_prefill_that_can_gather_packs_each_decode_rank_whole_pages() {
    let mut l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    // A slot of two of our pages (of both buffers): the 3-page chunk goes in two pieces.
    let p = PrefillCore::new(l.clone(), Duration::from_secs(300))
        .with_staging(2 * 2 * 64, 2)
        .with_packing();
    packs_each_decode_rank_whole_pages(p, &l);
}

#[test]
fn a_prefill_with_host_packing_packs_host_pools_the_same_way() {
    let l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    assert_eq!(l.kv_mem, MemType::Dram);
    // An area of two decode pages (of both buffers): the 3-page chunk goes in two pieces.
    let p = PrefillCore::new(l.clone(), Duration::from_secs(300)).with_host_packing(2 * 2 * 32);
    packs_each_decode_rank_whole_pages(p, &l);
}

#[test]
fn packing_needs_the_areas_of_the_pools_memory() {
    let now = Instant::now();
    let dram = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    let mut vram = dram.clone();
    vram.kv_mem = MemType::Vram;
    let cores = [
        // GPU pools with only host areas, host pools with only a GPU staging buffer.
        PrefillCore::new(vram, Duration::from_secs(300)).with_host_packing(1 << 20),
        PrefillCore::new(dram.clone(), Duration::from_secs(300))
            .with_staging(1 << 20, 2)
            .with_packing(),
        PrefillCore::new(dram, Duration::from_secs(300)).with_host_packing(0),
    ];
    for mut p in cores {
        let mut drv = FakeDriver::new();
        p.handle_inbound(sliced_register("d1", 1, 0xa000_0000), now);
        drv.run(&mut p);
        let posts = send_room(&mut p, &mut drv, 1, &[("d1", &[0, 1, 2])], &[3, 4, 10]);
        assert!(matches!(posts[0].work, Work::Explicit { .. }));
    }
}

/// Two sliced decode ranks on `p` (a prefill of `l`, able to pack two pages per piece) get one
/// room's chunk each as packed pieces, whose gathered and written bytes are exactly their heads.
fn packs_each_decode_rank_whole_pages(p: PrefillCore, l: &Layout) {
    let (mut p, mut drv) = two_sliced_decodes_on(p);
    let room = RoomId::new(1);
    assert_eq!(p.failure(room), None);
    let posts = drv.take_posts();
    let kv: Vec<&Post> = posts.iter().filter(|q| q.kind == ListKind::Kv).collect();
    assert_eq!(kv.len(), 2);
    for post in kv {
        let (rank, dst, base) = match post.peer.as_str() {
            "d0" => (0u64, [5u32, 6, 9], 0x9000_0000u64),
            _ => (1, [0, 1, 2], 0xa000_0000),
        };
        let Work::Packed {
            pieces, item, area, ..
        } = &post.work
        else {
            panic!("not packed: {post:?}");
        };
        assert_eq!(*item, 32);
        // The route named the packer: a kernel on GPU pools, the CPU on host pools.
        match l.kv_mem {
            MemType::Vram => assert!(matches!(area, PackArea::Gpu { per: 2 }), "{area:?}"),
            _ => assert!(matches!(area, PackArea::Host { per: 2 }), "{area:?}"),
        }
        assert_eq!(
            pieces.iter().map(|q| q.src.clone()).collect::<Vec<_>>(),
            vec![vec![3, 4], vec![10]]
        );
        let want = rank_heads(l, &layout(base), rank, &dst);
        assert_eq!(run_packed(post, l), want, "decode rank {rank}");
        // The fake driver executes the packed post to the same bytes.
        let byte = |a: u64| (a ^ (a >> 8) ^ (a >> 16)) as u8;
        let mut decode = layout(base);
        decode.kv_item_lens = vec![32; decode.kv_ptrs.len()];
        drv.with_pools(l, &[(post.peer.as_str(), &decode)]);
        let mut ran = std::collections::BTreeMap::new();
        for (src, dst, len) in drv.copies(post) {
            for k in 0..len {
                assert!(
                    ran.insert(dst + k, byte(src + k)).is_none(),
                    "a byte written twice"
                );
            }
        }
        assert_eq!(ran, want, "decode rank {rank}, run by the fake driver");
        if rank == 1 {
            // Decode pages 0 and 1 continue each other: one WRITE descriptor per buffer.
            assert_eq!(pieces[0].copies.len(), 2);
        }
    }
    for post in posts {
        p.transfer_done(post.room, Ok(()));
    }
    assert_eq!(p.sender_poll(room), KvPoll::Success);
}

/// The naive model: the bytes decode rank `rank` of TP 2 (pool of `decode`) holds after our
/// pages [3, 4, 10] went to its pages `dst`: heads 2r..2r+2 of every token of ours (source
/// byte at address `a` being `a`'s low bytes mixed).
fn rank_heads(
    l: &Layout,
    decode: &Layout,
    rank: u64,
    dst: &[u32],
) -> std::collections::BTreeMap<u64, u8> {
    let byte = |a: u64| (a ^ (a >> 8) ^ (a >> 16)) as u8;
    let mut want = std::collections::BTreeMap::new();
    for b in 0..2 {
        for (&sp, &dp) in [3u64, 4, 10].iter().zip(dst) {
            for t in 0..u64::from(TOKENS) {
                for k in 0..2 * HEAD_BYTES {
                    let s = l.kv_ptrs[b] + sp * 64 + t * 32 + rank * 16 + k;
                    let d = decode.kv_ptrs[b] + u64::from(dp) * 32 + t * 16 + k;
                    want.insert(d, byte(s));
                }
            }
        }
    }
    want
}

#[test]
fn slices_that_share_a_decode_token_slot_are_never_packed() {
    // Two prefill ranks of TP 2 feed one decode rank of TP 1: each writes half of every decode
    // token slot, so a packed page would carry bytes it does not own.
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    l.tp.tp = 2;
    l.tp.rank = 1;
    let mut p = PrefillCore::new(l, Duration::from_secs(300))
        .with_staging(1 << 20, 2)
        .with_packing();
    let PrefillInbound::Register(mut r) = register_with("d0", &layout(0x9000_0000)) else {
        unreachable!()
    };
    r.tp_info = Some(DecodeTpInfo {
        decode_tp_size: 1,
        decode_tp_rank: 0,
        dst_kv_item_len: u64::from(TOKENS) * 2 * u64::from(HEADS) * HEAD_BYTES,
    });
    p.handle_inbound(PrefillInbound::Register(r), now);
    drv.run(&mut p);
    let posts = send_room(&mut p, &mut drv, 1, &[("d0", &[5, 6])], &[3, 4]);
    assert!(matches!(posts[0].work, Work::Explicit { .. }));
    // Rank 1's heads land in the second half of each decode token slot.
    assert!(
        drv.copies(&posts[0])
            .iter()
            .all(|&(_, d, len)| len == 32 && (d - 0x9000_0000) % 64 == 32)
    );
}

#[test]
fn without_packing_a_staging_prefill_keeps_per_token_descriptors() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    let mut p = PrefillCore::new(l, Duration::from_secs(300)).with_staging(1 << 20, 2);
    p.handle_inbound(sliced_register("d1", 1, 0xa000_0000), now);
    drv.run(&mut p);
    let posts = send_room(&mut p, &mut drv, 1, &[("d1", &[0, 1, 2])], &[3, 4, 10]);
    assert!(matches!(posts[0].work, Work::Explicit { .. }));
}

mod staged;
