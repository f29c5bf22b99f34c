//! `nixl-hicache`: store, fetch and benchmark KV pages with the HiCache connector.
//!
//! ```text
//! nixl-hicache put    --dir D --key K [--file F]        # F or stdin
//! nixl-hicache get    --dir D --key K [--file F]        # F or stdout; exit 1 on a miss
//! nixl-hicache exists --dir D --key K                   # prints true/false; exit 1 if absent
//! nixl-hicache bench  --dir D --pages N --page-bytes B [--batch K] [--backend posix|obj]
//!                     [--device cpu|gpu:N] [--json]
//! ```
//! For `--backend obj` set `--endpoint HOST:PORT --bucket NAME` (credentials from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, or `--access-key/--secret-key`).
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs,
    reason = "command-line program"
)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nixl_core::{BackendParams, HostBuffer};
use nixl_hicache::{HiCache, HiCacheConfig, Plugin, RawTarget, page_key};

#[derive(Parser)]
#[command(
    name = "nixl-hicache",
    about = "KV pages in files or objects over NIXL (SGLang HiCache layout)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Store {
    /// Storage directory (file backends).
    #[arg(long, default_value = nixl_hicache::DEFAULT_DIR)]
    dir: PathBuf,
    /// Storage backend.
    #[arg(long, value_enum, default_value_t = Backend::Posix)]
    backend: Backend,
    /// S3 endpoint for --backend obj (host:port, http).
    #[arg(long)]
    endpoint: Option<String>,
    /// S3 bucket for --backend obj.
    #[arg(long)]
    bucket: Option<String>,
    /// S3 access key (default: AWS_ACCESS_KEY_ID).
    #[arg(long)]
    access_key: Option<String>,
    /// S3 secret key (default: AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    secret_key: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Posix,
    Obj,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store a page.
    Put {
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        key: String,
        /// Read the page from this file (default: stdin).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Fetch a page.
    Get {
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        key: String,
        /// Write the page to this file (default: stdout).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Page length (needed for --backend obj; files know their size).
        #[arg(long)]
        len: Option<usize>,
    },
    /// Say whether a page is stored.
    Exists {
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        key: String,
    },
    /// Write then read N pages and report throughput.
    Bench {
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        pages: usize,
        #[arg(long)]
        page_bytes: usize,
        /// Pages per batch_set / batch_get call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Print one JSON object at the end instead of the text summary.
        #[arg(long)]
        json: bool,
        /// Where the pages live: `cpu` (registered host memory) or `gpu:N` (GPU N, staged
        /// through a pinned buffer of one batch).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() -> anyhow::Result<()> {
    nixl_tools::init_logging();
    let cmd = Cli::parse().cmd;
    match nixl_tools::runtime::load() {
        Ok(loaded) => {
            if let nixl_tools::runtime::Source::PipWheel(dir) = &loaded.source {
                eprintln!("using the pip-installed NIXL runtime in {}", dir.display());
            }
        }
        Err(e) => {
            eprintln!("nixl-hicache: {e}");
            std::process::exit(2);
        }
    }
    match cmd {
        Cmd::Put { store, key, file } => {
            let cache = open(&store)?;
            let mut data = Vec::new();
            match file {
                Some(f) => {
                    data = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                None => drop(std::io::stdin().read_to_end(&mut data)?),
            }
            // Registered memory: the zero-copy path (an unregistered slice is staged instead).
            let mut buf = cache.register_buffer(HostBuffer::new(data.len())?)?;
            buf.buffer_mut().as_mut_slice().copy_from_slice(&data);
            cache.set_raw(
                &key,
                RawTarget {
                    addr: buf.region().addr,
                    len: data.len() as u64,
                },
            )?;
            eprintln!("stored {} bytes under {key}", data.len());
        }
        Cmd::Get {
            store,
            key,
            file,
            len,
        } => {
            let cache = open(&store)?;
            let len = match (len, cache.path_of(&key)?) {
                (Some(n), _) => n,
                (None, Some(path)) => match std::fs::metadata(&path) {
                    Ok(m) => usize::try_from(m.len())?,
                    Err(_) => {
                        eprintln!("{key}: not stored");
                        std::process::exit(1);
                    }
                },
                (None, None) => bail!("--len is needed with --backend obj"),
            };
            let buf = cache.register_buffer(HostBuffer::new(len)?)?;
            if !cache.get_raw(
                &key,
                RawTarget {
                    addr: buf.region().addr,
                    len: len as u64,
                },
            )? {
                eprintln!("{key}: not stored");
                std::process::exit(1);
            }
            let bytes = buf.buffer().as_slice();
            match file {
                Some(f) => {
                    std::fs::write(&f, bytes).with_context(|| format!("writing {}", f.display()))?
                }
                None => std::io::stdout().write_all(bytes)?,
            }
        }
        Cmd::Exists { store, key } => {
            let yes = open(&store)?.exists(&key)?;
            println!("{yes}");
            if !yes {
                std::process::exit(1);
            }
        }
        Cmd::Bench {
            store,
            pages,
            page_bytes,
            batch,
            json,
            device,
        } => {
            let gpu = match device.strip_prefix("gpu:") {
                Some(n) => Some(n.parse::<u32>().context("--device gpu:N")?),
                None if device == "cpu" => None,
                None => bail!("--device is cpu or gpu:N, not {device}"),
            };
            bench(&store, pages, page_bytes, batch.max(1), json, gpu)?;
        }
    }
    Ok(())
}

/// `bench --device gpu:N`: pages in GPU memory, staged through a pinned buffer of one batch.
mod device {
    use std::time::{Duration, Instant};

    use nixl_core::cuda::DeviceBuffer;
    use nixl_hicache::{DevicePage, HiCache, page_key};

    /// Stores every page of a GPU buffer, loads them into another, and compares the two.
    pub(crate) fn run(
        cache: &HiCache,
        gpu: u32,
        pages: usize,
        page_bytes: usize,
        batch: usize,
        json: bool,
    ) -> anyhow::Result<(Duration, Duration, usize, bool)> {
        let total = pages * page_bytes;
        let mut pattern = vec![0u8; total];
        nixl_tools::pattern::fill(&mut pattern, 42);
        let mut src = DeviceBuffer::new(gpu, total)?;
        src.copy_from_host(&pattern)?;
        let mut dst = DeviceBuffer::new(gpu, total)?;
        let mut staging = cache.device_staging(gpu, batch * page_bytes)?;
        // Keys distinct from the host bench's, so a previous run cannot satisfy this one.
        let keys: Vec<String> = (0..pages as u32)
            .map(|i| page_key(&[i, 0x6e4d], None))
            .collect();
        let list: Vec<DevicePage<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| DevicePage {
                key: k,
                offset: i * page_bytes,
                len: page_bytes,
            })
            .collect();
        let bar = |msg: &'static str| super::bar(pages, json, msg);
        let b = bar("set");
        let start = Instant::now();
        for chunk in list.chunks(batch) {
            cache.batch_set_device(&mut staging, &src, chunk)?;
            b.inc(chunk.len() as u64);
        }
        let set_t = start.elapsed();
        b.finish();
        let b = bar("get");
        let start = Instant::now();
        let mut misses = 0;
        for chunk in list.chunks(batch) {
            let hits = cache.batch_get_device(&mut staging, &mut dst, chunk)?;
            misses += hits.iter().filter(|&&h| !h).count();
            b.inc(chunk.len() as u64);
        }
        let get_t = start.elapsed();
        b.finish();
        let ok = misses == 0 && dst.to_host()? == pattern;
        Ok((set_t, get_t, misses, ok))
    }
}

/// A progress bar over `pages` pages (hidden with `--json`).
fn bar(pages: usize, json: bool, msg: &'static str) -> ProgressBar {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(pages as u64)
    };
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>5} [{bar:40}] {pos}/{len} pages {per_sec}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}

