//! Agents: the NIXL endpoint that owns backends, registrations and transfers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::backend::{Backend, BackendKind, BackendParams};
use crate::desc::XferDescs;
use crate::emulation::{self, EmulationRisk, PeerPlace, TransferShape, UcxEnv};
use crate::error::{Error, Op};
use crate::mem::{BorrowedRegistration, MemRegion, MemType, NixlBuffer, Registered, Registration};
use crate::metadata::AgentMetadata;
use crate::notif::Notification;
use crate::sys::{self, check};
use crate::xfer::{PreparedDescs, XferOp, XferRequest};

/// How NIXL serialises calls on one agent internally.
///
/// `None` (no locking) is deliberately not offered: [`Agent`] is `Sync`, and nixl-sys lets
/// request creation run concurrently, which needs NIXL's own locking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ThreadSync {
    /// Reader-writer locking: concurrent request creation, exclusive everything else.
    #[default]
    Rw,
    /// One lock for everything.
    Strict,
}

/// Agent configuration: `Default` plus chained setters.
///
/// The default has **no progress thread**: on small machines NIXL's default thread (spinning with
/// no delay) costs a core and made transfers 3-10× slower (docs/runtime.md §2). Without it, every agent
/// taking part in a transfer must be progressed by someone: the initiator by polling
/// [`XferRequest::status`], the target by draining [`Agent::notifications`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentConfig {
    /// `Some(delay)` runs NIXL's progress thread, sleeping `delay` between rounds.
    pub progress_thread: Option<Duration>,
    /// NIXL's internal locking.
    pub thread_sync: ThreadSync,
    /// UCX workers per backend.
    pub num_workers: u32,
    /// Whether NIXL records per-transfer telemetry.
    pub capture_telemetry: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            progress_thread: None,
            thread_sync: ThreadSync::Rw,
            num_workers: 1,
            capture_telemetry: false,
        }
    }
}

impl AgentConfig {
    /// Runs NIXL's progress thread with `delay` between rounds (`None`: no thread).
    #[must_use]
    pub fn progress_thread(mut self, delay: Option<Duration>) -> Self {
        self.progress_thread = delay;
        self
    }

    /// Sets NIXL's internal locking.
    #[must_use]
    pub fn thread_sync(mut self, sync: ThreadSync) -> Self {
        self.thread_sync = sync;
        self
    }

    /// Sets the number of UCX workers.
    #[must_use]
    pub fn num_workers(mut self, n: u32) -> Self {
        self.num_workers = n;
        self
    }

    fn to_sys(&self) -> nixl_sys::AgentConfig {
        let delay = self
            .progress_thread
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        nixl_sys::AgentConfig {
            enable_prog_thread: self.progress_thread.is_some(),
            enable_listen_thread: false,
            listen_port: nixl_sys::DEFAULT_COMM_PORT,
            thread_sync: match self.thread_sync {
                ThreadSync::Rw => nixl_sys::ThreadSync::Rw,
                ThreadSync::Strict => nixl_sys::ThreadSync::Strict,
            },
            num_workers: self.num_workers,
            pthr_delay_us: delay,
            lthr_delay_us: 100_000,
            capture_telemetry: self.capture_telemetry,
        }
    }
}

/// A NIXL agent.
///
/// Cheap to clone (clones share one agent); `Send + Sync`. The agent lives until its last clone,
/// registration and request are dropped.
#[derive(Debug, Clone)]
pub struct Agent {
    pub(crate) inner: nixl_sys::Agent,
    name: Arc<str>,
    facts: Arc<Facts>,
}

/// What the agent knows about itself for emulation warnings.
#[derive(Debug)]
struct Facts {
    /// Whether a UCX backend was created in peer error mode (NIXL's default).
    ucx_peer_mode: AtomicBool,
    /// Transfer shapes already warned about (hashes of shape and peer).
    warned: Mutex<HashSet<u64>>,
    /// Keeps the agent's name in [`LIVE_AGENTS`] while any clone lives.
    _live: LiveName,
}

/// Names of the agents alive in this process, with counts (names may repeat).
static LIVE_AGENTS: Mutex<Option<HashMap<Arc<str>, usize>>> = Mutex::new(None);

