//! `sglang-bench` (`cargo xtask bench sglang`): the PD workload of `nixl-py/tests/sglang0523_pd.py`
//! (host memory, 127.0.0.1) with SGLang 0.5.23's own classes on both sides, ours on both sides,
//! and each mix, in one run: time-to-Success p50 and p99 on the decode (from the TransferInfo
//! to the poll that sees Success, polls 200 µs apart on every side), and the CPU each side's
//! process burns while idle afterwards.
//!
//! `SGLANG_PYTHON` names the SGLang 0.5.23 venv's python (xtask provisions it). Ours run in this
//! process (a prefill and a decode manager, each with its own agent); SGLang's in its harness.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "benchmark program"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Registered};
use nixl_kv::{
    BootstrapServer, KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, Profile,
    RoomId,
};
use nixl_testkit::sglang::{SglangPeer, Workload};

#[derive(Parser)]
#[command(about = "SGLang 0.5.23's NIXL classes against ours: time to Success and idle CPU")]
struct Args {
    /// Requests per combination and round (one at a time).
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Rounds: each runs the four combinations in turn.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds of idle after each combination over which CPU use is measured.
    #[arg(long, default_value_t = 2.0)]
    idle_seconds: f64,
}

const NAP: Duration = Duration::from_micros(200);
/// SGLang's prefill creates a sender as each request comes (as a scheduler does, and as ours
/// do), not all at once: polling hundreds of idle senders would slow every request.
const PREFILL_WINDOW: &[&str] = &["--prefill-window", "2"];
const T: Duration = Duration::from_secs(60);
/// 0.5.2x's default aux layout (the harness runs with `--hidden 32`).
const AUX: [u64; 10] = nixl_kv::AUX_LAYOUT_0520;

fn workload(requests: u64) -> Workload {
    Workload {
        requests,
        window: 1,
        ..Workload::default()
    }
}

/// CPU seconds a process has used (user + system), from `/proc`.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Share of one core that `pids` used over `secs` of idle.
fn idle_cpu(pids: &[String], secs: f64) -> anyhow::Result<f64> {
    let before: f64 = pids
        .iter()
        .map(|p| cpu_seconds(p))
        .sum::<anyhow::Result<f64>>()?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after: f64 = pids
        .iter()
        .map(|p| cpu_seconds(p))
        .sum::<anyhow::Result<f64>>()?;
    Ok((after - before) / secs)
}

struct Side {
    mgr: KvManager,
    kv: Vec<Registered<HostBuffer>>,
    aux: Vec<Registered<HostBuffer>>,
}

fn side(w: &Workload, pages: u64, prefill_at: Option<&str>) -> anyhow::Result<Side> {
    let agent = Agent::new(&nixl_testkit::unique_name("bench"), &AgentConfig::default())?;
    agent.create_backend(BackendKind::Ucx, &BackendParams::new())?;
    let mut kv = Vec::new();
    for _ in 0..2 * w.layers {
        kv.push(agent.register(HostBuffer::new((pages * w.page_bytes) as usize)?)?);
    }
    let mut aux = Vec::new();
    for item in AUX {
        aux.push(agent.register(HostBuffer::new((w.aux_slots * item) as usize)?)?);
    }
    let args = KvArgs::new(
        kv.iter().map(|b| (b.region(), w.page_bytes)),
        aux.iter().zip(AUX).map(|(b, item)| (b.region(), item)),
    )?;
    let config = ManagerConfig::default()
        .profile(Profile::Sglang0523)
        .sglang_pages(16, "bfloat16");
    let mgr = match prefill_at {
        Some(bootstrap) => KvManager::prefill(agent, args, bootstrap, config)?,
        None => KvManager::decode(agent, args, config)?,
    };
    Ok(Side { mgr, kv, aux })
}

/// Our prefill with the harness's bytes in every page and each request's aux rows.
fn prefill(w: &Workload, bootstrap: &str) -> anyhow::Result<Side> {
    let mut p = side(w, w.prefill_pages, Some(bootstrap))?;
    for (b, buf) in p.kv.iter_mut().enumerate() {
        let page = w.page_bytes as usize;
        for (q, bytes) in buf.buffer_mut().as_mut_slice().chunks_mut(page).enumerate() {
            for (j, byte) in bytes.iter_mut().enumerate() {
                *byte = Workload::kv_byte(b, q as u32, j);
            }
        }
    }
    Ok(p)
}

