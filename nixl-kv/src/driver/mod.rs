//! The IO shell: the manager per engine rank, senders and receivers per request.
//!
//! The driver owns NIXL handles, sockets and threads, and decides nothing: each side's core
//! (`proto`) queues commands, and whoever changed the core drains the queue in order
//! (`exec.rs`). Threads: one ZeroMQ thread per manager (the prefill's PULL socket, or the decode's
//! PUSH sockets); on a prefill one inbound thread that applies decoded messages, loads peer
//! metadata and expires orphan rooms on the clock; on a decode one heartbeat thread. Transfers
//! are posted and polled on the caller's thread, as in SGLang.

mod args;
mod config;
mod exec;
mod heartbeat;
mod host_pack;
mod inbound;
mod packed_chunk;
mod probe;
mod receiver;
mod sender;
mod staged;
mod zmq;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use nixl_core::{Agent, XferRequest};
use nixl_wire::http::PrefillRegistration;
use nixl_wire::{AgentName, GpuId, RoomId};

pub use args::KvArgs;
pub use config::{
    HostPacking, ManagerConfig, RECOMMENDED_BUSY_POLL, RECOMMENDED_SLOT_MIB, RECOMMENDED_SLOTS,
    StagingConfig, TOKEN_ENV,
};
pub use receiver::KvReceiver;
pub use sender::KvSender;

use crate::error::Error;
use crate::net::bootstrap::BootstrapClient;
use crate::proto::decode::{DecodeConfig, DecodeCore, DecodeTimers};
use crate::proto::prefill::{PrefillCore, Proofs, UnclaimedRoom};

/// Which side of the disaggregation a manager serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_enums)] // There are exactly two sides.
pub enum Mode {
    /// Computes KV pages and writes them to decodes.
    Prefill,
    /// Receives KV pages.
    Decode,
}

/// How a prefill's transfers were made: from descriptor lists prepared once, or from explicit
/// per-request descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RequestPaths {
    /// Requests made by index from prepared lists.
    pub prepared: u64,
    /// Requests made from explicit descriptors.
    pub explicit: u64,
    /// Staged pieces gathered (each then goes as one WRITE).
    pub staged: u64,
    /// KV chunks copied by the direct path (one kernel each, no NIXL request).
    pub direct: u64,
    /// KV chunks of head slices sent by the packed path (gathered as whole decode pages, then
    /// WRITTEN as pages).
    pub packed: u64,
}

/// Entries a manager holds, for leak checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TableSizes {
    /// Prefill rooms.
    pub prefill_rooms: usize,
    /// Registered decode agents (prefill).
    pub peers: usize,
    /// Decode rooms.
    pub decode_rooms: usize,
    /// Cached prefill connection-pool entries (decode).
    pub pools: usize,
}

/// 32 unpredictable bytes: from the OS, else from std's randomly keyed hasher.
fn random_seed() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut seed = [0u8; 32];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    if from_os.is_err() {
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    seed
}

/// A lock that a panicking holder cannot poison for everyone else.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The prefill's IO state.
pub(crate) struct PrefillIo {
    pub(crate) core: Mutex<PrefillCore>,
    /// Signalled (with `core`) whenever a decode's message was applied.
    pub(crate) arrivals: Condvar,
    /// When the last decode message arrived (the busy-poll window of `wait_unclaimed`).
    pub(crate) activity: crate::net::busy::Activity,
    /// Prepared lists, the probe and the GPU and host executors; held while commands run, so
    /// they run in queue order.
    pub(crate) exec: Mutex<exec::Lists>,
    /// Posted requests per room, until their sender sees them end.
    pub(crate) in_flight: Mutex<HashMap<RoomId, Vec<XferRequest>>>,
    pub(crate) made_prepared: AtomicU64,
    pub(crate) made_explicit: AtomicU64,
    pub(crate) made_staged: AtomicU64,
    pub(crate) made_direct: AtomicU64,
    pub(crate) made_packed: AtomicU64,
}

