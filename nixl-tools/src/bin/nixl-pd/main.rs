//! `nixl-pd`: a prefill and a decode moving KV pages over NIXL with SGLang's protocol.
//!
//! ```text
//! nixl-pd prefill --bootstrap-port P --layers L [--mla] --page-bytes B --pages N [--aux-slots S]
//!                 [--hidden-size H] [--aux-layout sglang|legacy] [--chunk-pages K]
//!                 [--stats-every SECS] [--abort-one-in K]
//! nixl-pd decode  --bootstrap HOST:P --layers L [--mla] --page-bytes B --pages N
//!                 [--prefill-pages NP] [--hidden-size H] [--aux-layout sglang|legacy]
//!                 --requests R --pages-per-request M [--concurrency C] [--seed X]
//!                 [--aux-verify all|first] [--json] [--no-verify] [--seconds S]
//!                 [--abort-one-in K] [--allow-failures]
//! nixl-pd doctor  [--device cpu|gpu:N] [--peer-device cpu|gpu:N]
//! ```
//!
//! Byte j of page p of KV buffer b on the prefill is `(7·b + 13·p + j) mod 251` (buffers in
//! SGLang's order: K of layers 0..L−1, then V). For room R the prefill sends source pages
//! `(R + 97·i) mod N`; aux buffer k's row for the room holds `(R + 17·k + j) mod 256`.
//!
//! The aux (metadata) buffers are SGLang 0.5.1's `MetadataBuffers`, six per slot: output ids
//! (16 × int32), logprob values (16 × f32), logprob indices (16 × int32), top-logprob values
//! (128 × f32), top-logprob indices (128 × int32) and hidden states (`--hidden-size` × bf16).
//! Both sides must agree on the layout: a prefill lowers aux copies with its own row lengths.
//!
//! Agent names carry a random UUID (version 4) and rooms are random 63-bit ids, both from the
//! OS's entropy, as SGLang's: a peer on the network can guess neither. `--seed` makes a decode's
//! rooms and pages reproducible instead (and guessable; two decodes with one seed collide).
//!
//! The prefill's loop sleeps: it polls its active senders every [`POLL_ACTIVE`], looks for new
//! rooms every [`SCAN_BUSY`] while any are active, and when idle backs off to a scan every
//! [`SCAN_IDLE`]; a scan (which walks every room the manager holds) is never more than about 2 %
//! of the time, however many orphan rooms there are.
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs,
    reason = "command-line program"
)]

mod doctor;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Registered};
use nixl_kv::bootstrap::BootstrapServer;
use nixl_kv::{
    FailureReason, KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId,
};
use rand::{Rng, RngCore, SeedableRng};

/// Sleep between polls of a prefill's active senders.
const POLL_ACTIVE: Duration = Duration::from_micros(100);
/// A busy prefill's interval between looks for new rooms.
const SCAN_BUSY: Duration = Duration::from_millis(1);
/// The longest interval between looks for new rooms, reached by doubling while idle.
const SCAN_IDLE: Duration = Duration::from_millis(16);
/// A scan for new rooms takes at most 1/this of the time.
const SCAN_COST_RATIO: u32 = 50;

/// Which aux buffers each slot has.
#[derive(Clone, Copy, ValueEnum)]
enum AuxLayout {
    /// SGLang 0.5.1's `MetadataBuffers`: six buffers of 64, 64, 64, 512, 512 and
    /// 2 × hidden-size bytes per slot.
    Sglang,
    /// Three buffers of 64, 64 and 512 bytes per slot (what earlier versions of this program
    /// registered).
    Legacy,
}

/// Row lengths of SGLang 0.5.1's `MetadataBuffers` (`disaggregation/utils.py`), hidden states
/// last: 16 int32 output ids (padded to 64 B, the smallest RDMA write SGLang allows), 16 f32
/// logprob values, 16 int32 logprob indices, 128 f32 top-logprob values, 128 int32 top-logprob
/// indices.
const SGLANG_AUX_ITEMS: [u64; 5] = [16 * 4, 16 * 4, 16 * 4, 128 * 4, 128 * 4];

#[derive(Parser)]
#[command(
    name = "nixl-pd",
    about = "SGLang-compatible prefill/decode KV transfer over NIXL"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

