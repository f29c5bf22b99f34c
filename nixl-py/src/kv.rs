//! nixl-kv's manager, sender, receiver and bootstrap server as native classes, behind SGLang's
//! `NixlKVManager`, `NixlKVSender`, `NixlKVReceiver` and `NixlKVBootstrapServer` (the Python
//! classes in `nixl_rs.sglang.kv` wrap these).
//!
//! Per-request problems never raise: they end in `KVPoll.Failed` (0) with a reason string
//! ([`PySender::failure`], [`PyReceiver::failure`]). Constructors raise on bad arguments, NIXL
//! errors and an unreachable bootstrap server. The GIL is released for every call that may
//! block or do IO.

use std::sync::Mutex;

use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, MemRegion, MemType, Registration};
use nixl_kv::BootstrapServer;
use nixl_kv::{KvArgs, KvManager, KvReceiver, KvSender, ManagerConfig, Mode, Profile, RoomId};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::ffi;

/// Adds the classes of this module to `m`.
pub(crate) fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyManager>()?;
    m.add_class::<PySender>()?;
    m.add_class::<PyReceiver>()?;
    m.add_class::<PyBootstrapServer>()
}

fn runtime_err(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// One engine rank's manager: its agent (UCX), its registered KV and aux memory, and nixl-kv's
/// [`KvManager`].
///
/// The KV and aux buffers follow the contract of the crate's FFI boundary: each
/// `(address, length, item length)` is memory of this process (KV: of `kv_mem`, on device
/// `gpu_id` for VRAM; aux: host memory) that stays allocated and unmoved for the manager's life
/// and may be written by transfers at any time (SGLang's KV pool and `MetadataBuffers`).
#[pyclass(name = "KvManager", module = "nixl_rs._native", frozen)]
pub(crate) struct PyManager {
    // Field order: the manager (and its agent) drops before the registrations' memory is
    // deregistered by their handles.
    mgr: KvManager,
    _regs: Vec<Registration>,
}

#[pymethods]
impl PyManager {
    /// `mode` is `"prefill"` or `"decode"`; `bootstrap` (`host:port`) is needed by a prefill,
    /// which registers there. `kv_head_num` and `page_size` (SGLang's KVArgs fields, 0 when
    /// unknown) let a prefill slice heads for decodes of another TP size. `profile`
    /// (`sglang-0.5.1`, `sglang-0.5.20`, `sglang-0.5.23`; default 0.5.1) is the wire format a
    /// decode speaks until its prefill reveals its own; `kv_cache_dtype` (with `page_size`)
    /// lets a prefill register for every release's decodes.
    #[new]
    #[pyo3(signature = (
        mode, name, kv, aux, kv_mem="VRAM", gpu_id=0, engine_rank=0, tp_size=1, dp_size=1,
        is_mla=false, bootstrap=None, local_ip="127.0.0.1", kv_head_num=0, page_size=0,
        profile=None, kv_cache_dtype=None
    ))]
    #[allow(clippy::too_many_arguments, reason = "mirrors SGLang's KVArgs fields")]
    fn new(
        py: Python<'_>,
        mode: &str,
        name: &str,
        kv: Vec<(u64, u64, u64)>,
        aux: Vec<(u64, u64, u64)>,
        kv_mem: &str,
        gpu_id: u32,
        engine_rank: u32,
        tp_size: u32,
        dp_size: u32,
        is_mla: bool,
        bootstrap: Option<String>,
        local_ip: &str,
        kv_head_num: u32,
        page_size: u32,
        profile: Option<&str>,
        kv_cache_dtype: Option<String>,
    ) -> PyResult<Self> {
        let mode = match mode {
            "prefill" => Mode::Prefill,
            "decode" => Mode::Decode,
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode must be \"prefill\" or \"decode\", not {other:?}"
                )));
            }
        };
        let (mem, dev) = match kv_mem.to_ascii_uppercase().as_str() {
            "VRAM" => (MemType::Vram, u64::from(gpu_id)),
            "DRAM" => (MemType::Dram, 0),
            other => {
                return Err(PyValueError::new_err(format!(
                    "kv_mem must be \"VRAM\" or \"DRAM\", not {other:?}"
                )));
            }
        };
        if mode == Mode::Prefill && bootstrap.is_none() {
            return Err(PyValueError::new_err("a prefill manager needs `bootstrap`"));
        }
        let profile = profile
            .map(str::parse::<Profile>)
            .transpose()
            .map_err(|e| PyValueError::new_err(e.to_string()))?
            .unwrap_or(Profile::Sglang051);
        let mut config = ManagerConfig::default()
            .profile(profile)
            .local_ip(local_ip)
            .staging(staging_from_env()?)
            .auto_staging(!off_in_env(STAGING_ENV))
            .busy_poll(busy_poll_from_env()?)
            .auto_busy_poll(!off_in_env(BUSY_POLL_ENV));
        // With the page size and dtype, a prefill registers in a form every SGLang release's
        // decode reads (0.5.20 and later check both against their own).
        if let Some(dtype) = kv_cache_dtype.filter(|_| page_size > 0) {
            config = config.sglang_pages(page_size, &dtype);
        }
        let name = name.to_owned();
        py.detach(move || {
            let agent = Agent::new(&name, &AgentConfig::default()).map_err(runtime_err)?;
            agent
                .create_backend(BackendKind::Ucx, &BackendParams::new())
                .map_err(runtime_err)?;
            let mut regs = Vec::with_capacity(kv.len() + aux.len());
            let mut kv_args = Vec::with_capacity(kv.len());
            for &(addr, len, item) in &kv {
                let region = MemRegion {
                    addr,
                    len,
                    dev,
                    mem,
                };
                regs.push(ffi::register_foreign(&agent, region).map_err(runtime_err)?);
                kv_args.push((region, item));
            }
            let mut aux_args = Vec::with_capacity(aux.len());
            for &(addr, len, item) in &aux {
                let region = MemRegion::dram(addr, len);
                regs.push(ffi::register_foreign(&agent, region).map_err(runtime_err)?);
                aux_args.push((region, item));
            }
            let args = KvArgs::new(kv_args, aux_args)
                .and_then(|a| a.parallel(engine_rank, tp_size, dp_size))
                .map_err(|e| PyValueError::new_err(e.to_string()))?
                .mla(is_mla)
                // SGLang's `kv_head_num` and `page_size`: a prefill slices heads for decodes of
                // another TP size (SGLang 0.5.2's registration frames 10-12); 0 = not given.
                .heads(kv_head_num, page_size);
            let mgr = match (mode, bootstrap) {
                (Mode::Prefill, Some(b)) => KvManager::prefill(agent, args, &b, config),
                _ => KvManager::decode(agent, args, config),
            }
            .map_err(runtime_err)?;
            Ok(Self { mgr, _regs: regs })
        })
    }

    /// The NIXL agent's name.
    #[getter]
    fn agent_name(&self) -> String {
        self.mgr.agent().name().to_owned()
    }

    /// Prefill: the PULL socket's port. Decode: the port it advertises.
    #[getter]
    fn rank_port(&self) -> u16 {
        self.mgr.rank_port()
    }

    /// `"prefill"` or `"decode"`.
    #[getter]
    fn mode(&self) -> &'static str {
        match self.mgr.mode() {
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
        }
    }

    /// Entries the manager holds (rooms, peers, pools), for leak checks.
    fn table_sizes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = self.mgr.table_sizes();
        let d = PyDict::new(py);
        d.set_item("prefill_rooms", t.prefill_rooms)?;
        d.set_item("peers", t.peers)?;
        d.set_item("decode_rooms", t.decode_rooms)?;
        d.set_item("pools", t.pools)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.mgr)
    }
}

