//! Against SGLang 0.5.23's own NIXL classes (`nixl-py/tests/sglang0523_pd.py` runs them on host
//! memory): our prefill serving SGLang's decode, and SGLang's prefill serving our decode, every
//! KV byte and all ten aux rows checked, an ABORT acknowledged and a failure with its reason,
//! both ways; and one prefill of ours serving SGLang 0.5.1.post3's and 0.5.23's decodes at once.
//! The same against SGLang 0.5.22, whose wire format is the 0.5.20 profile's.
//! Needs the NIXL runtime and the SGLang venvs: `NIXL_KV_SGLANG0523_PYTHON`,
//! `NIXL_KV_SGLANG0522_PYTHON` and `NIXL_KV_SGLANG051_PYTHON` name their interpreters (`cargo xtask ci` provisions them; see
//! xtask/src/wheel.rs).
#![cfg(feature = "sglang-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{agent, reach, server, until};
use nixl_core::{HostBuffer, Registered};
use nixl_kv::{KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId};
use nixl_testkit::sglang::{ROOM_BASE, SglangPeer, Workload};
use nixl_wire::{AUX_LAYOUT_0520, Profile};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const REQUESTS: u64 = 8;
const PER_CHUNK: u32 = 4;
const LAYERS: usize = 2;
const PAGE: u64 = 4096;
const PREFILL_PAGES: u64 = 129;
const DECODE_PAGES: u64 = 256;
const AUX_SLOTS: u64 = 32;

/// The harness's workload: both sides derive rooms, pages and bytes from it.
fn workload(window: u32) -> Workload {
    Workload {
        requests: REQUESTS,
        chunks: 4,
        pages_per_chunk: PER_CHUNK,
        layers: LAYERS,
        page_bytes: PAGE,
        prefill_pages: PREFILL_PAGES,
        decode_pages: DECODE_PAGES,
        aux_slots: AUX_SLOTS,
        window,
    }
}

fn pages_per_request() -> u32 {
    workload(1).pages()
}

fn src_pages(i: u64) -> Vec<u32> {
    workload(1).src_pages(i)
}

fn kv_byte(b: usize, p: u32, j: usize) -> u8 {
    Workload::kv_byte(b, p, j)
}

fn aux_byte(room: u64, k: usize, j: usize) -> u8 {
    Workload::aux_byte(room, k, j)
}

/// An SGLang release under test: the variable naming its venv's python, its version, and the
/// profile our side speaks to it.
#[derive(Clone, Copy)]
struct Release {
    python: &'static str,
    version: &'static str,
    profile: Profile,
}

/// SGLang 0.5.23.
const V0523: Release = Release {
    python: "NIXL_KV_SGLANG0523_PYTHON",
    version: "0.5.23",
    profile: Profile::Sglang0523,
};

/// SGLang 0.5.22, of the 0.5.20 profile (installed over 0.5.23's packages).
const V0522: Release = Release {
    python: "NIXL_KV_SGLANG0522_PYTHON",
    version: "0.5.22",
    profile: Profile::Sglang0520,
};

fn python(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} must name the SGLang venv's python (cargo xtask ci provisions it)")
    })
}

/// The harness as `role` against `release`, with `window` requests in flight on a decode.
fn harness(release: Release, role: &str, window: u32, extra: &[&str]) -> SglangPeer {
    SglangPeer::start(&python(release.python), role, &workload(window), extra).unwrap()
}

struct Side {
    mgr: KvManager,
    kv: Vec<Registered<HostBuffer>>,
    aux: Vec<Registered<HostBuffer>>,
}

fn side(pages: u64, prefill_at: Option<&str>, config: ManagerConfig) -> Side {
    let agent = agent();
    let kv: Vec<_> = (0..2 * LAYERS)
        .map(|_| {
            agent
                .register(HostBuffer::new((pages * PAGE) as usize).unwrap())
                .unwrap()
        })
        .collect();
    let aux: Vec<_> = AUX_LAYOUT_0520
        .iter()
        .map(|item| {
            agent
                .register(HostBuffer::new((AUX_SLOTS * item) as usize).unwrap())
                .unwrap()
        })
        .collect();
    let args = KvArgs::new(
        kv.iter().map(|b| (b.region(), PAGE)),
        aux.iter()
            .zip(AUX_LAYOUT_0520)
            .map(|(b, item)| (b.region(), item)),
    )
    .unwrap();
    let mgr = match prefill_at {
        Some(bootstrap) => KvManager::prefill(agent, args, bootstrap, config).unwrap(),
        None => KvManager::decode(agent, args, config).unwrap(),
    };
    Side { mgr, kv, aux }
}

