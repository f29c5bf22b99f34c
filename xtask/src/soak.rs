//! `cargo xtask soak --minutes N`: a bounded soak of one `nixl-pd` prefill (with its bootstrap
//! server) against several decode processes on 127.0.0.1, with random aborts on both sides
//! (`--abort-one-in`), decodes killed with SIGKILL and restarted, and hostile senders mixed in:
//! raw TCP garbage to the prefill's ZMQ port, spoofed registrations and TransferInfos over a
//! hand-written ZMTP PUSH, junk and hostile HTTP to the bootstrap server. Everything stays on
//! 127.0.0.1 and is bounded in count and rate.
//!
//! It samples the prefill every second (`VmRSS` from `/proc/PID/status`, entries of
//! `/proc/PID/fd`, and the manager's tables from its `prefill stats:` line) and, at the end,
//! checks that they are flat: the end window (the last fifth of the run, still under load) is
//! compared with the window right after warm-up (the second fifth). "Flat" means the end
//! window's maximum is at most the warm-up window's maximum plus a tolerance: RSS +10 % or
//! +16 MiB, whichever is larger; fds +16; rooms +64; active senders +8. Rooms are counted less
//! every spoofed room sent within one orphan lifetime (`rooms*`): spoofed infos make orphans
//! that expire only on the prefill's 5 s orphan timeout, at a rate that follows the machine's
//! speed, so the raw count is printed but not judged. Decode agents (peers) are bounded rather
//! than flat: the prefill forgets an idle decode agent only after 600 s, so each killed decode
//! is counted until then; the check is peers <= decodes started. After the load stops and a
//! quiet period, the prefill must hold no rooms and no active senders, still answer `/health`,
//! and every verified request of every decode that exited must have succeeded with correct
//! bytes or failed with a reason (no wrong byte, no failure without a reason). Every decode that
//! ran to its end must also have had its sentinel check on and found no stray write
//! (`stray_pages` and `stray_aux_rows` 0 in its JSON summary): no byte landed in a page or aux
//! row that no live request of it owned, spoofed infos and aborts included.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{demo, prereq, runtime};

#[derive(clap::Args, Debug)]
pub(crate) struct SoakArgs {
    /// How long the load runs, in minutes (fractions allowed).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) minutes: f64,
    /// Decode processes at once.
    #[arg(long, default_value_t = 3)]
    pub(crate) decodes: usize,
    /// Seed of the soak's own choices (kill times, hostile bytes); default: from the clock.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
}

impl SoakArgs {
    /// CI's run: half a minute of load (about 45 s in all).
    pub(crate) fn ci() -> Self {
        Self {
            minutes: 0.5,
            decodes: 3,
            seed: None,
        }
    }
}

/// Orphan rooms (spoofed infos nobody claims) expire this fast on the soak's prefill.
const ORPHAN_TIMEOUT_S: u64 = 5;
/// Hostile actions per second, each kind, at most.
const HOSTILE_PER_S: u64 = 10;

/// A small xorshift generator: the soak's choices need no quality, only reproducibility.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One sample of the prefill.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    at_s: f64,
    rss_kb: u64,
    fds: u64,
    rooms: u64,
    peers: u64,
    active: u64,
    /// Spoofed rooms sent so far (cumulative, not a window maximum).
    spoofed: u64,
}

/// The prefill's latest `prefill stats:` values.
#[derive(Debug, Default)]
struct Stats {
    rooms: u64,
    peers: u64,
    active: u64,
    served: u64,
    failed: u64,
    aborted: u64,
    seen: bool,
}

fn parse_stats(line: &str, into: &mut Stats) {
    let Some(rest) = line.strip_prefix("prefill stats: ") else {
        return;
    };
    for kv in rest.split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let Ok(v) = v.parse::<u64>() else { continue };
        match k {
            "rooms" => into.rooms = v,
            "peers" => into.peers = v,
            "active" => into.active = v,
            "served" => into.served = v,
            "failed" => into.failed = v,
            "aborted" => into.aborted = v,
            _ => {}
        }
    }
    into.seen = true;
}

