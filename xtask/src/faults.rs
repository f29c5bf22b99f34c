//! `cargo xtask faults`: multi-host faults, simulated (issue 15, item 3).
//!
//! A prefill and a decode (`nixl-pd`) run in two network namespaces joined by a veth pair, UCX
//! over TCP on the veth (`UCX_TLS=tcp`, `UCX_NET_DEVICES`), bootstrap HTTP and ZMQ on the veth
//! addresses 10.77.0.1 (prefill) and 10.77.0.2 (decode), which exist only inside those
//! namespaces. Scenarios: a clean run; delay and loss; the link black-holed mid-transfer and
//! healed; the link taken down and up; the prefill killed at a random point and restarted; the
//! decode killed at random points. Every request must end in Success with every byte verified
//! (the decode checks) or Failed with a reason; failures must come within [`bound`] of the fault
//! and of each other while it lasts; no write may land in a decode page or aux row that no live
//! request owned (each decode's sentinel check, `stray_pages` and `stray_aux_rows` in its JSON
//! summary, must be on and find nothing); every child has a deadline and is killed and reaped.
//!
//! Delay and loss use `tc netem` where the kernel has it. Kernels without `sch_netem` get loss
//! from iptables' `statistic` match and delay from a small NFQUEUE program (Python standard
//! library only) that holds each packet crossing the veth for the delay; the RTT is measured
//! before the scenario runs, so a delay that is not in force fails the step.
//!
//! Needs root (namespaces, iptables). Without it the step fails when `CI=true` and is skipped
//! with the reason otherwise. The namespaces are deleted by a guard, on failure too, and
//! leftovers of the same names are deleted first.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::{cmd, demo, prereq, runtime};

mod net;

use net::{Net, ip};

const NS_P: &str = "nxf-p";
const NS_D: &str = "nxf-d";
const VETH_P: &str = "nxf-vp";
const VETH_D: &str = "nxf-vd";
const IP_P: &str = "10.77.0.1";
const IP_D: &str = "10.77.0.2";
const PORT: u16 = 18998;

/// Timeouts given to both sides through SGLang's variables (read by `ManagerConfig::default`).
const HEARTBEAT_S: u64 = 2;
const HEARTBEAT_FAILURES: u64 = 1;
const WAITING_S: u64 = 8;
const ORPHAN_S: u64 = 8;
/// nixl-kv's bootstrap HTTP timeout (`ManagerConfig::http_timeout`, not settable by env).
const HTTP_S: u64 = 5;

/// Bootstrap lookups one `KvReceiver::new` may block on (nixl-kv's `MAX_LOOKUPS`).
const LOOKUPS: u64 = 4;

/// The longest a request may wait for its outcome once a fault starts, and the longest gap
/// between two outcomes while it lasts: the larger of detection (the waiting timeout, or one
/// heartbeat round: interval × failures plus the HTTP timeout of the last check) and one new
/// receiver's blocking bootstrap lookups (`nixl-pd decode` polls nothing meanwhile), plus 4 s.
fn bound() -> Duration {
    let detect = WAITING_S.max(HEARTBEAT_S * HEARTBEAT_FAILURES + HTTP_S);
    Duration::from_secs(detect.max(LOOKUPS * HTTP_S) + 4)
}

#[derive(clap::Args, Debug)]
pub(crate) struct FaultsArgs {
    /// Seed for the random fault points (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Run only the scenarios whose names contain this.
    #[arg(long)]
    only: Option<String>,
    /// How long the black hole lasts, in seconds.
    #[arg(long, default_value_t = 12)]
    cut_seconds: u64,
}

impl FaultsArgs {
    pub(crate) fn ci() -> Self {
        Self {
            seed: None,
            only: None,
            cut_seconds: 12,
        }
    }
}

