//! The initiator of one benchmark case: sets up both sides (the target in this process or in a
//! child process), fills the sources, times transfers and verifies the destinations.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nixl_core::cuda::{DeviceBuffer, Staging};
use nixl_core::{
    BackendParams, MemRegion, MemType, UcxErrorMode, UcxTuning, XferDescs, XferOp, XferRequest,
};
use serde_json::{Value, json};

use crate::side::{Layout, MemKind, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Place {
    /// Both agents in this process.
    One,
    /// The target agent in a child process.
    Two,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Op {
    Write,
    Read,
}

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct CaseArgs {
    #[arg(long)]
    pub(crate) name: String,
    #[arg(long, value_enum)]
    pub(crate) place: Place,
    #[arg(long, value_enum, default_value = "write")]
    pub(crate) op: Op,
    #[arg(long, value_enum, default_value = "vram")]
    pub(crate) local: MemKind,
    #[arg(long, value_enum, default_value = "vram")]
    pub(crate) remote: MemKind,
    #[arg(long, default_value_t = 0)]
    pub(crate) gpu: u32,
    #[arg(long, default_value_t = 0)]
    pub(crate) remote_gpu: u32,
    #[command(flatten)]
    pub(crate) layout: Layout,
    /// Seconds of timed transfers (at least 5 transfers, at most 5000).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) seconds: f64,
    /// Also time requests made from descriptor lists prepared once: lists of exactly the
    /// transfer's blocks, and lists of every block of every buffer indexed per transfer (what
    /// nixl-kv does with its per-peer lists).
    #[arg(long)]
    pub(crate) prepared: bool,
    /// Write the JSON result here instead of stdout (UCX_PROTO_INFO prints to stdout too).
    #[arg(long)]
    pub(crate) result: Option<std::path::PathBuf>,
    /// NIXL's UCX thread pool on the initiator (`num_threads`; 0: none).
    #[arg(long, default_value_t = 0)]
    pub(crate) num_threads: u32,
    /// Descriptors per thread-pool batch on the initiator (`split_batch_size`; 0: NIXL's).
    #[arg(long, default_value_t = 0)]
    pub(crate) split_batch_size: u32,
    /// UCX scatter-gather batching on the initiator (NIXL_UCX_SGL_ENABLE).
    #[arg(long)]
    pub(crate) sgl: bool,
    /// The staged path instead of per-page descriptors: gather every buffer's pages into a
    /// registered staging buffer, one WRITE with a notification into the target's staging
    /// buffer, scatter there; timed until the target reports its scatter done (VRAM only).
    #[arg(long)]
    pub(crate) staged: bool,
}

/// The remote side as the initiator sees it.
enum Target {
    Local(Side),
    Child {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<ChildStdout>,
        name: String,
        regions: Vec<MemRegion>,
        metadata: Vec<u8>,
    },
}

impl Target {
    fn start(args: &CaseArgs) -> anyhow::Result<Self> {
        match args.place {
            Place::One => {
                let name = format!("gpubench-b-{}", std::process::id());
                Ok(Self::Local(Side::new(
                    &name,
                    args.remote,
                    args.remote_gpu,
                    args.layout,
                )?))
            }
            Place::Two => spawn_child(args),
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Local(s) => s.agent.name(),
            Self::Child { name, .. } => name,
        }
    }

    fn metadata(&self) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Self::Local(s) => s.agent.local_metadata()?.as_bytes().to_vec(),
            Self::Child { metadata, .. } => metadata.clone(),
        })
    }

    fn regions(&self) -> Vec<MemRegion> {
        match self {
            Self::Local(s) => s.mem.regions(),
            Self::Child { regions, .. } => regions.clone(),
        }
    }

    /// Sends `cmd` to a child target and returns its `OK` answer's text after `OK `.
    fn request(&mut self, cmd: &str) -> anyhow::Result<String> {
        let Self::Child { stdin, stdout, .. } = self else {
            bail!("{cmd}: needs a target process");
        };
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let line = reply(stdout)?;
        match line.trim().strip_prefix("OK ") {
            Some(rest) => Ok(rest.to_owned()),
            None => bail!("target answered {cmd:.20} with {}", line.trim()),
        }
    }

    fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        match self {
            Self::Local(s) => match cmd {
                "FILL" => s.fill_sources(),
                "CLEAR" => s.clear_destinations(),
                _ => s.verify_destinations(),
            },
            Self::Child { stdin, stdout, .. } => {
                writeln!(stdin, "{cmd}")?;
                stdin.flush()?;
                let line = reply(stdout)?;
                if line.trim() != "OK" {
                    bail!("target answered {cmd} with {}", line.trim());
                }
                Ok(())
            }
        }
    }

    /// Progresses an in-process target (a child progresses itself).
    fn progress(&self, seen: &mut Vec<nixl_core::Notification>) {
        if let Self::Local(s) = self {
            let _ = s.agent.drain_notifications(seen);
            seen.clear();
        }
    }

    fn stop(self) {
        if let Self::Child {
            mut child,
            mut stdin,
            ..
        } = self
        {
            let _ = writeln!(stdin, "QUIT");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// The next protocol line from the target (UCX may print its own lines to the same stdout).
fn reply(stdout: &mut BufReader<ChildStdout>) -> anyhow::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            bail!("the target process exited");
        }
        if ["READY", "OK", "BAD", "ERR"]
            .iter()
            .any(|k| line.starts_with(k))
        {
            return Ok(line);
        }
    }
}

