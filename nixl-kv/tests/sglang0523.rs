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

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent, reach, server, until};
use nixl_core::{HostBuffer, Registered};
use nixl_kv::{KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId};
use nixl_wire::{AUX_LAYOUT_0520, Profile};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// The harness's workload options; both sides derive rooms, pages and bytes from them.
const REQUESTS: u64 = 8;
const CHUNKS: u32 = 4;
const PER_CHUNK: u32 = 4;
const LAYERS: usize = 2;
const PAGE: u64 = 4096;
const PREFILL_PAGES: u64 = 129;
const DECODE_PAGES: u64 = 256;
const AUX_SLOTS: u64 = 32;
const ROOM_BASE: u64 = (1 << 62) + 12345;
/// `--hidden 32`: SGLang's hidden-state row is 2 × 32 bytes, the default layout's 64.
const OPTIONS: &[&str] = &[
    "--requests",
    "8",
    "--chunks",
    "4",
    "--pages-per-chunk",
    "4",
    "--layers",
    "2",
    "--page-bytes",
    "4096",
    "--page-tokens",
    "16",
    "--prefill-pages",
    "129",
    "--decode-pages",
    "256",
    "--aux-slots",
    "32",
    "--hidden",
    "32",
    "--timeout",
    "60",
];

fn pages_per_request() -> u32 {
    CHUNKS * PER_CHUNK
}

fn src_pages(i: u64) -> Vec<u32> {
    let t = u64::from(pages_per_request());
    (0..t)
        .map(|n| (((i * t + n) * 7) % PREFILL_PAGES) as u32)
        .collect()
}

fn kv_byte(b: usize, p: u32, j: usize) -> u8 {
    ((7 * b + 13 * p as usize + j) % 251) as u8
}

fn aux_byte(room: u64, k: usize, j: usize) -> u8 {
    ((room % 256) as usize + 17 * k + j) as u8
}

/// The SGLang 0.5.23 harness, killed if the test ends first.
struct Peer {
    child: Child,
    lines: Box<dyn Iterator<Item = Value>>,
    stdin: Option<ChildStdin>,
}

/// An SGLang release under test: the variable naming its venv's python, and the profile
/// our side speaks to it.
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

impl Peer {
    fn start(role: &str, extra: &[&str]) -> Self {
        Self::start_of(V0523, role, extra)
    }

    fn start_of(release: Release, role: &str, extra: &[&str]) -> Self {
        let python = std::env::var(release.python).unwrap_or_else(|_| {
            panic!(
                "{} must name the SGLang venv's python (cargo xtask ci provisions it)",
                release.python
            )
        });
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../nixl-py/tests/sglang0523_pd.py"
        );
        let mut child = Command::new(python)
            .arg(script)
            .arg(role)
            .args(OPTIONS)
            .args(extra)
            .env("SGLANG_HOST_IP", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let lines = Box::new(
            out.lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str::<Value>(&l).ok()),
        );
        Self {
            child,
            lines,
            stdin,
        }
    }

    /// The next event named `event`, failing on an `error` event or the end of the output.
    fn next(&mut self, event: &str) -> Value {
        for v in self.lines.by_ref() {
            assert_ne!(v["event"], "error", "{v}");
            if v["event"] == event {
                return v;
            }
        }
        panic!("the SGLang peer ended before {event}");
    }

    /// Every `result` up to `done`, and `done`.
    fn results(&mut self) -> (Vec<Value>, Value) {
        let mut results = Vec::new();
        for v in self.lines.by_ref() {
            assert_ne!(v["event"], "error", "{v}");
            match v["event"].as_str() {
                Some("result") => results.push(v),
                Some("done") => return (results, v),
                _ => {}
            }
        }
        panic!("the SGLang peer ended before done");
    }

    fn quit(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "quit");
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.quit();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

fn config() -> ManagerConfig {
    config_for(V0523)
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
    let mut decode = Peer::start_of(
        release,
        "decode",
        &[
            "--bootstrap",
            &addr,
            "--abort-room-after-metadata",
            "2",
            "--bad-page",
            "5",
            "--window",
            "1",
        ],
    );
    let ready = decode.next("ready");
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
    let (results, done) = decode.results();
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

fn prefill_serves_ours(release: Release) {
    let mut prefill = Peer::start_of(release, "prefill", &[]);
    let ready = prefill.next("ready");
    assert_eq!(
        ready["sglang"], release.version,
        "the SGLang release under test"
    );
    let addr = ready["bootstrap"].as_str().unwrap().to_owned();
    let d = side(DECODE_PAGES, None, config_for(release));
    let abort_i = 3u64;
    for i in 0..REQUESTS {
        let room = ROOM_BASE + i;
        let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(room), None).unwrap();
        let dst: Vec<u32> = (0..pages_per_request())
            .map(|n| (n * 5 + 3) % DECODE_PAGES as u32)
            .collect();
        let slot = (AUX_SLOTS - 1) as u32;
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
    let (results, done) = prefill.results();
    prefill.quit();
    assert_eq!(results.len() as u64, REQUESTS, "{done}");
    for r in &results {
        if r["i"] == abort_i {
            let reason = r["reason"].as_str().unwrap_or("");
            assert!(
                r["ok"] == true || reason.contains("Aborted by decode"),
                "{r}"
            );
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
    peer: Peer,
}

impl Worker051 {
    fn start() -> Self {
        let python = std::env::var("NIXL_KV_SGLANG051_PYTHON").expect(
            "NIXL_KV_SGLANG051_PYTHON must name the SGLang 0.5.1.post3 venv's python \
             (cargo xtask ci provisions it)",
        );
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../nixl-py/tests/test_kv_interop.py"
        );
        let mut child = Command::new(python)
            .args([script, "--worker", "sglang"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let lines = Box::new(
            out.lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str::<Value>(&l).ok()),
        );
        let mut peer = Peer {
            child,
            lines,
            stdin,
        };
        let ready = peer.lines.next().expect("the 0.5.1 worker ended at start");
        assert_eq!(ready["ready"], true, "{ready}");
        Self { peer }
    }

    fn decode(&mut self, bootstrap_port: u16) {
        let stdin = self.peer.stdin.as_mut().unwrap();
        writeln!(
            stdin,
            "{}",
            serde_json::json!({"op": "decode", "port": bootstrap_port})
        )
        .unwrap();
        stdin.flush().unwrap();
    }

    fn result(&mut self) -> Value {
        self.peer.lines.next().expect("the 0.5.1 worker ended")
    }
}

#[test]
fn one_prefill_serves_sglang_051_and_0523_decodes_at_once() {
    let bs = server();
    let addr = bs.addr().to_string();
    // Pages 0..129 hold the 0.5.23 harness's pattern, 200..224 what the 0.5.1 decode expects
    // of its source pages 10..34.
    let mut p = side(256, Some(&addr), config());
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
    let mut new = Peer::start("decode", &["--bootstrap", &addr]);
    assert_eq!(new.next("ready")["sglang"], "0.5.23");
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
    let (results, done) = new.results();
    assert!(results.iter().all(|r| r["pass"] == true), "{results:?}");
    assert_eq!(done["pass"], true, "SGLang 0.5.23's decode: {done}");
}