/// Page indices from the bytes of a little-endian int32 array (numpy's `tobytes()` on x86 and
/// ARM, and SGLang's wire format); negative indices are refused.
fn pages(raw: &[u8]) -> PyResult<Vec<u32>> {
    if !raw.len().is_multiple_of(4) {
        return Err(PyValueError::new_err(format!(
            "page indices: {} bytes is not a whole number of int32",
            raw.len()
        )));
    }
    raw.chunks_exact(4)
        .map(|c| {
            let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            u32::try_from(v).map_err(|_| PyValueError::new_err(format!("negative page index {v}")))
        })
        .collect()
}

fn aux_index(aux: Option<i64>) -> PyResult<u32> {
    let v = aux.unwrap_or(0);
    u32::try_from(v).map_err(|_| PyValueError::new_err(format!("aux index {v} out of range")))
}

fn room(room: i128) -> PyResult<RoomId> {
    u64::try_from(room)
        .map(RoomId::new)
        .map_err(|_| PyValueError::new_err(format!("bootstrap room {room} is not a u64")))
}

/// A prefill request's sender.
#[pyclass(name = "KvSender", module = "nixl_rs._native", frozen)]
pub(crate) struct PySender {
    inner: Mutex<Option<KvSender>>,
}

impl PySender {
    fn with<T>(&self, default: T, f: impl FnOnce(&mut KvSender) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().map_or(default, f)
    }
}

