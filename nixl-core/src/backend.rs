//! Backends (NIXL plugins) and their parameters.

use std::collections::BTreeMap;
use std::fmt;

/// A NIXL backend plugin, by the name NIXL lists it under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// UCX: RDMA, CUDA IPC, shared memory, TCP. The transport between agents.
    Ucx,
    /// POSIX files (AIO, io_uring or plain pread/pwrite).
    Posix,
    /// Object stores over S3.
    Obj,
    /// GPUDirect Storage.
    Gds,
    /// GPUDirect Storage, multi-threaded.
    GdsMt,
    /// The 3FS distributed file system.
    Hf3fs,
    /// Any other plugin, by its exact name.
    Other(String),
}

impl BackendKind {
    /// The plugin name NIXL uses.
    pub fn plugin_name(&self) -> &str {
        match self {
            Self::Ucx => "UCX",
            Self::Posix => "POSIX",
            Self::Obj => "OBJ",
            Self::Gds => "GDS",
            Self::GdsMt => "GDS_MT",
            Self::Hf3fs => "3FS",
            Self::Other(name) => name,
        }
    }

    /// The kind for a plugin name (exact, case-sensitive, as NIXL lists them).
    pub fn from_plugin_name(name: &str) -> Self {
        match name {
            "UCX" => Self::Ucx,
            "POSIX" => Self::Posix,
            "OBJ" => Self::Obj,
            "GDS" => Self::Gds,
            "GDS_MT" => Self::GdsMt,
            "3FS" => Self::Hf3fs,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plugin_name())
    }
}

/// How UCX reacts to a failed peer (the `ucx_error_handling_mode` backend parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_enums)] // UCX defines exactly these two.
pub enum UcxErrorMode {
    /// Peer-failure detection on (NIXL's default). Notifications then travel over TCP on
    /// loopback, adding about 13 µs per small transfer on one host.
    Peer,
    /// No peer-failure detection; shared memory carries notifications (about 5× faster small
    /// transfers on one host, and needed for fast host↔GPU copies inside one agent).
    None,
}

/// String parameters for a backend, passed to the plugin at creation.
///
/// Besides the plugin's own string parameters it carries one setting NIXL reads from the
/// process environment instead: UCX scatter-gather batching ([`BackendParams::ucx_sgl`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendParams {
    map: BTreeMap<String, String>,
    sgl: Option<bool>,
}

/// The environment variable NIXL 1.5's UCX engine reads, when each UCX backend is created, to
/// batch the descriptors of a WRITE into one scatter-gather request.
pub const UCX_SGL_ENV: &str = "NIXL_UCX_SGL_ENABLE";

/// NIXL-only settings of the UCX backend that cut the per-descriptor cost of many-descriptor
/// WRITEs between GPUs (docs/runtime.md §6): NIXL's worker thread pool (`num_threads`), how many
/// descriptors one pool thread takes at a time (`split_batch_size`), and UCX scatter-gather
/// batching ([`UCX_SGL_ENV`]). They matter on the initiator of a transfer; the target of a
/// `cuda_ipc` WRITE is passive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UcxTuning {
    /// NIXL's UCX thread pool: `0` runs none (NIXL's default).
    pub num_threads: u32,
    /// Descriptors per pool-thread batch (NIXL's parameter; ignored without a pool).
    pub split_batch_size: u32,
    /// UCX scatter-gather batching of a request's descriptors.
    pub sgl: bool,
}

impl UcxTuning {
    /// NIXL's own defaults: no thread pool, no batching.
    pub const NIXL_DEFAULT: Self = Self {
        num_threads: 0,
        split_batch_size: 0,
        sgl: false,
    };

    /// The settings measured fastest for many-descriptor VRAM WRITEs on one host with the cu13
    /// runtime: 8 pool threads, batches of 64, SGL on (2048 × 32 KiB in 3.9–4.4 ms instead of
    /// 15.6 ms on an H200; BENCHMARKS.md, docs/runtime.md §6).
    pub const GPU_FAST: Self = Self {
        num_threads: 8,
        split_batch_size: 64,
        sgl: true,
    };

    /// Custom settings.
    pub fn new(num_threads: u32, split_batch_size: u32, sgl: bool) -> Self {
        Self {
            num_threads,
            split_batch_size,
            sgl,
        }
    }
}

impl Default for UcxTuning {
    fn default() -> Self {
        Self::NIXL_DEFAULT
    }
}

