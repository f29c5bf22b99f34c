//! Head slices on the staged path between our peers: `P < D` packed into our staging slot as
//! the decode's pages, `P > D` our whole pages scattered by slice on the decode; every byte
//! checked against the naive model through both sides' copy tables.

use nixl_wire::ext::{Ring, StagedNotice, StagedSlice};

use super::*;

/// A decode rank's ring in the staged tests: two slots of four of its 32-byte pages.
fn sliced_ring(addr: u64) -> Ring {
    Ring {
        addr,
        slot_bytes: 4 * 2 * 32,
        slots: 2,
        gpu: 0,
    }
}

/// The bytes a staged piece of head slices leaves in the decode's pools, run as both drivers
/// run it: our packing gather into our slot, the WRITE of the slot into the decode's ring slot,
/// then the decode's own scatter of that slot into the pages the notice names (the decode's
/// staging layout, pages of `decode.kv_item_lens`).
fn run_staged_piece(
    w: &crate::proto::prefill::StagedWrite,
    prefill: &Layout,
    decode: &Layout,
    dst_pages: &[u32],
    out: &mut std::collections::BTreeMap<u64, u8>,
) {
    use nixl_core::staging::StagingLayout;
    const SLOT: u64 = 0x7000_0000;
    let byte = |a: u64| (a ^ (a >> 8) ^ (a >> 16)) as u8;
    let pack = w.pack.expect("head slices are packed");
    let n = w.src_pages.len();
    let nb = prefill.kv_ptrs.len();
    assert_eq!(
        w.bytes,
        nb as u64 * n as u64 * pack.item,
        "the WRITE is the packed pages"
    );
    let ours = crate::proto::staging::staging_layout(prefill).unwrap();
    let area = StagingLayout::packed(SLOT, nb, n, pack.item).unwrap();
    let idx: Vec<u32> = (0..n as u32).collect();
    let mut slot = vec![None; w.bytes as usize];
    for (s, d, len) in ours
        .sliced_table(&w.src_pages, &area, &idx, &pack.slice)
        .unwrap()
        .copies()
    {
        for k in 0..len {
            slot[(d - SLOT + k) as usize] = Some(byte(s + k));
        }
    }
    let notice = StagedNotice::decode(&w.notif).unwrap();
    let from = notice.first_page_offset as usize;
    let pages = &dst_pages[from..from + notice.pages as usize];
    let theirs = crate::proto::staging::staging_layout(decode).unwrap();
    for (pool, off, len) in theirs.table(pages, w.bytes).unwrap().segments() {
        for k in 0..len {
            let b = slot[(off + k) as usize].expect("a scattered byte the gather never wrote");
            assert!(out.insert(pool + k, b).is_none(), "a byte written twice");
        }
    }
}

