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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendParams {
    map: BTreeMap<String, String>,
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
        self.map.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for BackendParams {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            map: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
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
