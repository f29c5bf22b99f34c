//! `cargo xtask runtime`: the NIXL runtime from the PyPI wheel, reduced to the shared-library
//! closure of the UCX, POSIX and OBJ plugins and the cma and cuda UCX modules (docs/runtime.md §1).
//!
//! Layout (the wheel's RPATHs need exactly this): `DIR/lib/` holds `libnixl_capi.so` and friends,
//! `DIR/lib/plugins/` the plugins, `DIR/nixl_cuXX.libs/` the bundled dependencies and
//! `DIR/nixl_cuXX.libs/ucx/` the UCX modules.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::cmd;

/// The pinned NIXL release.
pub(crate) const NIXL_VERSION: &str = "1.5.1";
const PLUGINS: [&str; 3] = ["UCX", "POSIX", "OBJ"];
const UCX_MODULES: [&str; 3] = ["libuct_cma", "libuct_cuda", "libucm_cuda"];
/// Libraries a GPU host's driver provides; missing on a CPU machine, which only matters to the
/// UCX cuda modules (UCX skips them there).
const DRIVER_LIBS: [&str; 4] = [
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libcudart.so.12",
    "libcudart.so.13",
];

#[derive(clap::Args, Debug)]
pub(crate) struct RuntimeArgs {
    /// CUDA major version of the wheel: 12 (nixl-cu12) or 13 (nixl-cu13; its OBJ plugin needs a
    /// library PyPI does not ship).
    #[arg(long, default_value_t = 12)]
    cuda: u32,
    /// Where to put the runtime (default: target/nixl-runtime).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write a .tar.gz (or .tar.xz) of the runtime to this file, for a GPU machine.
    #[arg(long)]
    pack: Option<PathBuf>,
    /// Extract again even if the runtime is present.
    #[arg(long)]
    force: bool,
}

impl RuntimeArgs {
    pub(crate) fn default_ci() -> Self {
        Self {
            cuda: 12,
            dir: None,
            pack: None,
            force: false,
        }
    }

    /// The CUDA 13 runtime in `dir` (for GPU machines).
    pub(crate) fn cuda13(dir: PathBuf) -> Self {
        Self {
            cuda: 13,
            dir: Some(dir),
            pack: None,
            force: false,
        }
    }
}

/// Provisions the runtime; returns its directory.
pub(crate) fn run(root: &Path, args: &RuntimeArgs) -> anyhow::Result<PathBuf> {
    if args.cuda != 12 && args.cuda != 13 {
        bail!("--cuda must be 12 or 13");
    }
    let package = format!("nixl-cu{}", args.cuda);
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| root.join("target/nixl-runtime"));
    let marker = dir.join("nixl-runtime.json");
    let wanted = format!("{package}=={NIXL_VERSION}");
    let present = fs::read_to_string(&marker)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v["package"] == wanted.as_str());
    if present && !args.force {
        println!("NIXL runtime {wanted} present at {}", dir.display());
    } else {
        let wheel = download(root, &package)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let files = extract_closure(&wheel, &dir, args.cuda)?;
        verify(&dir)?;
        let manifest = serde_json::json!({ "package": wanted, "files": files });
        fs::write(&marker, serde_json::to_string_pretty(&manifest)?)?;
        println!(
            "NIXL runtime {wanted}: {} files in {}",
            files.len(),
            dir.display()
        );
    }
    if let Some(pack) = &args.pack {
        let flag = if pack.extension().is_some_and(|e| e == "xz") {
            "-cJf"
        } else {
            "-czf"
        };
        cmd::run(
            Command::new("tar")
                .arg("-C")
                .arg(&dir)
                .arg(flag)
                .arg(pack)
                .arg("."),
        )?;
        println!(
            "packed {} ({} bytes)",
            pack.display(),
            fs::metadata(pack)?.len()
        );
    }
    Ok(dir)
}