pub(crate) fn run(root: &Path, args: &FaultsArgs) -> anyhow::Result<()> {
    if !is_root() {
        let why = "network namespaces need root";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("faults: {why}, and CI=true: run CI as root");
        }
        println!("faults: SKIPPED: {why} (CI would fail here)");
        return Ok(());
    }
    prereq::ensure_net_tools()?;
    prereq::ensure_libclang()?;
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    let pd = demo::build_pd(root)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "faults: seed {seed} (rerun: cargo xtask faults --seed {seed}); failure bound {:.0} s",
        bound().as_secs_f64()
    );
    let logs = root.join("target/faults");
    std::fs::create_dir_all(&logs)?;
    let net = Net::create()?;
    let netem = net.has_netem();
    println!(
        "faults: delay and loss by {}",
        if netem {
            "tc netem"
        } else {
            "iptables statistic + an NFQUEUE delay (this kernel has no sch_netem)"
        }
    );
    let mut h = Harness {
        pd,
        logs,
        rng: Rng(seed | 1),
        net,
        netem,
        report: Vec::new(),
        cut: Duration::from_secs(args.cut_seconds),
        sentinel: Cell::default(),
    };
    let scenarios: [(&str, Scenario); 6] = [
        ("clean", Harness::clean),
        ("delay-loss", Harness::delay_loss),
        ("blackhole", Harness::blackhole),
        ("link-down", Harness::link_down),
        ("kill-prefill", Harness::kill_prefill),
        ("kill-decode", Harness::kill_decode),
    ];
    let start = Instant::now();
    for (name, f) in scenarios {
        if args.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        println!("\n--- faults: {name}");
        let t = Instant::now();
        h.net.heal()?;
        let res = f(&mut h).with_context(|| format!("scenario {name} (seed {seed})"));
        match res {
            Ok(summary) => {
                let line = format!("{name}: {summary} ({:.1} s)", t.elapsed().as_secs_f64());
                println!("faults: {line}");
                h.report.push(line);
            }
            Err(e) => {
                println!("faults: logs in {}", h.logs.display());
                return Err(e);
            }
        }
    }
    println!(
        "\nfaults: every scenario passed in {:.0} s:",
        start.elapsed().as_secs_f64()
    );
    for l in &h.report {
        println!("  {l}");
    }
    let s = h.sentinel.get();
    println!(
        "  sentinel: {} decodes that ran to their end checked {} free pages and {} free aux slots: {} stray pages, {} stray aux rows",
        s.decodes, s.checked_pages, s.checked_rows, s.stray_pages, s.stray_rows
    );
    Ok(())
}

fn is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// xorshift64: reproducible fault points from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Milliseconds in `lo..hi`.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// One scenario: its one-line outcome.
type Scenario = fn(&mut Harness) -> anyhow::Result<String>;

