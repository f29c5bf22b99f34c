//! One side of a benchmark transfer: an agent, its buffers (GPU or pinned host memory), the
//! descriptor layout both sides derive from the same parameters, and the target process loop.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use nixl_core::cuda::{DeviceBuffer, PinnedBuffer};
use nixl_core::staging::{PoolBuffer, StagingLayout};
use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, MemRegion, MemType, Registered,
    UcxErrorMode, XferDescs,
};
use nixl_testkit::pattern;

/// Which memory a side's buffers live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MemKind {
    Vram,
    Pinned,
    /// Ordinary page-aligned host memory (needs no GPU; for trying the program out).
    Host,
}

impl MemKind {
    pub(crate) fn nixl(self) -> MemType {
        match self {
            Self::Vram => MemType::Vram,
            Self::Pinned | Self::Host => MemType::Dram,
        }
    }
}

/// `buffers` buffers of `pool_pages` blocks; a transfer moves `per_buffer` blocks of each.
/// Block i of buffer b goes from source block `(1 + 97 i) mod P` (as the `pd` prefill picks its
/// pages) to a destination block (see [`Layout::dst_block`]): distinct, never merged into runs.
#[derive(Clone, Copy, Debug, clap::Args)]
pub(crate) struct Layout {
    #[arg(long, default_value_t = 1)]
    pub(crate) buffers: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) pool_pages: usize,
    #[arg(long)]
    pub(crate) block: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) per_buffer: usize,
    /// Destination blocks come in runs of this many consecutive blocks (the `pd` decode's
    /// allocator hands out runs of 1 to 8 pages); sources stay scattered, so runs never merge.
    #[arg(long, default_value_t = 1)]
    pub(crate) dst_run: usize,
}

impl Layout {
    pub(crate) fn buffer_len(&self) -> usize {
        self.pool_pages * self.block
    }

    pub(crate) fn descs(&self) -> usize {
        self.buffers * self.per_buffer
    }

    pub(crate) fn bytes(&self) -> u64 {
        (self.descs() * self.block) as u64
    }

    /// The destination block of the i-th block of a buffer: run `i / r` goes to run slot
    /// `(5 + 31 k) mod (P / r)`, distinct while the slot count is coprime with 31.
    fn dst_block(&self, i: usize) -> usize {
        let r = self.dst_run.max(1);
        let slots = (self.pool_pages / r).max(1);
        ((5 + 31 * (i / r)) % slots) * r + i % r
    }

    /// The page (block) indices moved in every buffer: the sources, or the destinations.
    pub(crate) fn pages(&self, source: bool) -> Vec<u32> {
        let p = self.pool_pages.max(1);
        (0..self.per_buffer)
            .map(|i| {
                let page = match (p, source) {
                    (1, _) => 0,
                    (_, true) => (1 + 97 * i) % p,
                    (_, false) => self.dst_block(i),
                };
                page as u32
            })
            .collect()
    }

    /// `(buffer, source offset, destination offset)` of every block moved.
    pub(crate) fn pairs(&self) -> Vec<(usize, u64, u64)> {
        let p = self.pool_pages.max(1);
        let mut out = Vec::with_capacity(self.descs());
        for b in 0..self.buffers {
            for i in 0..self.per_buffer {
                let s = if p == 1 { 0 } else { (1 + 97 * i) % p };
                let d = if p == 1 { 0 } else { self.dst_block(i) };
                out.push((b, (s * self.block) as u64, (d * self.block) as u64));
            }
        }
        out
    }

    /// Every block of every buffer, buffer-major (for lists prepared once).
    pub(crate) fn pool_descs(&self, regions: &[MemRegion], mem: MemType) -> XferDescs {
        let mut d = XferDescs::with_capacity(mem, self.buffers * self.pool_pages);
        for r in regions.iter().take(self.buffers) {
            for p in 0..self.pool_pages {
                d.push_in(r, (p * self.block) as u64, self.block as u64);
            }
        }
        d
    }

