//! `cargo xtask bench hicache`: raw nixl-core POSIX transfers against `batch_set`/`batch_get`
//! of the same pages, in one run.
//!
//! Raw write: per batch, create + size + register one file per page, one WRITE request, close.
//! Raw read: per batch, open + register each page's file, one READ request, close. That is the
//! least any NIXL file store does per batch; ours adds atomic publish (temp file + rename) on
//! writes, and a stat plus a bounded cache of open files on reads. Files live under
//! `$HICACHE_BENCH_DIR` (default: a temp dir under target/); the page cache is warm for reads
//! (the pages were just written), and nothing is fsynced.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    missing_docs,
    reason = "benchmark binary"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, FileRegion, HostBuffer, MemType, Registered,
    XferDescs, XferOp,
};
use nixl_hicache::{HiCache, HiCacheConfig, Plugin, RawTarget, WriteMode, page_key};

struct Case {
    pages: usize,
    bytes: usize,
    batch: usize,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let root = std::env::var_os("HICACHE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/hicache-bench")
        });
    let cases = [
        Case {
            pages: 1000,
            bytes: 64 << 10,
            batch: 8,
        },
        Case {
            pages: 1000,
            bytes: 64 << 10,
            batch: 64,
        },
        Case {
            pages: 256,
            bytes: 1 << 20,
            batch: 8,
        },
        Case {
            pages: 256,
            bytes: 1 << 20,
            batch: 64,
        },
    ];
    let rounds = if quick { 1 } else { 3 };
    println!(
        "| pages x size | batch | raw write GB/s | batch_set atomic GB/s | atomic/raw | batch_set in-place GB/s | in-place/raw | raw read GB/s | batch_get GB/s | get/raw |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for case in &cases {
        let dir = root.join(format!("{}x{}-{}", case.pages, case.bytes, case.batch));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let total = case.pages * case.bytes;
        let raw = RawPosix::new();
        let cache = HiCache::new(HiCacheConfig::new(
            Some(dir.join("ours")),
            Plugin::parse("POSIX"),
        ))
        .unwrap();
        let in_place = HiCache::new(
            HiCacheConfig::new(Some(dir.join("in-place")), Plugin::parse("POSIX"))
                .write_mode(WriteMode::InPlace),
        )
        .unwrap();
        let src_in_place = in_place
            .register_buffer(HostBuffer::new(total).unwrap())
            .unwrap();
        let mut src = cache
            .register_buffer(HostBuffer::new(total).unwrap())
            .unwrap();
        nixl_testkit::pattern::fill(src.buffer_mut().as_mut_slice(), 1);
        let dst = cache
            .register_buffer(HostBuffer::new(total).unwrap())
            .unwrap();
        let raw_src = raw.agent.register(HostBuffer::new(total).unwrap()).unwrap();
        let raw_dst = raw.agent.register(HostBuffer::new(total).unwrap()).unwrap();
        let keys: Vec<String> = (0..case.pages as u32)
            .map(|i| page_key(&[i, case.bytes as u32], None))
            .collect();
        let (mut rw, mut ow, mut iw, mut rr, mut or) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            rw.push(time(|| raw.write_all(&dir.join("raw"), &raw_src, case)));
            ow.push(time(|| ours_write(&cache, &src, &keys, case)));
            iw.push(time(|| ours_write(&in_place, &src_in_place, &keys, case)));
            rr.push(time(|| raw.read_all(&dir.join("raw"), &raw_dst, case)));
            or.push(time(|| ours_read(&cache, &dst, &keys, case)));
        }
        assert_eq!(
            src.buffer().as_slice(),
            dst.buffer().as_slice(),
            "read back differs"
        );
        let gbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e9;
        let (rw, ow, iw) = (gbps(median(rw)), gbps(median(ow)), gbps(median(iw)));
        let (rr, or) = (gbps(median(rr)), gbps(median(or)));
        println!(
            "| {} x {} KiB | {} | {rw:.2} | {ow:.2} | {:.2} | {iw:.2} | {:.2} | {rr:.2} | {or:.2} | {:.2} |",
            case.pages,
            case.bytes >> 10,
            case.batch,
            ow / rw,
            iw / rw,
            or / rr
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Times `f` after flushing dirty pages, so no phase pays for the previous one's writeback.
fn time(f: impl FnOnce()) -> Duration {
    let _ = std::process::Command::new("sync").status();
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Page `key` of the run lives at its index in `buf`; calls `op` once per batch.
fn batches(
    buf: &Registered<HostBuffer>,
    keys: &[String],
    case: &Case,
    mut op: impl FnMut(&[(&str, RawTarget)]),
) {
    let base = buf.region().addr;
    for (b, chunk) in keys.chunks(case.batch).enumerate() {
        let items: Vec<(&str, RawTarget)> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let off = ((b * case.batch + i) * case.bytes) as u64;
                (
                    k.as_str(),
                    RawTarget {
                        addr: base + off,
                        len: case.bytes as u64,
                    },
                )
            })
            .collect();
        op(&items);
    }
}

fn ours_write(cache: &HiCache, src: &Registered<HostBuffer>, keys: &[String], case: &Case) {
    batches(src, keys, case, |items| cache.batch_set_raw(items).unwrap());
}

fn ours_read(cache: &HiCache, dst: &Registered<HostBuffer>, keys: &[String], case: &Case) {
    batches(dst, keys, case, |items| {
        assert!(cache.batch_get_raw(items).unwrap().iter().all(|&h| h))
    });
}

/// nixl-core alone, doing the same I/O without the connector.
struct RawPosix {
    agent: Agent,
}

impl RawPosix {
    fn new() -> Self {
        let agent = Agent::new(
            &nixl_testkit::unique_name("raw-posix"),
            &AgentConfig::default(),
        )
        .unwrap();
        agent
            .create_backend(BackendKind::Posix, &BackendParams::new())
            .unwrap();
        Self { agent }
    }

    fn batches(&self, dir: &Path, buf: &Registered<HostBuffer>, case: &Case, op: XferOp) {
        std::fs::create_dir_all(dir).unwrap();
        let base = buf.region().addr;
        for b in 0..case.pages.div_ceil(case.batch) {
            let n = case.batch.min(case.pages - b * case.batch);
            let mut files = Vec::with_capacity(n);
            let mut local = XferDescs::with_capacity(MemType::Dram, n);
            let mut remote = XferDescs::with_capacity(MemType::File, n);
            for i in 0..n {
                let page = b * case.batch + i;
                let region =
                    FileRegion::open(&dir.join(page.to_string()), op == XferOp::Write).unwrap();
                if op == XferOp::Write {
                    region.file().set_len(case.bytes as u64).unwrap();
                }
                let file = self.agent.register(region).unwrap();
                local.push(base + (page * case.bytes) as u64, case.bytes as u64, 0);
                remote.push(0, case.bytes as u64, file.buffer().fd());
                files.push(file);
            }
            let req = self
                .agent
                .create_request(op, &local, &remote, self.agent.name(), None)
                .unwrap();
            if req.post().unwrap() == nixl_core::XferStatus::InProgress {
                req.wait(Duration::from_secs(60), std::thread::yield_now)
                    .unwrap();
            }
        }
    }

    fn write_all(&self, dir: &Path, src: &Registered<HostBuffer>, case: &Case) {
        self.batches(dir, src, case, XferOp::Write);
    }

    fn read_all(&self, dir: &Path, dst: &Registered<HostBuffer>, case: &Case) {
        self.batches(dir, dst, case, XferOp::Read);
    }
}