/// The decode's IO state.
pub(crate) struct DecodeIo {
    /// Shared with the ZMQ thread's listener (0.5.2x), which must not hold the manager.
    pub(crate) core: Arc<Mutex<DecodeCore>>,
    /// Held while queued frames are sent, so they leave in queue order.
    pub(crate) sending: Mutex<()>,
    /// The staging ring, when the staged path is on.
    pub(crate) gpu: Option<Mutex<staged::DecodeGpu>>,
}

#[allow(clippy::large_enum_variant, reason = "one per manager, never moved")]
pub(crate) enum Role {
    Prefill(PrefillIo),
    Decode(DecodeIo),
}

pub(crate) struct Shared {
    /// Before `agent`: prepared lists and requests are released while their agent lives.
    pub(crate) role: Role,
    pub(crate) agent: Agent,
    pub(crate) config: ManagerConfig,
    pub(crate) zmq: Mutex<Option<zmq::ZmqThread>>,
    pub(crate) rank_port: u16,
    pub(crate) stop: AtomicBool,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    pub(crate) fn mode(&self) -> Mode {
        match self.role {
            Role::Prefill(_) => Mode::Prefill,
            Role::Decode(_) => Mode::Decode,
        }
    }

    pub(crate) fn prefill(&self) -> Option<&PrefillIo> {
        match &self.role {
            Role::Prefill(p) => Some(p),
            Role::Decode(_) => None,
        }
    }