fn config_for(release: Release) -> ManagerConfig {
    ManagerConfig::default()
        .profile(release.profile)
        .sglang_pages(16, "bfloat16")
}

#[test]
fn our_prefill_serves_sglang_0523s_decode_every_byte_an_abort_and_a_bad_page() {
    our_prefill_serves(V0523);
}

#[test]
fn our_prefill_serves_sglang_0522s_decode_every_byte_an_abort_and_a_bad_page() {
    our_prefill_serves(V0522);
}

fn our_prefill_serves(release: Release) {
    let bs = server();
    let addr = bs.addr().to_string();
    let mut p = side(PREFILL_PAGES, Some(&addr), config_for(release));
    for (b, buf) in p.kv.iter_mut().enumerate() {
        for (q, page) in buf
            .buffer_mut()
            .as_mut_slice()
            .chunks_mut(PAGE as usize)
            .enumerate()
        {
            for (j, byte) in page.iter_mut().enumerate() {
                *byte = kv_byte(b, q as u32, j);
            }
        }
    }
    let (abort_i, bad_i) = (2u64, 5u64);
    let mut decode = harness(
        release,
        "decode",
        1,
        &[
            "--bootstrap",
            &addr,
            "--abort-room-after-metadata",
            "2",
            "--bad-page",
            "5",
        ],
    );
    let ready = decode.next("ready").unwrap();
    assert_eq!(
        ready["sglang"], release.version,
        "the SGLang release under test"
    );
    for i in 0..REQUESTS {
        let room = ROOM_BASE + i;
        let slot = (i % AUX_SLOTS) as usize;
        for (k, aux) in p.aux.iter_mut().enumerate() {
            let item = AUX_LAYOUT_0520[k] as usize;
            for (j, byte) in aux.buffer_mut().as_mut_slice()[slot * item..(slot + 1) * item]
                .iter_mut()
                .enumerate()
            {
                *byte = aux_byte(room, k, j);
            }
        }
        let mut tx = KvSender::new(&p.mgr, RoomId::new(room)).unwrap();
        let state = reach(T, KvPoll::WaitingForInput, || tx.poll());
        if i == abort_i && state == KvPoll::Failed {
            continue;
        }
        assert_eq!(
            state,
            KvPoll::WaitingForInput,
            "room {i}: {:?}",
            tx.failure()
        );
        tx.init(pages_per_request(), slot as u32);
        let src = src_pages(i);
        for c in src.chunks(PER_CHUNK as usize) {
            tx.send(c);
        }
        let end = until(T, || tx.poll());
        match i {
            _ if i == abort_i => {}
            _ if i == bad_i => assert_eq!(end, KvPoll::Failed, "a page past the decode's pool"),
            _ => assert_eq!(end, KvPoll::Success, "room {i}: {:?}", tx.failure()),
        }
    }
    let (results, done) = decode.results("decode").unwrap();
    assert_eq!(results.len() as u64, REQUESTS);
    for r in &results {
        assert_eq!(r["pass"], true, "{r}");
        match r["case"].as_str() {
            Some("normal") => {
                assert_eq!(r["aux_rows_verified"], 10, "{r}");
                assert_eq!(
                    r["kv_bytes_verified"],
                    u64::from(pages_per_request()) * PAGE * 2 * LAYERS as u64
                );
            }
            Some("abort") => assert_eq!(r["abort_ack"], true, "{r}"),
            Some("bad_page") => assert!(r["reason"].as_str().is_some_and(|s| !s.is_empty())),
            other => panic!("case {other:?}"),
        }
    }
    assert_eq!(done["pass"], true, "{done}");
    assert_eq!(
        done["stray_writes"].as_array().map_or(0, Vec::len),
        0,
        "{done}"
    );
}

#[test]
fn sglang_0523s_prefill_serves_our_decode_every_byte_and_an_abort() {
    prefill_serves_ours(V0523);
}

#[test]
fn sglang_0522s_prefill_serves_our_decode_every_byte_and_an_abort() {
    prefill_serves_ours(V0522);
}

