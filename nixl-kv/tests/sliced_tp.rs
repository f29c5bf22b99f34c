//! Heterogeneous TP over real NIXL (host memory, one process): P prefill ranks and D decode
//! ranks share one room (1 → 2, 1 → 4, 2 → 4, 3 → 6, 2 → 1, 4 → 2); each decode rank gets
//! exactly the KV heads it owns, from one prefill rank or several, every byte checked against a
//! model of the prefill ranks' heads (docs/protocol.md §5.6); the same rooms again with the
//! prefills' pools shared for host packing (whole decode pages gathered on the CPU, one WRITE
//! of pages). Needs the runtime.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::{Duration, Instant};

use nixl_core::{HostBuffer, Registered, SharedHostBuffer};
use nixl_kv::{
    HostPacking, KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId,
};

const BUFFERS: usize = 2;
const PAGES: u64 = 8;
const HEADS: u64 = 4;
const TOKENS: u64 = 2;
const HEAD_BYTES: u64 = 8;
const AUX_ROW: u64 = 64;

/// Byte `j` of global head `g` of token `t` of page `p` of buffer `b` on the prefill.
fn model(b: usize, p: u64, t: u64, g: u64, j: u64) -> u8 {
    (1 + (b as u64 * 31 + p * 17 + t * 7 + g * 5 + j) % 250) as u8
}

/// A side's KV buffers: plain registered host buffers, or (a packing prefill's) shared ones.
enum Kv {
    Plain(Vec<Registered<HostBuffer>>),
    Shared(Vec<Registered<SharedHostBuffer>>),
}

impl Kv {
    /// Buffer `b`'s bytes.
    fn bytes(&self, b: usize) -> Vec<u8> {
        match self {
            Self::Plain(v) => v[b].buffer().as_slice().to_vec(),
            Self::Shared(v) => {
                let mut out = vec![0; v[b].buffer().len()];
                v[b].buffer().read_at(0, &mut out).unwrap();
                out
            }
        }
    }
}

struct Side {
    mgr: KvManager,
    kv: Kv,
    _aux: Registered<HostBuffer>,
}

/// Host packing areas of 128 bytes, two of them: a chunk of 3 pages to a decode rank of 2
/// buffers × 32-byte pages goes in two pieces.
fn packing(pools: Vec<SharedHostBuffer>) -> HostPacking {
    HostPacking::new(pools).areas(128, 2)
}

/// A side whose pages hold `heads` heads per token; `rank`/`tp` its place. A prefill's pages
/// hold the global heads `rank·heads ..`; with `packed`, in shared buffers given to the
/// manager for host packing.
fn side(
    bootstrap: Option<&str>,
    heads: u64,
    rank: u32,
    tp: u32,
    config: ManagerConfig,
    packed: bool,
) -> Side {
    let agent = common::agent();
    let item = TOKENS * heads * HEAD_BYTES;
    let first = u64::from(rank) * heads;
    let len = (PAGES * item) as usize;
    let pattern = |b: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                if bootstrap.is_none() {
                    return 0;
                }
                let (p, o) = (i / item, i % item);
                let (t, o) = (o / (heads * HEAD_BYTES), o % (heads * HEAD_BYTES));
                model(b, p, t, first + o / HEAD_BYTES, o % HEAD_BYTES)
            })
            .collect()
    };
    let (kv, regions, config) = if packed {
        let pools: Vec<SharedHostBuffer> = (0..BUFFERS)
            .map(|b| {
                let buf = SharedHostBuffer::new(len).unwrap();
                buf.write_at(0, &pattern(b)).unwrap();
                buf
            })
            .collect();
        let regions: Vec<_> = pools.iter().map(SharedHostBuffer::region).collect();
        let config = config.host_packing(Some(packing(pools.clone())));
        let kv = pools.into_iter().map(|b| agent.register(b).unwrap());
        (Kv::Shared(kv.collect()), regions, config)
    } else {
        let kv: Vec<_> = (0..BUFFERS)
            .map(|b| {
                let mut buf = agent.register(HostBuffer::new(len).unwrap()).unwrap();
                buf.buffer_mut().as_mut_slice().copy_from_slice(&pattern(b));
                buf
            })
            .collect();
        let regions = kv.iter().map(Registered::region).collect();
        (Kv::Plain(kv), regions, config)
    };
    let aux = agent
        .register(HostBuffer::new((AUX_ROW * 4) as usize).unwrap())
        .unwrap();
    let args = KvArgs::new(
        regions.into_iter().map(|r| (r, item)),
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
    Side { mgr, kv, _aux: aux }
}