fn open(store: &Store) -> anyhow::Result<HiCache> {
    let config = match store.backend {
        Backend::Posix => HiCacheConfig::new(Some(store.dir.clone()), Plugin::parse("POSIX")),
        Backend::Obj => {
            let (Some(endpoint), Some(bucket)) = (&store.endpoint, &store.bucket) else {
                bail!("--backend obj needs --endpoint and --bucket");
            };
            let env = |k: &str| std::env::var(k).unwrap_or_default();
            let params = BackendParams::new()
                .with("endpoint_override", endpoint.clone())
                .with("scheme", "http")
                .with("bucket", bucket.clone())
                .with("region", "us-east-1")
                .with("use_virtual_addressing", "false")
                .with(
                    "access_key",
                    store
                        .access_key
                        .clone()
                        .unwrap_or_else(|| env("AWS_ACCESS_KEY_ID")),
                )
                .with(
                    "secret_key",
                    store
                        .secret_key
                        .clone()
                        .unwrap_or_else(|| env("AWS_SECRET_ACCESS_KEY")),
                );
            HiCacheConfig::new(None, Plugin::parse("OBJ")).params(params)
        }
    };
    Ok(HiCache::new(config)?)
}

fn bench(
    store: &Store,
    pages: usize,
    page_bytes: usize,
    batch: usize,
    json: bool,
    gpu: Option<u32>,
) -> anyhow::Result<()> {
    let cache = open(store)?;
    let total = pages
        .checked_mul(page_bytes)
        .context("pages x page-bytes overflows")?;
    if let Some(gpu) = gpu {
        let (set_t, get_t, misses, ok) = device::run(&cache, gpu, pages, page_bytes, batch, json)?;
        return summary(
            pages,
            page_bytes,
            batch,
            json,
            (set_t, get_t, misses, ok),
            Some(gpu),
        );
    }
    let mut src = cache.register_buffer(HostBuffer::new(total)?)?;
    nixl_tools::pattern::fill(src.buffer_mut().as_mut_slice(), 42);
    let dst = cache.register_buffer(HostBuffer::new(total)?)?;
    let keys: Vec<String> = (0..pages as u32)
        .map(|i| page_key(&[i, 0x5eed], None))
        .collect();
    let run = |msg: &'static str, base: u64, write: bool| -> anyhow::Result<(Duration, usize)> {
        let bar = bar(pages, json, msg);
        let start = Instant::now();
        let mut misses = 0;
        for (b, chunk) in keys.chunks(batch).enumerate() {
            let items: Vec<(&str, RawTarget)> = chunk
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let off = ((b * batch + i) * page_bytes) as u64;
                    (
                        k.as_str(),
                        RawTarget {
                            addr: base + off,
                            len: page_bytes as u64,
                        },
                    )
                })
                .collect();
            if write {
                cache.batch_set_raw(&items)?;
            } else {
                misses += cache.batch_get_raw(&items)?.iter().filter(|&&h| !h).count();
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
        Ok((start.elapsed(), misses))
    };
    let (set_t, _) = run("set", src.region().addr, true)?;
    let (get_t, misses) = run("get", dst.region().addr, false)?;
    let ok = src.buffer().as_slice() == dst.buffer().as_slice() && misses == 0;
    summary(
        pages,
        page_bytes,
        batch,
        json,
        (set_t, get_t, misses, ok),
        None,
    )
}

