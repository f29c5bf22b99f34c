//! `nixl-pd`: a prefill and a decode moving KV pages over NIXL with SGLang's protocol.
//!
//! ```text
//! nixl-pd prefill --bootstrap-port P --layers L [--mla] --page-bytes B --pages N [--aux-slots S]
//!                 [--hidden-size H] [--aux-layout sglang|legacy] [--chunk-pages K]
//!                 [--stats-every SECS] [--abort-one-in K] [--device cpu|gpu:N]
//!                 [--no-staging | --staging] [--staging-slots S] [--staging-slot-mib M]
//!                 [--no-direct] [--no-spin | --spin] [--busy-poll-us U]
//!                 [--tp-size P --tp-rank R --heads H [--page-tokens T]] [--join HOST:PORT]
//!                 [--profile sglang-0.5.1|sglang-0.5.20|sglang-0.5.23]
//! nixl-pd decode  --bootstrap HOST:P --layers L [--mla] --page-bytes B --pages N
//!                 [--prefill-pages NP] [--hidden-size H] [--aux-layout sglang|legacy]
//!                 --requests R --pages-per-request M [--concurrency C] [--seed X]
//!                 [--aux-verify all|first] [--json] [--no-verify] [--seconds S]
//!                 [--abort-one-in K] [--allow-failures] [--sentinel auto|on|off]
//!                 [--quarantine-seconds Q] [--allow-stray] [--device cpu|gpu:N]
//!                 [--no-staging | --staging] [--staging-slots S] [--staging-slot-mib M]
//!                 [--no-direct] [--no-spin | --spin] [--busy-poll-us U]
//!                 [--tp-size D --tp-rank R --heads H [--page-tokens T] --sliced-tp]
//!                 [--profile sglang-0.5.1|sglang-0.5.20|sglang-0.5.23]
//! nixl-pd doctor  [--device cpu|gpu:N] [--peer-device cpu|gpu:N]
//! ```
//!
//! Byte j of page p of KV buffer b on the prefill is `(7·b + 13·p + j) mod 251` (buffers in
//! SGLang's order: K of layers 0..L−1, then V). For room R the prefill sends source pages
//! `(R + 97·i) mod N`; aux buffer k's row for the room holds `(R + 17·k + j) mod 256`.
//!
//! The aux (metadata) buffers are SGLang 0.5.1's `MetadataBuffers`, six per slot: output ids
//! (16 × int32), logprob values (16 × f32), logprob indices (16 × int32), top-logprob values
//! (128 × f32), top-logprob indices (128 × int32) and hidden states (`--hidden-size` × bf16);
//! with `--profile sglang-0.5.20` or `sglang-0.5.23`, the ten of those releases. A prefill
//! copies every aux row to a decode of the same layout and the first row only to others (as
//! SGLang 0.5.1 does; such a decode checks with `--aux-verify first`).
//!
//! `--profile` (default `sglang-0.5.1`) picks the wire format a decode speaks (docs/protocol.md
//! §10: 0.5.20 on, it binds a listener for `KV_STATUS`); a prefill serves decodes of every
//! profile at once, each in its own, and registers with its bootstrap server in a form every
//! release reads (`--page-tokens` is the page size it announces).
//!
//! Agent names carry a random UUID (version 4) and rooms are random 63-bit ids, both from the
//! OS's entropy, as SGLang's: a peer on the network can guess neither. `--seed` makes a decode's
//! rooms and pages reproducible instead (and guessable; two decodes with one seed collide).
//!
//! The decode fills its free pages and aux rows with a sentinel that no KV byte equals and checks
//! that they still hold it, so that a write landing where no live request owned the memory is
//! caught (`stray_pages`); pages of a failed or aborted request are quarantined first, as the
//! prefill's late write is still that request's own (pool.rs, sentinel.rs).
//!
//! With `--heads`, a page holds `--page-tokens` tokens of `--heads` heads and its bytes depend on
//! the *global* head (`tp_rank·heads + head`) instead of the byte offset, so that decode ranks of
//! another TP size (`--sliced-tp`) verify the slices they get (docs/protocol.md §5.6). Every
//! rank of a decode TP group runs the same rooms (one `--seed`; rooms have a stream of their own).
//!
//! With GPU pools (`--device gpu:N`) on both sides, the fast paths are on without flags: when
//! both run on one node, each chunk is one kernel copying straight into the decode's pages (the
//! direct path; `--no-direct` turns it off), otherwise each chunk moves as gather, one WRITE per
//! staging slot and scatter (docs/runtime.md §12; `--no-staging` turns both off); loops spin
//! while requests are active (`--no-spin`) and the manager polls for 2 ms after traffic
//! (`--busy-poll-us 0`). The prefill's stats line counts the staged pieces, the direct chunks
//! and the packed chunks (head slices gathered into whole decode pages for decodes of another TP
//! size: out of host pools by the CPU, out of GPU pools by a kernel for decodes that do not go
//! direct; `--no-packed` sends SGLang's per-token descriptors instead).
//!
//! Unless it spins (`--spin`, the default on GPU pools), the prefill's loop sleeps (prefill.rs): it polls its active senders every 100 µs, looks for
//! new rooms every 1 ms while any are active, and when idle backs off to a scan every 16 ms; a
//! scan (which walks every room the manager holds) is never more than about 2 % of the time,
//! however many orphan rooms there are.
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs,
    reason = "command-line program"
)]