/// Two rooms between `pt` prefill ranks and `dt` decode ranks, every decode byte checked after
/// each; the second goes by the token lists prepared during the first (no explicit
/// descriptors). With `packed`, prefill ranks whose slices fill a decode rank's token slots
/// (`pt < dt`) pack every chunk instead, with no per-token descriptor at all.
fn sliced_room(pt: u32, dt: u32, packed: bool) {
    let bs = common::server();
    let addr = bs.addr().to_string();
    let prefills: Vec<Side> = (0..pt)
        .map(|r| side(Some(&addr), HEADS, r, pt, ManagerConfig::default(), packed))
        .collect();
    let hd = HEADS * u64::from(pt) / u64::from(dt);
    let sliced = || ManagerConfig::default().sliced_tp(true);
    let decodes: Vec<Side> = (0..dt)
        .map(|r| side(None, hd, r, dt, sliced(), false))
        .collect();
    let dst: Vec<Vec<u32>> = (0..dt)
        .map(|d| (0..3).map(|i| (d + 3 * i) % PAGES as u32).collect())
        .collect();
    let paths = |f: fn(&nixl_kv::RequestPaths) -> u64| -> Vec<u64> {
        prefills.iter().map(|p| f(&p.mgr.request_paths())).collect()
    };
    let room = |id: u64, src: &[u32]| {
        run_room(&addr, RoomId::new(id), src, &prefills, &decodes, &dst);
        check_decodes(pt, dt, &decodes, src, &dst);
    };
    room(77, &[6, 1, 2]);
    let after_first = paths(|p| p.explicit);
    if packed && pt < dt {
        // Every KV chunk to every decode rank went packed: one per decode rank a prefill
        // rank feeds.
        let per = u64::from(dt / pt);
        assert_eq!(paths(|p| p.packed), vec![per; pt as usize], "{pt} -> {dt}");
        assert_eq!(after_first, vec![0; pt as usize], "{pt} -> {dt}");
    } else {
        assert_eq!(paths(|p| p.packed), vec![0; pt as usize], "{pt} -> {dt}");
        assert!(
            after_first.iter().all(|&n| n > 0),
            "{pt} -> {dt}: the first room's slices went explicit while the lists were prepared: {after_first:?}"
        );
    }
    room(78, &[3, 0, 7]);
    assert_eq!(
        paths(|p| p.explicit),
        after_first,
        "{pt} -> {dt}: the second room is indexed or packed"
    );
}

