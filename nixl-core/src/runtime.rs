//! Finding and loading the NIXL runtime (`libnixl_capi.so` and its plugins) before the first
//! NIXL call.
//!
//! nixl-sys is built with its `stub-api` feature: every NIXL call is resolved at run time from
//! `libnixl_capi.so`, and the first call *aborts the process* if the library cannot be found. This
//! module loads the library by absolute path first and returns [`Error::RuntimeNotFound`] when
//! there is none, so no call in this crate can reach that abort.
//!
//! Search order (the first hit wins):
//! 1. an explicit directory passed to [`load_from`];
//! 2. the environment variable [`RUNTIME_DIR_ENV`] (`NIXL_RUNTIME_DIR`); when set, nothing else is
//!    searched;
//! 3. `nixl-runtime/` or `target/nixl-runtime/` in any ancestor of the running executable or of
//!    the current directory (where `cargo xtask runtime` puts it);
//! 4. a system install: `$NIXL_PREFIX`, `/opt/nvidia/nvda_nixl`, `/usr/local/nixl`, `/usr/local`,
//!    `/usr` (`lib/x86_64-linux-gnu`, `lib64` or `lib` under each);
//! 5. a `pip install nixl-cu12` (or `nixl-cu13`) in the active virtualenv, the user's site or the
//!    system's (`site-packages/.nixl_cu12.mesonpy.libs`);
//! 6. the dynamic loader's own search (`LD_LIBRARY_PATH`, `ldconfig`).
//!
//! A runtime directory holds `lib/libnixl_capi.so`; NIXL finds its plugins in `lib/plugins`
//! next to `libnixl.so`, and UCX its modules relative to `libucs`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::Error;
use crate::sys;

/// The environment variable naming a runtime directory (one holding `lib/libnixl_capi.so`).
pub const RUNTIME_DIR_ENV: &str = "NIXL_RUNTIME_DIR";

const CAPI: &str = "libnixl_capi.so";

/// Where the loaded runtime came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// The `libnixl_capi.so` that was loaded, or `None` when the dynamic loader found it by name.
    pub library: Option<PathBuf>,
}

static LOADED: Mutex<Option<RuntimeInfo>> = Mutex::new(None);

/// Loads the runtime if it is not loaded yet, searching as the module docs describe.
///
/// Cheap after the first success. Safe to call from several threads.
pub fn ensure_loaded() -> Result<RuntimeInfo, Error> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(info) = loaded.as_ref() {
        return Ok(info.clone());
    }
    let info = discover_and_load()?;
    *loaded = Some(info.clone());
    Ok(info)
}

/// Loads the runtime from `dir` (which holds `lib/libnixl_capi.so`, or is that `lib` itself).
///
/// Fails if another runtime was already loaded from elsewhere: a process can hold only one.
pub fn load_from(dir: &Path) -> Result<RuntimeInfo, Error> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lib) = capi_in(dir) else {
        return Err(Error::RuntimeNotFound {
            searched: dir.display().to_string(),
        });
    };
    if let Some(info) = loaded.as_ref() {
        return if info.library.as_deref() == Some(lib.as_path()) {
            Ok(info.clone())
        } else {
            Err(Error::RuntimeLoad {
                path: lib,
                reason: format!("a runtime is already loaded ({:?})", info.library),
            })
        };
    }
    let info = load_path(&lib)?;
    *loaded = Some(info.clone());
    Ok(info)
}

/// Whether a runtime has been loaded in this process.
pub fn is_loaded() -> bool {
    LOADED.lock().map(|l| l.is_some()).unwrap_or(false)
}

fn discover_and_load() -> Result<RuntimeInfo, Error> {
    if let Some(dir) = std::env::var_os(RUNTIME_DIR_ENV) {
        let dir = PathBuf::from(dir);
        return match capi_in(&dir) {
            Some(lib) => load_path(&lib),
            None => Err(Error::RuntimeNotFound {
                searched: format!("{RUNTIME_DIR_ENV}={}", dir.display()),
            }),
        };
    }
    let candidates = candidate_dirs();
    for dir in &candidates {
        if let Some(lib) = capi_in(dir) {
            tracing::debug!(library = %lib.display(), "loading NIXL runtime");
            return load_path(&lib);
        }
    }
    // Last resort: the dynamic loader's own search path.
    if sys::load_library(Path::new(CAPI)).is_ok() {
        return verify(RuntimeInfo { library: None });
    }
    let mut searched: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    searched.push(format!("{CAPI} on the loader path"));
    Err(Error::RuntimeNotFound {
        searched: searched.join(", "),
    })
}