fn spawn_child(args: &CaseArgs) -> anyhow::Result<Target> {
    let l = &args.layout;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("target")
        .args(["--mem", &format!("{:?}", args.remote).to_lowercase()])
        .args(["--gpu", &args.remote_gpu.to_string()])
        .args(["--buffers", &l.buffers.to_string()])
        .args(["--pool-pages", &l.pool_pages.to_string()])
        .args(["--block", &l.block.to_string()])
        .args(["--per-buffer", &l.per_buffer.to_string()])
        .args(["--dst-run", &l.dst_run.to_string()])
        .env_remove("UCX_PROTO_INFO")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the target process")?;
    let stdin = child.stdin.take().context("child stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("child stdout")?);
    let line = reply(&mut stdout)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let ["READY", name, md, addrs] = words[..] else {
        let _ = child.kill();
        bail!("target did not start: {line:?}");
    };
    let metadata = nixl_testkit::unhex(md).context("target metadata hex")?;
    let len = l.buffer_len() as u64;
    let mem = args.remote.nixl();
    let regions = addrs
        .split(',')
        .map(|a| {
            Ok(MemRegion {
                addr: a.parse()?,
                len,
                dev: u64::from(args.remote_gpu),
                mem,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = Target::Child {
        child,
        stdin,
        stdout,
        name: name.to_owned(),
        regions,
        metadata,
    };
    Ok(target)
}

/// Per-transfer times of one series.
struct Series {
    first: Duration,
    samples: Vec<Duration>,
}

impl Series {
    fn json(&self, bytes: u64) -> Value {
        let mut s = self.samples.clone();
        s.sort();
        let pct = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        let total: Duration = s.iter().sum();
        let mean = total / s.len() as u32;
        let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
        json!({
            "reps": s.len(),
            "first_us": self.first.as_secs_f64() * 1e6,
            "mean_us": mean.as_secs_f64() * 1e6,
            "p50_us": pct(0.5).as_secs_f64() * 1e6,
            "p99_us": pct(0.99).as_secs_f64() * 1e6,
            "gbps": gbps(mean),
        })
    }
}

/// Times `make` + post + wait until `seconds` have passed (5 to 5000 transfers).
fn time_series(
    seconds: f64,
    target: &Target,
    mut make: impl FnMut() -> anyhow::Result<XferRequest>,
) -> anyhow::Result<Series> {
    let mut seen = Vec::new();
    let mut one = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        let req = make()?;
        req.post()?;
        req.wait(Duration::from_secs(60), || target.progress(&mut seen))?;
        Ok(t.elapsed())
    };
    let first = one()?;
    one()?;
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 5 || (start.elapsed() < budget && samples.len() < 5000) {
        samples.push(one()?);
    }
    Ok(Series { first, samples })
}

/// Runs one case and returns its JSON result.
pub(crate) fn run(args: &CaseArgs) -> anyhow::Result<Value> {
    let l = args.layout;
    let name = format!("gpubench-a-{}", std::process::id());
    let tuning = UcxTuning::new(args.num_threads, args.split_batch_size, args.sgl);
    let params = BackendParams::ucx_tuned(UcxErrorMode::None, tuning);
    let mut local = Side::with_params(&name, args.local, args.gpu, l, &params)?;
    let mut target = Target::start(args)?;
    if args.staged {
        let result = run_staged(args, &mut local, &mut target);
        target.stop();
        let mut v = result?;
        v["case"] = json!(args.name);
        v["descs"] = json!(l.descs());
        v["block"] = json!(l.block);
        v["bytes"] = json!(l.bytes());
        v["verified"] = json!(true);
        return Ok(v);
    }
    let result = run_with(args, &mut local, &mut target);
    target.stop();
    let (series, prepared, risks) = result?;
    let mut out = json!({
        "case": args.name,
        "place": format!("{:?}", args.place).to_lowercase(),
        "op": format!("{:?}", args.op).to_lowercase(),
        "local": format!("{:?}", args.local).to_lowercase(),
        "remote": format!("{:?}", args.remote).to_lowercase(),
        "gpu": args.gpu,
        "remote_gpu": args.remote_gpu,
        "descs": l.descs(),
        "block": l.block,
        "bytes": l.bytes(),
        "create": series.json(l.bytes()),
        "verified": true,
        "predicted_emulation": risks,
        "num_threads": args.num_threads,
        "split_batch_size": args.split_batch_size,
        "sgl": args.sgl,
    });
    if let Some((p, pool)) = prepared {
        out["prepared"] = p.json(l.bytes());
        out["prepared_pool"] = pool.json(l.bytes());
    }
    Ok(out)
}

type Outcome = (Series, Option<(Series, Series)>, Vec<String>);

fn run_with(args: &CaseArgs, local: &mut Side, target: &mut Target) -> anyhow::Result<Outcome> {
    let l = args.layout;
    local.agent.load_remote(&target.metadata()?)?;
    let peer = target.name().to_owned();
    let (op, source_is_local) = match args.op {
        Op::Write => (XferOp::Write, true),
        Op::Read => (XferOp::Read, false),
    };
    if source_is_local {
        local.fill_sources()?;
    } else {
        target.command("FILL")?;
    }
    let (lmem, rmem) = (args.local.nixl(), args.remote.nixl());
    let ldescs = l.xfer_descs(&local.mem.regions(), lmem, source_is_local);
    let rdescs = l.xfer_descs(&target.regions(), rmem, !source_is_local);
    let risks: Vec<String> = local
        .agent
        .emulation_risks(op, lmem, rmem, &peer)
        .iter()
        .map(ToString::to_string)
        .collect();
    let agent = local.agent.clone();
    // Each series is verified on its own: check the destinations, then zero them.
    let check = |local: &mut Side, target: &mut Target| -> anyhow::Result<()> {
        if source_is_local {
            target.command("VERIFY")?;
            target.command("CLEAR")
        } else {
            local.verify_destinations()?;
            local.clear_destinations()
        }
    };
    let series = time_series(args.seconds, target, || {
        Ok(agent.create_request(op, &ldescs, &rdescs, &peer, Some(b"gpubench"))?)
    })?;
    check(local, target)?;
    let prepared = if args.prepared {
        let lp = agent.prepare(None, &ldescs)?;
        let rp = agent.prepare(Some(&peer), &rdescs)?;
        let idx: Vec<i32> = (0..i32::try_from(l.descs())?).collect();
        let exact = time_series(args.seconds, target, || {
            Ok(agent.make_request(op, &lp, &idx, &rp, &idx, Some(b"gpubench"))?)
        })?;
        check(local, target)?;
        // Pool-wide lists: every block of every buffer, as nixl-kv prepares per peer.
        let lp = agent.prepare(None, &l.pool_descs(&local.mem.regions(), lmem))?;
        let rp = agent.prepare(Some(&peer), &l.pool_descs(&target.regions(), rmem))?;
        let (src_idx, dst_idx) = l.pool_indices()?;
        let (li, ri) = if source_is_local {
            (src_idx, dst_idx)
        } else {
            (dst_idx, src_idx)
        };
        let pool = time_series(args.seconds, target, || {
            Ok(agent.make_request(op, &lp, &li, &rp, &ri, Some(b"gpubench"))?)
        })?;
        check(local, target)?;
        Some((exact, pool))
    } else {
        None
    };
    Ok((series, prepared, risks))
}

/// The staged path, raw: gather on this side, one WRITE + notification into the target's
/// staging buffer, scatter there; each round ends when the target's "scattered" notification
/// arrives. Verified afterwards, in a separate pass over every destination page.
fn run_staged(args: &CaseArgs, local: &mut Side, target: &mut Target) -> anyhow::Result<Value> {
    let l = args.layout;
    if args.local != MemKind::Vram || args.remote != MemKind::Vram || args.place != Place::Two {
        bail!("--staged needs VRAM on both sides and --place two");
    }
    local.agent.load_remote(&target.metadata()?)?;
    let peer = target.name().to_owned();
    let md = local.agent.local_metadata()?;
    let answer = target.request(&format!("STAGED {}", nixl_testkit::hex(md.as_bytes())))?;
    let (addr, fresh) = answer.split_once(' ').context("STAGED answer")?;
    let remote_addr: u64 = addr.parse()?;
    // The target registered its staging buffer after the first metadata: load it again.
    let fresh = nixl_testkit::unhex(fresh.trim()).context("target metadata hex")?;
    if local.agent.load_remote(&fresh).is_err() {
        local.agent.invalidate_remote(&peer)?;
        local.agent.load_remote(&fresh)?;
    }
    local.fill_sources()?;
    let layout = local.pool_layout()?;
    let pages = l.pages(true);
    let bytes = layout.staged_bytes(pages.len());
    let mut buf = local
        .agent
        .register(DeviceBuffer::new(args.gpu, usize::try_from(bytes)?)?)?;
    let mut staging = Staging::new(args.gpu, layout, pages.len())?;
    let mut ldescs = XferDescs::new(MemType::Vram);
    ldescs.push_in(&buf.region(), 0, bytes);
    let remote = MemRegion {
        addr: remote_addr,
        len: bytes,
        dev: u64::from(args.remote_gpu),
        mem: MemType::Vram,
    };
    let mut rdescs = XferDescs::new(MemType::Vram);
    rdescs.push_in(&remote, 0, bytes);
    let agent = local.agent.clone();
    let mut seen = Vec::new();
    let mut one = || -> anyhow::Result<[Duration; 4]> {
        let t0 = Instant::now();
        staging.gather(&pages, buf.buffer_mut(), 0)?.wait()?;
        let t1 = Instant::now();
        let req = agent.create_request(XferOp::Write, &ldescs, &rdescs, &peer, Some(b"stage"))?;
        req.post()?;
        let mut notes = Vec::new();
        req.wait(Duration::from_secs(60), || {
            let _ = agent.drain_notifications(&mut notes);
        })?;
        let t2 = Instant::now();
        let scatter_ns = loop {
            if let Some(n) = notes.iter().find(|n| n.payload.starts_with(b"scattered ")) {
                let text = String::from_utf8_lossy(&n.payload[10..]).into_owned();
                break text.parse::<u64>()?;
            }
            if let Some(n) = notes.iter().find(|n| n.payload.starts_with(b"failed")) {
                bail!("target: {}", String::from_utf8_lossy(&n.payload));
            }
            if t2.elapsed() > Duration::from_secs(10) {
                bail!("no scatter notification within 10 s");
            }
            agent.drain_notifications(&mut notes)?;
        };
        seen.extend(notes);
        let t3 = Instant::now();
        Ok([t3 - t0, t1 - t0, t2 - t1, Duration::from_nanos(scatter_ns)])
    };
    let first = one()?;
    one()?;
    let budget = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut rounds = Vec::new();
    while rounds.len() < 5 || (start.elapsed() < budget && rounds.len() < 5000) {
        rounds.push(one()?);
    }
    staging.synchronize()?;
    let probes = staged_probes(
        &mut staging,
        &pages,
        &mut buf,
        &agent,
        &ldescs,
        &rdescs,
        &peer,
    )?;
    target.command("VERIFY")?;
    target.command("CLEAR")?;
    let series = |k: usize| Series {
        first: first[k],
        samples: rounds.iter().map(|r| r[k]).collect(),
    };
    Ok(json!({
        "place": "two",
        "op": "write",
        "local": "vram",
        "remote": "vram",
        "gpu": args.gpu,
        "remote_gpu": args.remote_gpu,
        "staged": true,
        "staging_bytes_per_side": bytes,
        "create": series(0).json(l.bytes()),
        "gather": series(1).json(l.bytes()),
        "write": series(2).json(l.bytes()),
        "scatter": series(3).json(l.bytes()),
        "notifications_seen": seen.len(),
        "probes": probes,
    }))
}

/// Where the staged rounds' gather time goes: the gather alone with no WRITE between
/// launches (the peer's mappings live), waited by spinning on the event instead of blocking,
/// and right after a WRITE of the staging buffer that has completed (no notification, no
/// scatter on the peer). p50s in µs.
fn staged_probes(
    staging: &mut Staging,
    pages: &[u32],
    buf: &mut nixl_core::Registered<DeviceBuffer>,
    agent: &nixl_core::Agent,
    ldescs: &XferDescs,
    rdescs: &XferDescs,
    peer: &str,
) -> anyhow::Result<Value> {
    let p50 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e6
    };
    let (mut alone, mut enqueue, mut spun, mut after_write) = (vec![], vec![], vec![], vec![]);
    for _ in 0..100 {
        let t = Instant::now();
        let ev = staging.gather(pages, buf.buffer_mut(), 0)?;
        enqueue.push(t.elapsed().as_secs_f64());
        ev.wait()?;
        alone.push(t.elapsed().as_secs_f64());
    }
    for _ in 0..100 {
        let t = Instant::now();
        let ev = staging.gather(pages, buf.buffer_mut(), 0)?;
        while !ev.is_done()? {
            std::hint::spin_loop();
        }
        spun.push(t.elapsed().as_secs_f64());
    }
    for _ in 0..100 {
        let req = agent.create_request(XferOp::Write, ldescs, rdescs, peer, None)?;
        req.post()?;
        req.wait(Duration::from_secs(60), || {})?;
        let t = Instant::now();
        staging.gather(pages, buf.buffer_mut(), 0)?.wait()?;
        after_write.push(t.elapsed().as_secs_f64());
    }
    Ok(json!({
        "gather_alone_p50_us": p50(alone),
        "gather_enqueue_p50_us": p50(enqueue),
        "gather_spin_wait_p50_us": p50(spun),
        "gather_after_write_p50_us": p50(after_write),
    }))
}
