//! `cargo xtask bench kv`: layout 64 buffers × 32 KiB pages, requests of 32 and 256 pages.
//!
//! (a) nixl-core WRITEs of exactly the descriptors those requests need, to a target agent in a
//!     child process (this binary re-run with `--serve-target`); create + post + wait per request.
//! (b) the full path in two processes (`nixl-pd prefill` and `nixl-pd decode`, from `$PD_BIN`): transfer
//!     message → prefill send → NIXL → notifications → Success on the decode.
//! (c) planner nanoseconds per descriptor; (d) CPU used by idle managers.
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    missing_docs,
    reason = "benchmark binary"
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, MemType, XferDescs, XferOp,
    XferStatus,
};
use nixl_kv::proto::plan::{group_runs, plan_kv};
use rand::{Rng, SeedableRng};

const BUFFERS: u64 = 64;
const PAGE: u64 = 32 << 10;
const POOL: u64 = 600;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-target") {
        serve_target(args[2].parse().unwrap());
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    println!(
        "layout: {BUFFERS} buffers x {POOL} pages x {} KiB per side\n",
        PAGE >> 10
    );
    planner();
    idle_cpu();
    println!(
        "\n| request | (a) raw nixl-core GB/s | (a) p50 ms | (a) p99 ms | (b) full path GB/s | (b) p50 ms | (b) p99 ms | b/a (GB/s) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (pages, n) in [
        (32usize, if quick { 50 } else { 300 }),
        (256, if quick { 10 } else { 60 }),
    ] {
        let a = raw(pages, n);
        let b = full(pages, n);
        println!(
            "| {pages} pages ({} MiB) | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            (pages as u64 * PAGE * BUFFERS) >> 20,
            a.gbps,
            a.p50,
            a.p99,
            b.gbps,
            b.p50,
            b.p99,
            b.gbps / a.gbps
        );
    }
}

struct Stats {
    gbps: f64,
    p50: f64,
    p99: f64,
}

/// Destination pages as the `pd` decode picks them: random runs of 1-8 consecutive pages.
fn dst_pages(n: usize, rng: &mut impl Rng) -> Vec<u32> {
    let mut free: Vec<u32> = (0..POOL as u32).collect();
    nixl_tools::take_page_runs(&mut free, n, rng)
}

fn src_pages(room: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (room.wrapping_add(97 * i) % POOL) as u32)
        .collect()
}