#[test]
fn sglang_0522s_prefill_serves_our_decode_configured_for_0523() {
    // The profiles of one family interoperate: the 0.5.22 prefill signals by notifications.
    prefill_serves_ours(Release {
        profile: Profile::Sglang0523,
        ..V0522
    });
}

#[test]
fn sglang_0523s_prefill_serves_our_decode_configured_for_051() {
    // The bootstrap server's answer reveals 0.5.23: our decode speaks it to that prefill.
    prefill_serves_ours(Release {
        profile: Profile::Sglang051,
        ..V0523
    });
}

fn prefill_serves_ours(release: Release) {
    let mut prefill = harness(release, "prefill", 4, &["--bad-src-page", "5"]);
    let ready = prefill.next("ready").unwrap();
    assert_eq!(
        ready["sglang"], release.version,
        "the SGLang release under test"
    );
    let addr = ready["bootstrap"].as_str().unwrap().to_owned();
    let d = side(DECODE_PAGES, None, config_for(release));
    // Request 5 names a source page past SGLang's own pool (`--bad-src-page 5`): its prefill
    // fails the room and tells our decode why.
    let (abort_i, short_i) = (3u64, 5u64);
    for i in 0..REQUESTS {
        let room = ROOM_BASE + i;
        let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(room), None).unwrap();
        let dst: Vec<u32> = (0..pages_per_request())
            .map(|n| (n * 5 + 3) % DECODE_PAGES as u32)
            .collect();
        let slot = (AUX_SLOTS - 1) as u32;
        if i == short_i {
            // Our decode hears why (KV_STATUS 0 and its reason), not a timeout.
            rx.init(&dst, slot);
            assert_eq!(until(T, || rx.poll()), KvPoll::Failed, "room {i}");
            let why = rx.failure().unwrap().to_string();
            assert!(why.starts_with("prefill failed the transfer"), "{why}");
            continue;
        }
        rx.init(&dst, slot);
        if i == abort_i {
            rx.abort("the client went away");
            assert_eq!(rx.poll(), KvPoll::Failed);
            continue;
        }
        assert_eq!(
            until(T, || rx.poll()),
            KvPoll::Success,
            "room {i}: {:?}",
            rx.failure()
        );
        for (b, buf) in d.kv.iter().enumerate() {
            let data = buf.buffer().as_slice();
            for (s, t) in src_pages(i).iter().zip(&dst) {
                let page = &data[*t as usize * PAGE as usize..(*t as usize + 1) * PAGE as usize];
                let want: Vec<u8> = (0..PAGE as usize).map(|j| kv_byte(b, *s, j)).collect();
                assert!(page == want.as_slice(), "room {i} buffer {b} page {t}");
            }
        }
        for (k, aux) in d.aux.iter().enumerate() {
            let item = AUX_LAYOUT_0520[k] as usize;
            let row = &aux.buffer().as_slice()[slot as usize * item..(slot as usize + 1) * item];
            let want: Vec<u8> = (0..item).map(|j| aux_byte(room, k, j)).collect();
            assert_eq!(row, want.as_slice(), "room {i} aux buffer {k}");
        }
    }
    let (results, done) = prefill.results("prefill").unwrap();
    prefill.quit();
    assert_eq!(results.len() as u64, REQUESTS, "{done}");
    for r in &results {
        if r["i"] == abort_i {
            let reason = r["reason"].as_str().unwrap_or("");
            assert!(
                r["ok"] == true || reason.contains("Aborted by decode"),
                "{r}"
            );
        } else if r["i"] == short_i {
            assert_eq!(r["ok"], false, "{r}");
        } else {
            assert_eq!(r["ok"], true, "{r}");
        }
    }
}

/// SGLang 0.5.1.post3's own decode (`nixl-py/tests/test_kv_interop.py --worker sglang`): three
/// rooms 1000..1002 of 8 pages, each page `p` of buffer `b` expected to hold
/// `(j + 131 b + 7 p) % 251` for its source page `p = 10 + 8 r + n`, and aux buffer 0's row
/// `(j + 13 r + 1) % 253`.
struct Worker051 {
    peer: SglangPeer,
}