#[derive(Debug)]
struct LiveName(Arc<str>);

impl LiveName {
    fn new(name: Arc<str>) -> Self {
        let mut live = LIVE_AGENTS.lock().unwrap_or_else(PoisonError::into_inner);
        *live
            .get_or_insert_with(HashMap::new)
            .entry(Arc::clone(&name))
            .or_insert(0) += 1;
        Self(name)
    }

    fn is_live(name: &str) -> bool {
        let live = LIVE_AGENTS.lock().unwrap_or_else(PoisonError::into_inner);
        live.as_ref().is_some_and(|m| m.contains_key(name))
    }
}

impl Drop for LiveName {
    fn drop(&mut self) {
        let mut live = LIVE_AGENTS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = live.as_mut()
            && let Some(n) = map.get_mut(&self.0)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.0);
            }
        }
    }
}

impl Agent {
    /// Creates an agent named `name`, loading the NIXL runtime first if needed.
    ///
    /// Peers address the agent by its name, so it must be unique among the agents that meet.
    pub fn new(name: &str, config: &AgentConfig) -> Result<Self, Error> {
        validate_name(name)?;
        crate::runtime::ensure_loaded()?;
        let inner = check(
            Op::CreateAgent,
            nixl_sys::Agent::new_configured(name, &config.to_sys()),
        )?;
        tracing::debug!(agent = name, "created NIXL agent");
        let name: Arc<str> = name.into();
        Ok(Self {
            inner,
            facts: Arc::new(Facts {
                ucx_peer_mode: AtomicBool::new(false),
                warned: Mutex::new(HashSet::new()),
                _live: LiveName::new(Arc::clone(&name)),
            }),
            name,
        })
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugins installed with the runtime (e.g. `UCX`, `POSIX`, `OBJ`).
    pub fn plugins(&self) -> Result<Vec<String>, Error> {
        let list = check(Op::QueryPlugins, self.inner.get_available_plugins())?;
        list.iter()
            .map(|r| check(Op::QueryPlugins, r.map(str::to_owned)))
            .collect()
    }

    /// The default parameters of a plugin.
    pub fn plugin_params(&self, kind: &BackendKind) -> Result<BackendParams, Error> {
        let (_mems, params) = check(
            Op::QueryPlugins,
            self.inner.get_plugin_params(kind.plugin_name()),
        )?;
        let iter = check(Op::QueryPlugins, params.iter())?;
        let mut out = BackendParams::new();
        for pair in iter {
            let pair = check(Op::QueryPlugins, pair)?;
            out.set(pair.0, pair.1);
        }
        Ok(out)
    }

    /// Creates a backend from a plugin with `params` (empty: the plugin's defaults).
    pub fn create_backend(
        &self,
        kind: BackendKind,
        params: &BackendParams,
    ) -> Result<Backend, Error> {
        let sys_params = check(Op::CreateBackend, nixl_sys::Params::from(params.iter()))?;
        let create = || {
            check(
                Op::CreateBackend,
                self.inner.create_backend(kind.plugin_name(), &sys_params),
            )
        };
        let inner = match params.sgl() {
            // NIXL reads the variable in the UCX engine's constructor (docs/runtime.md §6).
            Some(on) if kind == BackendKind::Ucx => sys::with_env(
                crate::backend::UCX_SGL_ENV,
                if on { "y" } else { "n" },
                create,
            )?,
            _ => create()?,
        };
        tracing::debug!(agent = %self.name, backend = %kind, "created NIXL backend");
        if kind == BackendKind::Ucx && params.value("ucx_error_handling_mode") != Some("none") {
            self.facts.ucx_peer_mode.store(true, Ordering::Relaxed);
        }
        Ok(Backend {
            kind,
            inner: Arc::new(inner),
        })
    }

    /// Registers `buffer` with every backend that supports its memory type.
    pub fn register<B: NixlBuffer>(&self, buffer: B) -> Result<Registered<B>, Error> {
        sys::register_owned(self, buffer)
    }

    /// Registers `buf` (host memory) for as long as the returned guard lives.
    ///
    /// Safe because the guard holds the exclusive borrow: nothing else can read, write, move or
    /// free the slice until the registration is gone, so transfers may write into it freely.
    pub fn register_slice_mut<'a>(
        &self,
        buf: &'a mut [u8],
    ) -> Result<BorrowedRegistration<'a>, Error> {
        sys::register_borrowed(self, buf)
    }

    /// Registers memory that the caller owns and keeps alive.
    ///
    /// # Safety
    ///
    /// Until the returned [`Registration`] is dropped:
    /// - `[region.addr, region.addr + region.len)` must stay allocated and must not move;
    /// - for [`MemType::Dram`] it must be host memory of this process, for [`MemType::Vram`] device
    ///   memory of the CUDA device `region.dev`;
    /// - nothing else may rely on the contents staying unchanged: peers may write into the region
    ///   at any time, outside Rust's aliasing rules.
    #[allow(
        unsafe_code,
        unsafe_op_in_unsafe_fn,
        reason = "a wrapper that forwards its contract, unchanged, to the sys primitive"
    )]
    pub unsafe fn register_raw(&self, region: MemRegion) -> Result<Registration, Error> {
        sys::register_raw(self, region)
    }

    /// This agent's metadata, for a peer to load with [`Agent::load_remote`].
    pub fn local_metadata(&self) -> Result<AgentMetadata, Error> {
        check(Op::LocalMetadata, self.inner.get_local_md()).map(AgentMetadata::from)
    }

    /// Loads a peer's metadata; returns the peer's agent name.
    ///
    /// The blob is checked by [`crate::inspect_metadata`] first: a blob that would abort the
    /// process in UCX, or make nixl-sys panic, is refused before NIXL sees it. A panic inside
    /// nixl-sys is caught and returned as an error.
    pub fn load_remote(&self, metadata: &[u8]) -> Result<String, Error> {
        if metadata.is_empty() {
            return Err(Error::InvalidArgument {
                what: "agent metadata",
                reason: "empty".into(),
            });
        }
        let summary = crate::inspect_metadata(metadata)?;
        let loaded = sys::contain(Op::LoadRemoteMetadata, || {
            self.inner.load_remote_md(metadata)
        })?;
        let name = check(Op::LoadRemoteMetadata, loaded)?;
        if name != summary.agent {
            return Err(Error::InvalidArgument {
                what: "agent metadata",
                reason: format!(
                    "NIXL loaded agent {name:?}, the blob names {:?}",
                    summary.agent
                ),
            });
        }
        Ok(name)
    }

    /// Forgets a peer's metadata (its connection and remote keys).
    pub fn invalidate_remote(&self, peer: &str) -> Result<(), Error> {
        check(Op::InvalidateRemote, self.inner.invalidate_remote_md(peer))
    }

    /// Whether this agent holds metadata for `peer`.
    pub fn has_remote(&self, peer: &str) -> bool {
        self.inner.check_remote_metadata(peer, None)
    }

    /// Creates a transfer of `local` to or from `remote` on agent `peer` (this agent's own name
    /// for local transfers such as file I/O), carrying `notif` to the peer when it completes.
    pub fn create_request(
        &self,
        op: XferOp,
        local: &XferDescs,
        remote: &XferDescs,
        peer: &str,
        notif: Option<&[u8]>,
    ) -> Result<XferRequest, Error> {
        if local.total_bytes() != remote.total_bytes() {
            return Err(Error::InvalidArgument {
                what: "descriptor lists",
                reason: format!(
                    "local describes {} bytes, remote {}",
                    local.total_bytes(),
                    remote.total_bytes()
                ),
            });
        }
        self.warn_emulation(op, local.mem_type(), remote.mem_type(), peer);
        let l = local.to_sys()?;
        let r = remote.to_sys()?;
        let args = notif_args(notif)?;
        let inner = check(
            Op::CreateRequest,
            self.inner
                .create_xfer_req(op.to_sys(), &l, &r, peer, args.as_ref()),
        )?;
        Ok(XferRequest::new(inner, self.clone(), peer))
    }

    /// Prepares a descriptor list once, for many [`Agent::make_request`] calls by index.
    ///
    /// `peer` is the remote agent whose memory `descs` describes, or `None` for local memory.
    pub fn prepare(&self, peer: Option<&str>, descs: &XferDescs) -> Result<PreparedDescs, Error> {
        let list = descs.to_sys()?;
        // NIXL's NIXL_INIT_AGENT ("") names the local agent.
        let name = peer.unwrap_or("");
        let handle = check(
            Op::PrepareDescriptors,
            self.inner.prepare_xfer_dlist(name, &list, None),
        )?;
        Ok(PreparedDescs::new(sys::PreparedHandle(handle), descs, peer))
    }

    /// Makes a transfer from prepared lists, pairing `local[local_idx[i]]` with
    /// `remote[remote_idx[i]]`.
    pub fn make_request(
        &self,
        op: XferOp,
        local: &PreparedDescs,
        local_idx: &[i32],
        remote: &PreparedDescs,
        remote_idx: &[i32],
        notif: Option<&[u8]>,
    ) -> Result<XferRequest, Error> {
        local.check_indices(local_idx, remote, remote_idx)?;
        let peer = remote.peer().unwrap_or(&self.name).to_owned();
        self.warn_emulation(op, local.mem_type(), remote.mem_type(), &peer);
        let args = notif_args(notif)?;
        let inner = check(
            Op::MakeRequest,
            self.inner.make_xfer_req(
                op.to_sys(),
                &local.handle.0,
                local_idx,
                &remote.handle.0,
                remote_idx,
                args.as_ref(),
            ),
        )?;
        Ok(XferRequest::new(inner, self.clone(), &peer))
    }

    /// Drains the notifications received since the last call, appending them to `out`.
    ///
    /// This also progresses the agent, which a target must do when no progress thread runs.
    pub fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<(), Error> {
        // Polling loops call this constantly; reuse one NIXL map per thread while it stays
        // empty, and replace it only after notifications arrived (nixl-sys cannot clear a map
        // holding binary payloads).
        thread_local! {
            static MAP: std::cell::RefCell<Option<nixl_sys::NotificationMap>> =
                const { std::cell::RefCell::new(None) };
        }
        MAP.with(|cell| {
            let mut slot = cell.borrow_mut();
            let map = match slot.as_mut() {
                Some(map) => map,
                None => slot.insert(check(Op::Notifications, nixl_sys::NotificationMap::new())?),
            };
            check(Op::Notifications, self.inner.get_notifications(map, None))?;
            if check(Op::Notifications, map.is_empty())? {
                return Ok(());
            }
            let taken = slot.take();
            let Some(map) = taken.as_ref() else {
                return Ok(());
            };
            read_map(map, out)
        })
    }

    /// Drains and returns the notifications received since the last call.
    pub fn notifications(&self) -> Result<Vec<Notification>, Error> {
        let mut out = Vec::new();
        self.drain_notifications(&mut out)?;
        Ok(out)
    }

    /// Asks `backend` whether each storage item exists (NIXL's `queryMem`): for files the
    /// metadata string is a path, for objects a key. `true` where the backend answered with a
    /// value.
    pub fn query_storage(
        &self,
        backend: &Backend,
        mem: MemType,
        items: &[&str],
    ) -> Result<Vec<bool>, Error> {
        let mut list = check(
            Op::QueryMemory,
            nixl_sys::RegDescList::new(sys::sys_mem_type(mem)),
        )?;
        for item in items {
            list.add_desc_with_meta(0, 0, 0, item.as_bytes());
        }
        let mut args = check(Op::QueryMemory, nixl_sys::OptArgs::new())?;
        check(Op::QueryMemory, args.add_backend(&backend.inner))?;
        let resp = check(Op::QueryMemory, self.inner.query_mem(&list, Some(&args)))?;
        let n = check(Op::QueryMemory, resp.len())?;
        (0..n)
            .map(|i| check(Op::QueryMemory, resp.get(i).and_then(|r| r.has_value())))
            .collect()
    }

    /// Sends a notification to `peer` without a transfer.
    pub fn send_notification(&self, peer: &str, message: &[u8]) -> Result<(), Error> {
        check(
            Op::SendNotification,
            self.inner.send_notification(peer, message, None),
        )
    }
}

