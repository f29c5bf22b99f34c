//! Loading the NIXL runtime for the programs, and what to tell a user who has none.
//!
//! nixl-core searches `NIXL_RUNTIME_DIR`, a `nixl-runtime/` directory near the executable or the
//! current directory, the usual system prefixes and the dynamic loader's path
//! ([`nixl_core::runtime`]). A user who installed the programs with `cargo install` most likely
//! has none of these, but may have NIXL's Python wheel (`pip install nixl-cu12`): its libraries
//! sit in `<site-packages>/.nixl_cu12.mesonpy.libs` (with their dependencies in the sibling
//! `nixl_cu12.libs`, which their RPATHs name). When nixl-core finds nothing and
//! `NIXL_RUNTIME_DIR` is not set, [`load`] asks `python3` where its site-packages are and loads
//! a wheel found there.

use std::path::{Path, PathBuf};
use std::process::Command;

use nixl_core::runtime::{self as rt, RUNTIME_DIR_ENV, RuntimeInfo};

/// The NIXL release the workspace is tested with (the wheels `nixl-cu12` and `nixl-cu13`).
pub const NIXL_VERSION: &str = "1.5.1";

/// How the runtime was found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// By nixl-core's own search (see [`nixl_core::runtime`]).
    Discovered,
    /// In a pip-installed wheel, this directory (nixl-core's search found nothing).
    PipWheel(PathBuf),
}

/// The loaded runtime and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// What nixl-core loaded.
    pub info: RuntimeInfo,
    /// Where it came from.
    pub source: Source,
}

/// Loads the runtime: nixl-core's search, then (without `NIXL_RUNTIME_DIR`) a pip-installed
/// wheel. The error says what was searched and what to do, in words for the user.
pub fn load() -> anyhow::Result<Loaded> {
    let err = match rt::ensure_loaded() {
        Ok(info) => {
            return Ok(Loaded {
                info,
                source: Source::Discovered,
            });
        }
        Err(e) => e,
    };
    let not_found = matches!(err, nixl_core::Error::RuntimeNotFound { .. });
    if not_found && std::env::var_os(RUNTIME_DIR_ENV).is_none() {
        for dir in pip_wheel_dirs() {
            if let Ok(info) = rt::load_from(&dir) {
                return Ok(Loaded {
                    info,
                    source: Source::PipWheel(dir),
                });
            }
        }
    }
    anyhow::bail!("{err}\n\n{}", help(not_found))
}

/// What to do when the runtime is missing (`not_found`) or failed to load.
pub fn help(not_found: bool) -> String {
    let mut s = String::new();
    if not_found {
        s.push_str("The NIXL runtime (libnixl_capi.so, its plugins and UCX) is not installed.\n");
    } else {
        s.push_str(
            "A NIXL runtime was found but did not load (a missing dependency, or a wheel's\n\
             libraries copied away from their sibling nixl_cuXX.libs directory).\n",
        );
    }
    s.push_str(&format!(
        "Install NIXL's Python wheel, which these programs find through python3:\n\
         \n    python3 -m pip install nixl-cu12=={NIXL_VERSION}     # nixl-cu13 for CUDA 13\n\
         \nor point {RUNTIME_DIR_ENV} at the directory holding libnixl_capi.so, in place:\n\
         \n    export {RUNTIME_DIR_ENV}=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/.nixl_cu12.mesonpy.libs\n\
         \nFor a NIXL built from source, set {RUNTIME_DIR_ENV} to its install prefix (the directory\n\
         whose lib/ holds libnixl_capi.so), or put that lib/ on LD_LIBRARY_PATH.\n\
         `nixl-pd doctor` shows what is found."
    ));
    s
}

/// Directories of pip-installed NIXL wheels (`.nixl_cu12.mesonpy.libs`, `.nixl_cu13...`) that
/// hold `libnixl_capi.so`, in the site-packages `python3` reports (its own, the user's, and an
/// active virtual environment's); empty when there is no `python3`.
pub fn pip_wheel_dirs() -> Vec<PathBuf> {
    let script = "import site, sysconfig\n\
                  print(sysconfig.get_paths()['purelib'])\n\
                  print(sysconfig.get_paths()['platlib'])\n\
                  print(site.getusersitepackages())\n\
                  [print(p) for p in site.getsitepackages()]";
    let mut sites: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let lib = Path::new(&venv).join("lib");
        if let Ok(rd) = std::fs::read_dir(&lib) {
            sites.extend(rd.flatten().map(|e| e.path().join("site-packages")));
        }
    }
    if let Ok(out) = Command::new("python3").args(["-c", script]).output()
        && out.status.success()
    {
        sites.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| PathBuf::from(l.trim())),
        );
    }
    let mut dirs = Vec::new();
    for site in sites {
        for cuda in ["cu12", "cu13"] {
            let dir = site.join(format!(".nixl_{cuda}.mesonpy.libs"));
            if dir.join("libnixl_capi.so").is_file() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// The environment variables that steer NIXL and UCX (`NIXL_*`, `UCX_*`), sorted by name.
pub fn settings() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("UCX_") || k.starts_with("NIXL_"))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_names_the_wheel_and_the_variable() {
        for not_found in [true, false] {
            let h = help(not_found);
            assert!(h.contains("pip install nixl-cu12==1.5.1"), "{h}");
            assert!(h.contains("NIXL_RUNTIME_DIR"), "{h}");
            assert!(h.contains(".nixl_cu12.mesonpy.libs"), "{h}");
        }
    }
}