mod decode;
mod doctor;
mod memory;
mod pool;
mod prefill;
mod sentinel;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use nixl_kv::FailureReason;

/// Which aux buffers each slot has.
#[derive(Clone, Copy, ValueEnum)]
enum AuxLayout {
    /// SGLang's `MetadataBuffers` of the `--profile` release: 0.5.1's six buffers of 64, 64,
    /// 64, 512, 512 and 2 × hidden-size bytes per slot, or 0.5.20–0.5.23's ten (64, 64, 64, 64,
    /// 512, 512, 64, 128, 64, 64).
    Sglang,
    /// Three buffers of 64, 64 and 512 bytes per slot (what earlier versions of this program
    /// registered).
    Legacy,
}

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
            // 0.5.1: bf16 hidden states last; 0.5.2x: its ten default buffers.
            AuxLayout::Sglang => self.profile.aux_layout(2 * self.hidden_size),
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
    /// The staged GPU path, on by default with `--device gpu:N`: between two of our peers on
    /// one node each chunk is one kernel copying straight into the decode's pages (the direct
    /// path); on two nodes each chunk's pages of every buffer are gathered into a registered
    /// staging slot, sent as one WRITE and scattered on the decode. Against a peer without it,
    /// the per-page path is used. This flag asks for it explicitly (host pools refuse it).
    #[arg(long, conflicts_with = "no_staging")]
    staging: bool,
    /// With `--device gpu:N`: move pages as SGLang does, one descriptor per page and buffer.
    #[arg(long)]
    no_staging: bool,
    /// Staging slots per side.
    #[arg(long, default_value_t = nixl_kv::RECOMMENDED_SLOTS)]
    staging_slots: u32,
    /// MiB per staging slot (a piece holds as many whole pages of every buffer as fit).
    #[arg(long, default_value_t = nixl_kv::RECOMMENDED_SLOT_MIB)]
    staging_slot_mib: u64,
    /// Do not take the same-node direct path (a decode exports no pools, a prefill maps none),
    /// so that same-node pairs stage as pairs on two nodes do.
    #[arg(long)]
    no_direct: bool,
    /// On a prefill: send head slices to decodes of a larger TP size as SGLang does, one
    /// descriptor per token slot, instead of whole decode pages gathered first (the packed
    /// path, the default: on host pools by the CPU, on GPU pools with `--staging` by one kernel
    /// for decodes that do not go direct).
    #[arg(long)]
    no_packed: bool,
    /// Poll without sleeping while requests are active (lowest latency; a core stays busy
    /// while working, none while idle). The default with `--device gpu:N`.
    #[arg(long, conflicts_with = "no_spin")]
    spin: bool,
    /// With `--device gpu:N`: sleep between polls of active requests, as on host pools.
    #[arg(long)]
    no_spin: bool,
    /// Microseconds the manager's own waits (the prefill's inbound thread and room waits, the
    /// decode's sends, the ZMQ thread) poll without sleeping after traffic before they block;
    /// 0: never. Default: 2000 with `--device gpu:N`, 0 on host pools.
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// This side's attention-TP size (prefill: ranks registering with one bootstrap server;
    /// decode: ranks sharing each room, all run with the same `--seed`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    tp_size: u32,
    /// This process's rank in it.
    #[arg(long, default_value_t = 0)]
    tp_rank: u32,
    /// KV heads per token on this rank: pages then hold `--page-tokens` tokens of `--heads`
    /// heads each, and their bytes are a function of the global head, so that ranks of other
    /// TP sizes can check each other's slices (docs/protocol.md §5.6).
    #[arg(long)]
    heads: Option<u32>,
    /// Tokens per page (with `--heads`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    page_tokens: u32,
    /// Decode: take head slices from prefills of another TP size (they must slice heads).
    #[arg(long)]
    sliced_tp: bool,
    /// The SGLang release family whose wire format and default aux layout this side has
    /// (docs/protocol.md §10): on a decode, the dialect it speaks; on a prefill, its aux layout
    /// (it serves decodes of every profile, each in its own).
    #[arg(long, default_value = "sglang-0.5.1", value_parser = parse_profile)]
    profile: nixl_kv::Profile,
}