    pub(crate) fn decode(&self) -> Option<&DecodeIo> {
        match &self.role {
            Role::Decode(d) => Some(d),
            Role::Prefill(_) => None,
        }
    }
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
            .field("mode", &self.shared.mode())
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
        let config = config.resolved(args.kv()[0].0.mem);
        let (inbound_tx, inbound_rx) = inbound::queue();
        let on_message = Box::new(move |frames| inbound::offer(&inbound_tx, frames));
        let (zmq, port) = zmq::ZmqThread::start(
            Some(format!("tcp://{}:0", config.local_ip)),
            on_message,
            config.busy_poll,
        )
        .map_err(Error::Zmq)?;
        let rank_port = port.ok_or_else(|| Error::Zmq("the PULL socket has no port".into()))?;
        let endpoint = crate::proto::tcp_endpoint(&config.local_ip, rank_port);
        let layout = args.layout();
        let gpu = match config.staging {
            Some(cfg) => Some(staged::PrefillGpu::new(&agent, &layout, cfg)?),
            None => None,
        };
        let host_pack = match &config.host_packing {
            Some(cfg) => Some(host_pack::HostPacker::new(&layout, cfg)?),
            None => None,
        };
        let mut core = PrefillCore::new(layout, config.orphan_timeout)
            .with_peer_idle_timeout(config.peer_idle_timeout)
            .with_proofs(Proofs {
                seed: random_seed(),
                endpoint,
                strict: config.strict_peers,
            });
        if let Some(cfg) = &config.host_packing {
            core = core.with_host_packing(cfg.area_bytes);
        }
        if let Some(cfg) = config.staging {
            core = core.with_staging(cfg.slot_bytes, cfg.slots);
            if cfg.packed {
                core = core.with_packing();
            }
            if let (true, Some(node)) = (cfg.direct, staged::node_id()) {
                core = core.with_direct(&node);
            }
        }
        let shared = Arc::new(Shared {
            role: Role::Prefill(PrefillIo {
                core: Mutex::new(core),
                arrivals: Condvar::new(),
                activity: crate::net::busy::Activity::new(),
                exec: Mutex::new(exec::Lists::new(gpu, host_pack)),
                in_flight: Mutex::default(),
                made_prepared: AtomicU64::new(0),
                made_explicit: AtomicU64::new(0),
                made_staged: AtomicU64::new(0),
                made_direct: AtomicU64::new(0),
                made_packed: AtomicU64::new(0),
            }),
            agent,
            config,
            zmq: Mutex::new(Some(zmq)),
            rank_port,
            stop: AtomicBool::new(false),
            threads: Mutex::default(),
        });
        // Our own descriptor lists, before any request.
        exec::drive_prefill(&shared);
        inbound::start(&shared, inbound_rx)?;
        let reg = PrefillRegistration {
            role: "Prefill".into(),
            tp_size: args.tp_size(),
            dp_size: args.dp_size(),
            rank_ip: shared.config.local_ip.clone(),
            rank_port,
            engine_rank: args.engine_rank(),
        };
        let client = BootstrapClient::new(bootstrap, shared.config.http_timeout)
            .with_token(shared.config.bootstrap_token.clone());
        let body = match &shared.config.sglang_pages {
            Some((page_size, dtype)) => {
                nixl_wire::http::v2x::PrefillRegistration::from_seed(&reg, *page_size, dtype)
                    .body_for_every_release(&reg)
            }
            None => nixl_wire::http::to_python_json(&reg),
        };
        register_with_retries(&client, &body)?;
        tracing::info!(port = rank_port, bootstrap, "prefill manager ready");
        Ok(Self { shared })
    }

    /// A decode manager. `agent` must have a UCX backend and the memory of `args` registered
    /// (the registration carries the agent's metadata as it is now).
    pub fn decode(agent: Agent, args: KvArgs, config: ManagerConfig) -> Result<Self, Error> {
        let config = config.resolved(args.kv()[0].0.mem);
        // The decode listens for KV_STATUS and ABORT_ACK (0.5.20 on; with a 0.5.1 prefill
        // nothing arrives, and the port is the one SGLang 0.5.1 advertises without binding). It
        // binds whatever its profile, since a prefill's bootstrap server may reveal another
        // (docs/protocol.md §10.12). The listener reaches the core only (never the manager,
        // whose last reference it must not drop on the ZMQ thread); what arrives before the
        // core exists is dropped (no room can be meant yet).
        let listener: Arc<OnceLock<Weak<Mutex<DecodeCore>>>> = Arc::new(OnceLock::new());
        let to = Arc::clone(&listener);
        let on_message = Box::new(move |frames: Vec<bytes::Bytes>| {
            if let Some(core) = to.get().and_then(Weak::upgrade) {
                lock(&core).handle_listener(&frames, Instant::now());
            }
        });
        let (zmq, port) = zmq::ZmqThread::start(
            Some(format!("tcp://{}:0", config.local_ip)),
            on_message,
            config.busy_poll,
        )
        .map_err(Error::Zmq)?;
        let rank_port = port.ok_or_else(|| Error::Zmq("the PULL listener has no port".into()))?;
        let name = agent.name().to_owned();
        let agent_name = AgentName::new(&name).map_err(|reason| Error::AgentName {
            name: name.clone(),
            reason,
        })?;
        let layout = args.layout();
        // The ring is registered before the metadata is taken, so that prefills can write it.
        let (gpu, staging, direct) = match config.staging {
            Some(cfg) => {
                let (gpu, staging, direct) = staged::DecodeGpu::new(&agent, &layout, cfg)?;
                (Some(Mutex::new(gpu)), Some(staging), direct)
            }
            None => (None, None, None),
        };
        let me = DecodeConfig {
            local_ip: config.local_ip.clone(),
            rank_port,
            agent: agent_name,
            metadata: agent.local_metadata()?.into_bytes().into(),
            kv_ptrs: layout.kv_ptrs.clone(),
            kv_item_len: layout.kv_item_lens.first().copied().unwrap_or(0),
            aux_ptrs: layout.aux_ptrs.clone(),
            gpu_id: GpuId::new(layout.gpu_id),
            engine_rank: args.engine_rank(),
            tp_per_dp: args.tp_size() / args.dp_size(),
            is_mla: args.is_mla(),
            kv_pages: layout.kv_pages,
            aux_slots: layout.aux_slots,
            staging,
            direct,
            sliced_tp: config.sliced_tp,
            profile: config.profile,
            kv_mem: match args.kv()[0].0.mem {
                nixl_core::MemType::Vram => nixl_wire::v2x::MemKind::Vram,
                _ => nixl_wire::v2x::MemKind::Dram,
            },
            sglang_pages: config.sglang_pages.clone(),
        };
        let timers = DecodeTimers::new(
            config.waiting_timeout,
            config.heartbeat_interval,
            config.heartbeat_max_failures,
        );
        let core = Arc::new(Mutex::new(DecodeCore::new(me, timers, Instant::now())));
        let _ = listener.set(Arc::downgrade(&core));
        let shared = Arc::new(Shared {
            role: Role::Decode(DecodeIo {
                core,
                sending: Mutex::new(()),
                gpu,
            }),
            agent,
            config,
            zmq: Mutex::new(Some(zmq)),
            rank_port,
            stop: AtomicBool::new(false),
            threads: Mutex::default(),
        });
        heartbeat::start(&shared)?;
        Ok(Self { shared })
    }

    /// The manager's NIXL agent.
    pub fn agent(&self) -> &Agent {
        &self.shared.agent
    }

    /// Prefill or decode.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Prefill: the port of the PULL socket. Decode: the port it advertises.
    pub fn rank_port(&self) -> u16 {
        self.shared.rank_port
    }

    /// Prefill: rooms whose decode infos arrived but that no [`KvSender`] claims yet (empty on
    /// a decode).
    pub fn unclaimed_rooms(&self) -> Vec<UnclaimedRoom> {
        self.shared
            .prefill()
            .map(|p| lock(&p.core).unclaimed())
            .unwrap_or_default()
    }

    /// Prefill: waits up to `timeout` until some room is unclaimed (see
    /// [`KvManager::unclaimed_rooms`]); returns whether one is. Returns at once when one already
    /// is, and `false` at once on a decode. A server that learns of requests from its decodes
    /// waits here instead of polling.
    pub fn wait_unclaimed(&self, timeout: std::time::Duration) -> bool {
        let Some(p) = self.shared.prefill() else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let spin = p.activity.left(self.shared.config.busy_poll).min(timeout);
        if crate::net::busy::poll_for(spin, || lock(&p.core).has_unclaimed().then_some(()))
            .is_some()
        {
            return true;
        }
        let mut core = lock(&p.core);
        loop {
            if core.has_unclaimed() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            core = p
                .arrivals
                .wait_timeout(core, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Prefill: how its transfers were made.
    pub fn request_paths(&self) -> RequestPaths {
        self.shared
            .prefill()
            .map_or_else(RequestPaths::default, |p| RequestPaths {
                prepared: p.made_prepared.load(Ordering::Relaxed),
                explicit: p.made_explicit.load(Ordering::Relaxed),
                staged: p.made_staged.load(Ordering::Relaxed),
                direct: p.made_direct.load(Ordering::Relaxed),
                packed: p.made_packed.load(Ordering::Relaxed),
            })
    }

    /// Entries held, for leak checks.
    pub fn table_sizes(&self) -> TableSizes {
        match &self.shared.role {
            Role::Prefill(p) => {
                let core = lock(&p.core);
                TableSizes {
                    prefill_rooms: core.rooms(),
                    peers: core.peers(),
                    ..TableSizes::default()
                }
            }
            Role::Decode(d) => {
                let core = lock(&d.core);
                TableSizes {
                    decode_rooms: core.rooms(),
                    pools: core.pools(),
                    ..TableSizes::default()
                }
            }
        }
    }
}

/// Attempts at a registration the server answers 409 (a rank of ours that just restarted: its
/// old process may still hold its socket for a moment).
const REGISTER_ATTEMPTS: u32 = 4;

/// Registers `body`, again after 0.5, 1 and 1.5 s while the server answers 409; a last 409 is
/// [`BootstrapError::Conflict`](crate::net::bootstrap::BootstrapError::Conflict).
fn register_with_retries(client: &BootstrapClient, body: &str) -> Result<(), Error> {
    let mut attempt = 1;
    loop {
        match client.register_body(body) {
            Err(crate::net::bootstrap::BootstrapError::Conflict { url })
                if attempt < REGISTER_ATTEMPTS =>
            {
                tracing::warn!(%url, attempt, "rank registered from another live address; retrying");
                std::thread::sleep(std::time::Duration::from_millis(500 * u64::from(attempt)));
                attempt += 1;
            }
            other => return Ok(other?),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The ZMQ thread first: its end closes the inbound queue.
        if let Some(z) = lock(&self.zmq).take() {
            drop(z);
        }
        let me = std::thread::current().id();
        for h in lock(&self.threads).drain(..) {
            h.thread().unpark();
            // The last owner can be one of these threads itself; it then just ends.
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}
