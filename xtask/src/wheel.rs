//! `cargo xtask wheel [--test]`: the `nixl-rs` Python wheel (crate `nixl-py`) built with
//! maturin into `target/wheels/`, and its tests against the real SGLang 0.5.1.post3. The
//! SGLang 0.5.23 venv of nixl-kv's `sglang-tests` is made the same way ([`SGLANG_0523`]).
//!
//! maturin comes from PyPI into `target/maturin-venv`. The tests need SGLang's Python world
//! (torch 2.8.0 and the modules SGLang's disaggregation and HiCache code import; about 6.5 GB,
//! two to three minutes from PyPI): it is installed once per machine into
//! `$XDG_CACHE_HOME/nixl-rs` (default `~/.cache/nixl-rs`), in a venv named by the SGLang and
//! torch versions, the Python version and a hash of `nixl-py/tests/sglang-requirements.txt`,
//! because CI runs in a fresh clone every time. Each clone then gets a small venv of its own,
//! `target/sglang-venv`, that sees the cached packages through a `.pth` path line and holds only
//! our wheel, so the shared cache is never modified by a test run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::{cmd, runtime};

/// The SGLang release the Python tests run against.
pub(crate) const SGLANG: &str = "0.5.1.post3";
const MATURIN: &str = "maturin>=1.9,<2";
const REQUIREMENTS: &str = "nixl-py/tests/sglang-requirements.txt";

#[derive(clap::Args, Debug)]
pub(crate) struct WheelArgs {
    /// Also run the Python tests against SGLang (provisions its venv on first use).
    #[arg(long)]
    test: bool,
}

pub(crate) fn run(root: &Path, args: &WheelArgs) -> anyhow::Result<()> {
    let wheel = build(root)?;
    println!("wheel: {}", wheel.display());
    if args.test {
        test(root, &wheel)?;
    }
    Ok(())
}

/// Builds the wheel (release profile) and returns its path.
pub(crate) fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/maturin-venv");
    let maturin = venv.join("bin/maturin");
    if !maturin.is_file() {
        python_required()?;
        cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        pip(&venv, &["install", MATURIN])?;
    }
    let out = root.join("target/wheels");
    // Only this build's wheel is left, so the tests install exactly it.
    if let Ok(entries) = std::fs::read_dir(&out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("nixl_rs-") {
                std::fs::remove_file(e.path())?;
            }
        }
    }
    cmd::run(
        Command::new(&maturin)
            .args(["build", "--release", "--locked", "--compatibility", "linux"])
            .arg("-m")
            .arg(root.join("nixl-py/Cargo.toml"))
            .arg("-o")
            .arg(&out),
    )?;
    std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nixl_rs-"))
        })
        .context("maturin reported success but left no nixl_rs wheel")
}

/// Runs the Python tests of SGLang 0.5.1.post3: SGLang's own HiCacheNixl suite against ours, the
/// start-up hook and version check (`test_activation.py`), then the KV interop test; then those
/// of SGLang 0.5.23 ([`test_0523`]).
pub(crate) fn test(root: &Path, wheel: &Path) -> anyhow::Result<()> {
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    let venv = test_venv(root, wheel)?;
    let python = venv.join("bin/python");
    let tests = root.join("nixl-py/tests");
    let start = Instant::now();
    cmd::run(
        Command::new(&python)
            .arg(tests.join("run_sglang_hicache.py"))
            .env("NIXL_RS_SGLANG", "1")
            .current_dir(root),
    )?;
    println!(
        "SGLang {SGLANG} HiCacheNixl suite on nixl-rs: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    cmd::run(
        Command::new(&python)
            .arg(tests.join("test_activation.py"))
            .env_remove("NIXL_RS_SGLANG")
            .current_dir(root),
    )?;
    println!(
        "start-up hook and version check (SGLang {SGLANG}): {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    cmd::run(
        Command::new(&python)
            .arg(tests.join("test_kv_interop.py"))
            .current_dir(root),
    )?;
    println!(
        "KV interop (SGLang {SGLANG} <-> nixl-rs): {:.1}s",
        start.elapsed().as_secs_f64()
    );
    test_0523(root, wheel)
}

