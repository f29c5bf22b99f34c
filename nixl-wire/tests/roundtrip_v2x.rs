//! Property tests of SGLang 0.5.20–0.5.23's messages: each round-trips, is told apart from
//! 0.5.1's by its shape (also with our trailing frames), and arbitrary input never panics.
#![allow(clippy::unwrap_used, reason = "test code")]

use bytes::Bytes;
use nixl_wire::v2x::{
    Abort, AbortAck, AbortReply, ChunkReady, DecodeInbound, KvArgsRegister, KvStatus, MemKind,
    SglangStaging, StagingReq, StagingRsp, TransferInfo, Watermark,
};
use nixl_wire::{AgentName, GUARD, GpuId, PageIndex, PrefillInbound, Profile, RoomId, ext};
use proptest::prelude::*;

fn agent() -> impl Strategy<Value = AgentName> {
    "[ -~]{1,40}".prop_map(|s| AgentName::new(&s).unwrap())
}

fn lists<T: Arbitrary + 'static>() -> impl Strategy<Value = Vec<Vec<T>>> {
    prop::collection::vec(prop::collection::vec(any::<T>(), 0..4), 0..3)
}

fn trailing() -> impl Strategy<Value = Vec<Bytes>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![ext::caps_frame(&[ext::CAP_PROOF])]),
        Just(vec![ext::caps_frame(&[]), ext::proof_frame("s3cret")]),
    ]
}

prop_compose! {
    fn register()(
        n in 0usize..6,
        (ip, port, agent, md) in ("[0-9.]{1,15}", any::<u16>(), agent(), prop::collection::vec(any::<u8>(), 0..200)),
        aux in prop::collection::vec(any::<u64>(), 0..12),
        (state_ptrs, state_item_lens, state_dims, state_layer_ids) in (lists::<u64>(), lists::<u32>(), lists::<u32>(), lists::<u32>()),
        (gpu, tp, rank, item) in (any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()),
        staging in prop::option::of((any::<u64>(), any::<u64>())),
        slots in prop::option::of(any::<u64>()),
        seed in any::<u64>(),
        (dcp_size, dcp_rank) in (any::<u32>(), any::<u32>()),
        state_data_lens in prop::option::of(lists::<u64>()),
        trailing in trailing(),
    ) -> KvArgsRegister {
        let pick = |i: usize| seed.rotate_left(i as u32 * 7);
        KvArgsRegister {
            local_ip: ip,
            rank_port: port,
            agent,
            metadata: md.into(),
            kv_ptrs: (0..n).map(pick).collect(),
            aux_ptrs: aux,
            state_ptrs,
            gpu_id: GpuId::new(gpu),
            decode_tp_size: tp,
            decode_tp_rank: rank,
            dst_kv_item_len: item,
            state_item_lens,
            state_dims,
            staging: staging.map(|(base, size)| SglangStaging { base, size }),
            dst_num_slots: slots,
            kv_mem_kinds: (0..n).map(|i| if pick(i) % 2 == 0 { MemKind::Vram } else { MemKind::Dram }).collect(),
            kv_item_lens: (0..n).map(|i| pick(i) >> 3).collect(),
            state_layer_ids,
            kv_layer_ids: (0..n).map(|i| i as u32).collect(),
            dcp_size,
            dcp_rank,
            state_data_lens,
            trailing,
        }
    }
}

prop_compose! {
    fn transfer()(
        (room, ip, port, agent) in (any::<u64>(), "[0-9.]{1,15}", any::<u16>(), agent()),
        pages in prop::collection::vec(0..=i32::MAX as u32, 0..100),
        (aux, req) in (0..=i32::MAX as u32, any::<u32>()),
        state_indices in lists::<i32>(),
        (prefix, dummy) in (any::<u64>(), any::<bool>()),
        trailing in trailing(),
    ) -> TransferInfo {
        TransferInfo {
            room: RoomId::new(room),
            local_ip: ip,
            rank_port: port,
            agent,
            dst_pages: pages.into_iter().map(PageIndex::new).collect(),
            dst_aux_index: aux,
            required_dst_info_num: req,
            state_indices,
            decode_prefix_len: prefix,
            is_dummy: dummy,
            trailing,
        }
    }
}