/// A child in a namespace with a deadline; killed (SIGKILL) and reaped on drop.
struct Proc {
    name: String,
    child: Child,
    started: Instant,
    deadline: Duration,
    /// Stderr lines with their arrival time.
    err: Lines,
    /// Stdout lines.
    out: Lines,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(
        name: &str,
        ns: &str,
        env: &[(&str, String)],
        program: &Path,
        args: &[&str],
        deadline: Duration,
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().with_context(|| format!("starting {name}"))?;
        let log = logs.join(format!("{name}.log"));
        let err = Lines::default();
        let out = Lines::default();
        let file = Arc::new(Mutex::new(std::fs::File::create(&log)?));
        let pipes: [(Box<dyn Read + Send>, &Lines, &str); 2] = [
            (
                Box::new(child.stderr.take().context("no stderr")?),
                &err,
                "err",
            ),
            (
                Box::new(child.stdout.take().context("no stdout")?),
                &out,
                "out",
            ),
        ];
        for (pipe, lines, tag) in pipes {
            let (lines, file, tag) = (Arc::clone(lines), Arc::clone(&file), tag.to_owned());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut f) = file.lock() {
                        use std::io::Write as _;
                        let _ = writeln!(f, "[{tag}] {line}");
                    }
                    if let Ok(mut l) = lines.lock() {
                        l.push((Instant::now(), line));
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            started: Instant::now(),
            deadline,
            err,
            out,
            status: None,
        })
    }

    fn err_lines(&self) -> Vec<(Instant, String)> {
        self.err.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn out_lines(&self) -> Vec<String> {
        self.out
            .lock()
            .map(|l| l.iter().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_none()
    }

    /// Waits for a stderr or stdout line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str, within: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let seen = |l: &Lines| {
                l.lock()
                    .is_ok_and(|l| l.iter().any(|(_, s)| s.starts_with(prefix)))
            };
            if seen(&self.err) || seen(&self.out) {
                return Ok(());
            }
            if !self.alive() {
                bail!("{} exited ({:?}) before `{prefix}`", self.name, self.status);
            }
            if t.elapsed() > within {
                self.kill();
                bail!("{} printed no `{prefix}` within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit; past the deadline the child is killed and that is an error (a hang).
    fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        loop {
            if !self.alive() {
                // Let the readers drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return self.status.context("no status");
            }
            if self.started.elapsed() > self.deadline {
                self.kill();
                bail!(
                    "{} hung: still running after its deadline of {:?}; killed",
                    self.name,
                    self.deadline
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a finished decode reported.
#[derive(Debug, Default)]
struct Outcome {
    requests: usize,
    failed: usize,
    /// `room R failed: reason`, with arrival times.
    failures: Vec<(Instant, String)>,
    /// `room R: ... differs` (verification) lines.
    corrupt: Vec<String>,
    exited: Option<Instant>,
    /// The decode's stray-write check.
    sentinel: Sentinel,
}

/// A decode's stray-write check, from its JSON summary; summed over decodes in [`Harness`].
#[derive(Debug, Default, Clone, Copy)]
struct Sentinel {
    decodes: u64,
    checked_pages: u64,
    checked_rows: u64,
    stray_pages: u64,
    stray_rows: u64,
}

impl Sentinel {
    /// From `nixl-pd decode --json`'s last line; the check must have been on.
    fn parse(json: &serde_json::Value) -> anyhow::Result<Self> {
        ensure!(
            json["sentinel"] == serde_json::Value::Bool(true),
            "the decode's sentinel check was off: {json}"
        );
        let n = |k: &str| json[k].as_u64().with_context(|| format!("summary: no {k}"));
        Ok(Self {
            decodes: 1,
            checked_pages: n("sentinel_checked_pages")?,
            checked_rows: n("sentinel_checked_rows")?,
            stray_pages: n("stray_pages")?,
            stray_rows: n("stray_aux_rows")?,
        })
    }

    fn add(self, o: Self) -> Self {
        Self {
            decodes: self.decodes + o.decodes,
            checked_pages: self.checked_pages + o.checked_pages,
            checked_rows: self.checked_rows + o.checked_rows,
            stray_pages: self.stray_pages + o.stray_pages,
            stray_rows: self.stray_rows + o.stray_rows,
        }
    }
}

impl std::fmt::Display for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stray pages, {} stray aux rows in {} free-page checks",
            self.stray_pages, self.stray_rows, self.checked_pages
        )
    }
}

impl Outcome {
    fn succeeded(&self) -> usize {
        self.requests - self.failed
    }

    /// Checks every request is accounted for: Success, or Failed with a reason; no bad byte.
    fn check(&self, name: &str) -> anyhow::Result<()> {
        ensure!(
            self.corrupt.is_empty(),
            "{name}: bytes wrong in a request that reported Success: {:?}",
            self.corrupt
        );
        ensure!(
            self.failures.len() == self.failed,
            "{name}: {} requests failed but {} failures were reported with a reason",
            self.failed,
            self.failures.len()
        );
        Ok(())
    }

    /// Failure reasons, counted (room ids removed).
    fn reasons(&self) -> String {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for (_, l) in &self.failures {
            let r = l.split_once(" failed: ").map_or(l.as_str(), |x| x.1);
            // Room numbers and agent names vary; keep the reason's shape.
            let r: String = r
                .split(' ')
                .map(|w| {
                    if w.chars().any(|c| c.is_ascii_digit()) && w.len() > 8 {
                        "#"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            *m.entry(r).or_default() += 1;
        }
        m.iter()
            .map(|(r, n)| format!("{n}× \"{r}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// While a fault lasts (`from..until`), the first failure comes within the bound of its
    /// start and each next one within the bound of the previous: no request waits longer.
    fn check_bound(&self, name: &str, from: Instant, until: Instant) -> anyhow::Result<Duration> {
        let mut last = from;
        let mut worst = Duration::ZERO;
        let mut times: Vec<Instant> = self
            .failures
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t >= from)
            .collect();
        times.extend(self.exited);
        times.sort();
        for t in times {
            if last >= until {
                break;
            }
            // Successes are not printed: past the fault's end only its end is known.
            let gap = t.min(until) - last;
            worst = worst.max(gap);
            ensure!(
                gap <= bound(),
                "{name}: no outcome for {:.1} s during the fault (bound {:.0} s)",
                gap.as_secs_f64(),
                bound().as_secs_f64()
            );
            last = t;
        }
        if last < until {
            let gap = until - last;
            ensure!(
                gap <= bound(),
                "{name}: no outcome for {:.1} s before the fault ended (bound {:.0} s)",
                gap.as_secs_f64(),
                bound().as_secs_f64()
            );
            worst = worst.max(gap);
        }
        Ok(worst)
    }
}

/// How many requests a decode runs.
#[derive(Clone, Copy)]
enum Run {
    Requests(usize),
    /// As many as it can start in this long from `decode: ready` (those in flight then
    /// finish): a fault at a random point of a run must find it still running, however fast
    /// the machine is.
    For(Duration),
}

/// How much later than on a quiet machine a decode may reach its first success on a loaded one
/// and still see the whole fault: its run is this much longer.
const SLACK: Duration = Duration::from_secs(10);

/// The latest random fault point after a decode's first success, in milliseconds.
const FAULT_BY_MS: u64 = 1200;

/// The pool both sides use: 2 layers (4 KV buffers) of 64 pages of 8 KiB, small aux rows.
/// Small on purpose: over TCP at 40 ms RTT a transfer costs about one round trip per
/// descriptor (docs/runtime.md §13).
const POOL: [&str; 10] = [
    "--layers",
    "2",
    "--page-bytes",
    "8192",
    "--pages",
    "64",
    "--aux-slots",
    "16",
    "--hidden-size",
    "64",
];

struct Harness {
    pd: PathBuf,
    logs: PathBuf,
    rng: Rng,
    net: Net,
    netem: bool,
    report: Vec<String>,
    cut: Duration,
    /// Every finished decode's stray-write check, summed.
    sentinel: Cell<Sentinel>,
}

fn env(dev: &str) -> Vec<(&'static str, String)> {
    vec![
        ("UCX_TLS", "tcp".into()),
        ("UCX_NET_DEVICES", dev.into()),
        (
            "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL",
            HEARTBEAT_S.to_string(),
        ),
        (
            "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
            HEARTBEAT_FAILURES.to_string(),
        ),
        (
            "SGLANG_DISAGGREGATION_WAITING_TIMEOUT",
            WAITING_S.to_string(),
        ),
        (
            "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
            ORPHAN_S.to_string(),
        ),
        ("RUST_LOG", "error".into()),
    ]
}

impl Harness {
    fn prefill(&self, name: &str) -> anyhow::Result<Proc> {
        let mut args = vec![
            "prefill",
            "--host",
            IP_P,
            "--bootstrap-port",
            "18998",
            "--chunk-pages",
            "2",
        ];
        args.extend(POOL);
        let mut p = Proc::spawn(
            name,
            NS_P,
            &env(VETH_P),
            &self.pd,
            &args,
            Duration::from_secs(300),
            &self.logs,
        )?;
        p.wait_line("prefill: bootstrap on", Duration::from_secs(30))?;
        Ok(p)
    }

    /// A decode of `run` requests, 4 at a time.
    fn decode(&self, name: &str, run: Run) -> anyhow::Result<Proc> {
        let bootstrap = format!("{IP_P}:{PORT}");
        let (r, secs) = match run {
            Run::Requests(n) => (n.to_string(), None),
            Run::For(d) => (
                "1000000".to_owned(),
                Some(format!("{:.1}", d.as_secs_f64())),
            ),
        };
        let mut args = vec![
            "decode",
            "--bootstrap",
            &bootstrap,
            "--requests",
            &r,
            "--pages-per-request",
            "4",
            "--concurrency",
            "4",
            "--json",
        ];
        if let Some(s) = &secs {
            args.extend(["--seconds", s]);
        }
        args.extend(POOL);
        Proc::spawn(
            name,
            NS_D,
            &env(VETH_D),
            &self.pd,
            &args,
            Duration::from_secs(120),
            &self.logs,
        )
    }

    /// Waits for a decode and reads its outcome.
    fn finish(&self, d: &mut Proc) -> anyhow::Result<Outcome> {
        let status = d.wait()?;
        let exited = Instant::now();
        let out = d.out_lines();
        let summary = out
            .iter()
            .find(|l| l.contains(" requests x "))
            .with_context(|| format!("{}: no summary line ({status})", d.name))?;
        let requests = summary
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .context("summary: request count")?;
        let failed = summary
            .split(", ")
            .find_map(|p| p.strip_suffix(" failed"))
            .and_then(|w| w.trim().parse().ok())
            .context("summary: failure count")?;
        let json: serde_json::Value = out
            .iter()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("{}: no JSON summary ({status})", d.name))
            .and_then(|l| Ok(serde_json::from_str(l)?))?;
        let sentinel = Sentinel::parse(&json).with_context(|| d.name.clone())?;
        self.sentinel.set(self.sentinel.get().add(sentinel));
        let mut o = Outcome {
            requests,
            failed,
            exited: Some(exited),
            sentinel,
            ..Outcome::default()
        };
        let mut strays = Vec::new();
        for (t, l) in d.err_lines() {
            if l.starts_with("stray write: ") {
                strays.push(l);
                continue;
            }
            if !l.starts_with("room ") {
                continue;
            }
            if l.contains(" failed: ") {
                o.failures.push((t, l));
            } else {
                o.corrupt.push(l);
            }
        }
        ensure!(
            sentinel.stray_pages == 0 && sentinel.stray_rows == 0,
            "{}: a write landed where no live request owned the memory: {sentinel}: {strays:?}",
            d.name
        );
        ensure!(
            status.success() == (failed == 0),
            "{}: exit status {status} with {failed} failures",
            d.name
        );
        Ok(o)
    }

    /// The prefill must still be up and must never have panicked.
    fn check_prefill(p: &mut Proc) -> anyhow::Result<()> {
        ensure!(p.alive(), "the prefill died ({:?})", p.status);
        if let Some((_, l)) = p.err_lines().iter().find(|(_, l)| l.contains("panicked")) {
            bail!("the prefill panicked: {l}");
        }
        Ok(())
    }

    /// A fresh decode against `p` after a fault: every request must succeed.
    fn recovered(&self, p: &mut Proc, name: &str) -> anyhow::Result<usize> {
        Self::check_prefill(p)?;
        let mut d = self.decode(name, Run::Requests(20))?;
        let o = self.finish(&mut d)?;
        o.check(name)?;
        ensure!(
            o.failed == 0,
            "{name}: after the fault healed, {} of {} requests failed: {}",
            o.failed,
            o.requests,
            o.reasons()
        );
        Self::check_prefill(p)?;
        Ok(o.requests)
    }

    fn clean(&mut self) -> anyhow::Result<String> {
        let mut p = self.prefill("clean-prefill")?;
        let before = veth_tx_bytes()?;
        let mut d = self.decode("clean-decode", Run::Requests(40))?;
        let o = self.finish(&mut d)?;
        o.check("clean")?;
        ensure!(o.failed == 0, "clean: failures: {}", o.reasons());
        // 40 requests × 4 pages × 4 buffers × 8 KiB went over the veth, not shared memory.
        let moved = veth_tx_bytes()? - before;
        ensure!(
            moved >= 40 * 4 * 4 * 8192,
            "clean: only {moved} bytes left the prefill's veth: UCX did not use TCP on it"
        );
        Self::check_prefill(&mut p)?;
        Ok(format!(
            "{} Success of {}, every byte verified, {} KiB over the veth; {}",
            o.succeeded(),
            o.requests,
            moved / 1024,
            o.sentinel
        ))
    }

    fn delay_loss(&mut self) -> anyhow::Result<String> {
        let mut p = self.prefill("delay-prefill")?;
        let loss = 1 + (self.rng.next() % 5) as u32;
        self.net.impair(self.netem, &self.logs, 20, loss)?;
        let rtt = measure_rtt()?;
        ensure!(
            rtt >= Duration::from_millis(38),
            "delay-loss: RTT {rtt:?} with 20 ms each way: the delay is not in force"
        );
        let t = Instant::now();
        let mut d = self.decode("delay-decode", Run::Requests(16))?;
        let o = self.finish(&mut d)?;
        o.check("delay-loss")?;
        Self::check_prefill(&mut p)?;
        let secs = t.elapsed().as_secs_f64();
        self.net.heal()?;
        let n = self.recovered(&mut p, "delay-recovered")?;
        Ok(format!(
            "20 ms each way (RTT {:.0} ms), {loss}% loss each way: {} Success, {} Failed [{}] of {} in {secs:.1} s, {}; then {n} of {n} Success",
            rtt.as_secs_f64() * 1e3,
            o.succeeded(),
            o.failed,
            o.reasons(),
            o.requests,
            o.sentinel
        ))
    }

    /// A link fault during a run: cut at a random point, held `hold`, healed; the decode goes on.
    fn cut(&mut self, name: &str, down: bool, hold: Duration) -> anyhow::Result<String> {
        let mut p = self.prefill(&format!("{name}-prefill"))?;
        // On until 4 s after the heal: the same decode also sees the link come back.
        let run = Duration::from_millis(FAULT_BY_MS) + hold + Duration::from_secs(4) + SLACK;
        let mut d = self.decode(&format!("{name}-decode"), Run::For(run))?;
        // Its UCX context must exist before the link goes: a decode starting on a downed veth
        // cannot create one at all (a harness race on a loaded machine, not a fault to test).
        // The fault is timed from its first success, so that something succeeded before it
        // however slowly a loaded machine starts.
        d.wait_line("decode: first success", Duration::from_secs(60))?;
        let at = self.rng.ms(200, FAULT_BY_MS);
        std::thread::sleep(at);
        ensure!(d.alive(), "{name}: the decode ended before the fault");
        let cut = Instant::now();
        if down {
            ip(&["-n", NS_D, "link", "set", VETH_D, "down"])?;
        } else {
            self.net.blackhole()?;
        }
        std::thread::sleep(hold);
        self.net.heal()?;
        let healed = Instant::now();
        let o = self.finish(&mut d)?;
        o.check(name)?;
        let worst = o.check_bound(name, cut, healed)?;
        let during = o
            .failures
            .iter()
            .filter(|(t, _)| *t >= cut && *t <= healed + bound())
            .count();
        ensure!(
            during > 0,
            "{name}: no request failed while the link was cut"
        );
        ensure!(
            o.succeeded() > 0 && o.failed < o.requests,
            "{name}: no request succeeded"
        );
        let n = self.recovered(&mut p, &format!("{name}-recovered"))?;
        Ok(format!(
            "cut at {:.2} s for {:.0} s: {} Success (verified), {} Failed [{}] of {}, {}; longest wait for an outcome during the cut {:.1} s (bound {:.0} s); then {n} of {n} Success",
            at.as_secs_f64(),
            hold.as_secs_f64(),
            o.succeeded(),
            o.failed,
            o.reasons(),
            o.requests,
            o.sentinel,
            worst.as_secs_f64(),
            bound().as_secs_f64()
        ))
    }

    fn blackhole(&mut self) -> anyhow::Result<String> {
        self.cut("blackhole", false, self.cut)
    }

    fn link_down(&mut self) -> anyhow::Result<String> {
        self.cut("link-down", true, Duration::from_secs(6))
    }

    fn kill_prefill(&mut self) -> anyhow::Result<String> {
        let mut p = self.prefill("killp-prefill")?;
        // Down at most 3 s; on for 8 s more, through the restart and the re-bootstrap.
        let run = Duration::from_millis(FAULT_BY_MS + 3000 + 8000) + SLACK;
        let mut d = self.decode("killp-decode", Run::For(run))?;
        d.wait_line("decode: first success", Duration::from_secs(60))?;
        let at = self.rng.ms(200, FAULT_BY_MS);
        std::thread::sleep(at);
        ensure!(d.alive(), "kill-prefill: the decode ended before the kill");
        let killed = Instant::now();
        p.kill();
        let down = self.rng.ms(500, 3000);
        std::thread::sleep(down);
        // Restarted on the same port: the decode must re-bootstrap (issue 15, D8).
        let mut p2 = self.prefill("killp-prefill2")?;
        let back = Instant::now();
        let o = self.finish(&mut d)?;
        o.check("kill-prefill")?;
        let worst = o.check_bound("kill-prefill", killed, back)?;
        ensure!(
            o.succeeded() > 0,
            "kill-prefill: nothing succeeded after the restart"
        );
        let n = self.recovered(&mut p2, "killp-recovered")?;
        Ok(format!(
            "SIGKILL at {:.2} s, restarted {:.1} s later: {} Success (verified), {} Failed [{}] of {}, {}; longest wait for an outcome while down {:.1} s; then {n} of {n} Success",
            at.as_secs_f64(),
            down.as_secs_f64(),
            o.succeeded(),
            o.failed,
            o.reasons(),
            o.requests,
            o.sentinel,
            worst.as_secs_f64()
        ))
    }

    fn kill_decode(&mut self) -> anyhow::Result<String> {
        let mut p = self.prefill("killd-prefill")?;
        let mut points = Vec::new();
        for i in 0..4 {
            let run = Run::For(Duration::from_secs(10));
            let mut d = self.decode(&format!("killd-decode{i}"), run)?;
            let at = self.rng.ms(100, 1500);
            std::thread::sleep(at);
            d.kill();
            points.push(format!("{:.2}", at.as_secs_f64()));
            Self::check_prefill(&mut p)?;
        }
        let n = self.recovered(&mut p, "killd-recovered")?;
        Ok(format!(
            "4 decodes SIGKILLed at {} s: the prefill survived; then a fresh decode {n} of {n} Success",
            points.join(", ")
        ))
    }
}

/// Bytes sent so far on the prefill's veth.
fn veth_tx_bytes() -> anyhow::Result<u64> {
    let out = cmd::output(Command::new("ip").args([
        "netns",
        "exec",
        NS_P,
        "cat",
        &format!("/sys/class/net/{VETH_P}/statistics/tx_bytes"),
    ]))?;
    Ok(out.trim().parse()?)
}

/// TCP connect time from the decode's namespace to a closed port of the prefill's (one round
/// trip: SYN, RST), the best of five.
fn measure_rtt() -> anyhow::Result<Duration> {
    let script = format!(
        "import socket,time\nb=9\nfor _ in range(5):\n  t=time.monotonic()\n  try: socket.create_connection(('{IP_P}',9),timeout=3).close()\n  except OSError: pass\n  b=min(b,time.monotonic()-t)\nprint(b)"
    );
    let out =
        cmd::output(Command::new("ip").args(["netns", "exec", NS_D, "python3", "-c", &script]))?;
    Ok(Duration::from_secs_f64(out.trim().parse()?))
}
