//! Property tests: every message and notification round-trips, and decoding arbitrary input
//! returns (an error) instead of panicking.
#![allow(clippy::unwrap_used, reason = "test code")]

use bytes::Bytes;
use nixl_wire::http::RouteQuery;
use nixl_wire::{
    AgentName, ChunkId, DecodeError, DecodeTpInfo, GUARD, GpuId, KvArgsRegister, Notification,
    PageIndex, PpRank, PrefillInbound, RoomId, TransferInfo,
};
use proptest::prelude::*;

fn agent() -> impl Strategy<Value = AgentName> {
    "[ -~]{1,40}".prop_map(|s| AgentName::new(&s).unwrap())
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![Just("127.0.0.1".to_owned()), "[0-9a-f:.]{0,39}"]
}

fn register() -> impl Strategy<Value = KvArgsRegister> {
    (
        ip(),
        any::<u16>(),
        agent(),
        prop::collection::vec(any::<u8>(), 0..600),
        prop::collection::vec(any::<u64>(), 0..80),
        prop::collection::vec(any::<u64>(), 0..8),
        any::<u32>(),
        prop::option::of((any::<u32>(), any::<u32>(), any::<u64>())),
    )
        .prop_map(
            |(local_ip, rank_port, agent, md, kv, aux, gpu, tp)| KvArgsRegister {
                local_ip,
                rank_port,
                agent,
                metadata: md.into(),
                kv_ptrs: kv,
                aux_ptrs: aux,
                gpu_id: GpuId::new(gpu),
                tp_info: tp.map(|(s, r, l)| DecodeTpInfo {
                    decode_tp_size: s,
                    decode_tp_rank: r,
                    dst_kv_item_len: l,
                }),
                trailing: Vec::new(),
            },
        )
}

fn transfer() -> impl Strategy<Value = TransferInfo> {
    (
        any::<u64>(),
        ip(),
        any::<u16>(),
        agent(),
        prop::collection::vec(0..=i32::MAX as u32, 0..300),
        0..=i32::MAX as u32,
        any::<u32>(),
    )
        .prop_map(
            |(room, local_ip, rank_port, agent, pages, aux, req)| TransferInfo {
                room: RoomId::new(room),
                local_ip,
                rank_port,
                agent,
                dst_pages: pages.into_iter().map(PageIndex::new).collect(),
                dst_aux_index: aux,
                required_dst_info_num: req,
                trailing: Vec::new(),
            },
        )
}

fn notification() -> impl Strategy<Value = Notification> {
    let room = any::<u64>().prop_map(RoomId::new);
    prop_oneof![
        (
            room.clone(),
            any::<u32>(),
            any::<bool>(),
            prop::option::of(any::<u32>())
        )
            .prop_map(|(room, c, last, pp)| {
                Notification::Kv {
                    room,
                    chunk: ChunkId::new(c),
                    last,
                    pp: pp.map(PpRank::new),
                }
            }),
        room.clone().prop_map(|room| Notification::Aux { room }),
        (room.clone(), any::<u32>()).prop_map(|(room, pp)| Notification::State {
            room,
            pp: PpRank::new(pp)
        }),
        (
            room.clone(),
            any::<u32>(),
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(room, c, last, src, part, parts)| Notification::KvPart {
                room,
                chunk: ChunkId::new(c),
                last,
                src: PpRank::new(src),
                part,
                parts,
            }),
        (room.clone(), any::<u32>(), any::<u32>()).prop_map(|(room, src, chunks)| {
            Notification::AuxNoKv {
                room,
                src: PpRank::new(src),
                chunks,
            }
        }),
        (room.clone(), any::<u32>(), any::<u32>()).prop_map(|(room, src, component)| {
            Notification::StatePart {
                room,
                src: PpRank::new(src),
                component,
            }
        }),
        (room.clone(), "[!-~]{1,60}").prop_map(|(room, rest)| Notification::Staged { room, rest }),
        (room, ".{0,300}").prop_map(|(room, reason)| Notification::fail(room, &reason)),
    ]
}

