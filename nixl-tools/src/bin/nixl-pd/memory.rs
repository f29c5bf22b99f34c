//! The pools: host or GPU KV buffers and host aux buffers, registered with one agent.

use anyhow::{Context, bail};
use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Registered, SharedHostBuffer,
};
use nixl_kv::KvArgs;
use rand::RngCore;

use crate::Pool;

pub(crate) enum Kv {
    /// Host pools, shared with the manager for host packing (a prefill gathers head slices out
    /// of them while this process reads and writes other pages).
    Host(Vec<Registered<SharedHostBuffer>>),
    Gpu(Vec<Registered<nixl_core::cuda::DeviceBuffer>>),
}

impl Kv {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Host(v) => v.len(),
            Self::Gpu(v) => v.len(),
        }
    }

    pub(crate) fn regions(&self) -> Vec<nixl_core::MemRegion> {
        match self {
            Self::Host(v) => v.iter().map(|b| b.region()).collect(),
            Self::Gpu(v) => v.iter().map(|b| b.region()).collect(),
        }
    }

    /// The host pools, as the manager's host packing takes them (`None` for GPU pools).
    pub(crate) fn host_pools(&self) -> Option<Vec<SharedHostBuffer>> {
        match self {
            Self::Host(v) => Some(v.iter().map(|b| b.buffer().clone()).collect()),
            Self::Gpu(_) => None,
        }
    }

    /// Fills buffer `b` page by page with `page_fill(page, bytes)`.
    pub(crate) fn fill(
        &mut self,
        b: usize,
        page: usize,
        page_fill: impl Fn(u64, &mut [u8]),
    ) -> anyhow::Result<()> {
        let len = match self {
            Self::Host(v) => v[b].buffer().len(),
            Self::Gpu(v) => v[b].buffer().len(),
        };
        let mut host = vec![0u8; len];
        for (p, chunk) in host.chunks_mut(page).enumerate() {
            page_fill(p as u64, chunk);
        }
        self.write_at(b, 0, &host)
    }

    /// Writes `bytes` at byte `at` of buffer `b`.
    pub(crate) fn write_at(&mut self, b: usize, at: usize, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Self::Host(v) => v[b].buffer().write_at(at, bytes)?,
            Self::Gpu(v) => v[b].buffer_mut().write_at(at, bytes)?,
        }
        Ok(())
    }

    /// Page `p` of buffer `b` as host bytes.
    pub(crate) fn read_page(
        &self,
        b: usize,
        p: usize,
        page: usize,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        out.resize(page, 0);
        match self {
            Self::Host(v) => v[b].buffer().read_at(p * page, out)?,
            Self::Gpu(v) => v[b].buffer().read_at(p * page, out)?,
        }
        Ok(())
    }
}

pub(crate) struct Memory {
    pub(crate) agent: Agent,
    pub(crate) kv: Kv,
    pub(crate) aux: Vec<Registered<HostBuffer>>,
    /// Row length of each aux buffer.
    pub(crate) aux_items: Vec<u64>,
    /// Bytes of one page of one KV buffer.
    pub(crate) page: usize,
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

pub(crate) fn memory(pool: &Pool, role: &str) -> anyhow::Result<Memory> {
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
                .map(|_| Ok(agent.register(SharedHostBuffer::new(len)?)?))
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
        page: usize::try_from(pool.page_bytes)?,
    })
}

pub(crate) fn args(m: &Memory, pool: &Pool) -> anyhow::Result<KvArgs> {
    let kv = m.kv.regions().into_iter().map(|r| (r, pool.page_bytes));
    let aux = m
        .aux
        .iter()
        .map(|b| b.region())
        .zip(m.aux_items.iter().copied());
    let mut args = KvArgs::new(kv, aux)?
        .parallel(pool.tp_rank, pool.tp_size, 1)?
        .mla(pool.mla);
    if let Some((heads, _)) = pool.head_layout()? {
        args = args.heads(heads as u32, pool.page_tokens);
    }
    Ok(args)
}

impl crate::sentinel::Target for Memory {
    fn kv_buffers(&self) -> usize {
        self.kv.len()
    }

    fn aux_buffers(&self) -> usize {
        self.aux.len()
    }

    fn fill_kv_buffer(&mut self, b: usize, byte: &dyn Fn(u32) -> u8) -> anyhow::Result<()> {
        self.kv
            .fill(b, self.page, |p, bytes| bytes.fill(byte(p as u32)))
    }

    fn fill_kv_page(&mut self, b: usize, p: u32, byte: u8) -> anyhow::Result<()> {
        let (page, at) = (self.page, p as usize * self.page);
        self.kv.write_at(b, at, &vec![byte; page])
    }

    fn kv_page_differs(
        &self,
        b: usize,
        p: u32,
        byte: u8,
        scratch: &mut Vec<u8>,
    ) -> anyhow::Result<Option<(usize, u8)>> {
        self.kv.read_page(b, p as usize, self.page, scratch)?;
        Ok(scratch
            .iter()
            .position(|&x| x != byte)
            .map(|j| (j, scratch[j])))
    }

    fn aux_row(&self, k: usize, slot: u32) -> &[u8] {
        let item = self.aux_items[k] as usize;
        &self.aux[k].buffer().as_slice()[slot as usize * item..(slot as usize + 1) * item]
    }

    fn aux_row_mut(&mut self, k: usize, slot: u32) -> &mut [u8] {
        let item = self.aux_items[k] as usize;
        &mut self.aux[k].buffer_mut().as_mut_slice()
            [slot as usize * item..(slot as usize + 1) * item]
    }
}