impl Agent {
    /// Why UCX would move a transfer of this shape to or from `peer` by software emulation
    /// (empty: a zero-copy transport serves it), judged from this process's `UCX_*` variables.
    ///
    /// [`Agent::create_request`] and [`Agent::make_request`] log each reason once per shape and
    /// peer as a `tracing` warning; this lets a caller check before moving anything.
    pub fn emulation_risks(
        &self,
        op: XferOp,
        local: MemType,
        remote: MemType,
        peer: &str,
    ) -> Vec<EmulationRisk> {
        let place = if peer == &*self.name {
            PeerPlace::SameAgent
        } else if LiveName::is_live(peer) {
            PeerPlace::SameProcess
        } else {
            PeerPlace::OtherProcess
        };
        let peer_mode = self.facts.ucx_peer_mode.load(Ordering::Relaxed);
        let shape = TransferShape::new(op, local, remote, place, peer_mode);
        emulation::risks(&shape, &UcxEnv::from_process())
    }

    /// Logs [`Agent::emulation_risks`] once per shape and peer; free for host-only transfers.
    fn warn_emulation(&self, op: XferOp, local: MemType, remote: MemType, peer: &str) {
        if local != MemType::Vram && remote != MemType::Vram {
            return;
        }
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (op, local, remote, peer).hash(&mut h);
            h.finish()
        };
        let fresh = self
            .facts
            .warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
        if !fresh {
            return;
        }
        for risk in self.emulation_risks(op, local, remote, peer) {
            tracing::warn!(
                agent = %self.name,
                peer,
                ?op,
                ?local,
                ?remote,
                "UCX will fall back to software emulation: {risk}"
            );
        }
    }

    /// Warns when registered GPU memory cannot be exported to other processes (feature `cuda`;
    /// without it the check is skipped).
    pub(crate) fn check_exportable(&self, region: MemRegion) {
        #[cfg(feature = "cuda")]
        if region.mem == MemType::Vram {
            let dev = u32::try_from(region.dev).unwrap_or(0);
            match crate::cuda::ipc_capable(dev, region.addr) {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    agent = %self.name,
                    "UCX will fall back to software emulation for other processes: {}",
                    EmulationRisk::NotIpcExportable { addr: region.addr }
                ),
                Err(e) => tracing::debug!(agent = %self.name, "cannot query GPU pointer: {e}"),
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = region;
    }
}