#[pymethods]
impl PySender {
    /// A sender for `room` on a prefill manager.
    #[new]
    fn new(py: Python<'_>, mgr: &PyManager, room_id: i128) -> PyResult<Self> {
        let r = room(room_id)?;
        let tx = py
            .detach(|| KvSender::new(&mgr.mgr, r))
            .map_err(runtime_err)?;
        Ok(Self {
            inner: Mutex::new(Some(tx)),
        })
    }

    /// The request has `num_pages` pages; its aux row is `aux_index`.
    #[pyo3(signature = (num_pages, aux_index=None))]
    fn init(&self, py: Python<'_>, num_pages: u32, aux_index: Option<i64>) -> PyResult<()> {
        let aux = self::aux_index(aux_index)?;
        py.detach(|| self.with((), |tx| tx.init(num_pages, aux)));
        Ok(())
    }

    /// Sends a chunk: the bytes of an int32 array of prefill page indices.
    fn send(&self, py: Python<'_>, pages: &[u8]) -> PyResult<()> {
        let pages = self::pages(pages)?;
        py.detach(|| self.with((), |tx| tx.send(&pages)));
        Ok(())
    }

    /// SGLang's KVPoll value (0 Failed ... 4 Success).
    fn poll(&self, py: Python<'_>) -> u8 {
        py.detach(|| self.with(0, |tx| tx.poll() as u8))
    }

    /// Why the request failed, if it did.
    fn failure(&self) -> Option<String> {
        self.with(None, |tx| tx.failure().map(|f| f.to_string()))
    }

    /// Fails the request; the decodes are told.
    fn abort(&self, py: Python<'_>, reason: &str) {
        py.detach(|| self.with((), |tx| tx.abort(reason)));
    }

    /// Releases the room (later calls see Failed).
    fn clear(&self, py: Python<'_>) {
        let tx = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(|| drop(tx));
    }
}

/// A decode request's receiver.
#[pyclass(name = "KvReceiver", module = "nixl_rs._native", frozen)]
pub(crate) struct PyReceiver {
    inner: Mutex<Option<KvReceiver>>,
}

impl PyReceiver {
    fn with<T>(&self, default: T, f: impl FnOnce(&mut KvReceiver) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().map_or(default, f)
    }
}

#[pymethods]
impl PyReceiver {
    /// A receiver for `room` from the prefill whose bootstrap server is `bootstrap`
    /// (`host:port`); blocks (without the GIL) for the bootstrap lookups.
    #[new]
    #[pyo3(signature = (mgr, bootstrap, room_id, dp_rank=None))]
    fn new(
        py: Python<'_>,
        mgr: &PyManager,
        bootstrap: &str,
        room_id: i128,
        dp_rank: Option<u32>,
    ) -> PyResult<Self> {
        let r = room(room_id)?;
        let rx = py
            .detach(|| KvReceiver::new(&mgr.mgr, bootstrap, r, dp_rank))
            .map_err(runtime_err)?;
        Ok(Self {
            inner: Mutex::new(Some(rx)),
        })
    }

    /// Asks for the request: the bytes of an int32 array of destination pages, and the aux
    /// row.
    #[pyo3(signature = (pages, aux_index=None))]
    fn init(&self, py: Python<'_>, pages: &[u8], aux_index: Option<i64>) -> PyResult<()> {
        let pages = self::pages(pages)?;
        let aux = self::aux_index(aux_index)?;
        py.detach(|| self.with((), |rx| rx.init(&pages, aux)));
        Ok(())
    }

    /// SGLang's KVPoll value (0 Failed ... 4 Success).
    fn poll(&self, py: Python<'_>) -> u8 {
        py.detach(|| self.with(0, |rx| rx.poll() as u8))
    }

    /// Why the request failed, if it did.
    fn failure(&self) -> Option<String> {
        self.with(None, |rx| rx.failure().map(|f| f.to_string()))
    }

    /// Fails the request locally.
    fn abort(&self, reason: &str) {
        self.with((), |rx| rx.abort(reason));
    }

    /// Releases the room (later calls see Failed).
    fn clear(&self, py: Python<'_>) {
        let rx = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(|| drop(rx));
    }
}