fn parse_profile(s: &str) -> Result<nixl_kv::Profile, String> {
    s.parse()
        .map_err(|e: nixl_kv::UnknownProfile| e.to_string())
}

impl Pool {
    /// The manager settings these options ask for.
    fn manager_config(&self) -> anyhow::Result<nixl_kv::ManagerConfig> {
        let staging = if self.staging || (self.on_gpu() && !self.no_staging) {
            let bytes = self.staging_slot_mib.saturating_mul(1 << 20);
            Some(
                nixl_kv::StagingConfig::new(bytes, self.staging_slots)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--staging-slots {} --staging-slot-mib {}: need 1..=1024 slots of at least 1 MiB",
                            self.staging_slots,
                            self.staging_slot_mib
                        )
                    })?
                    .direct(!self.no_direct)
                    .packed(!self.no_packed),
            )
        } else {
            None
        };
        let config = nixl_kv::ManagerConfig::default()
            .staging(staging)
            .auto_staging(false)
            .sliced_tp(self.sliced_tp)
            .profile(self.profile)
            // Announced to (and, on a decode, checked against) 0.5.2x peers; a prefill then
            // registers in a form every SGLang release reads.
            .sglang_pages(self.page_tokens, "bfloat16");
        Ok(match self.busy_poll_us {
            Some(us) => config
                .busy_poll(Duration::from_micros(us))
                .auto_busy_poll(false),
            None => config,
        })
    }

    /// Whether the KV pool is GPU memory (`--device gpu:N`).
    fn on_gpu(&self) -> bool {
        self.device.starts_with("gpu")
    }

    /// Whether active loops spin: `--spin`, or by default on GPU pools unless `--no-spin`.
    fn spins(&self) -> bool {
        self.spin || (self.on_gpu() && !self.no_spin)
    }

    /// The head layout of a page, when `--heads` is given: (heads, bytes per head), checked.
    fn head_layout(&self) -> anyhow::Result<Option<(u64, u64)>> {
        let Some(h) = self.heads else { return Ok(None) };
        let per_token = u64::from(self.page_tokens) * u64::from(h);
        if h == 0 || !self.page_bytes.is_multiple_of(per_token) {
            anyhow::bail!(
                "--page-bytes {} does not hold {} tokens of {h} heads",
                self.page_bytes,
                self.page_tokens
            );
        }
        Ok(Some((u64::from(h), self.page_bytes / per_token)))
    }

    /// Byte `j` of page `page` of KV buffer `b` as this rank holds it: [`kv_byte`] without
    /// `--heads`, else a function of (buffer, page, token, global head, byte in head).
    fn kv_byte(&self, b: usize, page: u64, j: usize) -> u8 {
        let Ok(Some((heads, head_bytes))) = self.head_layout() else {
            return kv_byte(b, page, j);
        };
        let j = j as u64;
        let token_bytes = heads * head_bytes;
        let (t, in_token) = (j / token_bytes, j % token_bytes);
        let head = u64::from(self.tp_rank) * heads + in_token / head_bytes;
        ((7 * b as u64 + 13 * page + 3 * t + 11 * head + in_token % head_bytes) % 251) as u8
    }

    /// How long an active loop pauses between polls: `busy`, or nothing with `--spin` (then
    /// it only yields).
    fn pause(&self, busy: Duration) {
        if self.spins() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(busy);
        }
    }
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
        /// Register with this bootstrap server (`host:port`, another rank's) instead of
        /// starting one: for prefill ranks after the first of a TP group.
        #[arg(long)]
        join: Option<String>,
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
        /// pages and aux slot are then quarantined, as a late write could still land).
        #[arg(long)]
        abort_one_in: Option<u32>,
        /// Exit 0 even if requests failed with a reason (never for wrong bytes or a failure
        /// without a reason).
        #[arg(long)]
        allow_failures: bool,
        /// Fill free pages and aux rows with a sentinel and check they keep it: `auto` is on
        /// for a host pool and off for a GPU pool (where every check is a device copy).
        /// `--no-verify` turns it off.
        #[arg(long, value_enum, default_value_t = SentinelMode::Auto)]
        sentinel: SentinelMode,
        /// How long the pages and aux slot of a failed or aborted request stay out of use
        /// (a late write for it may still land), in seconds.
        #[arg(long, default_value_t = 30.0)]
        quarantine_seconds: f64,
        /// Exit 0 even if a free page or aux row lost its sentinel (reported either way).
        #[arg(long)]
        allow_stray: bool,
    },
    /// Print where the NIXL runtime was found, the UCX and NIXL settings in force, and whether
    /// UCX would emulate the KV transfers for these memory types; fail if there is no runtime.
    Doctor(doctor::DoctorArgs),
}

/// Whether the decode checks its free memory for stray writes.
#[derive(Clone, Copy, ValueEnum)]
enum SentinelMode {
    /// On for `--device cpu`, off for `--device gpu:N`.
    Auto,
    On,
    Off,
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
            join,
            chunk_pages,
            stats_every,
            abort_one_in,
        } => prefill::prefill(
            &pool,
            bootstrap_port,
            &host,
            &prefill::PrefillOpts {
                join,
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
            sentinel,
            quarantine_seconds,
            allow_stray,
        } => {
            let np = prefill_pages.unwrap_or(pool.pages);
            let verify = if no_verify { None } else { Some(aux_verify) };
            let sentinel = !no_verify
                && match sentinel {
                    SentinelMode::Auto => pool.device == "cpu",
                    SentinelMode::On => true,
                    SentinelMode::Off => false,
                };
            decode::decode(
                &pool,
                &bootstrap,
                &decode::DecodeOpts {
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
                    sentinel,
                    quarantine: Duration::try_from_secs_f64(quarantine_seconds).map_err(|_| {
                        anyhow::anyhow!("--quarantine-seconds: {quarantine_seconds}")
                    })?,
                    allow_stray,
                },
            )
        }
        Role::Doctor(_) => Ok(()),
    }
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
