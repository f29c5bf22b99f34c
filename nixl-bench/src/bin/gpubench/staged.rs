//! The staged path's pieces in gpubench: the target side (scatter when the chunk's
//! notification arrives, then tell the initiator), and the kernel check run before the
//! benchmarks (every byte, odd lengths and offsets, gather and scatter) with the gather
//! kernel's own time.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nixl_core::cuda::{DeviceBuffer, Staging};
use nixl_core::staging::{PoolBuffer, StagingLayout};
use nixl_core::{Agent, Notification, Registered};
use serde_json::{Value, json};

use crate::side::Side;

/// The target's staging buffer and scatter kernel, driven by its progress thread.
pub(crate) struct TargetStaging {
    staging: Staging,
    buf: Registered<DeviceBuffer>,
    pages: Vec<u32>,
    peer: String,
}

impl TargetStaging {
    /// Loads the initiator's metadata (hex), registers a staging buffer for one request and
    /// prepares the scatter into the destination pages.
    pub(crate) fn start(side: &Side, gpu: u32, peer_md_hex: &str) -> anyhow::Result<Self> {
        let md = nixl_testkit::unhex(peer_md_hex.trim()).context("initiator metadata hex")?;
        let peer = side.agent.load_remote(&md)?;
        let layout = side.pool_layout()?;
        let pages = side.layout.pages(false);
        let bytes = usize::try_from(layout.staged_bytes(pages.len()))?;
        let buf = side.agent.register(DeviceBuffer::new(gpu, bytes)?)?;
        let staging = Staging::new(gpu, layout, pages.len())?;
        Ok(Self {
            staging,
            buf,
            pages,
            peer,
        })
    }

    pub(crate) fn staging_addr(&self) -> u64 {
        self.buf.buffer().addr()
    }

    /// On `stage`: scatters the staging buffer, waits, and answers `scattered <ns>`.
    pub(crate) fn on_notification(&mut self, agent: &Agent, n: &Notification) {
        if n.payload != b"stage" {
            return;
        }
        let t = Instant::now();
        let done = self
            .staging
            .scatter(&self.pages, self.buf.buffer(), 0)
            .and_then(|ev| ev.wait());
        let msg = match done {
            Ok(()) => format!("scattered {}", t.elapsed().as_nanos()),
            Err(e) => format!("failed {e}"),
        };
        let _ = agent.send_notification(&self.peer, msg.as_bytes());
    }
}

/// A byte of buffer `b` at offset `i` for the check (never zero, differs per buffer).
fn byte(b: usize, i: usize) -> u8 {
    (((i * 131 + b * 29 + i / 4096) % 251) + 1) as u8
}

/// Gathers and scatters over pools with odd item lengths and an unaligned staging offset, and
/// compares every byte with the table's own mapping; then times one gather of 2048 × 32 KiB.
pub(crate) fn kernel_check(gpu: u32) -> anyhow::Result<Value> {
    kernel_check_with(gpu, WithAgent::No)
}

/// Whether the timed gather runs in a process that also holds a NIXL agent (with a UCX
/// backend), and whether the gather's buffers are registered with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum WithAgent {
    No,
    Backend,
    Registered,
    /// Registered, plus a second agent of this process whose buffer the gather's output was
    /// written to once over NIXL (cuda_ipc mappings live; needs
    /// `UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y`).
    Peer,
}

