//! `cargo xtask demo`: the main job. Provisions everything, starts a prefill (with its
//! bootstrap server) and a decode on 127.0.0.1, runs a stream of requests with a progress bar,
//! verifies every byte and prints the summary. `--tp P:D` runs P prefill and D decode ranks
//! with head slicing instead (demo_tp.rs).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{cmd, prereq, runtime};

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Requests to run.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Pages per request.
    #[arg(long, default_value_t = 32)]
    pages_per_request: usize,
    /// Model layers (2 KV buffers each).
    #[arg(long, default_value_t = 8)]
    layers: u32,
    /// Bytes per page per buffer.
    #[arg(long, default_value_t = 16384)]
    page_bytes: u64,
    /// Pages per chunk on the prefill.
    #[arg(long, default_value_t = 16)]
    chunk_pages: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// `P:D`: P prefill ranks and D decode ranks of a model that is not MLA, each decode rank
    /// getting its KV heads sliced out of the prefill ranks' pages (for example `2:4`).
    #[arg(long)]
    tp: Option<String>,
    /// The SGLang release family both sides speak and lay their aux buffers out as:
    /// `sglang-0.5.1`, `sglang-0.5.20` or `sglang-0.5.23`.
    #[arg(long, default_value = "sglang-0.5.1")]
    profile: String,
}

/// Builds the `nixl-pd` program in release and returns its path (demo, `bench kv` and `gpu`
/// use it).
pub(crate) fn build_pd(root: &Path) -> anyhow::Result<PathBuf> {
    build_bin(root, "nixl-tools", "nixl-pd")
}

/// Builds binary `bin` of `package` in release and returns its path.
pub(crate) fn build_bin(root: &Path, package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    cmd::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        package,
        "--bin",
        bin,
    ]))?;
    Ok(root.join("target/release").join(bin))
}

impl DemoArgs {
    /// A short run for CI: two processes, 100 requests, chunked sends, every byte verified.
    pub(crate) fn smoke() -> Self {
        Self {
            requests: 100,
            pages_per_request: 16,
            layers: 4,
            page_bytes: 8192,
            chunk_pages: 4,
            concurrency: 4,
            tp: None,
            profile: "sglang-0.5.1".into(),
        }
    }

    /// What CI runs for `--profile`: the smoke run in that release's dialect.
    pub(crate) fn profile_smoke(profile: &str) -> Self {
        Self {
            requests: 60,
            profile: profile.to_owned(),
            ..Self::smoke()
        }
    }

    /// What CI runs for `--tp`: a short stream of 8-page requests.
    pub(crate) fn tp_smoke(tp: &str) -> Self {
        Self {
            requests: 60,
            pages_per_request: 8,
            tp: Some(tp.to_owned()),
            ..Self::smoke()
        }
    }
}

pub(crate) fn run(root: &Path, args: &DemoArgs) -> anyhow::Result<()> {
    prereq::ensure_libclang()?;
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    let pd = build_pd(root)?;
    if let Some(tp) = &args.tp {
        let ranks = crate::demo_tp::parse(tp)?;
        return crate::demo_tp::run(&pd, ranks, args.requests, args.pages_per_request);
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let pages = (args.pages_per_request * args.concurrency * 2).max(256);
    let pool = |c: &mut Command| {
        c.args([
            "--layers",
            &args.layers.to_string(),
            "--page-bytes",
            &args.page_bytes.to_string(),
        ])
        .args(["--pages", &pages.to_string()])
        .args(["--profile", &args.profile]);
    };
    let mut prefill = Command::new(&pd);
    prefill.args([
        "prefill",
        "--bootstrap-port",
        &port.to_string(),
        "--chunk-pages",
        &args.chunk_pages.to_string(),
    ]);
    pool(&mut prefill);
    println!("starting the prefill (bootstrap server on 127.0.0.1:{port})");
    let mut child = prefill
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nixl-pd prefill")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[prefill] {line}");
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("prefill: bootstrap on") => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    if ready.is_err() {
        let _ = child.kill();
        bail!("the prefill did not come up within 60 s");
    }
    let mut decode = Command::new(&pd);
    decode
        .args(["decode", "--bootstrap", &format!("127.0.0.1:{port}")])
        .args([
            "--requests",
            &args.requests.to_string(),
            "--pages-per-request",
            &args.pages_per_request.to_string(),
        ])
        .args(["--concurrency", &args.concurrency.to_string()]);
    pool(&mut decode);
    println!(
        "running {} requests of {} pages on the decode ({})",
        args.requests, args.pages_per_request, args.profile
    );
    let status = decode.status().context("running nixl-pd decode");
    let _ = child.kill();
    let _ = child.wait();
    if !status?.success() {
        bail!("the decode reported failures");
    }
    println!("demo: every request succeeded and every byte was verified");
    Ok(())
}