    /// The indices of every transfer block in [`Layout::pool_descs`]: sources, destinations.
    pub(crate) fn pool_indices(&self) -> anyhow::Result<(Vec<i32>, Vec<i32>)> {
        let idx =
            |b: usize, off: u64| i32::try_from(b * self.pool_pages + off as usize / self.block);
        let mut src = Vec::with_capacity(self.descs());
        let mut dst = Vec::with_capacity(self.descs());
        for (b, s, d) in self.pairs() {
            src.push(idx(b, s)?);
            dst.push(idx(b, d)?);
        }
        Ok((src, dst))
    }

    /// Descriptor lists over `regions`: the source offsets, or the destination offsets.
    pub(crate) fn xfer_descs(
        &self,
        regions: &[MemRegion],
        mem: MemType,
        source: bool,
    ) -> XferDescs {
        let mut d = XferDescs::new(mem);
        for (b, s, t) in self.pairs() {
            d.push_in(&regions[b], if source { s } else { t }, self.block as u64);
        }
        d
    }
}

/// The pattern of buffer `b`.
fn seed(b: usize) -> u64 {
    100 + b as u64
}

pub(crate) enum Mem {
    Vram(Vec<Registered<DeviceBuffer>>),
    Pinned(Vec<Registered<PinnedBuffer>>),
    Host(Vec<Registered<HostBuffer>>),
}

impl Mem {
    pub(crate) fn regions(&self) -> Vec<MemRegion> {
        match self {
            Self::Vram(v) => v.iter().map(Registered::region).collect(),
            Self::Pinned(v) => v.iter().map(Registered::region).collect(),
            Self::Host(v) => v.iter().map(Registered::region).collect(),
        }
    }

    fn write(&mut self, b: usize, off: usize, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Self::Vram(v) => v[b].buffer_mut().write_at(off, bytes)?,
            Self::Pinned(v) => {
                v[b].buffer_mut().as_mut_slice()[off..off + bytes.len()].copy_from_slice(bytes)
            }
            Self::Host(v) => {
                v[b].buffer_mut().as_mut_slice()[off..off + bytes.len()].copy_from_slice(bytes)
            }
        }
        Ok(())
    }

    fn read(&self, b: usize, off: usize, out: &mut [u8]) -> anyhow::Result<()> {
        match self {
            Self::Vram(v) => v[b].buffer().read_at(off, out)?,
            Self::Pinned(v) => out.copy_from_slice(&v[b].buffer().as_slice()[off..off + out.len()]),
            Self::Host(v) => out.copy_from_slice(&v[b].buffer().as_slice()[off..off + out.len()]),
        }
        Ok(())
    }
}

/// An agent with its buffers.
pub(crate) struct Side {
    pub(crate) agent: Agent,
    pub(crate) mem: Mem,
    pub(crate) layout: Layout,
}

impl Side {
    pub(crate) fn new(name: &str, kind: MemKind, gpu: u32, layout: Layout) -> anyhow::Result<Self> {
        Self::with_params(
            name,
            kind,
            gpu,
            layout,
            &BackendParams::ucx(UcxErrorMode::None),
        )
    }

    /// A side whose UCX backend gets `params` (e.g. NIXL-only tuning on an initiator).
    pub(crate) fn with_params(
        name: &str,
        kind: MemKind,
        gpu: u32,
        layout: Layout,
        params: &BackendParams,
    ) -> anyhow::Result<Self> {
        let agent = Agent::new(name, &AgentConfig::default())?;
        agent.create_backend(BackendKind::Ucx, params)?;
        let len = layout.buffer_len();
        let mem = match kind {
            MemKind::Vram => Mem::Vram(
                (0..layout.buffers)
                    .map(|_| Ok(agent.register(DeviceBuffer::new(gpu, len)?)?))
                    .collect::<anyhow::Result<_>>()?,
            ),
            MemKind::Pinned => Mem::Pinned(
                (0..layout.buffers)
                    .map(|_| Ok(agent.register(PinnedBuffer::new(gpu, len)?)?))
                    .collect::<anyhow::Result<_>>()?,
            ),
            MemKind::Host => Mem::Host(
                (0..layout.buffers)
                    .map(|_| Ok(agent.register(HostBuffer::new(len)?)?))
                    .collect::<anyhow::Result<_>>()?,
            ),
        };
        Ok(Self { agent, mem, layout })
    }