fn load_path(lib: &Path) -> Result<RuntimeInfo, Error> {
    sys::load_library(lib).map_err(|reason| Error::RuntimeLoad {
        path: lib.to_path_buf(),
        reason,
    })?;
    verify(RuntimeInfo {
        library: Some(lib.to_path_buf()),
    })
}

fn verify(info: RuntimeInfo) -> Result<RuntimeInfo, Error> {
    // Only now may nixl-sys's stub look for the library: it caches its one dlopen attempt.
    if nixl_sys::is_stub() {
        return Err(Error::RuntimeLoad {
            path: info.library.clone().unwrap_or_else(|| PathBuf::from(CAPI)),
            reason: "loaded, but nixl-sys still cannot resolve libnixl_capi.so".into(),
        });
    }
    Ok(info)
}

/// `dir/lib/libnixl_capi.so` or `dir/libnixl_capi.so`, if either exists.
fn capi_in(dir: &Path) -> Option<PathBuf> {
    [dir.join("lib").join(CAPI), dir.join(CAPI)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Runtime directories to try, in order (see the module docs).
pub(crate) fn candidate_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for start in starts {
        for anc in start.ancestors() {
            for rel in ["nixl-runtime", "target/nixl-runtime"] {
                let p = anc.join(rel);
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NIXL_PREFIX") {
        prefixes.push(p.into());
    }
    prefixes.extend(
        [
            "/opt/nvidia/nvda_nixl",
            "/usr/local/nixl",
            "/usr/local",
            "/usr",
        ]
        .map(PathBuf::from),
    );
    for prefix in prefixes {
        for lib in [
            "lib/x86_64-linux-gnu",
            "lib/aarch64-linux-gnu",
            "lib64",
            "lib",
        ] {
            out.push(prefix.join(lib));
        }
    }
    out.extend(pip_installed());
    out
}

/// Where `pip install nixl-cu12` (or `nixl-cu13`) puts the runtime: `.nixl_cu1N.mesonpy.libs`
/// in the site-packages of the active virtualenv (`$VIRTUAL_ENV`), of the user (`~/.local`)
/// and of the system (`/usr/local/lib`, `/usr/lib`), for every Python version found there.
fn pip_installed() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(h).join(".local/lib"));
    }
    roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    pip_installed_under(&roots)
}

/// [`pip_installed`] under `roots` (each a `lib` directory holding `python3.*`).
fn pip_installed_under(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for py in pythons {
            for site in ["site-packages", "dist-packages"] {
                for wheel in [".nixl_cu12.mesonpy.libs", ".nixl_cu13.mesonpy.libs"] {
                    out.push(py.join(site).join(wheel));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pip_installed_runtime_is_a_candidate() {
        let venv = tempfile_dir();
        let libs = venv.join("python3.11/site-packages/.nixl_cu12.mesonpy.libs");
        std::fs::create_dir_all(&libs).unwrap();
        std::fs::write(libs.join(CAPI), b"").unwrap();
        let found = pip_installed_under(std::slice::from_ref(&venv));
        assert!(found.contains(&libs), "{found:?}");
        assert_eq!(capi_in(&libs), Some(libs.join(CAPI)));
        std::fs::remove_dir_all(&venv).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nixl-core-runtime-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn candidates_include_target_dir_next_to_workspace() {
        let dirs = candidate_dirs();
        let cwd = std::env::current_dir().unwrap();
        assert!(dirs.contains(&cwd.join("target/nixl-runtime")));
        assert!(dirs.iter().any(|d| d.ends_with("nixl-runtime")));
        assert!(dirs.contains(&PathBuf::from("/opt/nvidia/nvda_nixl/lib/x86_64-linux-gnu")));
    }

    #[test]
    fn capi_in_accepts_runtime_dir_and_lib_dir() {
        let tmp = std::env::temp_dir().join(format!("nixl-core-capi-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("lib")).unwrap();
        assert_eq!(capi_in(&tmp), None);
        std::fs::write(tmp.join("lib").join(CAPI), b"").unwrap();
        assert_eq!(capi_in(&tmp), Some(tmp.join("lib").join(CAPI)));
        assert_eq!(capi_in(&tmp.join("lib")), Some(tmp.join("lib").join(CAPI)));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn load_from_missing_dir_is_a_typed_error() {
        let err = load_from(Path::new("/nonexistent/nixl-runtime")).unwrap_err();
        assert!(matches!(err, Error::RuntimeNotFound { .. }), "{err}");
    }
}
