//! The IO shell: the manager per engine rank, senders and receivers per request.
//!
//! Threads: one ZeroMQ thread per manager (the prefill's PULL socket, or the decode's PUSH
//! sockets), one heartbeat thread per decode manager, one bootstrap-server thread where a
//! prefill starts one. Transfers are posted and polled on the caller's thread, as in SGLang.

mod config;
mod heartbeat;
mod prepared;
mod receiver;
mod sender;
mod zmq;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use nixl_core::{Agent, MemRegion, MemType};
use nixl_wire::PrefillInbound;
use nixl_wire::http::PrefillRegistration;

pub use config::ManagerConfig;
pub use receiver::KvReceiver;
pub use sender::KvSender;

use crate::bootstrap::BootstrapClient;
use crate::proto::Layout;
use crate::proto::decode::DecodeCore;
use crate::proto::prefill::{Command, PrefillCore};

/// Which side of the disaggregation a manager serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_enums)] // There are exactly two sides.
pub enum Mode {
    /// Computes KV pages and writes them to decodes.
    Prefill,
    /// Receives KV pages.
    Decode,
}

/// SGLang's KVArgs: the engine rank's memory (already registered on the manager's agent by the
/// caller) and its parallel layout.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KvArgs {
    /// The TP rank (prefill: global; decode: inside its attention-TP group).
    pub engine_rank: u32,
    /// KV buffers in SGLang's order (K of every layer, then V; one per layer for MLA).
    pub kv: Vec<MemRegion>,
    /// Bytes of one page of each KV buffer.
    pub kv_item_lens: Vec<u64>,
    /// Aux (metadata) buffers.
    pub aux: Vec<MemRegion>,
    /// Bytes of one row of each aux buffer.
    pub aux_item_lens: Vec<u64>,
    /// The GPU (CUDA ordinal; 0 for host memory).
    pub gpu_id: u32,
    /// Whether the model uses MLA (one latent buffer per layer, replicated across TP).
    pub is_mla: bool,
    /// The server's TP size.
    pub tp_size: u32,
    /// The server's DP size.
    pub dp_size: u32,
}

impl KvArgs {
    /// Args for one engine rank; set the parallel sizes with [`KvArgs::parallel`].
    pub fn new(
        kv: Vec<MemRegion>,
        kv_item_lens: Vec<u64>,
        aux: Vec<MemRegion>,
        aux_item_lens: Vec<u64>,
    ) -> Self {
        let gpu_id = kv
            .first()
            .filter(|r| r.mem == MemType::Vram)
            .map_or(0, |r| r.dev as u32);
        Self {
            engine_rank: 0,
            kv,
            kv_item_lens,
            aux,
            aux_item_lens,
            gpu_id,
            is_mla: false,
            tp_size: 1,
            dp_size: 1,
        }
    }

    /// Sets the engine rank and the TP/DP sizes.
    #[must_use]
    pub fn parallel(mut self, engine_rank: u32, tp_size: u32, dp_size: u32) -> Self {
        self.engine_rank = engine_rank;
        self.tp_size = tp_size.max(1);
        self.dp_size = dp_size.max(1);
        self
    }

    /// Marks the model as MLA.
    #[must_use]
    pub fn mla(mut self, is_mla: bool) -> Self {
        self.is_mla = is_mla;
        self
    }

    fn layout(&self) -> Result<Layout, String> {
        if self.kv.len() != self.kv_item_lens.len() || self.aux.len() != self.aux_item_lens.len() {
            return Err("one item length per buffer is needed".into());
        }
        let pages = |r: &MemRegion, item: u64| r.len.checked_div(item).unwrap_or(0);
        let kv_pages = self
            .kv
            .iter()
            .zip(&self.kv_item_lens)
            .map(|(r, &i)| pages(r, i))
            .min()
            .unwrap_or(0);
        let slots = self
            .aux
            .iter()
            .zip(&self.aux_item_lens)
            .map(|(r, &i)| pages(r, i))
            .min()
            .unwrap_or(0);
        Ok(Layout {
            kv_ptrs: self.kv.iter().map(|r| r.addr).collect(),
            kv_item_lens: self.kv_item_lens.clone(),
            kv_pages: u32::try_from(kv_pages).unwrap_or(u32::MAX),
            aux_ptrs: self.aux.iter().map(|r| r.addr).collect(),
            aux_item_lens: self.aux_item_lens.clone(),
            aux_slots: u32::try_from(slots).unwrap_or(u32::MAX),
            gpu_id: self.gpu_id,
        })
    }

