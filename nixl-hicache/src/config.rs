//! Configuration and backend selection (SGLang's `NixlBackendSelection`).

use std::path::PathBuf;

use nixl_core::{BackendKind, BackendParams};

use crate::key::{KeySuffix, Naming};

/// The storage directory SGLang uses by default.
pub const DEFAULT_DIR: &str = "/tmp/hicache_storage";
/// The environment variable that overrides the directory (it wins even over an explicit path,
/// as in SGLang).
pub const DIR_ENV: &str = "SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR";
/// The default bound on open, registered files kept for reads.
pub const DEFAULT_MAX_OPEN: usize = 16;
/// File plugins in SGLang's `auto` priority order.
pub const FILE_PLUGINS: [&str; 4] = ["3FS", "POSIX", "GDS_MT", "GDS"];

/// Which NIXL storage plugin to use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Plugin {
    /// The first installed of 3FS, POSIX, GDS_MT, GDS, then OBJ.
    #[default]
    Auto,
    /// Exactly this plugin.
    Named(BackendKind),
}

impl Plugin {
    /// Parses SGLang's plugin names (`auto`, `POSIX`, `OBJ`, ...; case-sensitive as in SGLang).
    pub fn parse(name: &str) -> Self {
        if name == "auto" {
            Self::Auto
        } else {
            Self::Named(BackendKind::from_plugin_name(name))
        }
    }
}

/// How `set` puts a page into its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WriteMode {
    /// Write a fresh temp file and rename it over the key once written: readers never see a
    /// torn page, and a failed or interrupted write leaves the key's previous page (or no key)
    /// in place. Costs a file creation, a block reservation and a rename per page.
    #[default]
    Atomic,
    /// Write the key's file in place, as SGLang does (sized to the page, so no stale tail is
    /// left). Faster where metadata operations are slow; a failed write removes the key (its
    /// file may be torn), and an interrupted one can leave a torn page.
    InPlace,
}

/// Connector configuration: `Default` plus chained setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HiCacheConfig {
    /// The storage directory (file plugins).
    pub dir: PathBuf,
    /// The plugin.
    pub plugin: Plugin,
    /// The storage-name suffix (none, as in the seed).
    pub suffix: Option<KeySuffix>,
    /// Parameters for the chosen backend (for OBJ: `bucket`, `endpoint_override`, `scheme`,
    /// `region`, `access_key`, ...). OBJ takes its bucket from `AWS_DEFAULT_BUCKET` when unset.
    pub params: BackendParams,
    /// How many files stay open and registered for reads (default 16). Keep it small: NIXL
    /// looks registrations up for every descriptor, and holding many slows every request
    /// (measured here with 64 KiB pages: 128 held, reads at 0.8 of uncached raw I/O; 16 held,
    /// 0.9).
    pub max_open: usize,
    /// How file backends write pages.
    pub write_mode: WriteMode,
    /// Where pages' files lie under the directory (default [`Naming::Flat`]).
    pub naming: Naming,
    /// Atomic writes of pages whose host ranges are 4 KiB aligned open their temp file
    /// `O_DIRECT` (the data goes to the device without a copy into the page cache, as SGLang
    /// 0.5.23 writes by default), on file systems that take it. Reads stay buffered. Off by
    /// default.
    pub direct_io: bool,
}

impl Default for HiCacheConfig {
    fn default() -> Self {
        Self::new(None, Plugin::Auto)
    }
}

impl HiCacheConfig {
    /// SGLang's construction: `path` (default [`DEFAULT_DIR`]), overridden by [`DIR_ENV`] when
    /// that is set.
    pub fn new(path: Option<PathBuf>, plugin: Plugin) -> Self {
        let dir = std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .or(path)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        Self {
            dir,
            plugin,
            suffix: None,
            params: BackendParams::new(),
            max_open: DEFAULT_MAX_OPEN,
            write_mode: WriteMode::Atomic,
            naming: Naming::Flat,
            direct_io: false,
        }
    }

    /// Sets the storage-name suffix.
    #[must_use]
    pub fn suffix(mut self, suffix: Option<KeySuffix>) -> Self {
        self.suffix = suffix;
        self
    }

    /// Sets the backend parameters.
    #[must_use]
    pub fn params(mut self, params: BackendParams) -> Self {
        self.params = params;
        self
    }

    /// Sets how file backends write pages.
    #[must_use]
    pub fn write_mode(mut self, mode: WriteMode) -> Self {
        self.write_mode = mode;
        self
    }

    /// Sets where pages' files lie (see [`Naming`]).
    #[must_use]
    pub fn naming(mut self, naming: Naming) -> Self {
        self.naming = naming;
        self
    }

    /// Sets whether aligned writes bypass the page cache (see [`HiCacheConfig::direct_io`]).
    #[must_use]
    pub fn direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }

    /// Sets the bound on open, registered files or objects kept for reads.
    #[must_use]
    pub fn max_open(mut self, n: usize) -> Self {
        self.max_open = n.max(1);
        self
    }
}

/// Picks the plugin among the installed ones, as SGLang's `create_backend` does.
pub(crate) fn select(plugin: &Plugin, installed: &[String]) -> Result<BackendKind, String> {
    let has = |n: &str| installed.iter().any(|p| p == n);
    match plugin {
        Plugin::Auto => FILE_PLUGINS
            .iter()
            .chain(["OBJ"].iter())
            .find(|p| has(p))
            .map(|p| BackendKind::from_plugin_name(p))
            .ok_or_else(|| format!("no storage plugin installed (have {installed:?})")),
        Plugin::Named(kind) if has(kind.plugin_name()) => Ok(kind.clone()),
        Plugin::Named(kind) => Err(format!(
            "plugin {kind} is not installed (have {installed:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_file_plugins_in_sglang_order() {
        let have = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            select(&Plugin::Auto, &have(&["UCX", "OBJ", "POSIX"])),
            Ok(BackendKind::Posix)
        );
        assert_eq!(
            select(&Plugin::Auto, &have(&["GDS", "3FS", "POSIX"])),
            Ok(BackendKind::Hf3fs)
        );
        assert_eq!(
            select(&Plugin::Auto, &have(&["UCX", "OBJ"])),
            Ok(BackendKind::Obj)
        );
        assert!(select(&Plugin::Auto, &have(&["UCX"])).is_err());
        assert!(select(&Plugin::parse("GDS"), &have(&["POSIX"])).is_err());
        assert_eq!(
            select(&Plugin::parse("POSIX"), &have(&["POSIX"])),
            Ok(BackendKind::Posix)
        );
    }
}