/// Appends every notification in `map` to `out`.
fn read_map(map: &nixl_sys::NotificationMap, out: &mut Vec<Notification>) -> Result<(), Error> {
    let peers: Vec<String> = map
        .agents()
        .map(|a| check(Op::Notifications, a.map(str::to_owned)))
        .collect::<Result<_, _>>()?;
    for peer in peers {
        let n = check(Op::Notifications, map.get_notifications_size(&peer))?;
        for i in 0..n {
            let payload = check(Op::Notifications, map.get_notification_bytes(&peer, i))?;
            out.push(Notification {
                peer: peer.clone(),
                payload,
            });
        }
    }
    Ok(())
}

fn notif_args(notif: Option<&[u8]>) -> Result<Option<nixl_sys::OptArgs>, Error> {
    let Some(msg) = notif else { return Ok(None) };
    let mut args = check(Op::CreateRequest, nixl_sys::OptArgs::new())?;
    check(Op::CreateRequest, args.set_notification_message(msg))?;
    // NIXL ignores the message unless the flag is set too.
    check(Op::CreateRequest, args.set_has_notification(true))?;
    Ok(Some(args))
}

fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument {
        what: "agent name",
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_nul_or_empty_are_rejected_before_nixl() {
        assert!(matches!(
            validate_name(""),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            validate_name("a\0b"),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(validate_name("prefill-0").is_ok());
    }

    #[test]
    fn default_config_has_no_progress_thread() {
        let c = AgentConfig::default();
        assert_eq!(c.progress_thread, None);
        assert!(!c.to_sys().enable_prog_thread);
        let c = c.progress_thread(Some(Duration::from_micros(100)));
        assert!(c.to_sys().enable_prog_thread);
        assert_eq!(c.to_sys().pthr_delay_us, 100);
    }
}