/// [`kernel_check`], timing the gather next to a NIXL agent as `with` says.
pub(crate) fn kernel_check_with(gpu: u32, with: WithAgent) -> anyhow::Result<Value> {
    // The agent comes first, before any CUDA work, as in the pd programs and the cases.
    let agent = match with {
        WithAgent::No => None,
        _ => {
            let a = Agent::new("kernel-check", &nixl_core::AgentConfig::default())?;
            a.create_backend(
                nixl_core::BackendKind::Ucx,
                &nixl_core::BackendParams::new(),
            )?;
            Some(a)
        }
    };
    // Item lengths: aligned, odd, one byte, and over one 64 KiB slice.
    let lens: [usize; 5] = [32768, 13, 4099, 1, 100_003];
    let pool_pages = 12usize;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for (b, &len) in lens.iter().enumerate() {
        let mut s = DeviceBuffer::new(gpu, len * pool_pages)?;
        let data: Vec<u8> = (0..len * pool_pages).map(|i| byte(b, i)).collect();
        s.copy_from_host(&data)?;
        src.push(s);
        dst.push(DeviceBuffer::new(gpu, len * pool_pages)?);
    }
    let layout = |bufs: &[DeviceBuffer]| {
        StagingLayout::new(
            bufs.iter()
                .zip(lens)
                .map(|(d, len)| PoolBuffer {
                    addr: d.addr(),
                    len: d.len() as u64,
                    item_len: len as u64,
                })
                .collect(),
        )
    };
    let (sl, dl) = (layout(&src)?, layout(&dst)?);
    let src_pages = [11u32, 0, 5, 7, 3];
    let dst_pages = [2u32, 9, 0, 11, 6];
    let offset = 3u64;
    let staged = sl.staged_bytes(src_pages.len());
    let mut stage = DeviceBuffer::new(gpu, usize::try_from(staged + offset)?)?;
    stage.copy_from_host(&vec![0xEEu8; stage.len()])?;
    let mut gather = Staging::new(gpu, sl.clone(), src_pages.len())?;
    gather.gather(&src_pages, &mut stage, offset)?.wait()?;
    let got = stage.to_host()?;
    let table = sl.table(&src_pages, staged)?;
    let mut staged_ok = 0u64;
    for (addr, off, len) in table.segments() {
        let b = sl
            .buffers()
            .iter()
            .position(|x| x.addr <= addr && addr < x.addr + x.len)
            .context("segment outside the pools")?;
        let from = (addr - sl.buffers()[b].addr) as usize;
        let at = (offset + off) as usize;
        for k in 0..len as usize {
            if got[at + k] != byte(b, from + k) {
                bail!("gather: buffer {b}, segment at {off}, byte {k} differs");
            }
        }
        staged_ok += len;
    }
    if got[..offset as usize].iter().any(|&x| x != 0xEE) {
        bail!("gather wrote before its offset");
    }
    let mut scatter = Staging::new(gpu, dl, dst_pages.len())?;
    scatter.scatter(&dst_pages, &stage, offset)?.wait()?;
    for (b, (d, &len)) in dst.iter().zip(&lens).enumerate() {
        let host = d.to_host()?;
        for p in 0..pool_pages {
            let page = &host[p * len..(p + 1) * len];
            match dst_pages.iter().position(|&x| x as usize == p) {
                Some(i) => {
                    let s = src_pages[i] as usize;
                    if (0..len).any(|k| page[k] != byte(b, s * len + k)) {
                        bail!("scatter: buffer {b}, page {p} differs");
                    }
                }
                None if page.iter().any(|&x| x != 0) => {
                    bail!("scatter wrote into page {p} of buffer {b}, not in its list")
                }
                None => {}
            }
        }
    }
    // The gather kernel alone: 64 buffers × 32 pages × 32 KiB out of 600-page pools.
    let pools: Vec<DeviceBuffer> = (0..64)
        .map(|_| DeviceBuffer::new(gpu, 600 * 32768))
        .collect::<Result<_, _>>()?;
    let big = StagingLayout::new(
        pools
            .iter()
            .map(|d| PoolBuffer {
                addr: d.addr(),
                len: d.len() as u64,
                item_len: 32768,
            })
            .collect(),
    )?;
    let pages: Vec<u32> = (0..32u32).map(|i| (1 + 97 * i) % 600).collect();
    let out = DeviceBuffer::new(gpu, 64 << 20)?;
    let mut g = Staging::new(gpu, big, pages.len())?;
    let mut held = Vec::new();
    let (mut registered, mut plain);
    let out: &mut DeviceBuffer = match (&agent, with) {
        (Some(a), WithAgent::Registered | WithAgent::Peer) => {
            for p in pools {
                held.push(a.register(p)?);
            }
            registered = a.register(out)?;
            if with == WithAgent::Peer {
                held.push(write_to_peer(a, &registered, gpu)?);
            }
            registered.buffer_mut()
        }
        _ => {
            plain = out;
            &mut plain
        }
    };
    for _ in 0..5 {
        g.gather(&pages, out, 0)?.wait()?;
    }
    let reps = 200u32;
    let t = Instant::now();
    for _ in 0..reps {
        g.gather(&pages, out, 0)?;
    }
    g.synchronize()?;
    let per = t.elapsed().as_secs_f64() / f64::from(reps);
    let mut samples = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        g.gather(&pages, out, 0)?.wait()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    // The same with the GPU left idle (the CPU spinning) before each launch, as between
    // requests, and with the enqueue (table upload, launch, event record) timed alone.
    let mut gaps = [Vec::new(), Vec::new()];
    let mut enqueue = Vec::new();
    for (k, gap) in [Duration::from_micros(300), Duration::from_millis(3)]
        .into_iter()
        .enumerate()
    {
        for _ in 0..40 {
            let idle = Instant::now();
            while idle.elapsed() < gap {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            let ev = g.gather(&pages, out, 0)?;
            enqueue.push(t.elapsed().as_secs_f64());
            ev.wait()?;
            gaps[k].push(t.elapsed().as_secs_f64());
        }
        gaps[k].sort_by(f64::total_cmp);
    }
    enqueue.sort_by(f64::total_cmp);
    let p50 = |v: &[f64]| v[v.len() / 2] * 1e6;
    Ok(json!({
        "gather_64x32x32k_after_300us_idle_p50_us": p50(&gaps[0]),
        "gather_64x32x32k_after_3ms_idle_p50_us": p50(&gaps[1]),
        "gather_64x32x32k_enqueue_p50_us": p50(&enqueue),
        "verified_bytes": staged_ok,
        "item_lengths": lens,
        "gather_64x32x32k_back_to_back_us": per * 1e6,
        "gather_64x32x32k_rw_gbps": 2.0 * 67_108_864.0 / per / 1e9,
        "gather_64x32x32k_launch_and_wait_p50_us": samples[samples.len() / 2] * 1e6,
        "with_agent": format!("{with:?}"),
    }))
}

/// A second agent of this process with a buffer as large as `src`, written once from `src`
/// over NIXL; returns the second agent's buffer (kept alive by the caller with its agent).
fn write_to_peer(
    a: &Agent,
    src: &Registered<DeviceBuffer>,
    gpu: u32,
) -> anyhow::Result<Registered<DeviceBuffer>> {
    use nixl_core::{MemType, XferDescs, XferOp};
    let b = Agent::new("kernel-check-peer", &nixl_core::AgentConfig::default())?;
    b.create_backend(
        nixl_core::BackendKind::Ucx,
        &nixl_core::BackendParams::new(),
    )?;
    let dst = b.register(DeviceBuffer::new(gpu, src.buffer().len())?)?;
    let peer = a.load_remote(b.local_metadata()?.as_bytes())?;
    let bytes = src.buffer().len() as u64;
    let mut l = XferDescs::new(MemType::Vram);
    l.push_in(&src.region(), 0, bytes);
    let mut r = XferDescs::new(MemType::Vram);
    r.push_in(&dst.region(), 0, bytes);
    let req = a.create_request(XferOp::Write, &l, &r, &peer, None)?;
    req.post()?;
    let mut seen = Vec::new();
    req.wait(Duration::from_secs(30), || {
        let _ = b.drain_notifications(&mut seen);
    })?;
    // The agent must outlive its registration; leak it for the life of this check process.
    std::mem::forget(b);
    Ok(dst)
}