impl Pool {
    /// The row length of each aux buffer.
    fn aux_items(&self) -> Vec<u64> {
        match self.aux_layout {
            AuxLayout::Sglang => {
                let mut v = SGLANG_AUX_ITEMS.to_vec();
                // bf16 hidden states.
                v.push(2 * self.hidden_size);
                v
            }
            AuxLayout::Legacy => vec![64, 64, 512],
        }
    }
}

#[derive(clap::Args, Clone)]
struct Pool {
    /// Model layers.
    #[arg(long)]
    layers: u32,
    /// MLA: one latent buffer per layer instead of K and V.
    #[arg(long)]
    mla: bool,
    /// Bytes of one page of one buffer.
    #[arg(long)]
    page_bytes: u64,
    /// Pages in each buffer of this side's pool.
    #[arg(long)]
    pages: u32,
    /// Aux rows.
    #[arg(long, default_value_t = 64)]
    aux_slots: u32,
    /// The model's hidden size: the sixth aux buffer holds this many bf16 values per slot.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    hidden_size: u64,
    /// Aux buffers per slot; must match the peer's.
    #[arg(long, value_enum, default_value_t = AuxLayout::Sglang)]
    aux_layout: AuxLayout,
    /// Draw the decode's rooms and pages from this seed, for reproducible runs (rooms then are
    /// guessable, and two decodes with one seed collide). Default: unguessable, from the OS.
    #[arg(long)]
    seed: Option<u64>,
    /// Where the KV pool lives: `cpu` (host memory) or `gpu:N` (GPU N; aux stays in host
    /// memory, as in SGLang).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuxVerify {
    /// Every aux buffer of the slot.
    All,
    /// Only the first (output ids): all that SGLang 0.5.1's prefill writes.
    First,
}

#[derive(Subcommand)]
enum Role {
    /// Serve rooms until killed.
    Prefill {
        #[command(flatten)]
        pool: Pool,
        /// Port of the bootstrap HTTP server this process starts.
        #[arg(long, default_value_t = 8998)]
        bootstrap_port: u16,
        /// Address to bind the bootstrap server and ZMQ socket on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Pages per chunk (default: the whole request in one chunk).
        #[arg(long)]
        chunk_pages: Option<usize>,
        /// Print a `prefill stats:` line on stderr every this many seconds: the manager's
        /// tables, active senders, rooms served/failed/aborted, RSS and open descriptors.
        #[arg(long)]
        stats_every: Option<f64>,
        /// Test knob: abort about one room in K (at a random chunk), as a scheduler would.
        #[arg(long)]
        abort_one_in: Option<u32>,
    },
    /// Run requests against a prefill and verify every byte.
    Decode {
        #[command(flatten)]
        pool: Pool,
        /// The prefill's bootstrap server, host:port.
        #[arg(long)]
        bootstrap: String,
        /// The prefill's pool size (default: ours), needed to verify.
        #[arg(long)]
        prefill_pages: Option<u32>,
        #[arg(long)]
        requests: usize,
        #[arg(long)]
        pages_per_request: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, value_enum, default_value_t = AuxVerify::All)]
        aux_verify: AuxVerify,
        /// End stdout with one JSON object.
        #[arg(long)]
        json: bool,
        /// Skip byte verification (benchmarks only; the summary says so).
        #[arg(long)]
        no_verify: bool,
        /// Stop starting requests after this many seconds (then finish those in flight).
        #[arg(long)]
        seconds: Option<f64>,
        /// Test knob: abort about one request in K at a random moment after it starts (its
        /// pages and aux slot are then not reused for 30 s, as a late write could still land).
        #[arg(long)]
        abort_one_in: Option<u32>,
        /// Exit 0 even if requests failed with a reason (never for wrong bytes or a failure
        /// without a reason).
        #[arg(long)]
        allow_failures: bool,
    },
    /// Print where the NIXL runtime was found, the UCX and NIXL settings in force, and whether
    /// UCX would emulate the KV transfers for these memory types; fail if there is no runtime.
    Doctor(doctor::DoctorArgs),
}