    fn kv_mem(&self) -> MemType {
        self.kv.first().map_or(MemType::Dram, |r| r.mem)
    }
}

/// Errors creating a manager. Per-request problems are `Failed` states, not errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A NIXL call failed.
    #[error(transparent)]
    Core(#[from] nixl_core::Error),
    /// The arguments do not describe a usable layout.
    #[error("invalid KV arguments: {0}")]
    Args(String),
    /// ZeroMQ could not start.
    #[error("zmq: {0}")]
    Zmq(String),
    /// The bootstrap server refused or is unreachable.
    #[error(transparent)]
    Bootstrap(#[from] crate::bootstrap::BootstrapError),
}

pub(crate) struct Shared {
    pub(crate) mode: Mode,
    pub(crate) agent: Agent,
    pub(crate) args: KvArgs,
    pub(crate) config: ManagerConfig,
    pub(crate) kv_mem: MemType,
    pub(crate) prefill: Mutex<PrefillCore>,
    pub(crate) decode: Mutex<DecodeCore>,
    pub(crate) zmq: Mutex<Option<zmq::ZmqThread>>,
    pub(crate) rank_port: u16,
    /// Decode: prefill (tp, dp) per bootstrap address.
    pub(crate) parallel: Mutex<HashMap<String, (u32, u32)>>,
    /// Decode: targets per connection-pool key `{addr}_{dp}_{real rank}`.
    pub(crate) pools: Mutex<HashMap<String, Vec<receiver::Target>>>,
    pub(crate) prepared: Mutex<prepared::PreparedLists>,
    /// Requests made from prepared lists / from per-request lists.
    pub(crate) made_prepared: std::sync::atomic::AtomicU64,
    pub(crate) made_per_request: std::sync::atomic::AtomicU64,
    pub(crate) stop: AtomicBool,
    pub(crate) heartbeat: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// One engine rank's transfer manager. Cheap to clone; threads stop when the last clone, sender
/// and receiver are gone.
#[derive(Clone)]
pub struct KvManager {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for KvManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvManager")
            .field("mode", &self.shared.mode)
            .field("agent", &self.shared.agent.name())
            .field("rank_port", &self.shared.rank_port)
            .finish()
    }
}

impl KvManager {
    /// A prefill manager: binds its PULL socket on `config.local_ip` and registers with the
    /// bootstrap server at `bootstrap` (`host:port`). `agent` must have a UCX backend and the
    /// memory of `args` registered.
    pub fn prefill(
        agent: Agent,
        args: KvArgs,
        bootstrap: &str,
        config: ManagerConfig,
    ) -> Result<Self, Error> {
        let layout = args.layout().map_err(Error::Args)?;
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            let weak = weak.clone();
            let on_message = Box::new(move |frames: Vec<Bytes>| {
                if let Some(s) = weak.upgrade() {
                    handle_inbound(&s, &frames);
                }
            });
            let started =
                zmq::ZmqThread::start(Some(format!("tcp://{}:0", config.local_ip)), on_message);
            let (zmq, port) = match started {
                Ok((z, p)) => (Some(z), p.unwrap_or(0)),
                Err(e) => {
                    tracing::error!(error = %e, "zmq thread failed to start");
                    (None, 0)
                }
            };
            shared_new(Mode::Prefill, agent, args, config, layout, zmq, port)
        });
        if shared.zmq.lock().map(|z| z.is_none()).unwrap_or(true) {
            return Err(Error::Zmq("could not bind the PULL socket".into()));
        }
        let reg = PrefillRegistration {
            role: "Prefill".into(),
            tp_size: shared.args.tp_size,
            dp_size: shared.args.dp_size,
            rank_ip: shared.config.local_ip.clone(),
            rank_port: shared.rank_port,
            engine_rank: shared.args.engine_rank,
        };
        BootstrapClient::new(bootstrap, shared.config.http_timeout).register(&reg)?;
        tracing::info!(port = shared.rank_port, bootstrap, "prefill manager ready");
        Ok(Self { shared })
    }

    /// A decode manager. `agent` must have a UCX backend and the memory of `args` registered.
    pub fn decode(agent: Agent, args: KvArgs, config: ManagerConfig) -> Result<Self, Error> {
        let layout = args.layout().map_err(Error::Args)?;
        let (zmq, _) = zmq::ZmqThread::start(None, Box::new(|_| {})).map_err(Error::Zmq)?;
        // SGLang advertises a port it never binds; so do we (a free one, for fidelity).
        let port = std::net::TcpListener::bind((config.local_ip.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map_or(0, |a| a.port());
        let shared = Arc::new(shared_new(
            Mode::Decode,
            agent,
            args,
            config,
            layout,
            Some(zmq),
            port,
        ));
        heartbeat::start(&shared);
        Ok(Self { shared })
    }

    /// The manager's NIXL agent.
    pub fn agent(&self) -> &Agent {
        &self.shared.agent
    }

    /// Prefill: the port of the PULL socket.
    pub fn rank_port(&self) -> u16 {
        self.shared.rank_port
    }

    /// Prefill: rooms whose decode infos arrived but that no [`KvSender`] claims yet, with the
    /// page count the decode asked for (room, pages).
    pub fn unclaimed_rooms(&self) -> Vec<(u64, u32)> {
        let core = self
            .shared
            .prefill
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        core.unclaimed()
            .into_iter()
            .map(|(r, n)| (r.get(), n))
            .collect()
    }

    /// Prefill: transfers made from prepared descriptor lists, and from per-request lists.
    pub fn request_paths(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.made_prepared.load(Relaxed),
            self.shared.made_per_request.load(Relaxed),
        )
    }

    /// Rooms and peers held, for leak checks: (prefill rooms, decode rooms, prefill peers).
    pub fn table_sizes(&self) -> (usize, usize, usize) {
        let p = self
            .shared
            .prefill
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let d = self.shared.decode.lock().unwrap_or_else(|e| e.into_inner());
        (p.rooms(), d.rooms(), p.peers())
    }
}