fn wait(mut poll: impl FnMut() -> KvPoll, until: impl Fn(KvPoll) -> bool) -> KvPoll {
    let deadline = Instant::now() + T;
    loop {
        let s = poll();
        if until(s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(NAP);
    }
}

/// Our prefill serving the harness's requests one after the other.
fn serve(w: &Workload, p: &mut Side) -> anyhow::Result<()> {
    for i in 0..w.requests {
        let room = w.room(i);
        let slot = (i % w.aux_slots) as usize;
        for (k, aux) in p.aux.iter_mut().enumerate() {
            let item = AUX[k] as usize;
            let row = &mut aux.buffer_mut().as_mut_slice()[slot * item..(slot + 1) * item];
            for (j, byte) in row.iter_mut().enumerate() {
                *byte = Workload::aux_byte(room, k, j);
            }
        }
        let mut tx = KvSender::new(&p.mgr, RoomId::new(room))?;
        let s = wait(|| tx.poll(), |s| s != KvPoll::Bootstrapping);
        if s != KvPoll::WaitingForInput {
            bail!("prefill room {i}: {s:?} {:?}", tx.failure());
        }
        tx.init(w.pages(), slot as u32);
        for c in w.src_pages(i).chunks(w.pages_per_chunk as usize) {
            tx.send(c);
        }
        let s = wait(
            || tx.poll(),
            |s| matches!(s, KvPoll::Success | KvPoll::Failed),
        );
        if s != KvPoll::Success {
            bail!("prefill room {i}: {s:?} {:?}", tx.failure());
        }
    }
    Ok(())
}

/// Our decode running the harness's requests; returns the times to Success, every byte
/// checked.
fn receive(w: &Workload, d: &Side, bootstrap: &str) -> anyhow::Result<Vec<f64>> {
    let mut tts = Vec::new();
    let dst: Vec<u32> = (0..w.pages())
        .map(|n| (n * 5 + 3) % w.decode_pages as u32)
        .collect();
    let slot = (w.aux_slots - 1) as u32;
    for i in 0..w.requests {
        let mut rx = KvReceiver::new(&d.mgr, bootstrap, RoomId::new(w.room(i)), None)?;
        let t0 = Instant::now();
        rx.init(&dst, slot);
        let s = wait(
            || rx.poll(),
            |s| matches!(s, KvPoll::Success | KvPoll::Failed),
        );
        tts.push(t0.elapsed().as_secs_f64() * 1e3);
        if s != KvPoll::Success {
            bail!("decode room {i}: {s:?} {:?}", rx.failure());
        }
        let page = w.page_bytes as usize;
        for (b, buf) in d.kv.iter().enumerate() {
            for (sp, dp) in w.src_pages(i).iter().zip(&dst) {
                let got = &buf.buffer().as_slice()[*dp as usize * page..(*dp as usize + 1) * page];
                if got
                    .iter()
                    .enumerate()
                    .any(|(j, v)| *v != Workload::kv_byte(b, *sp, j))
                {
                    bail!("decode room {i}: buffer {b} page {dp} differs");
                }
            }
        }
    }
    Ok(tts)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One combination's times to Success (ms) and the idle CPU of its processes.
struct Run {
    tts: Vec<f64>,
    idle: f64,
}

/// SGLang's prefill with its bootstrap server, ready, and that server's address.
fn sglang_prefill(python: &Path, w: &Workload) -> anyhow::Result<(SglangPeer, String)> {
    let mut prefill = SglangPeer::start(python, "prefill", w, PREFILL_WINDOW)?;
    let ready = prefill.next("ready")?;
    let addr = ready["bootstrap"]
        .as_str()
        .context("no bootstrap")?
        .to_owned();
    Ok((prefill, addr))
}

fn sglang_to_sglang(python: &Path, w: &Workload, idle_s: f64) -> anyhow::Result<Run> {
    let (mut prefill, addr) = sglang_prefill(python, w)?;
    let mut decode = SglangPeer::start(python, "decode", w, &["--bootstrap", &addr])?;
    let (results, done) = decode.results("decode")?;
    if done["pass"] != true {
        bail!("SGLang's decode: {done}");
    }
    prefill.results("prefill")?;
    let tts = results
        .iter()
        .filter_map(|r| r["tts_ms"].as_f64())
        .collect();
    let idle = idle_cpu(&[prefill.pid().to_string()], idle_s)?;
    Ok(Run { tts, idle })
}

fn ours_to_sglang(python: &Path, w: &Workload, idle_s: f64) -> anyhow::Result<Run> {
    let bs = BootstrapServer::start("127.0.0.1:0")?;
    let addr = bs.addr().to_string();
    let mut p = prefill(w, &addr)?;
    let mut decode = SglangPeer::start(python, "decode", w, &["--bootstrap", &addr])?;
    decode.next("ready")?;
    serve(w, &mut p)?;
    let (results, done) = decode.results("decode")?;
    if done["pass"] != true {
        bail!("SGLang's decode: {done}");
    }
    let tts = results
        .iter()
        .filter_map(|r| r["tts_ms"].as_f64())
        .collect();
    drop(decode);
    let me = std::process::id().to_string();
    Ok(Run {
        tts,
        idle: idle_cpu(&[me], idle_s)?,
    })
}

fn sglang_to_ours(python: &Path, w: &Workload, idle_s: f64) -> anyhow::Result<Run> {
    let (mut prefill, addr) = sglang_prefill(python, w)?;
    let d = side(w, w.decode_pages, None)?;
    let tts = receive(w, &d, &addr)?;
    prefill.results("prefill")?;
    let pids = [std::process::id().to_string(), prefill.pid().to_string()];
    Ok(Run {
        tts,
        idle: idle_cpu(&pids, idle_s)?,
    })
}

fn ours_to_ours(w: &Workload, idle_s: f64) -> anyhow::Result<Run> {
    let bs = BootstrapServer::start("127.0.0.1:0")?;
    let addr = bs.addr().to_string();
    let mut p = prefill(w, &addr)?;
    let d = side(w, w.decode_pages, None)?;
    let tts = std::thread::scope(|s| {
        let server = s.spawn(|| serve(w, &mut p));
        let tts = receive(w, &d, &addr);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("prefill thread panicked"))??;
        tts
    })?;
    let me = std::process::id().to_string();
    Ok(Run {
        tts,
        idle: idle_cpu(&[me], idle_s)?,
    })
}

const COMBOS: [&str; 4] = [
    "SGLang 0.5.23 → SGLang 0.5.23",
    "ours → SGLang 0.5.23",
    "SGLang 0.5.23 → ours",
    "ours → ours",
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let python = PathBuf::from(
        std::env::var_os("SGLANG_PYTHON")
            .context("SGLANG_PYTHON must name SGLang 0.5.23's python")?,
    );
    let w = workload(args.requests);
    // Per combination: every sample, each round's p50, the largest idle CPU seen.
    let mut all: Vec<(Vec<f64>, Vec<f64>, f64)> = vec![(Vec::new(), Vec::new(), 0.0); 4];
    let bar = indicatif::ProgressBar::new(u64::from(args.rounds) * 4);
    for round in 0..args.rounds {
        for (k, name) in COMBOS.iter().enumerate() {
            bar.set_message(format!("round {}: {name}", round + 1));
            let run = match k {
                0 => sglang_to_sglang(&python, &w, args.idle_seconds)?,
                1 => ours_to_sglang(&python, &w, args.idle_seconds)?,
                2 => sglang_to_ours(&python, &w, args.idle_seconds)?,
                _ => ours_to_ours(&w, args.idle_seconds)?,
            };
            let mut tts = run.tts;
            all[k].1.push(percentile(&mut tts, 0.5));
            all[k].0.extend(tts);
            all[k].2 = all[k].2.max(run.idle);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let base = percentile(&mut all[0].0, 0.5);
    println!(
        "\n{} rounds × {} requests × {} pages × {} buffers × {} B, one request at a time, \
         127.0.0.1, host memory\n",
        args.rounds,
        w.requests,
        w.pages(),
        2 * w.layers,
        w.page_bytes
    );
    println!(
        "| prefill → decode | TTS p50 (ms) | p50 per round (ms) | TTS p99 (ms) | SGLang p50 / this p50 | idle CPU (cores)¹ |"
    );
    println!("|---|---|---|---|---|---|");
    for (k, name) in COMBOS.iter().enumerate() {
        let (samples, rounds, idle) = &mut all[k];
        let p50 = percentile(samples, 0.5);
        let per_round: Vec<String> = rounds.iter().map(|v| format!("{v:.3}")).collect();
        println!(
            "| {name} | {p50:.3} | {} | {:.3} | {:.2}× | {idle:.3} |",
            per_round.join(", "),
            percentile(samples, 0.99),
            base / p50
        );
    }
    println!(
        "\n¹ The most seen over {} s after a run: SGLang's prefill (its decode has exited), this \
         process (ours), or both (the mixes).",
        args.idle_seconds
    );
    Ok(())
}
