//! The staged path end to end: GPU pools on both sides, a prefill and a decode with staging
//! buffers, rooms gathered, written as one WRITE per piece and scattered, every byte checked
//! (feature `gpu-tests`, run on the GPU machine with `UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y`).
//! Without a GPU, only the refusal of staging on host pools runs.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use nixl_kv::{Error, KvManager, ManagerConfig, StagingConfig};

#[test]
fn staging_on_host_pools_is_refused_with_a_reason() {
    let agent = common::agent();
    let kv = agent
        .register(nixl_core::HostBuffer::new(4 * 4096).unwrap())
        .unwrap();
    let aux = agent
        .register(nixl_core::HostBuffer::new(64 * 4).unwrap())
        .unwrap();
    let args = nixl_kv::KvArgs::new([(kv.region(), 4096)], [(aux.region(), 64)]).unwrap();
    let cfg = ManagerConfig::default()
        .auto_staging(false)
        .staging(StagingConfig::new(1 << 20, 4));
    match KvManager::decode(agent, args, cfg) {
        Err(Error::Staging(why)) => {
            assert!(
                why.contains("GPU memory") || why.contains("cuda"),
                "reason: {why}"
            );
        }
        other => panic!("staging on host pools: {other:?}"),
    }
}

#[test]
fn staging_config_is_bounded() {
    assert!(StagingConfig::new(0, 4).is_none());
    assert!(StagingConfig::new(1 << 20, 0).is_none());
    assert!(StagingConfig::new(1 << 20, 1025).is_none());
    let c = StagingConfig::new(1 << 20, 8).unwrap();
    assert_eq!((c.per_room, c.bytes()), (4, 8 << 20));
    assert_eq!(c.per_room(100).per_room, 8);
}

#[cfg(feature = "gpu-tests")]
mod gpu {
    use std::time::{Duration, Instant};

    use nixl_core::cuda::DeviceBuffer;
    use nixl_core::{HostBuffer, Registered};
    use nixl_kv::BootstrapServer;
    use nixl_kv::{KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId};
    use nixl_kv::{RequestPaths, StagingConfig};

    use super::common;

    const BUFFERS: usize = 8;
    const PAGES: u32 = 64;
    const PAGE: u64 = 32 << 10;
    const AUX_ROW: u64 = 64;

    struct GpuSide {
        mgr: KvManager,
        kv: Vec<Registered<DeviceBuffer>>,
        _aux: Registered<HostBuffer>,
    }

    fn byte(b: usize, page: u32, j: usize) -> u8 {
        ((7 * b + 13 * page as usize + j) % 251) as u8
    }

    fn side(prefill: Option<&str>, staging: Option<StagingConfig>) -> GpuSide {
        let agent = common::agent();
        let mut kv = Vec::new();
        for b in 0..BUFFERS {
            let mut buf = DeviceBuffer::new(0, (u64::from(PAGES) * PAGE) as usize).unwrap();
            if prefill.is_some() {
                let mut host = vec![0u8; buf.len()];
                for (i, v) in host.iter_mut().enumerate() {
                    *v = byte(b, (i as u64 / PAGE) as u32, i % PAGE as usize);
                }
                buf.copy_from_host(&host).unwrap();
            }
            kv.push(agent.register(buf).unwrap());
        }
        let aux = agent
            .register(HostBuffer::new((AUX_ROW * 16) as usize).unwrap())
            .unwrap();
        let args = KvArgs::new(
            kv.iter().map(|b| (b.region(), PAGE)),
            [(aux.region(), AUX_ROW)],
        )
        .unwrap();
        let cfg = ManagerConfig::default()
            .auto_staging(false)
            .staging(staging);
        let mgr = match prefill {
            Some(bootstrap) => KvManager::prefill(agent, args, bootstrap, cfg).unwrap(),
            None => KvManager::decode(agent, args, cfg).unwrap(),
        };
        GpuSide { mgr, kv, _aux: aux }
    }