fn proc_rss_fds(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// What the decodes that exited reported.
#[derive(Debug, Default)]
struct Totals {
    runs: u64,
    ok: u64,
    failed: u64,
    no_reason: u64,
    corrupt: u64,
    aborted: u64,
    bad_exits: u64,
    killed: u64,
    started: u64,
    /// Free-page checks of the decodes' sentinel, and what they found.
    checked_pages: u64,
    stray_pages: u64,
    stray_rows: u64,
    /// Decode runs whose summary says the sentinel check was off.
    sentinel_off: u64,
}

struct Decode {
    child: Child,
    reader: Option<std::thread::JoinHandle<Option<serde_json::Value>>>,
    /// The last lines the decode wrote on stderr (printed when it exits badly).
    tail: Arc<Mutex<std::collections::VecDeque<String>>>,
}

/// Lines of a decode's stderr kept for the report of a bad exit.
const TAIL_LINES: usize = 12;

pub(crate) fn run(root: &Path, args: &SoakArgs) -> anyhow::Result<()> {
    prereq::ensure_libclang()?;
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    let pd = demo::build_pd(root)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    let load = Duration::from_secs_f64((args.minutes * 60.0).max(10.0));
    let decodes = args.decodes.max(1);
    println!(
        "soak: {:.0} s of load, {decodes} decodes, seed {seed} (rerun: cargo xtask soak --minutes {} --seed {seed})",
        load.as_secs_f64(),
        args.minutes
    );
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let bootstrap = format!("127.0.0.1:{port}");
    let pool = [
        "--layers",
        "2",
        "--page-bytes",
        "4096",
        "--hidden-size",
        "64",
    ];
    let mut prefill = Command::new(&pd)
        .args(["prefill", "--bootstrap-port", &port.to_string()])
        .args(pool)
        .args(["--pages", "512", "--chunk-pages", "4", "--stats-every", "1"])
        .args(["--abort-one-in", "25"])
        .env(
            "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
            ORPHAN_TIMEOUT_S.to_string(),
        )
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nixl-pd prefill")?;
    let pid = prefill.id();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u16>();
    {
        let stderr = prefill.stderr.take().context("no stderr")?;
        let stats = Arc::clone(&stats);
        std::thread::spawn(move || {
            let mut log_lines = 0u64;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("prefill: bootstrap on ") {
                    let zmq = rest
                        .split("zmq port ")
                        .nth(1)
                        .and_then(|r| r.split(',').next())
                        .and_then(|p| p.trim().parse().ok());
                    if let Some(p) = zmq {
                        let _ = ready_tx.send(p);
                    }
                }
                if line.starts_with("prefill stats: ") {
                    parse_stats(&line, &mut stats.lock().unwrap_or_else(|p| p.into_inner()));
                } else if log_lines < 40 {
                    // The first lines of anything else (warnings included), then quiet.
                    log_lines += 1;
                    eprintln!("[prefill] {line}");
                }
            }
        });
    }
    let Ok(zmq_port) = ready_rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = prefill.kill();
        bail!("the prefill did not come up within 60 s");
    };
    println!("soak: prefill pid {pid}, bootstrap {bootstrap}, zmq port {zmq_port}");
    let result = soak(
        &pd,
        &mut prefill,
        &bootstrap,
        zmq_port,
        &stats,
        load,
        decodes,
        seed,
        &pool,
    );
    let _ = prefill.kill();
    let _ = prefill.wait();
    result
}