fn shared_new(
    mode: Mode,
    agent: Agent,
    args: KvArgs,
    config: ManagerConfig,
    layout: Layout,
    zmq: Option<zmq::ZmqThread>,
    rank_port: u16,
) -> Shared {
    let kv_mem = args.kv_mem();
    Shared {
        mode,
        agent,
        args,
        prefill: Mutex::new(PrefillCore::new(layout, config.orphan_timeout)),
        decode: Mutex::new(DecodeCore::new(config.waiting_timeout)),
        config,
        kv_mem,
        zmq: Mutex::new(zmq),
        rank_port,
        parallel: Mutex::default(),
        pools: Mutex::default(),
        prepared: Mutex::default(),
        made_prepared: Default::default(),
        made_per_request: Default::default(),
        stop: AtomicBool::new(false),
        heartbeat: Mutex::new(None),
    }
}

/// A frame set from a decode: decode, apply, load metadata. Malformed input is logged and
/// dropped; the listener keeps serving.
fn handle_inbound(s: &Shared, frames: &[Bytes]) {
    let msg = match PrefillInbound::decode(frames) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "malformed message from a decode; dropped");
            return;
        }
    };
    let cmd = {
        let mut core = s.prefill.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        core.handle_timeout(now);
        core.handle_inbound(msg, now)
    };
    if let Some(Command::LoadRemote { agent, metadata }) = cmd {
        let ok = match s.agent.load_remote(&metadata) {
            Ok(name) if name == agent.as_str() => true,
            Ok(name) => {
                tracing::warn!(claimed = %agent, actual = %name, "decode metadata names another agent");
                // Forget what was just loaded, unless it belongs to a registered decode (a hostile
                // message must not disconnect a legitimate peer).
                let known = nixl_wire::AgentName::new(&name)
                    .map(|n| {
                        s.prefill
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .has_peer(&n)
                    })
                    .unwrap_or(false);
                if !known {
                    let _ = s.agent.invalidate_remote(&name);
                }
                false
            }
            Err(e) => {
                tracing::warn!(agent = %agent, error = %e, "cannot load decode metadata");
                false
            }
        };
        s.prefill
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remote_loaded(&agent, ok);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.heartbeat.lock().ok().and_then(|mut h| h.take()) {
            h.thread().unpark();
            let _ = h.join();
        }
        if let Ok(mut z) = self.zmq.lock() {
            drop(z.take());
        }
    }
}

/// Sends raw frames to a ZMQ endpoint from a throw-away socket (for tests of malformed input).
#[doc(hidden)]
pub fn send_raw_for_tests(endpoint: &str, frames: Vec<Vec<u8>>) -> Result<(), String> {
    let (z, _) = zmq::ZmqThread::start(None, Box::new(|_| {}))?;
    z.send(endpoint, frames.into_iter().map(Bytes::from).collect())
}