/// One room: prefill pages `src` to each decode rank's pages `dst[d]`, until all succeed.
fn run_room(
    addr: &str,
    room: RoomId,
    src: &[u32],
    prefills: &[Side],
    decodes: &[Side],
    dst: &[Vec<u32>],
) {
    let mut rx: Vec<KvReceiver> = decodes
        .iter()
        .zip(dst)
        .map(|(d, pages)| {
            let mut r = KvReceiver::new(&d.mgr, addr, room, None).unwrap();
            r.init(pages, 1);
            r
        })
        .collect();
    let mut tx: Vec<KvSender> = prefills
        .iter()
        .map(|p| KvSender::new(&p.mgr, room).unwrap())
        .collect();
    for t in &mut tx {
        assert_eq!(
            common::reach(Duration::from_secs(30), KvPoll::WaitingForInput, || t
                .poll()),
            KvPoll::WaitingForInput,
            "every info arrives: {:?}",
            t.failure()
        );
        t.init(src.len() as u32, 0);
        t.send(src);
    }
    let start = Instant::now();
    loop {
        let s: Vec<KvPoll> = tx.iter_mut().map(KvSender::poll).collect();
        let r: Vec<KvPoll> = rx.iter_mut().map(KvReceiver::poll).collect();
        assert!(
            s.iter().chain(&r).all(|&x| x != KvPoll::Failed),
            "{:?} {:?}",
            tx.iter().map(KvSender::failure).collect::<Vec<_>>(),
            rx.iter().map(KvReceiver::failure).collect::<Vec<_>>()
        );
        if s.iter().chain(&r).all(|&x| x == KvPoll::Success) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stuck: {s:?} {r:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Every byte of every decode rank: the model's heads of `src[k]` in page `dst[d][k]`, zero
/// in every other page.
fn check_decodes(pt: u32, dt: u32, decodes: &[Side], src: &[u32], dst: &[Vec<u32>]) {
    let hd = HEADS * u64::from(pt) / u64::from(dt);
    let item = TOKENS * hd * HEAD_BYTES;
    for (d, side) in decodes.iter().enumerate() {
        for b in 0..BUFFERS {
            for (i, &v) in side.kv.bytes(b).iter().enumerate() {
                let i = i as u64;
                let (page, o) = (i / item, i % item);
                let (t, o) = (o / (hd * HEAD_BYTES), o % (hd * HEAD_BYTES));
                let (head, j) = (o / HEAD_BYTES, o % HEAD_BYTES);
                let want = match dst[d].iter().position(|&x| u64::from(x) == page) {
                    Some(k) => model(b, u64::from(src[k]), t, d as u64 * hd + head, j),
                    None => 0,
                };
                assert_eq!(v, want, "{pt} -> {dt}: decode {d} buffer {b} byte {i}");
            }
        }
    }
}

#[test]
fn one_prefill_rank_feeds_two_decode_ranks() {
    sliced_room(1, 2, false);
}

#[test]
fn one_prefill_rank_feeds_four_decode_ranks() {
    sliced_room(1, 4, false);
}

#[test]
fn two_prefill_ranks_feed_four_decode_ranks() {
    sliced_room(2, 4, false);
}

#[test]
fn three_prefill_ranks_feed_six_decode_ranks() {
    sliced_room(3, 6, false);
}

#[test]
fn two_prefill_ranks_feed_one_decode_rank() {
    sliced_room(2, 1, false);
}

#[test]
fn four_prefill_ranks_feed_two_decode_ranks() {
    sliced_room(4, 2, false);
}

#[test]
fn packed_one_prefill_rank_feeds_two_decode_ranks() {
    sliced_room(1, 2, true);
}

#[test]
fn packed_one_prefill_rank_feeds_four_decode_ranks() {
    sliced_room(1, 4, true);
}

#[test]
fn packed_two_prefill_ranks_feed_four_decode_ranks() {
    sliced_room(2, 4, true);
}

/// Prefill ranks that share a decode token slot never pack (a packed page would carry bytes
/// they do not own): the per-token descriptors still go.
#[test]
fn packing_prefill_ranks_that_share_a_decode_slot_keep_per_token_descriptors() {
    sliced_room(4, 2, true);
}

#[test]
fn without_sliced_tp_a_larger_decode_fails_with_a_reason() {
    let bs = common::server();
    let addr = bs.addr().to_string();
    let _p = side(Some(&addr), HEADS, 0, 1, ManagerConfig::default(), false);
    let d = side(None, HEADS / 2, 0, 2, ManagerConfig::default(), false);
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(5), None).unwrap();
    rx.init(&[0], 0);
    assert_eq!(rx.poll(), KvPoll::Failed);
    let why = rx.failure().unwrap().to_string();
    assert!(why.contains("only supported for MLA"), "{why}");
}

/// A golden frame of SGLang's captured registration (`nixl-wire/tests/data`), as bytes.
fn golden_register_frame(i: usize) -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nixl-wire/tests/data/register_kv_args.json"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let hex = v["frames_hex"][i].as_str().unwrap();
    (0..hex.len())
        .step_by(2)
        .map(|k| u8::from_str_radix(&hex[k..k + 2], 16).unwrap())
        .collect()
}

/// The mixed case: our prefill rank of TP 1 and a Python-style decode rank of TP 2 that is
/// nothing but a NIXL agent and a PUSH socket. It registers with the 12-frame form (SGLang's
/// captured frames 0–8 with its own name, metadata and pointers, then decode TP size, rank and
/// item length as #9960 sends them) and asks for a room with a plain 8-frame TransferInfo; it
/// then waits for the usual `_kv_` and `_aux` notifications and must hold exactly its heads.
#[test]
fn a_python_style_twelve_frame_decode_rank_gets_its_heads() {
    python_style_decode_rank(false);
}

/// The same decode, passive as SGLang's: a packing prefill's whole-page WRITEs need nothing of
/// it either.
#[test]
fn a_python_style_twelve_frame_decode_rank_gets_packed_heads() {
    python_style_decode_rank(true);
}

fn python_style_decode_rank(packed: bool) {
    let bs = common::server();
    let addr = bs.addr().to_string();
    let prefill = side(Some(&addr), HEADS, 0, 1, ManagerConfig::default(), packed);
    let endpoint = format!("tcp://127.0.0.1:{}", prefill.mgr.rank_port());
    // Decode rank 1 of TP 2 owns global heads 2 and 3.
    let (rank, hd) = (1u64, HEADS / 2);
    let item = TOKENS * hd * HEAD_BYTES;
    let agent = common::agent();
    let kv: Vec<Registered<HostBuffer>> = (0..BUFFERS)
        .map(|_| {
            agent
                .register(HostBuffer::new((PAGES * item) as usize).unwrap())
                .unwrap()
        })
        .collect();
    let aux = agent
        .register(HostBuffer::new((AUX_ROW * 4) as usize).unwrap())
        .unwrap();
    let ptrs = |bufs: &[&Registered<HostBuffer>]| -> Vec<u8> {
        bufs.iter()
            .flat_map(|b| b.region().addr.to_le_bytes())
            .collect()
    };
    let name = agent.name().to_owned();
    let register = vec![
        golden_register_frame(0), // NixlMsgGuard
        golden_register_frame(1), // None: a registration, not a room
        b"127.0.0.1".to_vec(),
        b"1".to_vec(),
        name.as_bytes().to_vec(),
        agent.local_metadata().unwrap().into_bytes(),
        ptrs(&kv.iter().collect::<Vec<_>>()),
        ptrs(&[&aux]),
        golden_register_frame(8), // gpu id 0
        b"2".to_vec(),
        rank.to_string().into_bytes(),
        item.to_string().into_bytes(),
    ];
    assert_eq!(register.len(), 12);
    common::send_raw(&endpoint, register);
    let room = RoomId::new(4242);
    let dst: Vec<u32> = vec![7, 0, 3];
    let info = vec![
        golden_register_frame(0),
        room.get().to_string().into_bytes(),
        b"127.0.0.1".to_vec(),
        b"1".to_vec(),
        name.as_bytes().to_vec(),
        dst.iter().flat_map(|p| (*p as i32).to_le_bytes()).collect(),
        b"2".to_vec(),
        b"1".to_vec(),
    ];
    common::send_raw(&endpoint, info);
    let src: Vec<u32> = vec![5, 2, 6];
    let mut tx = KvSender::new(&prefill.mgr, room).unwrap();
    assert_eq!(
        common::reach(Duration::from_secs(30), KvPoll::WaitingForInput, || tx
            .poll()),
        KvPoll::WaitingForInput,
        "the info arrives: {:?}",
        tx.failure()
    );
    tx.init(src.len() as u32, 1);
    tx.send(&src);
    // The decode side is passive: it progresses its agent (UCX over TCP moves bytes only then)
    // and watches for the notifications.
    let (kv_done, aux_done) = (
        format!("{}_kv_0_1", room.get()),
        format!("{}_aux", room.get()),
    );
    let mut seen: Vec<String> = Vec::new();
    let start = Instant::now();
    loop {
        let state = tx.poll();
        assert_ne!(state, KvPoll::Failed, "{:?}", tx.failure());
        let mut n = Vec::new();
        agent.drain_notifications(&mut n).unwrap();
        seen.extend(
            n.into_iter()
                .map(|x| String::from_utf8_lossy(&x.payload).into_owned()),
        );
        if state == KvPoll::Success && seen.contains(&kv_done) && seen.contains(&aux_done) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{state:?}, notifications: {seen:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    for (b, buf) in kv.iter().enumerate() {
        for (i, &v) in buf.buffer().as_slice().iter().enumerate() {
            let i = i as u64;
            let (page, o) = (i / item, i % item);
            let (t, o) = (o / (hd * HEAD_BYTES), o % (hd * HEAD_BYTES));
            let (head, j) = (o / HEAD_BYTES, o % HEAD_BYTES);
            let want = match dst.iter().position(|&x| u64::from(x) == page) {
                Some(k) => model(b, u64::from(src[k]), t, rank * hd + head, j),
                None => 0,
            };
            assert_eq!(v, want, "buffer {b} byte {i}");
        }
    }
    assert_eq!(prefill.mgr.request_paths().packed, u64::from(packed));
}

/// A prefill given host packing with pools that do not hold its KV buffers refuses to start,
/// with a reason that names the buffer; nothing is read from memory it was not given.
#[test]
fn host_packing_refuses_kv_buffers_outside_its_pools() {
    let bs = common::server();
    let addr = bs.addr().to_string();
    let agent = common::agent();
    let item = TOKENS * HEADS * HEAD_BYTES;
    let len = (PAGES * item) as usize;
    let kv: Vec<_> = (0..BUFFERS)
        .map(|_| agent.register(HostBuffer::new(len).unwrap()).unwrap())
        .collect();
    let aux = agent
        .register(HostBuffer::new((AUX_ROW * 4) as usize).unwrap())
        .unwrap();
    // The pools given: the first KV buffer's own memory is not among them.
    let elsewhere = SharedHostBuffer::new(len).unwrap();
    let args = KvArgs::new(
        kv.iter().map(|b| (b.region(), item)),
        [(aux.region(), AUX_ROW)],
    )
    .unwrap()
    .heads(HEADS as u32, TOKENS as u32);
    let config = ManagerConfig::default().host_packing(Some(packing(vec![elsewhere])));
    let err = KvManager::prefill(agent, args, &addr, config).unwrap_err();
    assert!(matches!(err, nixl_kv::Error::HostPacking(_)), "{err}");
    let first = format!("{:#x}", kv[0].region().addr);
    assert!(err.to_string().contains(&first), "{err}");
}