#[allow(clippy::too_many_arguments)]
fn soak(
    pd: &Path,
    prefill: &mut Child,
    bootstrap: &str,
    zmq_port: u16,
    stats: &Arc<Mutex<Stats>>,
    load: Duration,
    decodes: usize,
    seed: u64,
    pool: &[&str],
) -> anyhow::Result<()> {
    let pid = prefill.id();
    let t0 = Instant::now();
    let end = t0 + load;
    let mut rng = Rng(seed);
    let stop = Arc::new(AtomicBool::new(false));
    let hostile_count = Arc::new(AtomicU64::new(0));
    let spoofed_rooms = Arc::new(AtomicU64::new(0));
    let mut hostile = Vec::new();
    for kind in 0..3u64 {
        let stop = Arc::clone(&stop);
        let count = Arc::clone(&hostile_count);
        let spoofed = Arc::clone(&spoofed_rooms);
        let bootstrap = bootstrap.to_owned();
        let mut rng = Rng(seed ^ (kind + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        hostile.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match kind {
                    0 => zmq_garbage(zmq_port, &mut rng),
                    1 => zmq_spoof(zmq_port, &mut rng, &spoofed),
                    _ => http_junk(&bootstrap, &mut rng),
                }
                count.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1000 / HOSTILE_PER_S));
            }
        }));
    }
    let totals = Arc::new(Mutex::new(Totals::default()));
    // Decode stderr lines that report wrong bytes or a failure without a reason.
    let bad_lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let spawn = |remaining: Duration, totals: &Mutex<Totals>| -> anyhow::Result<Decode> {
        let mut child = Command::new(pd)
            .args(["decode", "--bootstrap", bootstrap])
            .args(pool)
            .args([
                "--pages",
                "2048",
                "--prefill-pages",
                "512",
                "--aux-slots",
                "512",
            ])
            .args(["--requests", "1000000", "--pages-per-request", "8"])
            .args(["--concurrency", "4", "--json", "--allow-failures"])
            .args(["--abort-one-in", "25"])
            .arg("--seconds")
            .arg(format!("{:.1}", remaining.as_secs_f64()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nixl-pd decode")?;
        let tail: Arc<Mutex<std::collections::VecDeque<String>>> = Arc::default();
        if let Some(stderr) = child.stderr.take() {
            let bad = Arc::clone(&bad_lines);
            let tail = Arc::clone(&tail);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    {
                        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line.clone());
                    }
                    if line.contains("differs")
                        || line.contains("no reason given")
                        || line.starts_with("stray write: ")
                    {
                        let mut b = bad.lock().unwrap_or_else(|p| p.into_inner());
                        if b.len() < 20 {
                            b.push(line);
                        }
                    }
                }
            });
        }
        let stdout = child.stdout.take().context("no stdout")?;
        let reader = std::thread::spawn(move || {
            let mut last = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with('{') {
                    last = serde_json::from_str(&line).ok();
                }
            }
            last
        });
        totals.lock().unwrap_or_else(|p| p.into_inner()).started += 1;
        Ok(Decode {
            child,
            reader: Some(reader),
            tail,
        })
    };
    let mut running: Vec<Option<Decode>> = Vec::new();
    for _ in 0..decodes {
        running.push(Some(spawn(load, &totals)?));
    }
    // One kill about every 10 s of load, none in the last 15 s (so that the end window sees
    // the restarted decode settle).
    let kill_every = Duration::from_secs(10);
    let mut next_kill = t0 + kill_every;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = t0;
    while Instant::now() < end {
        if let Some(status) = prefill.try_wait()? {
            stop.store(true, Ordering::Relaxed);
            bail!("the prefill exited during the soak: {status}");
        }
        let now = Instant::now();
        if now >= next_sample {
            if let Some((rss_kb, fds)) = proc_rss_fds(pid) {
                let s = stats.lock().unwrap_or_else(|p| p.into_inner());
                samples.push(Sample {
                    at_s: now.duration_since(t0).as_secs_f64(),
                    rss_kb,
                    fds,
                    rooms: s.rooms,
                    peers: s.peers,
                    active: s.active,
                    spoofed: spoofed_rooms.load(Ordering::Relaxed),
                });
            }
            next_sample = now + Duration::from_secs(1);
        }
        if now >= next_kill && end.saturating_duration_since(now) > Duration::from_secs(15) {
            let i = rng.below(running.len() as u64) as usize;
            if let Some(mut d) = running[i].take() {
                let _ = d.child.kill(); // SIGKILL
                let _ = d.child.wait();
                if let Some(r) = d.reader.take() {
                    let _ = r.join();
                }
                totals.lock().unwrap_or_else(|p| p.into_inner()).killed += 1;
            }
            running[i] = Some(spawn(end.saturating_duration_since(now), &totals)?);
            next_kill = now + kill_every + Duration::from_millis(rng.below(5000));
        }
        for slot in &mut running {
            let exited = match slot.as_mut() {
                Some(d) => d.child.try_wait()?.is_some(),
                None => false,
            };
            if exited && let Some(d) = slot.take() {
                collect(d, &totals);
                let left = end.saturating_duration_since(Instant::now());
                if left > Duration::from_secs(5) {
                    *slot = Some(spawn(left, &totals)?);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for h in hostile {
        let _ = h.join();
    }
    // The decodes stop starting requests at the end of the load; wait for them to finish.
    let deadline = Instant::now() + Duration::from_secs(60);
    for mut d in running.into_iter().flatten() {
        while d.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if d.child.try_wait()?.is_none() {
            let _ = d.child.kill();
            totals.lock().unwrap_or_else(|p| p.into_inner()).bad_exits += 1;
            println!("soak: a decode was still running 60 s after the load ended; killed");
            print_tail(&d);
        }
        collect(d, &totals);
    }
    // Quiet: orphans expire, then the tables must be empty.
    std::thread::sleep(Duration::from_secs(ORPHAN_TIMEOUT_S + 3));
    let quiet = proc_rss_fds(pid);
    let health = http_health(bootstrap);
    let s = stats.lock().unwrap_or_else(|p| p.into_inner());
    let t = totals.lock().unwrap_or_else(|p| p.into_inner());
    for line in bad_lines.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("soak: decode said: {line}");
    }
    report(
        &samples,
        &s,
        &t,
        quiet,
        health,
        hostile_count.load(Ordering::Relaxed),
    )
}

fn collect(mut d: Decode, totals: &Mutex<Totals>) {
    let status = d.child.wait().ok();
    let json = d.reader.take().and_then(|r| r.join().ok()).flatten();
    let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
    t.runs += 1;
    if !status.is_some_and(|s| s.success()) {
        t.bad_exits += 1;
        println!("soak: a decode exited with {status:?}");
        print_tail(&d);
    }
    if let Some(j) = json {
        let n = |k: &str| j[k].as_u64().unwrap_or(0);
        t.ok += n("ok");
        t.failed += n("failed");
        t.no_reason += n("no_reason");
        t.corrupt += n("corrupt");
        t.aborted += n("aborted");
        t.checked_pages += n("sentinel_checked_pages");
        t.stray_pages += n("stray_pages");
        t.stray_rows += n("stray_aux_rows");
        if j["sentinel"] != serde_json::Value::Bool(true) {
            t.sentinel_off += 1;
        }
    } else {
        t.bad_exits += 1;
        println!("soak: a decode printed no JSON summary");
        print_tail(&d);
    }
}

/// The last lines a decode wrote on stderr.
fn print_tail(d: &Decode) {
    for line in d.tail.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("soak:   decode stderr: {line}");
    }
}

/// How long a spoofed room can live on the prefill: the orphan timeout, plus the inbound
/// thread's 1 s sweep tick, plus a second of queueing and sampling.
const ORPHAN_LIFETIME_S: f64 = ORPHAN_TIMEOUT_S as f64 + 2.0;

/// Rooms of a sample less every spoofed room that may still be alive then (those sent within
/// one orphan lifetime): a lower bound of the rooms that real decodes hold. Spoofed rooms alone
/// come at up to about 80 a second and live up to [`ORPHAN_LIFETIME_S`], so the raw count swings
/// by hundreds with the machine's speed; this one does not, and a leak still makes it grow.
fn rooms_less_orphans(samples: &[Sample]) -> Vec<Sample> {
    samples
        .iter()
        .map(|s| {
            let before = samples
                .iter()
                .rev()
                .find(|o| o.at_s <= s.at_s - ORPHAN_LIFETIME_S)
                .map_or(0, |o| o.spoofed);
            Sample {
                rooms: s.rooms.saturating_sub(s.spoofed.saturating_sub(before)),
                ..*s
            }
        })
        .collect()
}

fn window(samples: &[Sample], from: f64, to: f64) -> Sample {
    let mut m = Sample::default();
    for s in samples.iter().filter(|s| s.at_s >= from && s.at_s < to) {
        m.rss_kb = m.rss_kb.max(s.rss_kb);
        m.fds = m.fds.max(s.fds);
        m.rooms = m.rooms.max(s.rooms);
        m.peers = m.peers.max(s.peers);
        m.active = m.active.max(s.active);
    }
    m
}

fn report(
    samples: &[Sample],
    s: &Stats,
    t: &Totals,
    quiet: Option<(u64, u64)>,
    health: bool,
    hostile: u64,
) -> anyhow::Result<()> {
    let last = samples.last().map_or(0.0, |s| s.at_s);
    let fifth = last / 5.0;
    let warm = window(samples, fifth, 2.0 * fifth);
    let endw = window(samples, 4.0 * fifth, last + 1.0);
    let mut problems = Vec::new();
    let mut check = |name: &str, warm: u64, end: u64, slack: u64| {
        let ok = end <= warm + slack;
        println!(
            "soak: {name:<8} warm-up max {warm:>8}  end max {end:>8}  allowed {:>8}  {}",
            warm + slack,
            if ok { "flat" } else { "GROWS" }
        );
        if !ok {
            problems.push(format!("{name} grows: {warm} -> {end}"));
        }
    };
    check(
        "rss_kb",
        warm.rss_kb,
        endw.rss_kb,
        (warm.rss_kb / 10).max(16 << 10),
    );
    check("fds", warm.fds, endw.fds, 16);
    let real = rooms_less_orphans(samples);
    let real_warm = window(&real, fifth, 2.0 * fifth);
    let real_end = window(&real, 4.0 * fifth, last + 1.0);
    println!(
        "soak: rooms    warm-up max {:>8}  end max {:>8}  (with spoofed orphans; {} spoofed rooms sent)",
        warm.rooms,
        endw.rooms,
        samples.last().map_or(0, |s| s.spoofed)
    );
    check("rooms*", real_warm.rooms, real_end.rooms, 64);
    check("active", warm.active, endw.active, 8);
    println!(
        "soak: peers    max {} over the run (bounded by the {} decodes started; idle agents are forgotten after 600 s)",
        window(samples, 0.0, last + 1.0).peers,
        t.started
    );
    if endw.peers > t.started {
        problems.push(format!(
            "peers {} exceed the {} decodes started",
            endw.peers, t.started
        ));
    }
    println!(
        "soak: prefill served {} rooms, {} failed, {} aborted; {hostile} hostile actions",
        s.served, s.failed, s.aborted
    );
    println!(
        "soak: decodes: {} started, {} SIGKILLed, {} ran to the end; their requests: {} ok (bytes verified), {} failed with a reason, {} aborted, {} failed without a reason, {} with wrong bytes; {} bad exits",
        t.started, t.killed, t.runs, t.ok, t.failed, t.aborted, t.no_reason, t.corrupt, t.bad_exits
    );
    println!(
        "soak: decode sentinel: {} stray pages, {} stray aux rows in {} free-page checks{}",
        t.stray_pages,
        t.stray_rows,
        t.checked_pages,
        if t.sentinel_off > 0 {
            format!("; OFF in {} runs", t.sentinel_off)
        } else {
            String::new()
        }
    );
    if t.stray_pages + t.stray_rows > 0 {
        problems.push(format!(
            "{} stray pages and {} stray aux rows: a write landed where no live request owned the memory",
            t.stray_pages, t.stray_rows
        ));
    }
    if t.sentinel_off > 0 || (t.runs > 0 && t.checked_pages == 0) {
        problems.push("a decode ran without its sentinel check".into());
    }
    match quiet {
        Some((rss, fds)) => println!(
            "soak: quiet: rss_kb {rss}, fds {fds}, rooms {}, active {}, /health {}",
            s.rooms,
            s.active,
            if health { "200" } else { "DOWN" }
        ),
        None => problems.push("the prefill is gone at the end".into()),
    }
    if !s.seen {
        problems.push("no stats line from the prefill".into());
    }
    if s.rooms != 0 || s.active != 0 {
        problems.push(format!(
            "after the quiet period the prefill holds {} rooms, {} active senders",
            s.rooms, s.active
        ));
    }
    if !health {
        problems.push("/health does not answer 200".into());
    }
    if t.corrupt > 0 || t.no_reason > 0 {
        problems.push(format!(
            "{} requests with wrong bytes, {} failed without a reason",
            t.corrupt, t.no_reason
        ));
    }
    if t.ok == 0 {
        problems.push("no request succeeded".into());
    }
    if t.bad_exits > 0 {
        problems.push(format!("{} decode runs exited badly", t.bad_exits));
    }
    if problems.is_empty() {
        println!("soak: passed");
        Ok(())
    } else {
        bail!("soak failed: {}", problems.join("; "))
    }
}

/// A ZMTP 3.0 NULL greeting.
fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// A PUSH socket's `READY` command.
#[allow(clippy::big_endian_bytes, reason = "ZMTP lengths are big-endian")]
fn ready_push() -> Vec<u8> {
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&4u32.to_be_bytes());
    body.extend_from_slice(b"PUSH");
    let mut f = vec![0x04, body.len() as u8];
    f.extend_from_slice(&body);
    f
}