    /// Runs `rooms` requests of `pages` pages at once, each sent in two chunks, and checks
    /// every byte of every destination page.
    fn run(staging: bool, rooms: u32, pages: u32) -> RequestPaths {
        let bs = BootstrapServer::start("127.0.0.1:0").unwrap();
        let addr = bs.addr().to_string();
        // 4 pages per piece; the ring holds 6 pieces, 2 per room.
        let slot = BUFFERS as u64 * PAGE * 4;
        let cfg = staging.then(|| StagingConfig::new(slot, 6).unwrap().per_room(2));
        let p = side(Some(&addr), cfg);
        let d = side(None, cfg);
        let mut pairs = Vec::new();
        for r in 0..rooms {
            let room = RoomId::new(1000 + u64::from(r));
            let src: Vec<u32> = (0..pages).map(|i| (r * pages + i) % PAGES).collect();
            let dst: Vec<u32> = (0..pages).map(|i| PAGES - 1 - (r * pages + i)).collect();
            let mut rx = KvReceiver::new(&d.mgr, &addr, room, None).unwrap();
            let tx = KvSender::new(&p.mgr, room).unwrap();
            rx.init(&dst, r % 16);
            pairs.push((tx, rx, src, dst, false));
        }
        let start = Instant::now();
        loop {
            let mut done = 0;
            for (tx, rx, src, _, started) in &mut pairs {
                if !*started && tx.poll() == KvPoll::WaitingForInput {
                    tx.init(src.len() as u32, 0);
                    let half = src.len() / 2;
                    tx.send(&src[..half]);
                    tx.send(&src[half..]);
                    *started = true;
                }
                let (s, r) = (tx.poll(), rx.poll());
                assert_ne!(s, KvPoll::Failed, "sender: {:?}", tx.failure());
                assert_ne!(r, KvPoll::Failed, "receiver: {:?}", rx.failure());
                if s == KvPoll::Success && r == KvPoll::Success {
                    done += 1;
                }
            }
            if done == pairs.len() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "rooms stuck");
        }
        for (b, buf) in d.kv.iter().enumerate() {
            let host = buf.buffer().to_host().unwrap();
            for (_, _, src, dst, _) in &pairs {
                for (&s, &t) in src.iter().zip(dst) {
                    let at = (u64::from(t) * PAGE) as usize;
                    let page = &host[at..at + PAGE as usize];
                    let bad = page
                        .iter()
                        .enumerate()
                        .filter(|&(j, &v)| v != byte(b, s, j))
                        .count();
                    assert_eq!(bad, 0, "buffer {b}, page {s} -> {t}: {bad} wrong bytes");
                }
            }
        }
        p.mgr.request_paths()
    }

    #[test]
    fn staged_rooms_land_byte_for_byte() {
        // 5 rooms of 10 pages, 3 pieces or more each. The ring grants 2 slots to each of the
        // first 3 rooms (which then wait for freed slots to send the rest); the last 2 get
        // none and go by per-page descriptors.
        let paths = run(true, 5, 10);
        assert!(paths.staged >= 9, "{paths:?}");
        assert!(paths.prepared + paths.explicit > 0, "{paths:?}");
    }

    #[test]
    fn plain_rooms_on_gpu_pools_land_byte_for_byte() {
        let paths = run(false, 3, 10);
        assert_eq!(paths.staged, 0, "{paths:?}");
    }

    /// Tokens per page and KV heads per token of the prefill's pages in the sliced test
    /// (16 × 8 heads × 256 bytes = `PAGE`); a decode rank of TP 2 holds 4 of the heads.
    const TOKENS: u64 = 16;
    const HEADS: u64 = 8;
    const HEAD_BYTES: u64 = PAGE / TOKENS / HEADS;

    /// GPU pools of `item`-byte pages at TP place `rank` of `tp`, filled on a prefill
    /// (`bootstrap` given) with [`byte`] of buffer `b + 3·rank`, page and offset in the page.
    fn sliced_side(bootstrap: Option<&str>, rank: u32, tp: u32, config: ManagerConfig) -> GpuSide {
        let agent = common::agent();
        let heads = HEADS / u64::from(tp);
        let item = TOKENS * heads * HEAD_BYTES;
        let mut kv = Vec::new();
        for b in 0..BUFFERS {
            let mut buf = DeviceBuffer::new(0, (u64::from(PAGES) * item) as usize).unwrap();
            if bootstrap.is_some() {
                let host: Vec<u8> = (0..buf.len() as u64)
                    .map(|i| {
                        byte(
                            b + 3 * rank as usize,
                            (i / item) as u32,
                            (i % item) as usize,
                        )
                    })
                    .collect();
                buf.copy_from_host(&host).unwrap();
            }
            kv.push(agent.register(buf).unwrap());
        }
        let aux = agent
            .register(HostBuffer::new((AUX_ROW * 16) as usize).unwrap())
            .unwrap();
        let args = KvArgs::new(
            kv.iter().map(|b| (b.region(), item)),
            [(aux.region(), AUX_ROW)],
        )
        .unwrap()
        .parallel(rank, tp, 1)
        .unwrap()
        .heads(heads as u32, TOKENS as u32);
        let mgr = match bootstrap {
            Some(addr) => KvManager::prefill(agent, args, addr, config).unwrap(),
            None => KvManager::decode(agent, args, config).unwrap(),
        };
        GpuSide { mgr, kv, _aux: aux }
    }

    #[test]
    fn packed_head_slices_land_byte_for_byte_in_plain_decodes() {
        // Two decode ranks of TP 2 without staging (passive targets, as SGLang's decodes are).
        let paths = head_slices_land_byte_for_byte(None);
        assert_eq!(
            (paths.packed, paths.staged),
            (4, 0),
            "two chunks to each of two ranks: {paths:?}"
        );
    }

    #[test]
    fn staged_head_slices_land_byte_for_byte_in_staging_decodes() {
        // Two decode ranks of TP 2 with rings of 8 of their pages a slot, 2 slots a room: each
        // 5-page chunk goes as pieces of 4 and 1 pages (our slot holds 4 of our pages), each
        // packed into our slot, one WRITE into the decode's slot, then its scatter.
        let ring = StagingConfig::new(BUFFERS as u64 * PAGE * 4, 4)
            .unwrap()
            .per_room(2)
            .direct(false);
        let paths = head_slices_land_byte_for_byte(Some(ring));
        assert_eq!(
            (paths.staged, paths.packed, paths.prepared + paths.explicit),
            (8, 0, 2),
            "four pieces to each of two ranks, then its aux WRITE: {paths:?}"
        );
    }

    /// A prefill of TP 1 that can gather (staging, packing on, direct off) sends one room of
    /// 10 pages in chunks of 5 to two decode ranks of TP 2 (with `decode_staging`'s ring, or
    /// none); every byte of every head slice is checked. Returns the prefill's paths.
    fn head_slices_land_byte_for_byte(decode_staging: Option<StagingConfig>) -> RequestPaths {
        let bs = BootstrapServer::start("127.0.0.1:0").unwrap();
        let addr = bs.addr().to_string();
        let slot = BUFFERS as u64 * PAGE * 4;
        // The packed path is the default of a prefill with staging.
        let staging = StagingConfig::new(slot, 4).unwrap().direct(false);
        let p = sliced_side(
            Some(&addr),
            0,
            1,
            ManagerConfig::default()
                .auto_staging(false)
                .staging(Some(staging)),
        );
        let sliced = || {
            ManagerConfig::default()
                .auto_staging(false)
                .sliced_tp(true)
                .staging(decode_staging)
        };
        let d: Vec<GpuSide> = (0..2).map(|r| sliced_side(None, r, 2, sliced())).collect();
        let src: Vec<u32> = (0..10).map(|i| (7 * i + 3) % PAGES).collect();
        let dst: Vec<Vec<u32>> = vec![(20..30).collect(), (0..10).map(|i| 63 - 2 * i).collect()];
        let room = RoomId::new(4242);
        let mut rx: Vec<KvReceiver> = d
            .iter()
            .zip(&dst)
            .map(|(side, pages)| {
                let mut r = KvReceiver::new(&side.mgr, &addr, room, None).unwrap();
                r.init(pages, 3);
                r
            })
            .collect();
        let mut tx = KvSender::new(&p.mgr, room).unwrap();
        let start = Instant::now();
        let mut started = false;
        loop {
            if !started && tx.poll() == KvPoll::WaitingForInput {
                tx.init(src.len() as u32, 0);
                tx.send(&src[..5]);
                tx.send(&src[5..]);
                started = true;
            }
            let s = tx.poll();
            let r: Vec<KvPoll> = rx.iter_mut().map(KvReceiver::poll).collect();
            assert_ne!(s, KvPoll::Failed, "sender: {:?}", tx.failure());
            assert!(
                r.iter().all(|&x| x != KvPoll::Failed),
                "{:?}",
                rx.iter().map(KvReceiver::failure).collect::<Vec<_>>()
            );
            if s == KvPoll::Success && r.iter().all(|&x| x == KvPoll::Success) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "room stuck");
        }
        let item = PAGE / 2;
        let heads = HEADS / 2;
        for (rank, side) in d.iter().enumerate() {
            for (b, buf) in side.kv.iter().enumerate() {
                let host = buf.buffer().to_host().unwrap();
                for (&s, &t) in src.iter().zip(&dst[rank]) {
                    let at = (u64::from(t) * item) as usize;
                    let bad = host[at..at + item as usize]
                        .iter()
                        .enumerate()
                        .filter(|&(o, &v)| {
                            let o = o as u64;
                            let (tok, o) = (o / (heads * HEAD_BYTES), o % (heads * HEAD_BYTES));
                            let g = rank as u64 * heads + o / HEAD_BYTES;
                            let j = tok * HEADS * HEAD_BYTES + g * HEAD_BYTES + o % HEAD_BYTES;
                            v != byte(b, s, j as usize)
                        })
                        .count();
                    assert_eq!(bad, 0, "rank {rank}, buffer {b}, page {s} -> {t}");
                }
            }
        }
        p.mgr.request_paths()
    }

    #[test]
    fn two_prefill_ranks_stage_their_heads_into_one_decode() {
        // Prefill ranks of TP 2 (4 heads each, 16 KiB pages) and one decode of TP 1 (8 heads,
        // 32 KiB pages) with a ring of 4 of its pages a slot: each rank's 5-page chunks go as
        // pieces of 4 and 1 of its whole pages, which the decode scatters by slice, each
        // rank's heads to its half of every token slot.
        let bs = BootstrapServer::start("127.0.0.1:0").unwrap();
        let addr = bs.addr().to_string();
        let slot = BUFFERS as u64 * PAGE * 4;
        let staging = StagingConfig::new(slot, 4).unwrap().direct(false);
        let prefill = || {
            ManagerConfig::default()
                .auto_staging(false)
                .staging(Some(staging))
        };
        let p: Vec<GpuSide> = (0..2)
            .map(|r| sliced_side(Some(&addr), r, 2, prefill()))
            .collect();
        let ring = StagingConfig::new(slot, 4)
            .unwrap()
            .per_room(2)
            .direct(false);
        let decode = ManagerConfig::default()
            .auto_staging(false)
            .sliced_tp(true)
            .staging(Some(ring));
        let d = sliced_side(None, 0, 1, decode);
        let src: [Vec<u32>; 2] = [
            (0..10).map(|i| (7 * i + 3) % PAGES).collect(),
            (0..10).map(|i| (5 * i + 1) % PAGES).collect(),
        ];
        let dst: Vec<u32> = (20..30).collect();
        let room = RoomId::new(77);
        let mut rx = KvReceiver::new(&d.mgr, &addr, room, None).unwrap();
        rx.init(&dst, 3);
        let mut tx: Vec<(KvSender, bool)> = p
            .iter()
            .map(|side| (KvSender::new(&side.mgr, room).unwrap(), false))
            .collect();
        let start = Instant::now();
        loop {
            for ((t, started), src) in tx.iter_mut().zip(&src) {
                if !*started && t.poll() == KvPoll::WaitingForInput {
                    t.init(src.len() as u32, 0);
                    t.send(&src[..5]);
                    t.send(&src[5..]);
                    *started = true;
                }
                assert_ne!(t.poll(), KvPoll::Failed, "sender: {:?}", t.failure());
            }
            let r = rx.poll();
            assert_ne!(r, KvPoll::Failed, "receiver: {:?}", rx.failure());
            if r == KvPoll::Success && tx.iter_mut().all(|(t, _)| t.poll() == KvPoll::Success) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "room stuck");
        }
        for side in &p {
            let paths = side.mgr.request_paths();
            assert_eq!(
                (paths.staged, paths.packed, paths.prepared + paths.explicit),
                (4, 0, 1),
                "four pieces, then the aux WRITE: {paths:?}"
            );
        }
        // Decode token slot: 8 heads of HEAD_BYTES; heads 4r..4r+4 are prefill rank r's.
        let token = HEADS * HEAD_BYTES;
        let ours = PAGE / 2;
        for (b, buf) in d.kv.iter().enumerate() {
            let host = buf.buffer().to_host().unwrap();
            for (i, &t) in dst.iter().enumerate() {
                let at = (u64::from(t) * PAGE) as usize;
                let bad = host[at..at + PAGE as usize]
                    .iter()
                    .enumerate()
                    .filter(|&(o, &v)| {
                        let o = o as u64;
                        let (tok, g, within) = (o / token, o % token / HEAD_BYTES, o % HEAD_BYTES);
                        let r = (g / (HEADS / 2)) as usize;
                        let h = g % (HEADS / 2);
                        let j = tok * (token / 2) + h * HEAD_BYTES + within;
                        debug_assert!(j < ours);
                        v != byte(b + 3 * r, src[r][i], j as usize)
                    })
                    .count();
                assert_eq!(bad, 0, "buffer {b}, decode page {t}");
            }
        }
    }
}