/// Prints the bench result; an error if anything missed or differed.
fn summary(
    pages: usize,
    page_bytes: usize,
    batch: usize,
    json: bool,
    (set_t, get_t, misses, ok): (Duration, Duration, usize, bool),
    gpu: Option<u32>,
) -> anyhow::Result<()> {
    let total = pages * page_bytes;
    let gbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e9;
    let device = gpu.map_or_else(|| "cpu".to_owned(), |g| format!("gpu:{g}"));
    if json {
        let out = serde_json::json!({
            "device": device,
            "pages": pages, "page_bytes": page_bytes, "batch": batch, "bytes": total,
            "set_seconds": set_t.as_secs_f64(), "get_seconds": get_t.as_secs_f64(),
            "set_gbps": gbps(set_t), "get_gbps": gbps(get_t), "misses": misses, "verified": ok,
        });
        println!("{out}");
    } else {
        println!(
            "{pages} pages x {page_bytes} B in {device}, batch {batch}: batch_set {:.2} GB/s ({:.1} ms), batch_get {:.2} GB/s ({:.1} ms), {}",
            gbps(set_t),
            set_t.as_secs_f64() * 1e3,
            gbps(get_t),
            get_t.as_secs_f64() * 1e3,
            if ok {
                "every byte verified"
            } else {
                "VERIFY FAILED"
            }
        );
    }
    if !ok {
        bail!("{misses} misses or mismatched bytes");
    }
    Ok(())
}