/// The SGLang 0.5.23 tests (`nixl-py/tests/test_sglang0523.py`): activation through the plugin
/// entry point, the class contract, PD against SGLang's own classes both ways, HiCache through
/// SGLang's host pools, and files shared with SGLang's own HiCacheNixl. Both engines load the
/// NIXL runtime of the venv's `nixl-cu13` wheel (one runtime per process), so
/// `NIXL_RUNTIME_DIR` is not passed on.
pub(crate) fn test_0523(root: &Path, wheel: &Path) -> anyhow::Result<()> {
    let venv = release_test_venv(root, wheel, &SGLANG_0523, "target/sglang0523-venv")?;
    let start = Instant::now();
    cmd::run(
        Command::new(venv.join("bin/python"))
            .arg(root.join("nixl-py/tests/test_sglang0523.py"))
            .env_remove("NIXL_RS_SGLANG")
            .env_remove("SGLANG_PLUGINS")
            .env_remove("NIXL_RUNTIME_DIR")
            .env("NIXL_RS_TEST_DIR", root.join("target"))
            .current_dir(root),
    )?;
    println!(
        "SGLang {} plugin, PD and HiCache on nixl-rs: {:.1}s",
        SGLANG_0523.sglang,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask bench py`: builds the wheel and runs, for SGLang 0.5.1.post3,
/// `nixl-py/tests/bench_sglang.py`, then, for SGLang 0.5.23, `nixl-py/tests/bench_sglang0523.py`
/// (SGLang's Python NIXL classes against ours, the same PD and HiCache workloads, rounds
/// alternating; each prints the markdown table for BENCHMARKS.md). `-- --sglang 0.5.1` or
/// `-- --sglang 0.5.23` runs one of them, and the rest of `rest` goes to that script (`--help`
/// lists its options).
pub(crate) fn bench(root: &Path, rest: &[String]) -> anyhow::Result<()> {
    let (only, rest) = match rest {
        [flag, v, tail @ ..] if flag == "--sglang" => (Some(v.as_str()), tail),
        _ => (None, rest),
    };
    match only {
        None if !rest.is_empty() => {
            bail!("options for the bench scripts need `--sglang 0.5.1` or `--sglang 0.5.23` first")
        }
        None | Some("0.5.1" | "0.5.23") => {}
        Some(other) => bail!("--sglang {other}: choose 0.5.1 or 0.5.23"),
    }
    let wheel = build(root)?;
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    if only != Some("0.5.23") {
        let venv = test_venv(root, &wheel)?;
        bench_script(root, &venv, "bench_sglang.py", "bench-py.json", rest)?;
    }
    if only != Some("0.5.1") {
        let venv = release_test_venv(root, &wheel, &SGLANG_0523, "target/sglang0523-venv")?;
        bench_script(
            root,
            &venv,
            "bench_sglang0523.py",
            "bench-py-0523.json",
            rest,
        )?;
    }
    Ok(())
}

/// Runs `nixl-py/tests/<script>` with `venv`'s Python, its raw figures to `target/<json>`, in an
/// environment where neither route of our engine is switched on and both engines load one
/// runtime (the venv's NIXL wheel).
fn bench_script(
    root: &Path,
    venv: &Path,
    script: &str,
    json: &str,
    rest: &[String],
) -> anyhow::Result<()> {
    cmd::run(
        Command::new(venv.join("bin/python"))
            .arg(root.join("nixl-py/tests").join(script))
            .arg("--json")
            .arg(root.join("target").join(json))
            .args(rest)
            .env_remove("NIXL_RS_SGLANG")
            .env_remove("SGLANG_PLUGINS")
            .env_remove("NIXL_RUNTIME_DIR")
            .env("BENCH_DIR", root.join("target"))
            .current_dir(root),
    )
}

/// The per-clone venv with our wheel, seeing the cached SGLang 0.5.1 packages.
pub(crate) fn test_venv(root: &Path, wheel: &Path) -> anyhow::Result<PathBuf> {
    release_test_venv(root, wheel, &SGLANG_0501, "target/sglang-venv")
}

/// The per-clone venv `dir` with our wheel, seeing the cached packages of `release`.
pub(crate) fn release_test_venv(
    root: &Path,
    wheel: &Path,
    release: &Release,
    dir: &str,
) -> anyhow::Result<PathBuf> {
    let cached = release_venv(root, release)?;
    let venv = root.join(dir);
    if !venv.join("bin/python").is_file() {
        cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let site = site_packages(&venv)?;
    std::fs::write(
        site.join("nixl_rs_sglang_cache.pth"),
        format!("{}\n", site_packages(&cached)?.display()),
    )?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--force-reinstall",
            ])
            .arg(wheel),
    )?;
    Ok(venv)
}

/// An SGLang release the tests run against: its PyPI version, the torch it pins and the file
/// of what its tested modules import.
pub(crate) struct Release {
    pub(crate) sglang: &'static str,
    torch: &'static str,
    requirements: &'static str,
}

/// SGLang 0.5.1.post3 (the wheel's tests, `cargo xtask bench py`).
pub(crate) const SGLANG_0501: Release = Release {
    sglang: SGLANG,
    torch: "2.8.0",
    requirements: REQUIREMENTS,
};

/// SGLang 0.5.23 (nixl-kv's `sglang-tests` against its own classes).
pub(crate) const SGLANG_0523: Release = Release {
    sglang: "0.5.23",
    torch: "2.14.1",
    requirements: "nixl-py/tests/sglang-0523-requirements.txt",
};

/// The machine-wide SGLang 0.5.1 venv, created when missing (see the module docs).
pub(crate) fn sglang_venv(root: &Path) -> anyhow::Result<PathBuf> {
    release_venv(root, &SGLANG_0501)
}

/// SGLang 0.5.22 (the 0.5.20 profile), installed over [`SGLANG_0523`]'s packages: it pins the
/// same torch, transformers and tokenizers, so only SGLang itself differs.
pub(crate) const SGLANG_0522: &str = "0.5.22";

/// A machine-wide venv holding SGLang `sglang` alone and seeing `base`'s packages through a
/// `.pth` path line (its own SGLang comes first), created when missing.
pub(crate) fn overlay_venv(root: &Path, base: &Release, sglang: &str) -> anyhow::Result<PathBuf> {
    let under = release_venv(root, base)?;
    let name = format!(
        "sglang-{sglang}-over-{}",
        under
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    let venv = under.with_file_name(&name);
    if venv.join(".ready").is_file() {
        return Ok(venv);
    }
    let tmp = under.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    println!(
        "installing SGLang {sglang} over {} (once per machine)",
        under.display()
    );
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&tmp))?;
    std::fs::write(
        site_packages(&tmp)?.join("nixl_rs_sglang_base.pth"),
        format!("{}\n", site_packages(&under)?.display()),
    )?;
    pip(
        &tmp,
        &["install", "--no-deps", &format!("sglang=={sglang}")],
    )?;
    settle(&tmp, &venv)?;
    Ok(venv)
}

/// Marks the venv built in `tmp` ready and moves it to `venv` (replacing a stale one). Venvs
/// hard-code their path in scripts; ours only ever run `bin/python` and `bin/pip` through the
/// interpreter, which resolves site-packages relative to itself.
fn settle(tmp: &Path, venv: &Path) -> anyhow::Result<()> {
    std::fs::write(tmp.join(".ready"), b"")?;
    if venv.exists() {
        std::fs::remove_dir_all(venv)?;
    }
    std::fs::rename(tmp, venv)?;
    Ok(())
}

/// The machine-wide venv of `release`, created when missing (see the module docs).
pub(crate) fn release_venv(root: &Path, release: &Release) -> anyhow::Result<PathBuf> {
    let Release {
        sglang,
        torch,
        requirements,
    } = release;
    let reqs = std::fs::read(root.join(requirements))
        .with_context(|| format!("cannot read {requirements}"))?;
    python_required()?;
    let py = cmd::output(Command::new("python3").args([
        "-c",
        "import sys; print(f'py{sys.version_info[0]}{sys.version_info[1]}')",
    ]))?;
    let name = format!(
        "sglang-{sglang}-torch-{torch}-{}-{:016x}",
        py.trim(),
        fnv1a(&reqs)
    );
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("nixl-rs");
    let venv = cache.join(&name);
    if venv.join(".ready").is_file() {
        return Ok(venv);
    }
    let tmp = cache.join(format!("{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&cache)?;
    println!(
        "installing SGLang {sglang}, torch {torch} and what they import into {} (once per machine)",
        venv.display()
    );
    let start = Instant::now();
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&tmp))?;
    cmd::run(
        Command::new(tmp.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(root.join(requirements)),
    )?;
    pip(
        &tmp,
        &["install", "--no-deps", &format!("sglang=={sglang}")],
    )?;
    settle(&tmp, &venv)?;
    println!(
        "SGLang {sglang} venv ready in {:.0}s ({})",
        start.elapsed().as_secs_f64(),
        venv.display()
    );
    Ok(venv)
}

fn site_packages(venv: &Path) -> anyhow::Result<PathBuf> {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .with_context(|| format!("no {}", lib.display()))?
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .with_context(|| format!("no site-packages under {}", lib.display()))
}

fn pip(venv: &Path, args: &[&str]) -> anyhow::Result<()> {
    cmd::run(
        Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "--quiet", "--disable-pip-version-check"])
            .args(args),
    )
}

fn python_required() -> anyhow::Result<()> {
    if !cmd::exists("python3") {
        bail!(
            "python3 with venv and pip is needed; run: apt-get install -y python3-venv python3-pip"
        );
    }
    Ok(())
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust releases, for the cache key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