fn decode_inbound() -> impl Strategy<Value = DecodeInbound> {
    let room = any::<u64>().prop_map(RoomId::new);
    prop_oneof![
        (
            room.clone(),
            any::<u32>(),
            any::<u32>(),
            prop::option::of(".{0,80}")
        )
            .prop_map(
                |(room, status, prefill_rank, reason)| DecodeInbound::KvStatus(KvStatus {
                    room,
                    status,
                    prefill_rank,
                    reason
                })
            ),
        (room.clone(), any::<u32>(), prop::option::of(any::<u64>())).prop_map(
            |(room, prefill_rank, generation)| DecodeInbound::AbortAck(AbortAck {
                room,
                prefill_rank,
                generation
            })
        ),
        (
            room.clone(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            agent(),
            any::<u32>()
        )
            .prop_map(
                |(room, chunk, page_start, num_pages, writer, prefill_rank)| {
                    DecodeInbound::ChunkReady(ChunkReady {
                        room,
                        chunk,
                        page_start,
                        num_pages,
                        writer,
                        prefill_rank,
                    })
                }
            ),
        (
            room,
            any::<u64>(),
            any::<u64>(),
            "[ -~]{0,40}",
            prop::option::of(any::<u32>())
        )
            .prop_map(|(room, chunk, chunk_pages, session, pp_rank)| {
                DecodeInbound::StagingReq(StagingReq {
                    room,
                    chunk,
                    chunk_pages,
                    session,
                    pp_rank,
                })
            }),
    ]
}

fn prefill_tagged() -> impl Strategy<Value = PrefillInbound> {
    let room = any::<u64>().prop_map(RoomId::new);
    prop_oneof![
        (
            room.clone(),
            prop::option::of(("[0-9.]{1,15}", any::<u16>(), prop::option::of(any::<u64>())))
        )
            .prop_map(|(room, reply)| PrefillInbound::Abort(Abort {
                room,
                reply: reply.map(|(ip, port, generation)| AbortReply {
                    ip,
                    port,
                    generation
                }),
            })),
        (
            room,
            any::<u64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            "[ -~]{0,40}"
        )
            .prop_map(|(room, chunk, offset, round, end, session)| {
                PrefillInbound::StagingRsp(StagingRsp {
                    room,
                    chunk,
                    offset,
                    round,
                    end,
                    session,
                })
            }),
        (any::<i64>(), any::<i64>(), prop::option::of("[ -~]{0,40}")).prop_map(
            |(round, tail, session)| PrefillInbound::Watermark(Watermark {
                round,
                tail,
                session
            })
        ),
    ]
}

fn frames() -> impl Strategy<Value = Vec<Bytes>> {
    let frame = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from),
        Just(Bytes::from_static(GUARD)),
        Just(Bytes::from_static(b"None")),
        Just(Bytes::new()),
        Just(Bytes::from_static(b"KV_STATUS")),
        Just(Bytes::from_static(b"ABORT")),
        Just(Bytes::from_static(b"ABORT_ACK")),
        Just(Bytes::from_static(b"WATERMARK")),
        Just(Bytes::from_static(b"STAGING_RSP")),
        Just(Bytes::from_static(b"VRAM,DRAM")),
        "-?[0-9]{1,21}".prop_map(|s| Bytes::from(s.into_bytes())),
    ];
    prop::collection::vec(frame, 0..28)
}

proptest! {
    #[test]
    fn registrations_round_trip_and_keep_their_profile(m in register()) {
        let frames = m.encode();
        let own = if m.state_data_lens.is_some() { 25 } else { 24 };
        prop_assert_eq!(frames.len(), own + m.trailing.len());
        let decoded = PrefillInbound::decode(&frames).unwrap();
        prop_assert_eq!(decoded.profile(), Some(m.profile()));
        prop_assert_eq!(decoded, PrefillInbound::RegisterV2x(m.clone()));
        prop_assert_eq!(m.profile() == Profile::Sglang0523, m.state_data_lens.is_some());
    }

    #[test]
    fn transfer_infos_round_trip(m in transfer()) {
        let frames = m.encode();
        prop_assert_eq!(PrefillInbound::decode(&frames), Ok(PrefillInbound::TransferV2x(m)));
    }

    #[test]
    fn decode_bound_messages_round_trip(m in decode_inbound()) {
        prop_assert_eq!(DecodeInbound::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn prefill_bound_tagged_messages_round_trip(m in prefill_tagged()) {
        prop_assert_eq!(PrefillInbound::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn arbitrary_frames_never_panic(f in frames()) {
        if let Ok(m) = PrefillInbound::decode(&f) {
            // Whatever decodes re-encodes to something that decodes to the same message.
            prop_assert_eq!(PrefillInbound::decode(&m.encode()), Ok(m));
        }
        if let Ok(m) = DecodeInbound::decode(&f) {
            prop_assert_eq!(DecodeInbound::decode(&m.encode()), Ok(m));
        }
    }
}

#[test]
fn malformed_v2x_fields_are_errors_naming_the_frame() {
    let base = KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: AgentName::new("d").unwrap(),
        metadata: Bytes::new(),
        kv_ptrs: vec![1, 2],
        aux_ptrs: vec![3],
        state_ptrs: vec![],
        gpu_id: GpuId::new(0),
        decode_tp_size: 1,
        decode_tp_rank: 0,
        dst_kv_item_len: 64,
        state_item_lens: vec![],
        state_dims: vec![],
        staging: None,
        dst_num_slots: Some(8),
        kv_mem_kinds: vec![MemKind::Vram; 2],
        kv_item_lens: vec![64, 64],
        state_layer_ids: vec![],
        kv_layer_ids: vec![],
        dcp_size: 1,
        dcp_rank: 0,
        state_data_lens: Some(vec![]),
        trailing: vec![],
    };
    let good = base.encode();
    let with = |i: usize, b: &'static [u8]| {
        let mut f = good.clone();
        f[i] = Bytes::from_static(b);
        PrefillInbound::decode(&f).unwrap_err().to_string()
    };
    assert!(
        with(18, b"VRAM").contains("frame 18"),
        "one kind for two buffers"
    );
    assert!(with(18, b"VRAM,HBM").contains("frame 18"));
    assert!(
        with(19, &[0; 8]).contains("frame 19"),
        "one item length for two buffers"
    );
    assert!(
        with(8, &[9, 0, 0, 0]).contains("frame 8"),
        "a list count the frame cannot hold"
    );
    assert!(
        with(15, &[0; 8]).contains("frame 15"),
        "a staging base without a size"
    );
    assert!(
        PrefillInbound::decode(&good[..23]).is_err(),
        "23 frames is no release's"
    );
    // SGLang's own dispatch would let these kill its thread; ours names them.
    let mut f = good.clone();
    f[2] = Bytes::from_static(b"\xff");
    assert!(
        PrefillInbound::decode(&f)
            .unwrap_err()
            .to_string()
            .contains("frame 2")
    );
}