impl Worker051 {
    fn start() -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../nixl-py/tests/test_kv_interop.py"
        );
        let mut peer = SglangPeer::spawn(
            Command::new(python("NIXL_KV_SGLANG051_PYTHON")).args([script, "--worker", "sglang"]),
        )
        .unwrap();
        let ready = peer.line().unwrap();
        assert_eq!(ready["ready"], true, "{ready}");
        Self { peer }
    }

    fn decode(&mut self, bootstrap_port: u16) {
        let cmd = serde_json::json!({"op": "decode", "port": bootstrap_port});
        self.peer.send(&cmd.to_string()).unwrap();
    }

    fn result(&mut self) -> Value {
        self.peer.line().unwrap()
    }
}

#[test]
fn one_prefill_serves_sglang_051_and_0523_decodes_at_once() {
    let bs = server();
    let addr = bs.addr().to_string();
    // Pages 0..129 hold the 0.5.23 harness's pattern, 200..224 what the 0.5.1 decode expects
    // of its source pages 10..34.
    let mut p = side(256, Some(&addr), config_for(V0523));
    for (b, buf) in p.kv.iter_mut().enumerate() {
        for (q, page) in buf
            .buffer_mut()
            .as_mut_slice()
            .chunks_mut(PAGE as usize)
            .enumerate()
        {
            for (j, byte) in page.iter_mut().enumerate() {
                *byte = if q >= 200 {
                    ((j + 131 * b + 7 * (q - 190)) % 251) as u8
                } else {
                    kv_byte(b, q as u32, j)
                };
            }
        }
    }
    for i in 0..REQUESTS {
        let (room, slot) = (ROOM_BASE + i, i as usize);
        for (k, aux) in p.aux.iter_mut().enumerate() {
            let item = AUX_LAYOUT_0520[k] as usize;
            for (j, byte) in aux.buffer_mut().as_mut_slice()[slot * item..(slot + 1) * item]
                .iter_mut()
                .enumerate()
            {
                *byte = aux_byte(room, k, j);
            }
        }
    }
    for r in 0..3usize {
        let slot = 20 + r;
        let row = &mut p.aux[0].buffer_mut().as_mut_slice()[slot * 64..(slot + 1) * 64];
        for (j, byte) in row.iter_mut().enumerate() {
            *byte = ((j + 13 * r + 1) % 253) as u8;
        }
    }
    let mut old = Worker051::start();
    let mut new = harness(V0523, "decode", 4, &["--bootstrap", &addr]);
    assert_eq!(new.next("ready").unwrap()["sglang"], "0.5.23");
    old.decode(bs.addr().port());
    let mgr = &p.mgr;
    std::thread::scope(|s| {
        s.spawn(|| {
            for r in 0..3u32 {
                let mut tx = KvSender::new(mgr, RoomId::new(1000 + u64::from(r))).unwrap();
                assert_eq!(
                    reach(T, KvPoll::WaitingForInput, || tx.poll()),
                    KvPoll::WaitingForInput
                );
                tx.init(8, 20 + r);
                let src: Vec<u32> = (0..8).map(|n| 200 + 8 * r + n).collect();
                tx.send(&src[..4]);
                tx.send(&src[4..]);
                assert_eq!(
                    until(T, || tx.poll()),
                    KvPoll::Success,
                    "0.5.1 room {r}: {:?}",
                    tx.failure()
                );
            }
        });
        s.spawn(|| {
            for i in 0..REQUESTS {
                let mut tx = KvSender::new(mgr, RoomId::new(ROOM_BASE + i)).unwrap();
                assert_eq!(
                    reach(T, KvPoll::WaitingForInput, || tx.poll()),
                    KvPoll::WaitingForInput
                );
                tx.init(pages_per_request(), i as u32);
                for c in src_pages(i).chunks(PER_CHUNK as usize) {
                    tx.send(c);
                }
                assert_eq!(
                    until(T, || tx.poll()),
                    KvPoll::Success,
                    "0.5.23 room {i}: {:?}",
                    tx.failure()
                );
            }
        });
    });
    let verdict = old.result();
    assert_eq!(
        verdict["ok"], true,
        "SGLang 0.5.1.post3's decode: {verdict}"
    );
    assert!(
        verdict["result"].as_str().unwrap().starts_with("VERIFIED"),
        "{verdict}"
    );
    let (results, done) = new.results("decode").unwrap();
    assert!(results.iter().all(|r| r["pass"] == true), "{results:?}");
    assert_eq!(done["pass"], true, "SGLang 0.5.23's decode: {done}");
}
