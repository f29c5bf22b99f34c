//! The full `nixl-pd` flow on one GPU (bootstrap, ZeroMQ, claim, transfers, notifications,
//! Success), plain per-page descriptors with the NIXL-only settings against the staged path,
//! for 1, 32 and 256 pages per request: one verified run, then a timed run without
//! verification, per configuration and round.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Staging slots per side and their size: a 32-page request of 64 × 32 KiB is one slot.
pub(crate) const STAGING_SLOTS: u32 = 8;
pub(crate) const STAGING_SLOT_MIB: u64 = 64;

/// (pages per request, timed requests).
pub(crate) const SIZES: [(u32, u32); 3] = [(1, 300), (32, 150), (256, 30)];

/// The paths compared: per-page descriptors (NIXL only), the staged path with the same-node
/// direct path turned off, and the direct path (both processes on one node).
pub(crate) const PATHS: [&str; 3] = ["plain", "staged", "direct"];

fn pool(gpu: u32, path: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "--layers",
        "32",
        "--page-bytes",
        "32768",
        "--pages",
        "600",
        "--device",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push(format!("gpu:{gpu}"));
    // Both paths poll without sleeping, as an engine's scheduler loop would.
    v.push("--spin".into());
    if path != "plain" {
        v.push("--staging".into());
        v.extend(["--staging-slots".into(), STAGING_SLOTS.to_string()]);
        v.extend(["--staging-slot-mib".into(), STAGING_SLOT_MIB.to_string()]);
    }
    if path == "staged" {
        v.push("--no-direct".into());
    }
    v
}

/// A `nixl-pd prefill` on `port` with `pool`, once its bootstrap server is up; the thread
/// returns the rest of its stderr when it exits.
pub(crate) fn start_prefill(
    pd: &Path,
    port: u16,
    pool: &[String],
) -> anyhow::Result<(Child, JoinHandle<String>)> {
    start_prefill_rank(pd, &["--bootstrap-port".into(), port.to_string()], pool)
}

/// A `nixl-pd prefill` with `how` (its own bootstrap server, or `--join` another's) and `pool`,
/// once it is up; the thread returns the rest of its stderr when it exits.
fn start_prefill_rank(
    pd: &Path,
    how: &[String],
    pool: &[String],
) -> anyhow::Result<(Child, JoinHandle<String>)> {
    let mut prefill = Command::new(pd)
        .arg("prefill")
        .args(how)
        .args(pool)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nixl-pd prefill")?;
    let mut err = BufReader::new(prefill.stderr.take().context("stderr")?);
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            let _ = prefill.wait();
            bail!("nixl-pd prefill exited before its bootstrap server started");
        }
        if line.contains("bootstrap on") {
            break;
        }
    }
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    Ok((prefill, drain))
}

/// One configuration: a prefill process, a verified decode run, then a timed one.
pub(crate) fn run_one(
    pd: &Path,
    gpu: u32,
    ppr: u32,
    requests: u32,
    path: &str,
    log: &Path,
) -> anyhow::Result<Vec<Value>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (mut prefill, drain) = start_prefill(pd, port, &pool(gpu, path))?;
    let decode = |verify: bool, n: u32| -> anyhow::Result<Value> {
        let mut cmd = Command::new(pd);
        cmd.arg("decode")
            .args(["--bootstrap", &format!("127.0.0.1:{port}")])
            .args(pool(gpu, path))
            .args(["--requests", &n.to_string()])
            .args(["--pages-per-request", &ppr.to_string()])
            .args(["--concurrency", "1", "--json"]);
        if !verify {
            cmd.arg("--no-verify");
        }
        let out = cmd.output()?;
        let mut v = decode_row(&out, ppr, path, verify)?;
        v["staged"] = json!(path == "staged");
        Ok(v)
    };
    let mut rows = vec![decode(true, requests.min(30))?, decode(false, requests)?];
    let _ = prefill.kill();
    let _ = prefill.wait();
    finish_prefill_log(drain, &mut rows, log)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(rows)
}