fn frames() -> impl Strategy<Value = Vec<Bytes>> {
    let frame = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        Just(Bytes::from_static(GUARD)),
        Just(Bytes::from_static(b"None")),
        "[0-9]{1,21}".prop_map(|s| Bytes::from(s.into_bytes())),
    ];
    prop::collection::vec(frame, 0..14)
}

proptest! {
    #[test]
    fn register_round_trips(m in register()) {
        let frames = m.encode();
        prop_assert_eq!(frames.len(), if m.tp_info.is_some() { 12 } else { 9 });
        prop_assert_eq!(KvArgsRegister::decode(&frames), Ok(m.clone()));
        prop_assert_eq!(PrefillInbound::decode(&frames), Ok(PrefillInbound::Register(m)));
    }

    #[test]
    fn transfer_round_trips(m in transfer()) {
        let frames = m.encode();
        prop_assert_eq!(frames.len(), 8);
        prop_assert_eq!(frames[5].len(), 4 * m.dst_pages.len());
        prop_assert_eq!(TransferInfo::decode(&frames), Ok(m.clone()));
        prop_assert_eq!(PrefillInbound::decode(&frames), Ok(PrefillInbound::Transfer(m)));
    }

    #[test]
    fn notification_round_trips(n in notification()) {
        let bytes = n.encode();
        prop_assert!(bytes.iter().all(|b| (0x20..=0x7e).contains(b)));
        prop_assert_eq!(Notification::decode(&bytes), Ok(n));
    }

    #[test]
    fn route_query_round_trips(e in any::<i64>(), g in any::<i64>()) {
        let q = RouteQuery { engine_rank: e, target_dp_group: g };
        prop_assert_eq!(RouteQuery::parse(&q.to_query_string()), Ok(q));
    }

    #[test]
    fn arbitrary_frames_never_panic(f in frames()) {
        if let Ok(m) = PrefillInbound::decode(&f) {
            // Whatever decodes must re-encode to exactly the input.
            prop_assert_eq!(m.encode(), f);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(m in transfer(), idx in 0usize..8, cut in 0usize..40, byte in any::<u8>()) {
        let mut f = m.encode();
        let mut v = f[idx].to_vec();
        v.truncate(cut.min(v.len()));
        v.push(byte);
        f[idx] = v.into();
        if let Ok(m2) = PrefillInbound::decode(&f) {
            prop_assert_eq!(m2.encode(), f);
        }
    }

    #[test]
    fn arbitrary_notification_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(n) = Notification::decode(&b) {
            prop_assert_eq!(n.encode(), b);
        }
    }

    #[test]
    fn structured_notification_noise_never_panics(s in "[0-9a-z_]{0,40}") {
        if let Ok(n) = Notification::decode(s.as_bytes()) {
            prop_assert_eq!(n.encode(), s.into_bytes());
        }
    }
}

#[test]
fn errors_name_the_frame() {
    let mut f = TransferInfo {
        room: RoomId::new(1),
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: AgentName::new("a").unwrap(),
        dst_pages: vec![PageIndex::new(1)],
        dst_aux_index: 0,
        required_dst_info_num: 1,
        trailing: Vec::new(),
    }
    .encode();
    f[5] = Bytes::from_static(&[1, 2, 3]);
    match PrefillInbound::decode(&f) {
        Err(DecodeError::Field { frame: 5, .. }) => {}
        other => panic!("{other:?}"),
    }
    f[5] = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
    let err = PrefillInbound::decode(&f).unwrap_err();
    assert_eq!(
        err.to_string(),
        "TransferInfo: frame 5 (dst page indices): negative index at position 0"
    );
    let mut g = f.clone();
    g[0] = Bytes::from_static(b"NixlMsgGuarD");
    assert!(matches!(
        PrefillInbound::decode(&g),
        Err(DecodeError::Field { frame: 0, .. })
    ));
    g.truncate(7);
    assert!(PrefillInbound::decode(&g).is_err());
    // Registrations of 10, 11 and 13 frames: SGLang's prefill ignores trailing frames, so do
    // we; they are kept, and re-encode byte for byte.
    for extra in [1usize, 2, 4] {
        let mut r = register_frames();
        for i in 0..extra {
            r.push(Bytes::from(format!("{i}x")));
        }
        let Ok(PrefillInbound::Register(m)) = PrefillInbound::decode(&r) else {
            panic!("{} frames refused", r.len())
        };
        assert_eq!(m.trailing.len(), extra, "{} frames", r.len());
        assert_eq!(m.tp_info, None);
        assert_eq!(m.encode(), r);
    }
    // Twelve frames whose last three are decimals are the TP form; a thirteenth trails it.
    let mut r = register_frames();
    r.extend(["2", "1", "4096", "nixl-rs:caps:proof"].map(|s| Bytes::from_static(s.as_bytes())));
    let Ok(PrefillInbound::Register(m)) = PrefillInbound::decode(&r) else {
        panic!("13 frames refused")
    };
    assert_eq!(m.tp_info.map(|t| t.dst_kv_item_len), Some(4096));
    assert_eq!(m.trailing, vec![Bytes::from_static(b"nixl-rs:caps:proof")]);
    assert_eq!(m.encode(), r);
    // A transfer info with a trailing frame.
    let mut t = TransferInfo {
        room: RoomId::new(1),
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: AgentName::new("a").unwrap(),
        dst_pages: vec![PageIndex::new(1)],
        dst_aux_index: 0,
        required_dst_info_num: 1,
        trailing: Vec::new(),
    }
    .encode();
    t.push(Bytes::from_static(b"nixl-rs:proof:ab"));
    let Ok(PrefillInbound::Transfer(m)) = PrefillInbound::decode(&t) else {
        panic!("9-frame info refused")
    };
    assert_eq!(m.trailing.len(), 1);
    assert_eq!(m.encode(), t);
}

fn register_frames() -> Vec<Bytes> {
    KvArgsRegister {
        local_ip: "::1".into(),
        rank_port: 9,
        agent: AgentName::new("d").unwrap(),
        metadata: Bytes::from_static(b"md"),
        kv_ptrs: vec![1, 2],
        aux_ptrs: vec![3],
        gpu_id: GpuId::new(0),
        tp_info: None,
        trailing: Vec::new(),
    }
    .encode()
}

fn staged_slice() -> impl Strategy<Value = nixl_wire::ext::StagedSlice> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(tokens, src_token, dst_token, src_offset, dst_offset, len)| {
                nixl_wire::ext::StagedSlice {
                    tokens,
                    src_token,
                    dst_token,
                    src_offset,
                    dst_offset,
                    len,
                }
            },
        )
}

proptest! {
    #[test]
    fn staged_notices_round_trip_with_and_without_a_slice(
        room in any::<u64>(),
        chunk in any::<u32>(),
        last in any::<bool>(),
        slot in any::<u32>(),
        first in 0u32..1 << 30,
        pages in 1u32..1 << 30,
        slice in proptest::option::of(staged_slice()),
    ) {
        let n = nixl_wire::ext::StagedNotice {
            room: RoomId::new(room),
            chunk,
            last,
            slot,
            first_page_offset: first,
            pages,
            slice,
        };
        prop_assert_eq!(nixl_wire::ext::StagedNotice::decode(&n.encode()), Some(n));
    }

    #[test]
    fn staged_notice_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        let mut p = b"nixl-rs:staged:".to_vec();
        p.extend_from_slice(&bytes);
        let _ = nixl_wire::ext::StagedNotice::decode(&p);
        let _ = nixl_wire::ext::StagedNotice::decode(&bytes);
    }
}