/// A multipart message's frames.
#[allow(clippy::big_endian_bytes, reason = "ZMTP lengths are big-endian")]
fn message(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let more = u8::from(i + 1 < frames.len());
        if f.len() > 255 {
            out.push(more | 0x02);
            out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        } else {
            out.push(more);
            out.push(f.len() as u8);
        }
        out.extend_from_slice(f);
    }
    out
}

fn connect(port: u16) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    Some(s)
}

/// Raw garbage at the ZMQ port: random bytes, a greeting then garbage, or a 2^62-byte header.
#[allow(clippy::big_endian_bytes, reason = "ZMTP lengths are big-endian")]
fn zmq_garbage(port: u16, rng: &mut Rng) {
    let Some(mut s) = connect(port) else { return };
    let n = rng.below(4096) as usize;
    let bytes = match rng.below(3) {
        0 => rng.bytes(n),
        1 => {
            let mut b = greeting().to_vec();
            b.extend(ready_push());
            b.extend(rng.bytes(n));
            b
        }
        _ => {
            let mut b = greeting().to_vec();
            b.extend(ready_push());
            b.push(0x02);
            b.extend_from_slice(&(1u64 << 62).to_be_bytes());
            b
        }
    };
    let _ = s.write_all(&bytes);
    if rng.below(4) == 0 {
        // Hold it open a little, unread bytes and all.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Spoofed TransferInfos (random rooms, made-up or guessed agent names, huge indices) and
/// registrations with garbage metadata, over a well-formed ZMTP PUSH connection.
fn zmq_spoof(port: u16, rng: &mut Rng, spoofed: &AtomicU64) {
    let Some(mut s) = connect(port) else { return };
    let mut out = greeting().to_vec();
    out.extend(ready_push());
    for _ in 0..1 + rng.below(8) {
        let agent = match rng.below(3) {
            0 => format!("pd-decode-{}", rng.below(100_000)),
            1 => "pd-decode-00000000-0000-4000-8000-000000000000".to_owned(),
            _ => format!("spoof-{:x}", rng.next()),
        };
        let room = (rng.next() >> 1).to_string();
        if rng.below(4) == 0 {
            out.extend(message(&[
                b"NixlMsgGuard".to_vec(),
                b"None".to_vec(),
                b"127.0.0.1".to_vec(),
                b"1".to_vec(),
                agent.into_bytes(),
                {
                    let n = rng.below(512) as usize;
                    rng.bytes(n)
                },
                rng.bytes(16),
                rng.bytes(8),
                b"0".to_vec(),
            ]));
            continue;
        }
        let pages: Vec<u8> = (0..1 + rng.below(16))
            .flat_map(|_| {
                let p = if rng.below(4) == 0 {
                    i32::MAX
                } else {
                    rng.below(512) as i32
                };
                p.to_le_bytes()
            })
            .collect();
        let aux = if rng.below(4) == 0 {
            i32::MAX.to_string()
        } else {
            rng.below(64).to_string()
        };
        out.extend(message(&[
            b"NixlMsgGuard".to_vec(),
            room.into_bytes(),
            b"127.0.0.1".to_vec(),
            b"1".to_vec(),
            agent.into_bytes(),
            pages,
            aux.into_bytes(),
            (1 + rng.below(2)).to_string().into_bytes(),
        ]));
        spoofed.fetch_add(1, Ordering::Relaxed);
    }
    let _ = s.write_all(&out);
    let mut sink = [0u8; 256];
    let _ = s.read(&mut sink);
}

/// Junk and hostile HTTP: random bytes, a takeover `PUT /route`, bad queries, a stalled body,
/// an oversized header.
fn http_junk(addr: &str, rng: &mut Rng) {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) else {
        return;
    };
    let Some(mut s) = connect(port) else { return };
    let take_over = r#"{"role": "Prefill", "tp_size": 1, "dp_size": 1, "rank_ip": "127.0.0.1", "rank_port": 9, "engine_rank": 0}"#;
    let req = match rng.below(6) {
        0 => {
            let n = rng.below(2048) as usize;
            rng.bytes(n)
        }
        1 => format!(
            "PUT /route HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{take_over}",
            take_over.len()
        )
        .into_bytes(),
        2 => format!(
            "GET /route?engine_rank={}&target_dp_group=x{} HTTP/1.1\r\nHost: x\r\n\r\n",
            rng.next(),
            rng.below(9)
        )
        .into_bytes(),
        3 => b"PUT /route HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{".to_vec(),
        4 => {
            let mut b = b"GET /health HTTP/1.1\r\nX: ".to_vec();
            b.extend(std::iter::repeat_n(b'a', 20 << 10));
            b.extend_from_slice(b"\r\n\r\n");
            b
        }
        _ => {
            b"PUT /route HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n"
                .to_vec()
        }
    };
    let _ = s.write_all(&req);
    let mut sink = [0u8; 512];
    let _ = s.read(&mut sink);
}

fn http_health(addr: &str) -> bool {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) else {
        return false;
    };
    let Some(mut s) = connect(port) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}