fn main() -> anyhow::Result<()> {
    nixl_tools::init_logging();
    let role = Cli::parse().role;
    if let Role::Doctor(args) = &role {
        return doctor::run(args);
    }
    match nixl_tools::runtime::load() {
        Ok(loaded) => {
            if let nixl_tools::runtime::Source::PipWheel(dir) = &loaded.source {
                eprintln!("using the pip-installed NIXL runtime in {}", dir.display());
            }
        }
        Err(e) => {
            eprintln!("nixl-pd: {e}");
            std::process::exit(2);
        }
    }
    match role {
        Role::Prefill {
            pool,
            bootstrap_port,
            host,
            chunk_pages,
            stats_every,
            abort_one_in,
        } => prefill(
            &pool,
            bootstrap_port,
            &host,
            &PrefillOpts {
                chunk: chunk_pages,
                stats_every: stats_every
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64),
                abort_one_in: abort_one_in.filter(|&k| k > 0),
            },
        ),
        Role::Decode {
            pool,
            bootstrap,
            prefill_pages,
            requests,
            pages_per_request,
            concurrency,
            aux_verify,
            json,
            no_verify,
            seconds,
            abort_one_in,
            allow_failures,
        } => {
            let np = prefill_pages.unwrap_or(pool.pages);
            let verify = if no_verify { None } else { Some(aux_verify) };
            decode(
                &pool,
                &bootstrap,
                &DecodeOpts {
                    prefill_pages: np,
                    requests,
                    per_request: pages_per_request,
                    concurrency: concurrency.max(1),
                    aux_verify: verify,
                    json,
                    seconds: seconds
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64),
                    abort_one_in: abort_one_in.filter(|&k| k > 0),
                    allow_failures,
                },
            )
        }
        Role::Doctor(_) => Ok(()),
    }
}

enum Kv {
    Host(Vec<Registered<HostBuffer>>),
    Gpu(Vec<Registered<nixl_core::cuda::DeviceBuffer>>),
}

impl Kv {
    fn len(&self) -> usize {
        match self {
            Self::Host(v) => v.len(),
            Self::Gpu(v) => v.len(),
        }
    }

    fn regions(&self) -> Vec<nixl_core::MemRegion> {
        match self {
            Self::Host(v) => v.iter().map(|b| b.region()).collect(),
            Self::Gpu(v) => v.iter().map(|b| b.region()).collect(),
        }
    }

    /// Fills buffer `b` page by page with `page_fill(page, bytes)`.
    fn fill(
        &mut self,
        b: usize,
        page: usize,
        page_fill: impl Fn(u64, &mut [u8]),
    ) -> anyhow::Result<()> {
        match self {
            Self::Host(v) => {
                for (p, chunk) in v[b]
                    .buffer_mut()
                    .as_mut_slice()
                    .chunks_mut(page)
                    .enumerate()
                {
                    page_fill(p as u64, chunk);
                }
            }
            Self::Gpu(v) => {
                let mut host = vec![0u8; v[b].buffer().len()];
                for (p, chunk) in host.chunks_mut(page).enumerate() {
                    page_fill(p as u64, chunk);
                }
                v[b].buffer_mut().write_at(0, &host)?;
            }
        }
        Ok(())
    }

    /// Page `p` of buffer `b` as host bytes.
    fn read_page(&self, b: usize, p: usize, page: usize, out: &mut Vec<u8>) -> anyhow::Result<()> {
        out.resize(page, 0);
        match self {
            Self::Host(v) => {
                out.copy_from_slice(&v[b].buffer().as_slice()[p * page..(p + 1) * page])
            }
            Self::Gpu(v) => v[b].buffer().read_at(p * page, out)?,
        }
        Ok(())
    }
}

struct Memory {
    agent: Agent,
    kv: Kv,
    aux: Vec<Registered<HostBuffer>>,
    /// Row length of each aux buffer.
    aux_items: Vec<u64>,
}

