//! `cargo xtask demo --tp P:D`: P prefill ranks and D decode ranks of a model that is not MLA,
//! as processes on 127.0.0.1. Every request goes to every rank on both sides, as in SGLang; each
//! decode rank receives the KV heads it owns, sliced out of the prefill ranks' pages
//! (docs/protocol.md §5.6), and verifies every byte.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

/// KV heads per token on a prefill rank, and tokens per page.
const PREFILL_HEADS: u32 = 8;
const PAGE_TOKENS: u32 = 4;
/// Bytes per head per token.
const HEAD_BYTES: u64 = 256;

/// Parses `P:D`.
pub(crate) fn parse(tp: &str) -> anyhow::Result<(u32, u32)> {
    let (p, d) = tp
        .split_once(':')
        .with_context(|| format!("--tp {tp}: expected P:D, e.g. 2:4"))?;
    let (p, d): (u32, u32) = (p.trim().parse()?, d.trim().parse()?);
    if p == 0 || d == 0 || (!p.is_multiple_of(d) && !d.is_multiple_of(p)) {
        bail!("--tp {tp}: one TP size must be a multiple of the other");
    }
    if !(PREFILL_HEADS * p).is_multiple_of(d) {
        bail!(
            "--tp {tp}: {PREFILL_HEADS} heads per prefill rank do not split over {d} decode ranks"
        );
    }
    Ok((p, d))
}

/// Starts `cmd` with its stderr echoed under `tag`, and waits for a line starting `ready`.
fn start(mut cmd: Command, tag: String, ready: &'static str) -> anyhow::Result<Child> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tag}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with(ready) => return Ok(child),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                bail!("a process did not print {ready:?} within 60 s");
            }
        }
    }
}

pub(crate) fn run(
    pd: &Path,
    (p, d): (u32, u32),
    requests: usize,
    pages: usize,
) -> anyhow::Result<()> {
    serve(pd, (p, d), requests, pages, true, &[])?;
    println!(
        "demo --tp {p}:{d}: every decode rank got its heads of every request, every byte verified"
    );
    Ok(())
}

/// Runs the ranks (the prefills with `prefill_args` added) until every decode rank has made
/// `requests` requests of `pages` pages (checking every byte when `verify`); returns each decode rank's summary line ("N requests x
/// ...: R req/s, G GB/s, ...").
pub(crate) fn serve(
    pd: &Path,
    (p, d): (u32, u32),
    requests: usize,
    pages: usize,
    verify: bool,
    prefill_args: &[&str],
) -> anyhow::Result<Vec<String>> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let bootstrap = format!("127.0.0.1:{port}");
    let decode_heads = PREFILL_HEADS * p / d;
    let pool = (pages * 4).max(64);
    let side = |c: &mut Command, heads: u32, tp: u32, rank: u32| {
        let page_bytes = u64::from(PAGE_TOKENS) * u64::from(heads) * HEAD_BYTES;
        c.args(["--layers", "4", "--pages", &pool.to_string()])
            .args(["--page-bytes", &page_bytes.to_string()])
            .args(["--heads", &heads.to_string()])
            .args(["--page-tokens", &PAGE_TOKENS.to_string()])
            .args(["--tp-size", &tp.to_string(), "--tp-rank", &rank.to_string()]);
    };
    println!(
        "{p} prefill ranks of {PREFILL_HEADS} KV heads, {d} decode ranks of {decode_heads}: bootstrap on {bootstrap}"
    );
    let mut prefills = Vec::new();
    for rank in 0..p {
        let mut c = Command::new(pd);
        c.arg("prefill");
        if rank == 0 {
            c.args(["--bootstrap-port", &port.to_string()]);
        } else {
            c.args(["--join", &bootstrap]);
        }
        side(&mut c, PREFILL_HEADS, p, rank);
        c.args(prefill_args);
        match start(c, format!("prefill {rank}"), "prefill: bootstrap on") {
            Ok(child) => prefills.push(child),
            Err(e) => {
                stop(&mut prefills);
                return Err(e);
            }
        }
    }
    // Every decode rank runs the same rooms (one seed): each request reaches all of them.
    let mut decodes = Vec::new();
    for rank in 0..d {
        let mut c = Command::new(pd);
        c.args([
            "decode",
            "--bootstrap",
            &bootstrap,
            "--sliced-tp",
            "--seed",
            "4242",
        ])
        .args(["--requests", &requests.to_string()])
        .args(["--pages-per-request", &pages.to_string()])
        .args(["--prefill-pages", &pool.to_string(), "--concurrency", "2"])
        .stdout(Stdio::piped());
        if !verify {
            c.arg("--no-verify");
        }
        side(&mut c, decode_heads, d, rank);
        decodes.push((rank, c.spawn().context("starting nixl-pd decode")?));
    }
    let mut failed = Vec::new();
    let mut summaries = Vec::new();
    for (rank, child) in decodes {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text
            .lines()
            .filter(|l| l.contains("requests x") || l.starts_with("sentinel"))
        {
            println!("decode {rank}: {line}");
            if line.contains("requests x") {
                summaries.push(line.to_owned());
            }
        }
        if !out.status.success() {
            failed.push(rank);
        }
    }
    stop(&mut prefills);
    if !failed.is_empty() {
        bail!("decode ranks {failed:?} reported failures");
    }
    Ok(summaries)
}

fn stop(children: &mut Vec<Child>) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}