/// The wheel, from target/nixl-wheels or pip.
fn download(root: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let wheels = root.join("target/nixl-wheels");
    let prefix = format!("{}-{NIXL_VERSION}-", package.replace('-', "_"));
    let find = || -> Option<PathBuf> {
        fs::read_dir(&wheels)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&prefix) && n.ends_with(".whl")
                })
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    if !cmd::exists("python3") {
        bail!("python3 with pip is needed to fetch {package}; run: apt-get install -y python3-pip");
    }
    println!("downloading {package}=={NIXL_VERSION} from PyPI");
    cmd::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args([
                "--python-version",
                "3.11",
                "--platform",
                "manylinux_2_28_x86_64",
            ])
            .args(["--disable-pip-version-check", "--quiet", "-d"])
            .arg(&wheels)
            .arg(format!("{package}=={NIXL_VERSION}")),
    )?;
    find().with_context(|| format!("pip succeeded but no {prefix}*.whl in {}", wheels.display()))
}

/// Extracts the DT_NEEDED closure of the chosen plugins and UCX modules. Returns the files
/// written, relative to `dir`.
fn extract_closure(wheel: &Path, dir: &Path, cuda: u32) -> anyhow::Result<Vec<String>> {
    let meson = format!(".nixl_cu{cuda}.mesonpy.libs/");
    let libs = format!("nixl_cu{cuda}.libs/");
    let file = fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).context("reading the wheel")?;

    // Shared libraries the closure may resolve to, by file name.
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    let mut roots: Vec<String> = Vec::new();
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    for n in &names {
        for base in [&meson, &libs] {
            if let Some(rest) = n.strip_prefix(base.as_str())
                && !rest.contains('/')
                && !rest.is_empty()
            {
                by_name.insert(rest.to_owned(), n.clone());
            }
        }
        if n == &format!("{meson}libnixl_capi.so") {
            roots.push(n.clone());
        }
        if PLUGINS
            .iter()
            .any(|p| n == &format!("{meson}plugins/libplugin_{p}.so"))
        {
            roots.push(n.clone());
        }
        if let Some(rest) = n.strip_prefix(&format!("{libs}ucx/"))
            && UCX_MODULES
                .iter()
                .any(|m| rest.starts_with(&format!("{m}.so")))
        {
            roots.push(n.clone());
        }
    }
    let wanted_roots = 1 + PLUGINS.len() + UCX_MODULES.len();
    if roots.len() != wanted_roots {
        bail!(
            "the wheel lacks some of libnixl_capi, the {PLUGINS:?} plugins or the {UCX_MODULES:?} modules (found {roots:?})"
        );
    }

    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<String> = roots.into();
    let mut written = Vec::new();
    while let Some(entry) = queue.pop_front() {
        if !seen.insert(entry.clone()) {
            continue;
        }
        let mut data = Vec::new();
        zip.by_name(&entry)?.read_to_end(&mut data)?;
        let elf = goblin::elf::Elf::parse(&data).with_context(|| format!("parsing {entry}"))?;
        for needed in &elf.libraries {
            if let Some(e) = by_name.get(*needed) {
                queue.push_back(e.clone());
            }
        }
        let rel = if let Some(r) = entry.strip_prefix(&meson) {
            format!("lib/{r}")
        } else {
            entry.clone()
        };
        let out = dir.join(&rel);
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&out, &data).with_context(|| format!("writing {}", out.display()))?;
        written.push(rel);
    }
    written.sort();
    Ok(written)
}

/// Checks with `ldd` that the library and plugins resolve every dependency (the UCX cuda modules
/// may lack only the GPU driver's libraries).
fn verify(dir: &Path) -> anyhow::Result<()> {
    let mut targets = vec![dir.join("lib/libnixl_capi.so")];
    for p in PLUGINS {
        targets.push(dir.join(format!("lib/plugins/libplugin_{p}.so")));
    }
    for t in &targets {
        let out = cmd::output(Command::new("ldd").arg(t))?;
        let missing: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("not found"))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|lib| !DRIVER_LIBS.contains(lib) && !lib.starts_with("libcuobjclient"))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} cannot resolve {missing:?}; the host needs glibc >= 2.28, libstdc++, OpenSSL 3 and zlib (apt-get install -y libssl3 zlib1g libstdc++6)",
                t.display()
            );
        }
    }
    Ok(())
}