    /// The pools as the staging kernels see them (VRAM sides only).
    pub(crate) fn pool_layout(&self) -> anyhow::Result<StagingLayout> {
        let Mem::Vram(_) = &self.mem else {
            bail!("staging needs VRAM pools");
        };
        let buffers = self
            .mem
            .regions()
            .iter()
            .map(|r| PoolBuffer {
                addr: r.addr,
                len: r.len,
                item_len: self.layout.block as u64,
            })
            .collect();
        Ok(StagingLayout::new(buffers)?)
    }

    /// Writes the pattern into every source block.
    pub(crate) fn fill_sources(&mut self) -> anyhow::Result<()> {
        let mut page = vec![0u8; self.layout.block];
        for (b, s, _) in self.layout.pairs() {
            for (j, x) in page.iter_mut().enumerate() {
                *x = pattern::byte(seed(b), s as usize + j);
            }
            self.mem.write(b, s as usize, &page)?;
        }
        Ok(())
    }

    /// Zeroes every destination block, so that the next series is verified on its own.
    pub(crate) fn clear_destinations(&mut self) -> anyhow::Result<()> {
        let zeros = vec![0u8; self.layout.block];
        for (b, _, d) in self.layout.pairs() {
            self.mem.write(b, d as usize, &zeros)?;
        }
        Ok(())
    }

    /// Checks every destination block against its source's pattern.
    pub(crate) fn verify_destinations(&self) -> anyhow::Result<()> {
        let mut page = vec![0u8; self.layout.block];
        for (b, s, d) in self.layout.pairs() {
            self.mem.read(b, d as usize, &mut page)?;
            if let Some(j) =
                (0..page.len()).find(|&j| page[j] != pattern::byte(seed(b), s as usize + j))
            {
                bail!("buffer {b}: block at {d} differs at byte {j}");
            }
        }
        Ok(())
    }
}

/// The target process: prints `READY name hex-metadata addr,addr,...`, progresses its agent,
/// and answers `FILL`, `VERIFY`, `CLEAR` and `QUIT` on stdin.
pub(crate) fn serve(kind: MemKind, gpu: u32, layout: Layout) -> anyhow::Result<()> {
    let name = format!("gpubench-target-{}", std::process::id());
    let mut side = Side::new(&name, kind, gpu, layout)?;
    let md = side.agent.local_metadata()?;
    let addrs: Vec<String> = side
        .mem
        .regions()
        .iter()
        .map(|r| r.addr.to_string())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let staged: Arc<Mutex<Option<crate::staged::TargetStaging>>> = Arc::new(Mutex::new(None));
    let progress = {
        let (agent, stop, staged) = (side.agent.clone(), Arc::clone(&stop), Arc::clone(&staged));
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if agent.drain_notifications(&mut seen).is_err() {
                    return;
                }
                let mut guard = staged.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(st) = guard.as_mut() {
                    for n in seen.drain(..) {
                        st.on_notification(&agent, &n);
                    }
                    drop(guard);
                    std::thread::yield_now();
                    continue;
                }
                drop(guard);
                seen.clear();
                std::thread::sleep(Duration::from_micros(20));
            }
        })
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "READY {name} {} {}",
        nixl_testkit::hex(md.as_bytes()),
        addrs.join(",")
    )?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let reply = match line?.trim() {
            "FILL" => side.fill_sources().map(|()| "OK".to_owned()),
            "VERIFY" => side.verify_destinations().map(|()| "OK".to_owned()),
            "CLEAR" => side.clear_destinations().map(|()| "OK".to_owned()),
            cmd if cmd.starts_with("STAGED ") => {
                crate::staged::TargetStaging::start(&side, gpu, &cmd[7..]).map(|st| {
                    // Fresh metadata: it now names the staging buffer too.
                    let md = side
                        .agent
                        .local_metadata()
                        .map(|m| nixl_testkit::hex(m.as_bytes()));
                    let reply = format!("OK {} {}", st.staging_addr(), md.unwrap_or_default());
                    *staged.lock().unwrap_or_else(PoisonError::into_inner) = Some(st);
                    reply
                })
            }
            "QUIT" => break,
            other => Ok(format!("ERR unknown command {other}")),
        }
        .unwrap_or_else(|e| format!("BAD {e:#}"));
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    stop.store(true, Ordering::Relaxed);
    progress.join().ok().context("progress thread panicked")?;
    Ok(())
}