/// Heterogeneous TP through the full flow, on one GPU: `p` prefill ranks and `d` decode
/// ranks as processes (`(1, 2)`: one prefill rank of TP 1 with 8 KV heads of 256 bytes, 16
/// tokens a page (32 KiB pages, as above), and two decode ranks of TP 2 with 4 heads each (16
/// KiB pages); `(2, 1)` the reverse), every request going to every decode rank (one seed).
/// Each decode rank takes its heads by `path`: `plain` (one descriptor per token slot, SGLang's
/// wire-compatible way), `packed` (`P < D`: a prefill that can gather, decodes that do not
/// stage, as SGLang's: the slices gathered into whole decode pages, then WRITTEN as pages; the
/// same wire), `staged` (decodes with staging rings, the direct path off: `P < D` the slices
/// packed into our slot, `P > D` our whole pages, one WRITE into the decode's ring slot, its
/// scatter) or `direct` (one sliced kernel in each prefill). Rows per decode rank: a verified
/// run, then a timed one.
pub(crate) fn run_sliced(
    pd: &Path,
    gpu: u32,
    ppr: u32,
    requests: u32,
    path: &str,
    (p, d): (u32, u32),
    log: &Path,
) -> anyhow::Result<Vec<Value>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ratio = format!("{p}:{d}");
    let side = |tp: u32, rank: u32, decode: bool| -> Vec<String> {
        // Packed: only the prefill stages; its decodes are passive targets.
        let decode_plain = path == "packed" && decode;
        let heads = 8 / tp;
        let mut v = pool(gpu, if decode_plain { "plain" } else { path });
        // pool() sets 32 KiB pages; a rank of TP 2 holds half the heads.
        let at = v.iter().position(|a| a == "--page-bytes").unwrap_or(0) + 1;
        v[at] = (16 * u64::from(heads) * 256).to_string();
        for a in [
            "--heads".to_owned(),
            heads.to_string(),
            "--page-tokens".to_owned(),
            "16".to_owned(),
            "--tp-size".to_owned(),
            tp.to_string(),
            "--tp-rank".to_owned(),
            rank.to_string(),
        ] {
            v.push(a);
        }
        v
    };
    let bootstrap = format!("127.0.0.1:{port}");
    let mut prefills = Vec::new();
    for rank in 0..p {
        let how = if rank == 0 {
            vec!["--bootstrap-port".to_owned(), port.to_string()]
        } else {
            vec!["--join".to_owned(), bootstrap.clone()]
        };
        match start_prefill_rank(pd, &how, &side(p, rank, false)) {
            Ok(started) => prefills.push(started),
            Err(e) => {
                for (mut c, _) in prefills {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    let run = |verify: bool, n: u32| -> anyhow::Result<Vec<Value>> {
        let mut children = Vec::new();
        for rank in 0..d {
            let mut cmd = Command::new(pd);
            cmd.arg("decode")
                .args(["--bootstrap", &bootstrap])
                .args(side(d, rank, true))
                .args(["--sliced-tp", "--seed", "4242", "--prefill-pages", "600"])
                .args(["--requests", &n.to_string()])
                .args(["--pages-per-request", &ppr.to_string()])
                .args(["--concurrency", "1", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if !verify {
                cmd.arg("--no-verify");
            }
            children.push(cmd.spawn().context("starting nixl-pd decode")?);
        }
        let mut rows = Vec::new();
        for (rank, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output()?;
            let mut v = decode_row(&out, ppr, path, verify)?;
            v["sliced"] = json!(ratio);
            v["decode_rank"] = json!(rank);
            rows.push(v);
        }
        Ok(rows)
    };
    let rows = run(true, requests.min(30)).and_then(|mut rows| {
        rows.extend(run(false, requests)?);
        Ok(rows)
    });
    let mut drains = Vec::new();
    for (mut c, drain) in prefills {
        let _ = c.kill();
        let _ = c.wait();
        drains.push(drain);
    }
    let mut rows = rows?;
    // The first prefill rank's log and counts (every rank moves the same requests).
    let mut drains = drains.into_iter();
    if let Some(first) = drains.next() {
        finish_prefill_log(first, &mut rows, log)?;
    }
    for d in drains {
        let _ = d.join();
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok(rows)
}

/// Writes the prefill's stderr to `log` and gives every row its last count of how its requests
/// went (prepared, explicit, staged, direct).
fn finish_prefill_log(
    drain: JoinHandle<String>,
    rows: &mut [Value],
    log: &Path,
) -> anyhow::Result<()> {
    let text = drain.join().unwrap_or_default();
    let paths = text
        .lines()
        .rev()
        .find_map(|l| l.split_once("requests so far: ").map(|(_, p)| p.to_owned()));
    for r in rows.iter_mut() {
        r["prefill_paths"] = json!(paths);
    }
    std::fs::write(log, text)?;
    Ok(())
}

/// A `nixl-pd decode --json` run as a row: its summary (or why there is none), the size, the
/// path, whether it was a verified run that passed, and its exit code.
fn decode_row(
    out: &std::process::Output,
    ppr: u32,
    path: &str,
    verify: bool,
) -> anyhow::Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v: Value = match text.lines().rev().find(|l| l.starts_with('{')) {
        Some(l) => serde_json::from_str(l)?,
        None => json!({"failed": crate::driver::tail(&String::from_utf8_lossy(&out.stderr))}),
    };
    v["pages_per_request"] = json!(ppr);
    v["path"] = json!(path);
    v["verified"] = json!(verify && out.status.success());
    v["exit"] = json!(out.status.code());
    Ok(v)
}