/// A random (version 4) UUID, from the OS's entropy through rand's thread generator (a CSPRNG
/// seeded from the OS), as SGLang names its agents with `uuid.uuid4()`.
fn uuid4() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn memory(pool: &Pool, role: &str) -> anyhow::Result<Memory> {
    let agent = Agent::new(&format!("pd-{role}-{}", uuid4()), &AgentConfig::default())?;
    // A prefill writing GPU pages posts every descriptor through UCX cuda_ipc: NIXL's thread
    // pool with SGL batching is the fastest NIXL-only setting measured on an H200
    // (UcxTuning::GPU_FAST, docs/runtime.md §6). The target of a WRITE is passive, and host
    // pools gain nothing from it, so everything else keeps NIXL's defaults.
    let params = match (role, pool.device.starts_with("gpu:")) {
        ("prefill", true) => {
            let t = nixl_core::UcxTuning::GPU_FAST;
            BackendParams::new()
                .ucx_num_threads(t.num_threads)
                .ucx_split_batch_size(t.split_batch_size)
                .ucx_sgl(t.sgl)
        }
        _ => BackendParams::new(),
    };
    agent.create_backend(BackendKind::Ucx, &params)?;
    let buffers = if pool.mla {
        pool.layers
    } else {
        2 * pool.layers
    };
    let len = usize::try_from(u64::from(pool.pages) * pool.page_bytes)?;
    let kv = match pool.device.strip_prefix("gpu:") {
        Some(n) => {
            let ordinal: u32 = n.parse().context("--device gpu:N")?;
            let bufs = (0..buffers)
                .map(|_| Ok(agent.register(nixl_core::cuda::DeviceBuffer::new(ordinal, len)?)?))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Kv::Gpu(bufs)
        }
        None if pool.device == "cpu" => Kv::Host(
            (0..buffers)
                .map(|_| Ok(agent.register(HostBuffer::new(len)?)?))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => bail!("--device is cpu or gpu:N, not {}", pool.device),
    };
    let aux_items = pool.aux_items();
    let aux = aux_items
        .iter()
        .map(|&i| {
            Ok(agent.register(HostBuffer::new(usize::try_from(
                i * u64::from(pool.aux_slots),
            )?)?)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Memory {
        agent,
        kv,
        aux,
        aux_items,
    })
}

fn args(m: &Memory, pool: &Pool) -> anyhow::Result<KvArgs> {
    let kv = m.kv.regions().into_iter().map(|r| (r, pool.page_bytes));
    let aux = m
        .aux
        .iter()
        .map(|b| b.region())
        .zip(m.aux_items.iter().copied());
    Ok(KvArgs::new(kv, aux)?.mla(pool.mla))
}

/// A failure reason for the log.
fn reason(r: Option<FailureReason>) -> String {
    r.map_or_else(|| "no reason given".to_owned(), |r| r.to_string())
}

fn kv_byte(b: usize, page: u64, j: usize) -> u8 {
    ((7 * b as u64 + 13 * page + j as u64) % 251) as u8
}

fn aux_byte(room: u64, k: usize, j: usize) -> u8 {
    (room.wrapping_add(17 * k as u64).wrapping_add(j as u64) % 256) as u8
}

struct PrefillOpts {
    chunk: Option<usize>,
    stats_every: Option<Duration>,
    abort_one_in: Option<u32>,
}

/// A room being sent: its sender, source pages, pages sent so far, and the page count at
/// which the abort knob aborts it.
struct Active {
    tx: KvSender,
    src: Vec<u32>,
    sent: usize,
    abort_at: Option<usize>,
}

/// What a prefill has done, for its stats line.
#[derive(Default)]
struct Counts {
    served: u64,
    failed: u64,
    aborted: u64,
}

/// This process's resident set (kB, from `/proc/self/status`) and open descriptors.
fn rss_and_fds() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (rss, fds)
}

fn prefill(pool: &Pool, port: u16, host: &str, opts: &PrefillOpts) -> anyhow::Result<()> {
    let mut m = memory(pool, "prefill")?;
    let page = pool.page_bytes as usize;
    for b in 0..m.kv.len() {
        m.kv.fill(b, page, |p, bytes| {
            for (j, byte) in bytes.iter_mut().enumerate() {
                *byte = kv_byte(b, p, j);
            }
        })?;
    }
    let server = BootstrapServer::start(&format!("{host}:{port}"))?;
    let addr = server.addr().to_string();
    let a = args(&m, pool)?;
    let mgr = KvManager::prefill(
        m.agent.clone(),
        a,
        &addr,
        ManagerConfig::default().local_ip(host),
    )?;
    eprintln!(
        "prefill: bootstrap on {addr}, zmq port {}, {} KV buffers of {} pages",
        mgr.rank_port(),
        m.kv.len(),
        pool.pages
    );
    let mut rng = rand::rng();
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut counts = Counts::default();
    let mut next_slot = 0u32;
    // Per-room time from claiming the room (all decode infos arrived) to both transfers done,
    // summarised on stderr every 20 rooms: the transfer time as this side sees it, to tell
    // apart from what the decode measures (which adds the ZMQ request and the notification).
    let mut claimed: HashMap<u64, Instant> = HashMap::new();
    let mut served: Vec<Duration> = Vec::new();
    let mut scan_every = SCAN_BUSY;
    let mut next_scan = Instant::now();
    let mut next_stats = opts.stats_every.map(|d| Instant::now() + d);
    loop {
        let now = Instant::now();
        if now >= next_scan {
            let scan_start = Instant::now();
            let unclaimed = mgr.unclaimed_rooms();
            let cost = scan_start.elapsed();
            let found = !unclaimed.is_empty();
            for unclaimed in unclaimed {
                let (room, n) = (unclaimed.room.get(), unclaimed.pages);
                if n == 0 || active.contains_key(&room) {
                    // nixl-kv never offers a room without pages (dummy infos only); a sender
                    // for one would wait forever.
                    continue;
                }
                let slot = next_slot % pool.aux_slots;
                next_slot = next_slot.wrapping_add(1);
                for (k, aux) in m.aux.iter_mut().enumerate() {
                    let item = m.aux_items[k] as usize;
                    let row = &mut aux.buffer_mut().as_mut_slice()
                        [slot as usize * item..(slot as usize + 1) * item];
                    for (j, b) in row.iter_mut().enumerate() {
                        *b = aux_byte(room, k, j);
                    }
                }
                claimed.insert(room, Instant::now());
                let mut tx = KvSender::new(&mgr, RoomId::new(room))?;
                tx.init(n, slot);
                let src: Vec<u32> = (0..u64::from(n))
                    .map(|i| (room.wrapping_add(97 * i) % u64::from(pool.pages)) as u32)
                    .collect();
                let abort_at = opts
                    .abort_one_in
                    .filter(|&k| rng.random_range(0..k) == 0)
                    .map(|_| rng.random_range(0..src.len()));
                active.insert(
                    room,
                    Active {
                        tx,
                        src,
                        sent: 0,
                        abort_at,
                    },
                );
            }
            // Busy (or just found work): scan often; idle: back off, doubling up to SCAN_IDLE.
            scan_every = if found || !active.is_empty() {
                SCAN_BUSY
            } else {
                (scan_every * 2).min(SCAN_IDLE)
            };
            // However many rooms the manager holds, scanning stays a small share of the time.
            scan_every = scan_every.max(cost * SCAN_COST_RATIO);
            next_scan = Instant::now() + scan_every;
        }
        let mut finished = Vec::new();
        for (room, a) in active.iter_mut() {
            if a.abort_at.is_some_and(|at| a.sent >= at) {
                a.abort_at = None;
                a.tx.abort("nixl-pd --abort-one-in");
            } else if a.sent < a.src.len() {
                let k = opts
                    .chunk
                    .unwrap_or(a.src.len())
                    .max(1)
                    .min(a.src.len() - a.sent);
                a.tx.send(&a.src[a.sent..a.sent + k]);
                a.sent += k;
            }
            match a.tx.poll() {
                KvPoll::Success => {
                    counts.served += 1;
                    finished.push(*room);
                }
                KvPoll::Failed => {
                    let why = a.tx.failure();
                    if matches!(why, Some(FailureReason::Aborted(_))) {
                        counts.aborted += 1;
                    } else {
                        counts.failed += 1;
                        eprintln!("prefill: room {room} failed: {}", reason(why));
                    }
                    finished.push(*room);
                }
                _ => {}
            }
        }
        for r in finished {
            active.remove(&r);
            if let Some(t) = claimed.remove(&r) {
                served.push(t.elapsed());
            }
        }
        if served.len() >= 20 {
            served.sort();
            eprintln!(
                "prefill: last {} rooms, claim to transfers done: p50 {:.2} ms, p99 {:.2} ms",
                served.len(),
                served[served.len() / 2].as_secs_f64() * 1e3,
                served[served.len() * 99 / 100].as_secs_f64() * 1e3
            );
            served.clear();
        }
        if let (Some(at), Some(every)) = (next_stats, opts.stats_every)
            && Instant::now() >= at
        {
            let t = mgr.table_sizes();
            let (rss_kb, fds) = rss_and_fds();
            eprintln!(
                "prefill stats: rooms={} peers={} active={} served={} failed={} aborted={} rss_kb={rss_kb} fds={fds}",
                t.prefill_rooms,
                t.peers,
                active.len(),
                counts.served,
                counts.failed,
                counts.aborted
            );
            next_stats = Some(Instant::now() + every);
        }
        let wake = if active.is_empty() {
            next_scan
        } else {
            next_scan.min(Instant::now() + POLL_ACTIVE)
        };
        let wake = next_stats.map_or(wake, |t| wake.min(t));
        let nap = wake.saturating_duration_since(Instant::now());
        if active.is_empty() {
            // Idle: wake as soon as a decode's infos complete a room, not at the next scan.
            if mgr.wait_unclaimed(nap) {
                next_scan = Instant::now();
                scan_every = SCAN_BUSY;
            }
        } else if !nap.is_zero() {
            std::thread::sleep(nap);
        }
    }
}

struct Request {
    rx: KvReceiver,
    pages: Vec<u32>,
    slot: u32,
    start: Instant,
    /// The abort knob aborts it then.
    abort_at: Option<Instant>,
}

struct DecodeOpts {
    prefill_pages: u32,
    requests: usize,
    per_request: usize,
    concurrency: usize,
    aux_verify: Option<AuxVerify>,
    json: bool,
    seconds: Option<Duration>,
    abort_one_in: Option<u32>,
    allow_failures: bool,
}

/// How a decode's requests ended.
#[derive(Default)]
struct Outcomes {
    /// Success, every byte verified (or not verified with `--no-verify`).
    ok: usize,
    /// Failed with a reason (a receiver that could not be created included).
    failed: usize,
    /// Failed without a reason.
    no_reason: usize,
    /// Success, but a byte differs.
    corrupt: usize,
    /// Aborted by the abort knob.
    aborted: usize,
}

/// Pages and aux slots of aborted and failed requests stay out of use this long (a late write
/// could still land).
const QUARANTINE: Duration = Duration::from_secs(30);

fn decode(pool: &Pool, bootstrap: &str, o: &DecodeOpts) -> anyhow::Result<()> {
    let (per_request, concurrency) = (o.per_request, o.concurrency);
    if per_request == 0 || per_request * concurrency > pool.pages as usize {
        bail!(
            "{concurrency} concurrent requests of {per_request} pages do not fit in {} pages",
            pool.pages
        );
    }
    let m = memory(pool, "decode")?;
    let mgr = KvManager::decode(m.agent.clone(), args(&m, pool)?, ManagerConfig::default())?;
    eprintln!(
        "decode: ready, {} KV buffers of {} pages",
        m.kv.len(),
        pool.pages
    );
    let mut rng = match pool.seed {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    let mut free_pages: Vec<u32> = (0..pool.pages).collect();
    let mut free_slots: Vec<u32> = (0..pool.aux_slots).collect();
    let mut quarantine: Vec<(Instant, Vec<u32>, u32)> = Vec::new();
    let bar = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(o.requests as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("decode [{bar:40}] {pos}/{len} requests {per_sec} {msg}")?
            .progress_chars("=> "),
    );
    let (mut started, mut out, mut latencies, mut bytes) =
        (0usize, Outcomes::default(), Vec::new(), 0u64);
    let mut inflight: Vec<Request> = Vec::new();
    let t0 = Instant::now();
    let deadline = o.seconds.map(|s| t0 + s);
    let more = |started: usize| started < o.requests && deadline.is_none_or(|d| Instant::now() < d);
    while more(started) || !inflight.is_empty() {
        let now = Instant::now();
        quarantine.retain(|(until, pages, slot)| {
            if now >= *until {
                free_pages.extend(pages);
                free_slots.push(*slot);
                false
            } else {
                true
            }
        });
        while more(started)
            && inflight.len() < concurrency
            && free_pages.len() >= per_request
            && !free_slots.is_empty()
        {
            let room = rng.random::<u64>() >> 1;
            let pages = nixl_tools::take_page_runs(&mut free_pages, per_request, &mut rng);
            let Some(slot) = free_slots.pop() else { break };
            started += 1;
            // From before the receiver's bootstrap lookup and registration (which it blocks on).
            let start = Instant::now();
            let mut rx = match KvReceiver::new(&mgr, bootstrap, RoomId::new(room), None) {
                Ok(rx) => rx,
                Err(e) => {
                    eprintln!("room {room} failed: {e}");
                    out.failed += 1;
                    free_pages.extend(&pages);
                    free_slots.push(slot);
                    bar.inc(1);
                    continue;
                }
            };
            rx.init(&pages, slot);
            let abort_at = o
                .abort_one_in
                .filter(|&k| rng.random_range(0..k) == 0)
                .map(|_| start + Duration::from_micros(rng.random_range(0..20_000)));
            inflight.push(Request {
                rx,
                pages,
                slot,
                start,
                abort_at,
            });
        }
        let mut i = 0;
        while i < inflight.len() {
            if inflight[i].abort_at.is_some_and(|t| Instant::now() >= t) {
                let mut req = inflight.swap_remove(i);
                req.rx.abort("nixl-pd --abort-one-in");
                out.aborted += 1;
                quarantine.push((Instant::now() + QUARANTINE, req.pages, req.slot));
                bar.inc(1);
                continue;
            }
            let state = inflight[i].rx.poll();
            if !matches!(state, KvPoll::Success | KvPoll::Failed) {
                i += 1;
                continue;
            }
            let req = inflight.swap_remove(i);
            latencies.push(req.start.elapsed());
            let room = req.rx.room().get();
            if state == KvPoll::Failed {
                match req.rx.failure() {
                    Some(why) => {
                        eprintln!("room {room} failed: {why}");
                        out.failed += 1;
                    }
                    None => {
                        eprintln!("room {room} failed: no reason given");
                        out.no_reason += 1;
                    }
                }
                // A failed room's pages may still receive a late write, as an aborted one's.
                quarantine.push((Instant::now() + QUARANTINE, req.pages, req.slot));
                bar.inc(1);
                continue;
            }
            let good = o.aux_verify.is_none_or(|a| {
                verify(&m, pool, o.prefill_pages, room, &req.pages, req.slot, a)
                    .map_err(|e| eprintln!("room {room}: {e}"))
                    .is_ok()
            });
            if good {
                out.ok += 1;
                bytes += req.pages.len() as u64 * pool.page_bytes * m.kv.len() as u64;
            } else {
                out.corrupt += 1;
            }
            free_pages.extend(&req.pages);
            free_slots.push(req.slot);
            bar.inc(1);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    bar.finish();
    let seconds = t0.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let (p50, p99) = (pct(0.5), pct(0.99));
    let gbps = bytes as f64 / seconds / 1e9;
    let failures = out.failed + out.no_reason + out.corrupt;
    println!(
        "{started} requests x {per_request} pages x {} buffers x {} B: {:.1} req/s, {gbps:.2} GB/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {failures} failed{}{}",
        m.kv.len(),
        pool.page_bytes,
        started as f64 / seconds,
        if o.aux_verify.is_some() {
            ", every byte verified"
        } else {
            " (not verified)"
        },
        if out.aborted > 0 {
            format!(", {} aborted", out.aborted)
        } else {
            String::new()
        }
    );
    if o.json {
        let line = serde_json::json!({
            "requests": started, "bytes": bytes, "seconds": seconds, "p50_ms": p50, "p99_ms": p99,
            "gbps": gbps, "failures": failures, "ok": out.ok, "failed": out.failed,
            "no_reason": out.no_reason, "corrupt": out.corrupt, "aborted": out.aborted,
        });
        println!("{line}");
    }
    if out.corrupt > 0 || out.no_reason > 0 || (failures > 0 && !o.allow_failures) {
        std::process::exit(1);
    }
    Ok(())
}

fn verify(
    m: &Memory,
    pool: &Pool,
    np: u32,
    room: u64,
    pages: &[u32],
    slot: u32,
    aux: AuxVerify,
) -> Result<(), String> {
    let page = pool.page_bytes as usize;
    let mut got = Vec::with_capacity(page);
    for b in 0..m.kv.len() {
        for (i, &d) in pages.iter().enumerate() {
            let src = room.wrapping_add(97 * i as u64) % u64::from(np);
            m.kv.read_page(b, d as usize, page, &mut got)
                .map_err(|e| e.to_string())?;
            if let Some(j) = (0..page).find(|&j| got[j] != kv_byte(b, src, j)) {
                return Err(format!("buffer {b} page {d} byte {j} differs"));
            }
        }
    }
    let buffers = match aux {
        AuxVerify::All => m.aux.len(),
        AuxVerify::First => 1,
    };
    for (k, buf) in m.aux.iter().enumerate().take(buffers) {
        let item = m.aux_items[k] as usize;
        let row = &buf.buffer().as_slice()[slot as usize * item..(slot as usize + 1) * item];
        if let Some(j) = (0..item).find(|&j| row[j] != aux_byte(room, k, j)) {
            return Err(format!("aux buffer {k} byte {j} differs"));
        }
    }
    Ok(())
}
