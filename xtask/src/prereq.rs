//! Build prerequisites (libclang for nixl-sys's bindgen) and test tools (moto).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use crate::cmd;

/// Makes sure bindgen can find libclang: installs `libclang-dev` with apt when running as root,
/// otherwise stops with the exact command to run.
pub(crate) fn ensure_libclang() -> anyhow::Result<()> {
    if libclang_present() {
        return Ok(());
    }
    let install = "apt-get install -y libclang-dev";
    if !is_root() {
        bail!("libclang (needed by nixl-sys's bindgen) is missing; run: sudo {install}");
    }
    println!("libclang is missing; installing libclang-dev with apt");
    let direct = cmd::run(Command::new("apt-get").args(["install", "-y", "libclang-dev"]));
    if direct.is_err() {
        cmd::run(Command::new("apt-get").arg("update"))?;
        cmd::run(Command::new("apt-get").args(["install", "-y", "libclang-dev"]))?;
    }
    if !libclang_present() {
        bail!("libclang-dev was installed but no libclang.so was found; set LIBCLANG_PATH");
    }
    Ok(())
}

fn libclang_present() -> bool {
    if std::env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    let mut dirs: Vec<PathBuf> = vec![
        "/usr/lib/x86_64-linux-gnu".into(),
        "/usr/lib64".into(),
        "/usr/lib".into(),
    ];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("llvm-") {
                dirs.push(e.path().join("lib"));
            }
        }
    }
    dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("libclang") && n.contains(".so") && !n.starts_with("libclang-cpp")
            })
        })
    })
}

fn is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// The moto S3 server venv under target/, created with pip when missing. Returns the venv.
pub(crate) fn ensure_moto(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/moto-venv");
    let server = venv.join("bin/moto_server");
    if server.is_file() {
        return Ok(venv);
    }
    if !cmd::exists("python3") {
        bail!(
            "python3 with pip and venv is needed for the local S3 server; run: apt-get install -y python3-venv python3-pip"
        );
    }
    println!("installing moto[server] into {}", venv.display());
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    cmd::run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "moto[server]>=5,<6",
    ]))?;
    if !server.is_file() {
        bail!("moto installed but {} is missing", server.display());
    }
    Ok(venv)
}

/// The Python peer venv under target/ (pyzmq, numpy and NIXL's Python API from the same wheel as
/// the runtime), for the interop tests that play a seed SGLang peer. Returns the venv.
pub(crate) fn ensure_python_peer(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/py-peer-venv");
    let marker = venv.join(".nixl-peer-ready");
    if marker.is_file() {
        return Ok(venv);
    }
    let wheel = std::fs::read_dir(root.join("target/nixl-wheels"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nixl_cu12-"))
        })
        .ok_or_else(|| {
            anyhow::anyhow!("no nixl_cu12 wheel in target/nixl-wheels; run `cargo xtask runtime`")
        })?;
    println!("creating the Python peer venv in {}", venv.display());
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    let pip = venv.join("bin/pip");
    cmd::run(Command::new(&pip).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "numpy",
        "pyzmq",
    ]))?;
    // torch is a declared dependency but only imported for type hints; leave it out.
    cmd::run(
        Command::new(&pip)
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
            ])
            .arg(&wheel),
    )?;
    std::fs::write(&marker, b"")?;
    Ok(venv)
}

/// `ip` and `tc` (iproute2) and `iptables` for `cargo xtask faults`: installed with apt when
/// running as root, otherwise stops with the command to run.
pub(crate) fn ensure_net_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("tc", "iproute2"),
        ("iptables", "iptables"),
    ]
    .into_iter()
    .filter(|(tool, _)| !cmd::exists(tool) && !Path::new("/usr/sbin").join(tool).is_file())
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages = missing;
    packages.dedup();
    if !is_root() {
        bail!(
            "the fault tests need {packages:?}; run: sudo apt-get install -y {}",
            packages.join(" ")
        );
    }
    println!("installing {packages:?} with apt");
    let install = || {
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        cmd::run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    Ok(())
}