/// SGLang's bootstrap HTTP server (`/route`, plus `/health`).
#[pyclass(name = "BootstrapServer", module = "nixl_rs._native", frozen)]
pub(crate) struct PyBootstrapServer {
    inner: Mutex<Option<BootstrapServer>>,
    port: u16,
}

#[pymethods]
impl PyBootstrapServer {
    /// Listens on `host:port` (SGLang listens on every interface). With
    /// `NIXL_RS_BOOTSTRAP_TOKEN` set, registrations must carry it (SGLang's own prefills send
    /// none: set it only where every prefill rank is ours).
    #[new]
    #[pyo3(signature = (port, host="0.0.0.0"))]
    fn new(py: Python<'_>, port: u16, host: &str) -> PyResult<Self> {
        let addr = format!("{host}:{port}");
        // With NIXL_RS_BOOTSTRAP_TOKEN set, only prefill ranks that send it may register.
        let token = std::env::var(nixl_kv::TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
        let server = py
            .detach(|| match &token {
                Some(t) => BootstrapServer::start_with_token(&addr, t),
                None => BootstrapServer::start(&addr),
            })
            .map_err(runtime_err)?;
        let port = server.addr().port();
        Ok(Self {
            inner: Mutex::new(Some(server)),
            port,
        })
    }

    /// The bound port.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server.
    fn close(&self, py: Python<'_>) {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(|| drop(s));
    }
}

/// The GPU paths between two nixl-rs engines (direct on one node, staged on two): unset or empty
/// (on for GPU KV pools, with nixl-kv's recommended ring), `1` (the same, asked for), `SLOTS:MIB`
/// (a ring of that size), `0` or `off` (SGLang's per-page path only).
pub(crate) const STAGING_ENV: &str = "NIXL_RS_STAGING";
/// `0` keeps same-node pairs off the direct path (they stage instead).
pub(crate) const DIRECT_ENV: &str = "NIXL_RS_DIRECT";
/// `0` sends head slices to decodes of a larger TP size as SGLang does, one descriptor per
/// token slot, instead of packing them into whole decode pages.
pub(crate) const PACKED_ENV: &str = "NIXL_RS_PACKED";
/// Microseconds the manager's waits poll without sleeping after traffic (unset: 2000 on GPU KV
/// pools, none on host pools; `0`: never).
pub(crate) const BUSY_POLL_ENV: &str = "NIXL_RS_BUSY_POLL_US";

/// Whether `var` turns its default off (`0` or `off`).
fn off_in_env(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| matches!(v.trim(), "0" | "off"))
}

/// The busy-poll window [`BUSY_POLL_ENV`] asks for.
fn busy_poll_from_env() -> PyResult<std::time::Duration> {
    let text = std::env::var(BUSY_POLL_ENV).unwrap_or_default();
    match text.trim() {
        "" => Ok(std::time::Duration::ZERO),
        t => t
            .parse::<u64>()
            .ok()
            .filter(|&us| us <= 1_000_000)
            .map(std::time::Duration::from_micros)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "{BUSY_POLL_ENV}={t:?}: expected microseconds, 0 to 1000000"
                ))
            }),
    }
}

/// The staging configuration [`STAGING_ENV`] and [`DIRECT_ENV`] ask for.
fn staging_from_env() -> PyResult<Option<nixl_kv::StagingConfig>> {
    let text = std::env::var(STAGING_ENV).unwrap_or_default();
    let (slots, mib) = match text.trim() {
        "" | "0" | "off" => return Ok(None),
        "1" | "on" => (nixl_kv::RECOMMENDED_SLOTS, nixl_kv::RECOMMENDED_SLOT_MIB),
        t => {
            let parsed = t
                .split_once(':')
                .and_then(|(s, m)| Some((s.trim().parse().ok()?, m.trim().parse().ok()?)));
            parsed.ok_or_else(|| {
                PyValueError::new_err(format!(
                    "{STAGING_ENV}={t:?}: expected 1, 0 or SLOTS:MIB (for example 8:64)"
                ))
            })?
        }
    };
    let cfg = nixl_kv::StagingConfig::new(mib.saturating_mul(1 << 20), slots).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{STAGING_ENV}: {slots} slots of {mib} MiB (1 to 1024 slots of at least 1 MiB)"
        ))
    })?;
    let direct = std::env::var(DIRECT_ENV).map_or(true, |v| v.trim() != "0");
    let packed = std::env::var(PACKED_ENV).map_or(true, |v| v.trim() != "0");
    Ok(Some(cfg.direct(direct).packed(packed)))
}