impl BackendParams {
    /// No parameters: the plugin's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one parameter.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.map.insert(key.into(), value.into());
        self
    }

    /// Sets one parameter in place.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.map.insert(key.into(), value.into());
    }

    /// UCX parameters with the given error-handling mode.
    pub fn ucx(mode: UcxErrorMode) -> Self {
        let mode = match mode {
            UcxErrorMode::Peer => "peer",
            UcxErrorMode::None => "none",
        };
        Self::new().with("ucx_error_handling_mode", mode)
    }

    /// UCX parameters with the given error-handling mode and NIXL-only tuning: `num_threads`
    /// and `split_batch_size` when a thread pool is asked for, and [`BackendParams::ucx_sgl`].
    pub fn ucx_tuned(mode: UcxErrorMode, tuning: UcxTuning) -> Self {
        let mut p = Self::ucx(mode);
        if tuning.num_threads > 0 {
            p = p.ucx_num_threads(tuning.num_threads);
            if tuning.split_batch_size > 0 {
                p = p.ucx_split_batch_size(tuning.split_batch_size);
            }
        }
        p.ucx_sgl(tuning.sgl)
    }

    /// NIXL's UCX worker thread pool (`num_threads`; 0: none).
    #[must_use]
    pub fn ucx_num_threads(self, n: u32) -> Self {
        self.with("num_threads", n.to_string())
    }

    /// Descriptors per thread-pool batch (`split_batch_size`).
    #[must_use]
    pub fn ucx_split_batch_size(self, n: u32) -> Self {
        self.with("split_batch_size", n.to_string())
    }

    /// UCX scatter-gather batching for the backend: nixl-core sets [`UCX_SGL_ENV`] to `y` or
    /// `n` while it creates the backend (NIXL reads it then, in the UCX engine's constructor,
    /// and keeps the value for that backend). Unset (the default), the process environment
    /// decides. The variable is changed only when it differs, so a process that exports it
    /// before starting threads never has it set from a running thread.
    #[must_use]
    pub fn ucx_sgl(mut self, on: bool) -> Self {
        self.sgl = Some(on);
        self
    }

    /// The scatter-gather setting, if any ([`BackendParams::ucx_sgl`]).
    pub fn sgl(&self) -> Option<bool> {
        self.sgl
    }

    /// One parameter's value.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// All parameters, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether no parameter is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.sgl.is_none()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for BackendParams {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            map: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            sgl: None,
        }
    }
}

/// A backend created on an agent. Lives as long as the agent; cheap to clone.
#[derive(Debug, Clone)]
pub struct Backend {
    pub(crate) kind: BackendKind,
    #[allow(
        dead_code,
        reason = "the agent owns the backend; kept for backend-specific options"
    )]
    pub(crate) inner: std::sync::Arc<nixl_sys::Backend>,
}

impl Backend {
    /// Which plugin this backend runs.
    pub fn kind(&self) -> &BackendKind {
        &self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_round_trip() {
        for k in [
            BackendKind::Ucx,
            BackendKind::Posix,
            BackendKind::Obj,
            BackendKind::Gds,
            BackendKind::GdsMt,
            BackendKind::Hf3fs,
            BackendKind::Other("LIBFABRIC".into()),
        ] {
            assert_eq!(BackendKind::from_plugin_name(k.plugin_name()), k);
        }
    }

    #[test]
    fn tuning_spells_nixl_parameters_and_keeps_sgl_apart() {
        let p = BackendParams::ucx_tuned(UcxErrorMode::None, UcxTuning::new(16, 128, true));
        assert_eq!(p.value("num_threads"), Some("16"));
        assert_eq!(p.value("split_batch_size"), Some("128"));
        assert_eq!(p.sgl(), Some(true));
        assert!(p.iter().all(|(k, _)| k != UCX_SGL_ENV));
        let plain = BackendParams::ucx_tuned(UcxErrorMode::None, UcxTuning::NIXL_DEFAULT);
        assert_eq!(plain.value("num_threads"), None);
        assert_eq!(plain.value("split_batch_size"), None);
        assert_eq!(plain.sgl(), Some(false));
        assert!(BackendParams::new().is_empty());
        assert!(!BackendParams::new().ucx_sgl(false).is_empty());
    }

    #[test]
    fn ucx_params_spell_the_mode() {
        assert_eq!(
            BackendParams::ucx(UcxErrorMode::None).value("ucx_error_handling_mode"),
            Some("none")
        );
        assert_eq!(
            BackendParams::ucx(UcxErrorMode::Peer).value("ucx_error_handling_mode"),
            Some("peer")
        );
    }
}