fn planner() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let src_ptrs: Vec<u64> = (0..BUFFERS)
        .map(|b| 0x7f00_0000_0000 + b * POOL * PAGE)
        .collect();
    let dst_ptrs: Vec<u64> = (0..BUFFERS)
        .map(|b| 0x5500_0000_0000 + b * POOL * PAGE)
        .collect();
    let items = vec![PAGE; BUFFERS as usize];
    for pages in [32usize, 256] {
        let reqs: Vec<(Vec<u32>, Vec<u32>)> = (0..64)
            .map(|r| (src_pages(r * 7919, pages), dst_pages(pages, &mut rng)))
            .collect();
        let (mut runs, mut ops) = (Vec::new(), Vec::new());
        let (mut descs, mut iters) = (0usize, 0usize);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            for (s, d) in &reqs {
                group_runs(s, d, &mut runs);
                ops.clear();
                plan_kv(&src_ptrs, &dst_ptrs, &items, &runs, &mut ops);
                descs += ops.len();
                iters += 1;
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / descs as f64;
        println!(
            "(c) planner, {pages}-page requests: {ns:.2} ns per descriptor ({} descriptors per request)",
            descs / iters
        );
    }
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn idle_cpu() {
    use nixl_kv::{KvArgs, KvManager, ManagerConfig};
    let server = nixl_kv::BootstrapServer::start("127.0.0.1:0").unwrap();
    let make = || {
        let a = Agent::new(&nixl_testkit::unique_name("idle"), &AgentConfig::default()).unwrap();
        a.create_backend(BackendKind::Ucx, &BackendParams::new())
            .unwrap();
        let kv = a.register(HostBuffer::new(1 << 20).unwrap()).unwrap();
        let aux = a.register(HostBuffer::new(4096).unwrap()).unwrap();
        let args = KvArgs::new([(kv.region(), 4096)], [(aux.region(), 64)]).unwrap();
        (a, args, kv, aux)
    };
    let (pa, pargs, _k1, _x1) = make();
    let (da, dargs, _k2, _x2) = make();
    let _p = KvManager::prefill(
        pa,
        pargs,
        &server.addr().to_string(),
        ManagerConfig::default(),
    )
    .unwrap();
    let _d = KvManager::decode(da, dargs, ManagerConfig::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (c0, t0) = (cpu_seconds(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let used = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    println!(
        "(d) idle prefill + decode managers (with bootstrap server), 3 s: {:.2} % of one core",
        used * 100.0
    );
}

/// The target side of (a): registers `bytes`, prints its metadata, progresses until stdin closes.
fn serve_target(bytes: usize) {
    let a = Agent::new(
        &nixl_testkit::unique_name("bench-target"),
        &AgentConfig::default(),
    )
    .unwrap();
    a.create_backend(BackendKind::Ucx, &BackendParams::new())
        .unwrap();
    let buf = a.register(HostBuffer::new(bytes).unwrap()).unwrap();
    println!(
        "{} {} {}",
        a.name(),
        buf.region().addr,
        nixl_testkit::hex(a.local_metadata().unwrap().as_bytes())
    );
    std::io::stdout().flush().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = std::sync::Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        s.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let mut sink = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        a.drain_notifications(&mut sink).unwrap();
        sink.clear();
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn raw(pages: usize, n: usize) -> Stats {
    let bytes = (BUFFERS * POOL * PAGE) as usize;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--serve-target", &bytes.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (name, dst_base) = (parts[0].to_owned(), parts[1].parse::<u64>().unwrap());
    let a = Agent::new(
        &nixl_testkit::unique_name("bench-init"),
        &AgentConfig::default(),
    )
    .unwrap();
    a.create_backend(BackendKind::Ucx, &BackendParams::new())
        .unwrap();
    let src = a.register(HostBuffer::new(bytes).unwrap()).unwrap();
    a.load_remote(&nixl_testkit::unhex(parts[2]).unwrap())
        .unwrap();
    let src_ptrs: Vec<u64> = (0..BUFFERS)
        .map(|b| src.region().addr + b * POOL * PAGE)
        .collect();
    let dst_ptrs: Vec<u64> = (0..BUFFERS).map(|b| dst_base + b * POOL * PAGE).collect();
    let items = vec![PAGE; BUFFERS as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let (mut runs, mut ops, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 2 {
        let room = rng.random::<u64>() >> 1;
        let (s, d) = (src_pages(room, pages), dst_pages(pages, &mut rng));
        group_runs(&s, &d, &mut runs);
        ops.clear();
        plan_kv(&src_ptrs, &dst_ptrs, &items, &runs, &mut ops);
        let start = Instant::now();
        let mut local = XferDescs::with_capacity(MemType::Dram, ops.len());
        let mut remote = XferDescs::with_capacity(MemType::Dram, ops.len());
        for op in &ops {
            local.push(op.src, op.len, 0);
            remote.push(op.dst, op.len, 0);
        }
        let notif = format!("{room}_kv_0_1");
        let req = a
            .create_request(
                XferOp::Write,
                &local,
                &remote,
                &name,
                Some(notif.as_bytes()),
            )
            .unwrap();
        if req.post().unwrap() == XferStatus::InProgress {
            while req.status().unwrap() == XferStatus::InProgress {}
        }
        if i >= 2 {
            lat.push(start.elapsed());
        }
    }
    let _ = writeln!(child.stdin.as_mut().unwrap());
    let _ = child.wait();
    stats(&mut lat, (pages as u64 * PAGE * BUFFERS * n as u64) as f64)
}

/// GB/s over the time spent in requests (not the set-up), and latency percentiles.
fn stats(lat: &mut [Duration], bytes: f64) -> Stats {
    lat.sort();
    let busy: f64 = lat.iter().map(Duration::as_secs_f64).sum();
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    Stats {
        gbps: bytes / busy / 1e9,
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

fn full(pages: usize, n: usize) -> Stats {
    let pd = std::env::var("PD_BIN").expect("PD_BIN (run through `cargo xtask bench kv`)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = [
        "--layers",
        "32",
        "--page-bytes",
        &PAGE.to_string(),
        "--pages",
        &POOL.to_string(),
    ];
    let mut prefill = Command::new(&pd)
        .args(["prefill", "--bootstrap-port", &port.to_string()])
        .args(pool)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(prefill.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("prefill: bootstrap on") {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("prefill exited");
        }
    }
    let out = Command::new(&pd)
        .args(["decode", "--bootstrap", &format!("127.0.0.1:{port}")])
        .args(pool)
        .args([
            "--requests",
            &n.to_string(),
            "--pages-per-request",
            &pages.to_string(),
            "--concurrency",
            "1",
        ])
        .args(["--no-verify", "--json"])
        .output()
        .unwrap();
    let _ = prefill.kill();
    let _ = prefill.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(json["failures"], 0, "{text}");
    Stats {
        gbps: json["gbps"].as_f64().unwrap(),
        p50: json["p50_ms"].as_f64().unwrap(),
        p99: json["p99_ms"].as_f64().unwrap(),
    }
}