#[test]
fn a_staging_prefill_stages_each_decode_rank_its_heads_as_the_pages_its_scatter_takes() {
    let now = Instant::now();
    let mut l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    // Our slots hold two of our pages of both buffers: the 3-page chunk goes in two pieces.
    let mut p = PrefillCore::new(l.clone(), Duration::from_secs(300))
        .with_staging(2 * 2 * 64, 4)
        .with_packing();
    let mut drv = FakeDriver::new();
    let ranks = [
        ("d0", 0u64, 0x9000_0000u64, [5u32, 6, 9], 0x7100_0000u64),
        ("d1", 1, 0xa000_0000, [0, 1, 2], 0x7200_0000),
    ];
    for (name, rank, base, _, ring) in ranks {
        let PrefillInbound::Register(mut r) = sliced_register(name, rank as u32, base) else {
            unreachable!()
        };
        r.trailing = vec![
            nixl_wire::ext::caps_frame(&["proof", "staging"]),
            sliced_ring(ring).frame(),
        ];
        p.handle_inbound(PrefillInbound::Register(r), now);
    }
    drv.run(&mut p);
    let room = RoomId::new(1);
    for (name, _, _, dst, _) in ranks {
        // d0 grants one slot: its second piece waits for the first's slot to be freed.
        let slots: &[u32] = if name == "d0" { &[1] } else { &[0, 1] };
        let PrefillInbound::Transfer(mut t) = info(1, name, &dst, 2) else {
            unreachable!()
        };
        t.trailing = vec![nixl_wire::ext::slots_frame(slots)];
        p.handle_inbound(PrefillInbound::Transfer(t), now);
    }
    p.sender_new(room, now);
    p.sender_init(room, 3, 0).unwrap();
    p.sender_send(room, &[3, 4, 10], now).unwrap();
    drv.run(&mut p);
    // d1's pieces are all posted: its aux WRITE follows them; d0's waits.
    let mut aux = drv.take_posts();
    assert_eq!(aux.len(), 1);
    assert_eq!((aux[0].kind, aux[0].peer.as_str()), (ListKind::Aux, "d1"));
    let mut stages = std::mem::take(&mut drv.stages);
    let of = |s: &[crate::proto::prefill::StagedWrite], name: &str| {
        s.iter()
            .filter(|w| w.peer.as_str() == name)
            .map(|w| w.src_pages.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(&stages, "d0"), vec![vec![3, 4]]);
    assert_eq!(of(&stages, "d1"), vec![vec![3, 4], vec![10]]);
    // Each piece goes to a slot its decode granted: d0's slot 1, d1's slots 0 and 1.
    let addrs: Vec<u64> = stages.iter().map(|w| w.remote_addr).collect();
    let slot = sliced_ring(0).slot_bytes;
    assert_eq!(
        addrs,
        vec![0x7100_0000 + slot, 0x7200_0000, 0x7200_0000 + slot]
    );
    for w in &stages {
        p.staged_done(room, w.local_slot, Ok(()), now);
    }
    drv.run(&mut p);
    assert!(drv.stages.is_empty(), "a WRITE done is not its slot freed");
    p.handle_inbound(
        PrefillInbound::Freed(nixl_wire::ext::FreedMessage {
            notice: nixl_wire::ext::FreedNotice { room, slot: 1 },
            agent: agent("d0"),
            trailing: Vec::new(),
        }),
        now,
    );
    drv.run(&mut p);
    let last = std::mem::take(&mut drv.stages);
    assert_eq!(of(&last, "d0"), vec![vec![10]]);
    p.staged_done(room, last[0].local_slot, Ok(()), now);
    stages.extend(last);

    // Every byte each decode rank's scatters leave is exactly its heads (the naive model).
    for (name, rank, base, dst, _) in ranks {
        let mut decode = layout(base);
        decode.kv_mem = MemType::Vram;
        decode.kv_item_lens = vec![32; decode.kv_ptrs.len()];
        let mut got = std::collections::BTreeMap::new();
        for w in stages.iter().filter(|w| w.peer.as_str() == name) {
            run_staged_piece(w, &l, &decode, &dst, &mut got);
        }
        let want = rank_heads(&l, &decode, rank, &dst);
        assert_eq!(got, want, "decode rank {rank}");
    }
    // Each decode's aux WRITE went after its last piece; then the room succeeds.
    aux.extend(drv.take_posts());
    assert_eq!(aux.len(), 2);
    assert_eq!(aux[1].peer.as_str(), "d0");
    assert!(aux.iter().all(|a| a.kind == ListKind::Aux));
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    for a in aux {
        p.transfer_done(a.room, Ok(()));
    }
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    assert_eq!(p.free_staging_slots(), Some(4));
}

#[test]
fn head_slices_are_staged_only_when_packed_and_every_decode_stages() {
    let now = Instant::now();
    let mut l = prefill_layout(0x1000_0000, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    let staged_posts = |packing: bool, ringed: &[&str]| {
        let mut p = PrefillCore::new(l.clone(), Duration::from_secs(300)).with_staging(1 << 20, 4);
        if packing {
            p = p.with_packing();
        }
        let mut drv = FakeDriver::new();
        for (name, rank, base) in [("d0", 0, 0x9000_0000u64), ("d1", 1, 0xa000_0000)] {
            let PrefillInbound::Register(mut r) = sliced_register(name, rank, base) else {
                unreachable!()
            };
            if ringed.contains(&name) {
                r.trailing = vec![
                    nixl_wire::ext::caps_frame(&["proof", "staging"]),
                    sliced_ring(base + 0x100_0000).frame(),
                ];
            }
            p.handle_inbound(PrefillInbound::Register(r), now);
        }
        drv.run(&mut p);
        for (name, dst) in [("d0", [5u32, 6, 9]), ("d1", [0, 1, 2])] {
            let PrefillInbound::Transfer(mut t) = info(1, name, &dst, 2) else {
                unreachable!()
            };
            t.trailing = vec![nixl_wire::ext::slots_frame(&[0])];
            p.handle_inbound(PrefillInbound::Transfer(t), now);
        }
        let room = RoomId::new(1);
        p.sender_new(room, now);
        p.sender_init(room, 3, 0).unwrap();
        p.sender_send(room, &[3, 4, 10], now).unwrap();
        drv.run(&mut p);
        let posts = drv.take_posts();
        let packed = posts
            .iter()
            .filter(|q| matches!(q.work, Work::Packed { .. }))
            .count();
        (drv.stages.len(), packed)
    };
    assert_eq!(
        staged_posts(true, &["d0", "d1"]),
        (2, 0),
        "one piece each, staged"
    );
    // A decode without a ring: the whole room goes packed (the wire SGLang decodes take).
    assert_eq!(staged_posts(true, &["d1"]), (0, 2));
    // Without packing the slices are per-token descriptors, never staged.
    assert_eq!(staged_posts(false, &["d0", "d1"]), (0, 0));
}

/// Rank `rank` of a prefill of TP 2 (4 of 8 heads; pools at `base`) staging to "d0", a decode
/// of TP 1 (8 heads: 128-byte pages) with a ring of four of its pages a slot: room 1, our pages
/// [3, 4] to its pages [5, 6]. Returns the staged WRITEs and the aux posts.
fn larger_prefill_stages(rank: u32, base: u64) -> (Layout, Vec<StagedWriteOf>, Vec<Post>) {
    let now = Instant::now();
    let mut l = prefill_layout(base, Some((HEADS, TOKENS)));
    l.kv_mem = MemType::Vram;
    l.tp.tp = 2;
    l.tp.rank = rank;
    let mut p = PrefillCore::new(l.clone(), Duration::from_secs(300)).with_staging(1 << 20, 2);
    let mut drv = FakeDriver::new();
    let PrefillInbound::Register(mut r) = register_with("d0", &layout(0x9000_0000)) else {
        unreachable!()
    };
    r.tp_info = Some(DecodeTpInfo {
        decode_tp_size: 1,
        decode_tp_rank: 0,
        dst_kv_item_len: DECODE_ITEM,
    });
    let ring = Ring {
        addr: 0x7100_0000,
        slot_bytes: 4 * 2 * DECODE_ITEM,
        slots: 2,
        gpu: 0,
    };
    r.trailing = vec![
        nixl_wire::ext::caps_frame(&["proof", "staging"]),
        ring.frame(),
    ];
    p.handle_inbound(PrefillInbound::Register(r), now);
    drv.run(&mut p);
    let PrefillInbound::Transfer(mut t) = info(1, "d0", &[5, 6], 1) else {
        unreachable!()
    };
    t.trailing = vec![nixl_wire::ext::slots_frame(&[rank])];
    p.handle_inbound(PrefillInbound::Transfer(t), now);
    let room = RoomId::new(1);
    p.sender_new(room, now);
    p.sender_init(room, 2, 0).unwrap();
    p.sender_send(room, &[3, 4], now).unwrap();
    drv.run(&mut p);
    let stages = std::mem::take(&mut drv.stages);
    for w in &stages {
        p.staged_done(room, w.local_slot, Ok(()), now);
    }
    let aux = drv.take_posts();
    for a in &aux {
        p.transfer_done(a.room, Ok(()));
    }
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    (l, stages, aux)
}

type StagedWriteOf = crate::proto::prefill::StagedWrite;

/// A decode page of TP 1: 2 tokens × 8 heads × 8 bytes.
const DECODE_ITEM: u64 = 2 * 8 * HEAD_BYTES;

#[test]
fn a_larger_prefill_stages_whole_pages_that_the_decode_scatters_by_slice() {
    use nixl_core::staging::StagingLayout;
    const SLOT: u64 = 0x7000_0000;
    let byte = |a: u64| (a ^ (a >> 8) ^ (a >> 16)) as u8;
    let mut decode = layout(0x9000_0000);
    decode.kv_mem = MemType::Vram;
    decode.kv_item_lens = vec![DECODE_ITEM; decode.kv_ptrs.len()];
    let theirs = crate::proto::staging::staging_layout(&decode).unwrap();
    let nb = decode.kv_ptrs.len();
    let mut got = std::collections::BTreeMap::new();
    let mut want = std::collections::BTreeMap::new();
    for (rank, base) in [(0u32, 0x1000_0000u64), (1, 0x2000_0000)] {
        let (l, stages, aux) = larger_prefill_stages(rank, base);
        assert_eq!(aux.len(), 1, "its aux WRITE after its piece");
        let [w] = &stages[..] else {
            panic!("one piece: {stages:?}")
        };
        assert_eq!(
            (w.src_pages.clone(), w.pack),
            (vec![3, 4], None),
            "gathered whole"
        );
        assert_eq!(
            w.remote_addr,
            0x7100_0000 + u64::from(rank) * 4 * 2 * DECODE_ITEM
        );
        let n = StagedNotice::decode(&w.notif).unwrap();
        let slice = n.slice.expect("the notice says how to scatter");
        assert_eq!(
            slice,
            StagedSlice {
                tokens: TOKENS,
                src_token: 32,
                dst_token: 64,
                src_offset: 0,
                dst_offset: u64::from(rank) * 32,
                len: 32,
            }
        );
        // Our gather: our pages whole, buffer-major into the slot.
        let ours = crate::proto::staging::staging_layout(&l).unwrap();
        let mut slot = vec![None; w.bytes as usize];
        for (pool, off, len) in ours.table(&w.src_pages, w.bytes).unwrap().segments() {
            for k in 0..len {
                slot[(off + k) as usize] = Some(byte(pool + k));
            }
        }
        // The decode's scatter by the notice's slice, as its driver runs it.
        let t = crate::proto::slicing::token_slice_of(&slice);
        let area = StagingLayout::packed(SLOT, nb, 2, 64).unwrap();
        for (s, d, len) in area
            .sliced_table(&[0, 1], &theirs, &[5, 6], &t)
            .unwrap()
            .copies()
        {
            for k in 0..len {
                let b = slot[(s - SLOT + k) as usize].expect("a byte the gather never wrote");
                assert!(got.insert(d + k, b).is_none(), "a byte written twice");
            }
        }
        // Naive: prefill rank r's 4 heads of every token go to heads 4r..4r+4 of the decode's.
        for b in 0..nb {
            for (sp, dp) in [(3u64, 5u64), (4, 6)] {
                for tok in 0..u64::from(TOKENS) {
                    for k in 0..32 {
                        let s = l.kv_ptrs[b] + sp * 64 + tok * 32 + k;
                        let d = decode.kv_ptrs[b]
                            + dp * DECODE_ITEM
                            + tok * 64
                            + u64::from(rank) * 32
                            + k;
                        want.insert(d, byte(s));
                    }
                }
            }
        }
    }
    assert_eq!(got, want);
}

/// [`decode_fed_by_two`] with a ring of four slots of four 4096-byte pages, one slot a writer:
/// the decode, its room, and the slots granted to the ranks on ports 5000 and 5001.
fn staging_decode_fed_by_two(now: Instant) -> (DecodeCore, RoomId, [u32; 2]) {
    let mut me = identity();
    let ring = Ring {
        addr: 0x7000_0000,
        slot_bytes: 4 * 2 * 4096,
        slots: 4,
        gpu: 0,
    };
    me.staging = Some(decode::DecodeStaging::new(ring, 1));
    let (mut d, room) = decode_of(me, now);
    let mut slots = [u32::MAX; 2];
    for (endpoint, frames) in sends(&mut d) {
        if let Ok(PrefillInbound::Transfer(t)) = PrefillInbound::decode(&frames) {
            let s = nixl_wire::ext::slots(&t.trailing, 4).expect("slots for each writer");
            let at = usize::from(endpoint.ends_with("5001"));
            slots[at] = s[0];
            assert_eq!(s.len(), 1);
        }
    }
    assert_ne!(slots[0], slots[1]);
    (d, room, slots)
}

/// A staged notice of room 9's only piece (its pages 0..2) in `slot`, with `slice`.
fn piece(slot: u32, slice: Option<StagedSlice>) -> Vec<u8> {
    StagedNotice {
        room: RoomId::new(9),
        chunk: 0,
        last: true,
        slot,
        first_page_offset: 0,
        pages: 2,
        slice,
    }
    .encode()
}

/// Writer `rank`'s slice into the decode's 4096-byte pages of 2 tokens.
fn writer_slice(rank: u64) -> StagedSlice {
    StagedSlice {
        tokens: 2,
        src_token: 1024,
        dst_token: 2048,
        src_offset: 0,
        dst_offset: rank * 1024,
        len: 1024,
    }
}

#[test]
fn a_decode_fed_by_two_grants_each_writer_slots_and_scatters_their_slices() {
    let now = Instant::now();
    let (mut d, room, slots) = staging_decode_fed_by_two(now);
    let aux = Notification::Aux { room }.encode();
    for (rank, agent) in [(0u64, "p0"), (1, "p1")] {
        let slot = slots[rank as usize];
        d.handle_notification(agent, &piece(slot, Some(writer_slice(rank))));
        let mut out = Vec::new();
        d.drain_commands(&mut out);
        assert_eq!(
            out,
            vec![decode::Command::Scatter {
                room,
                slot,
                pages: vec![3, 4],
                slice: Some(writer_slice(rank)),
            }]
        );
        d.scatter_done(room, slot, Ok(()));
        // The slot goes back to the writer it was granted to.
        let freed = sends(&mut d);
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].0, format!("tcp://127.0.0.1:{}", 5000 + rank));
        let Ok(PrefillInbound::Freed(f)) = PrefillInbound::decode(&freed[0].1) else {
            panic!("not a freed-slot message")
        };
        assert_eq!(f.notice, nixl_wire::ext::FreedNotice { room, slot });
        d.handle_notification(agent, &aux);
        let want = if rank == 0 {
            KvPoll::Transferring
        } else {
            KvPoll::Success
        };
        assert_eq!(d.poll(room, now), want, "after writer {rank}");
    }
    assert_eq!(d.free_slots(), Some(4));
}

#[test]
fn a_room_of_two_writers_refuses_whole_pages_and_slices_past_its_pages() {
    let now = Instant::now();
    let past = StagedSlice {
        dst_token: 4096,
        ..writer_slice(1)
    };
    for bad in [None, Some(past)] {
        let (mut d, room, slots) = staging_decode_fed_by_two(now);
        // Whole pages of one writer would overwrite the other's heads; a slice whose token
        // slots pass our pages would write past them.
        d.handle_notification("p0", &piece(slots[0], bad));
        let mut out = Vec::new();
        d.drain_commands(&mut out);
        assert!(
            !out.iter()
                .any(|c| matches!(c, decode::Command::Scatter { .. })),
            "{out:?}"
        );
        assert_eq!(d.poll(room, now), KvPoll::Failed);
        assert!(
            d.failure(room)
                .is_some_and(|f| f.to_string().starts_with("staging")),
            "{:?}",
            d.failure(room)
        );
    }
}
