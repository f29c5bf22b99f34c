//! `gpubench all`: the anchors, then every case in a child process of its own (so that each
//! gets its own UCX environment and `UCX_PROTO_INFO` tables), then the `pd` flow, then one
//! Markdown report with the ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use nixl_bench::proto_info::rma_tables;
use serde_json::{Value, json};

use crate::report;

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct AllArgs {
    #[arg(long, default_value_t = 0)]
    pub(crate) gpu: u32,
    /// The GPU of the target side (default: the same GPU).
    #[arg(long)]
    pub(crate) remote_gpu: Option<u32>,
    /// The `nixl-pd` binary, for the prefill/decode rows and their ratio to raw NIXL.
    #[arg(long)]
    pub(crate) pd: Option<PathBuf>,
    /// Directory for per-case logs, results.json and report.md.
    #[arg(long, default_value = "gpubench-out")]
    pub(crate) out: PathBuf,
    /// Seconds of timed transfers per case and series.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) seconds: f64,
    /// Ordinary host memory everywhere, no anchors (needs no GPU; for trying the program out).
    #[arg(long)]
    pub(crate) host: bool,
}

/// One planned case: its command-line arguments and extra environment.
struct Plan {
    args: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
    /// A short label for the configuration column.
    config: &'static str,
}

const SAME_PROCESS: (&str, &str) = ("UCX_CUDA_IPC_ENABLE_SAME_PROCESS", "y");

/// Environment variables for a case.
type Env = &'static [(&'static str, &'static str)];

fn plan(a: &AllArgs) -> Vec<Plan> {
    let rg = a.remote_gpu.unwrap_or(a.gpu);
    let two_gpus = rg != a.gpu;
    let base = |name: &str, place: &str| -> Vec<String> {
        [
            "case",
            "--name",
            name,
            "--place",
            place,
            "--gpu",
            &a.gpu.to_string(),
            "--remote-gpu",
            &rg.to_string(),
            "--seconds",
            &a.seconds.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let with = |mut v: Vec<String>, extra: &[&str]| {
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let sizes: [(&str, &[&str]); 5] = [
        ("1 x 4 KiB", &["--block", "4096"]),
        ("1 x 64 KiB", &["--block", "65536"]),
        ("1 x 1 MiB", &["--block", "1048576"]),
        ("1 x 64 MiB", &["--block", "67108864"]),
        (
            "4096 x 64 KiB scattered",
            &[
                "--block",
                "65536",
                "--pool-pages",
                "8192",
                "--per-buffer",
                "4096",
            ],
        ),
    ];
    let mut out = Vec::new();
    let places: &[(&str, &'static str, Env)] = if two_gpus {
        &[("two", "2 proc", &[])]
    } else {
        &[
            ("two", "2 proc", &[]),
            ("one", "1 proc + SAME_PROCESS", &[SAME_PROCESS]),
        ]
    };
    for &(place, config, env) in places {
        for (name, extra) in sizes {
            out.push(Plan {
                args: with(base(name, place), extra),
                env: env.to_vec(),
                config,
            });
        }
    }
    let pd_secs = (a.seconds * 3.0).to_string();
    for ppr in ["32", "256"] {
        let name = format!("pd descriptors: 64 x {ppr} x 32 KiB");
        let mut args = with(
            base(&name, "two"),
            &[
                "--block",
                "32768",
                "--buffers",
                "64",
                "--pool-pages",
                "600",
                "--per-buffer",
                ppr,
                "--prepared",
                "--dst-run",
                "4",
            ],
        );
        if let Some(i) = args.iter().position(|s| s == "--seconds") {
            args[i + 1].clone_from(&pd_secs);
        }
        out.push(Plan {
            args,
            env: vec![],
            config: "2 proc",
        });
    }
    // Configurations in which UCX emulates; each should be predicted by nixl-core.
    let short = |v: Vec<String>| {
        let mut v = v;
        if let Some(i) = v.iter().position(|s| s == "--seconds") {
            v[i + 1] = "0.3".into();
        }
        v
    };
    let mib = ["--block", "1048576"];
    let m64 = ["--block", "67108864"];
    if !two_gpus {
        out.push(Plan {
            args: short(with(base("1 x 1 MiB", "one"), &mib)),
            env: vec![],
            config: "1 proc, default UCX",
        });
    }
    out.push(Plan {
        args: short(with(
            base("1 x 1 MiB", "two"),
            &[&mib[..], &["--local", "pinned"]].concat(),
        )),
        env: vec![],
        config: "2 proc, pinned host -> VRAM",
    });
    out.push(Plan {
        args: short(with(
            base("1 x 64 MiB", "two"),
            &[&m64[..], &["--op", "read"]].concat(),
        )),
        env: vec![],
        config: "2 proc, READ",
    });
    out.push(Plan {
        args: short(with(
            base("1 x 64 MiB", "two"),
            &[&m64[..], &["--op", "read"]].concat(),
        )),
        env: vec![("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")],
        config: "2 proc, READ + GET_ZCOPY=y",
    });
    out.push(Plan {
        args: short(with(base("1 x 1 MiB", "two"), &mib)),
        env: vec![("UCX_TLS", "tcp,cuda_copy")],
        config: "2 proc, UCX_TLS=tcp,cuda_copy",
    });
    if a.host {
        out.retain(|p| !p.args.iter().any(|s| s == "--local"));
        for p in &mut out {
            p.args
                .extend(["--local", "host", "--remote", "host"].map(String::from));
        }
    }
    out
}

/// Runs one planned case in a child process; returns its JSON with the UCX tables added.
fn run_case(p: &Plan, log: &Path) -> anyhow::Result<Value> {
    let result = log.with_extension("json");
    let _ = std::fs::remove_file(&result);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(&p.args)
        .arg("--result")
        .arg(&result)
        .env("UCX_PROTO_INFO", "y");
    for (k, v) in &p.env {
        cmd.env(k, v);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running a case")?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(log, &text)?;
    let mut v: Value = match std::fs::read_to_string(&result) {
        Ok(l) if out.status.success() => serde_json::from_str(&l)?,
        _ => json!({ "case": p.args[2], "failed": format!("{}: {}", out.status, tail(&text)) }),
    };
    let tables: Vec<Value> = rma_tables(&text)
        .into_iter()
        .map(|t| {
            json!({
                "endpoint": t.endpoint,
                "operation": t.operation,
                "summary": t.summary(),
                "emulated": t.emulated(),
                "gpu": t.involves_gpu(),
            })
        })
        .collect();
    v["ucx_tables"] = Value::Array(tables);
    v["config"] = json!(p.config);
    v["env"] = json!(
        p.env
            .iter()
            .map(|(k, val)| format!("{k}={val}"))
            .collect::<Vec<_>>()
    );
    Ok(v)
}

pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains('|') && !l.starts_with(' ') && !l.starts_with('['))
        .collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

/// Runs the `pd` flow (prefill and decode processes, VRAM pools) for 32 and 256 pages.
/// Rounds of raw and pd runs, alternating.
const ROUNDS: usize = 3;

fn run_pd(pd: &Path, a: &AllArgs, out_dir: &Path, raw: &[&Plan]) -> anyhow::Result<Vec<Value>> {
    let rg = a.remote_gpu.unwrap_or(a.gpu);
    let pool = |dev: u32| -> Vec<String> {
        let device = if a.host {
            "cpu".to_owned()
        } else {
            format!("gpu:{dev}")
        };
        [
            "--layers",
            "32",
            "--page-bytes",
            "32768",
            "--pages",
            "600",
            "--device",
            &device,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let mut rows = Vec::new();
    for (ppr, n) in [(32, 200), (256, 40)] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let plog = out_dir.join(format!("pd-prefill-{ppr}.log"));
        let (mut prefill, drain) = crate::pdflow::start_prefill(pd, port, &pool(a.gpu))?;
        let decode = |verify: bool| -> anyhow::Result<Value> {
            let mut cmd = Command::new(pd);
            cmd.arg("decode")
                .args(["--bootstrap", &format!("127.0.0.1:{port}")])
                .args(pool(rg))
                .args([
                    "--requests",
                    &n.to_string(),
                    "--pages-per-request",
                    &ppr.to_string(),
                ])
                .args(["--concurrency", "1", "--json"]);
            if !verify {
                cmd.arg("--no-verify");
            }
            let out = cmd.output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let json_line = text.lines().rev().find(|l| l.starts_with('{'));
            let mut v: Value = match json_line {
                Some(l) => serde_json::from_str(l)?,
                None => json!({"failed": tail(&String::from_utf8_lossy(&out.stderr))}),
            };
            v["pages_per_request"] = json!(ppr);
            v["verified"] = json!(verify && out.status.success());
            v["exit"] = json!(out.status.code());
            Ok(v)
        };
        rows.push(decode(true)?);
        // Raw and pd rounds alternate, so that both see the same machine state.
        let raw_plan = raw
            .iter()
            .find(|p| p.args[2].contains(&format!("64 x {ppr} x")));
        for round in 0..ROUNDS {
            if let Some(p) = raw_plan {
                let log = out_dir.join(format!("interleaved-raw-{ppr}-{round}.log"));
                let mut v = run_case(p, &log)?;
                v["round"] = json!(round);
                v["pages_per_request"] = json!(ppr);
                v["interleaved_raw"] = json!(true);
                rows.push(v);
            }
            let mut v = decode(false)?;
            v["round"] = json!(round);
            rows.push(v);
        }
        let _ = prefill.kill();
        let _ = prefill.wait();
        let log = drain.join().unwrap_or_default();
        // The prefill's own view of the last (no-verify) requests: claim to transfers done.
        if let Some(p50) = log.lines().rev().find_map(|l| {
            l.split("done: p50 ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        }) && let Some(last) = rows.last_mut()
        {
            last["prefill_p50_ms"] = json!(p50);
        }
        std::fs::write(&plog, log)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(rows)
}

pub(crate) fn all(a: &AllArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let peer = a.remote_gpu.filter(|&r| r != a.gpu);
    eprintln!(
        "gpubench: anchors on GPU {}{}",
        a.gpu,
        peer.map_or(String::new(), |p| format!(" and {p}"))
    );
    let anchors = if a.host {
        json!({"gpu": null})
    } else {
        crate::anchors::measure(a.gpu, peer)?
    };
    let plans = plan(a);
    let bar = ProgressBar::new(plans.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")?);
    let mut cases = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        bar.set_message(format!("{} ({})", p.args[2], p.config));
        cases.push(run_case(p, &a.out.join(format!("case-{i:02}.log")))?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let pd = match &a.pd {
        Some(pd) => {
            eprintln!("gpubench: pd flow");
            let raw: Vec<&Plan> = plans
                .iter()
                .filter(|p| p.args[2].starts_with("pd descriptors"))
                .collect();
            run_pd(pd, a, &a.out, &raw)?
        }
        None => Vec::new(),
    };
    let all = json!({"anchors": anchors, "cases": cases, "pd": pd});
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&all)?,
    )?;
    let md = report::markdown(&all);
    std::fs::write(a.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct StagingArgs {
    #[arg(long, default_value_t = 0)]
    pub(crate) gpu: u32,
    /// Directory for per-case logs, staging.json and staging.md.
    #[arg(long, default_value = "gpubench-staging")]
    pub(crate) out: PathBuf,
    /// Seconds of timed transfers per series.
    #[arg(long, default_value_t = 0.3)]
    pub(crate) seconds: f64,
    /// Rounds; within a round every configuration runs once, so configurations alternate.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// The `nixl-pd` binary: adds the full pd flow, plain and staged, for 1, 32 and 256 pages
    /// per request to every round.
    #[arg(long)]
    pub(crate) pd: Option<PathBuf>,
    /// Every NIXL-only setting of the grid (default: NIXL's defaults and nixl-core's GPU_FAST,
    /// so that one device call also fits the pd flow).
    #[arg(long)]
    pub(crate) full_grid: bool,
    /// Pages per request of the pd flow rows (default: 1, 32 and 256).
    #[arg(long, value_delimiter = ',')]
    pub(crate) pd_sizes: Vec<u32>,
    /// Skip the raw cases (NIXL-only settings and raw staged): only anchors, kernels and pd rows.
    #[arg(long)]
    pub(crate) no_cases: bool,
    /// Add heterogeneous-TP rows (one prefill rank of TP 1, two decode ranks of TP 2): plain,
    /// packed, staged and direct, for each pd size.
    #[arg(long)]
    pub(crate) sliced: bool,
}

/// The heterogeneous-TP rows: (prefill ranks, decode ranks) and the paths run for them (with
/// `P > D` head slices are never packed).
const SLICED: [((u32, u32), &[&str]); 2] = [
    ((1, 2), &["plain", "packed", "staged", "direct"]),
    ((2, 1), &["plain", "staged", "direct"]),
];

/// NIXL-only settings tried on the pd descriptors: (label, num_threads, split_batch_size, sgl).
const GRID: [(&str, u32, u32, bool); 7] = [
    ("NIXL defaults", 0, 0, false),
    ("SGL", 0, 0, true),
    ("threads 4", 4, 0, false),
    ("threads 8, split 64, SGL", 8, 64, true),
    ("threads 16, split 32, SGL", 16, 32, true),
    ("threads 16, split 128, SGL", 16, 128, true),
    ("threads 32, split 128, SGL", 32, 128, true),
];

/// `gpubench staging`: the device-to-device anchor, the kernel check, then for 32 and 256 pages
/// of 64 buffers × 32 KiB (two processes, one GPU) the pd-descriptor WRITE under each NIXL-only
/// setting and the raw staged path, configurations alternating round by round.
pub(crate) fn staging(a: &StagingArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out)?;
    eprintln!(
        "gpubench staging: anchors and kernel check on GPU {}",
        a.gpu
    );
    let anchors = crate::anchors::measure(a.gpu, None)?;
    let kernels = crate::staged::kernel_check(a.gpu)
        .unwrap_or_else(|e| json!({ "failed": format!("{e:#}") }));
    let g = a.gpu.to_string();
    let secs = a.seconds.to_string();
    let mut plans: Vec<(u64, Plan)> = Vec::new();
    for ppr in [32u64, 256] {
        let p = ppr.to_string();
        let base = |name: String| -> Vec<String> {
            let mut v: Vec<String> = ["case", "--name"].map(String::from).to_vec();
            v.push(name);
            for s in [
                "--place",
                "two",
                "--gpu",
                &g,
                "--remote-gpu",
                &g,
                "--seconds",
                &secs,
                "--block",
                "32768",
                "--buffers",
                "64",
                "--pool-pages",
                "600",
                "--per-buffer",
                &p,
                "--dst-run",
                "4",
            ] {
                v.push(s.to_owned());
            }
            v
        };
        let grid: Vec<_> = if a.full_grid {
            GRID.to_vec()
        } else {
            vec![GRID[0], GRID[3]]
        };
        for (label, threads, split, sgl) in grid {
            let mut args = base(format!("pd descriptors: 64 x {ppr} x 32 KiB"));
            args.push("--prepared".into());
            args.extend(["--num-threads".into(), threads.to_string()]);
            args.extend(["--split-batch-size".into(), split.to_string()]);
            if sgl {
                args.push("--sgl".into());
            }
            plans.push((
                ppr,
                Plan {
                    args,
                    env: vec![],
                    config: label,
                },
            ));
        }
        let mut args = base(format!("staged: 64 x {ppr} x 32 KiB"));
        args.push("--staged".into());
        plans.push((
            ppr,
            Plan {
                args,
                env: vec![],
                config: "staged (gather + 1 WRITE + scatter)",
            },
        ));
    }
    if a.no_cases {
        plans.clear();
    }
    let sizes: Vec<(u32, u32)> = crate::pdflow::SIZES
        .into_iter()
        .filter(|(ppr, _)| a.pd_sizes.is_empty() || a.pd_sizes.contains(ppr))
        .collect();
    let sliced_rows: usize = SLICED.iter().map(|(_, paths)| paths.len()).sum();
    let per_size = crate::pdflow::PATHS.len() + if a.sliced { sliced_rows } else { 0 };
    let pd_runs = if a.pd.is_some() {
        per_size * sizes.len()
    } else {
        0
    };
    let total = (plans.len() + pd_runs) * a.rounds;
    let bar = ProgressBar::new(total as u64)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")?);
    let mut cases = Vec::new();
    let mut pd_rows = Vec::new();
    for round in 0..a.rounds {
        for (i, (ppr, p)) in plans.iter().enumerate() {
            bar.set_message(format!("{} ({}), round {round}", p.args[2], p.config));
            let log = a.out.join(format!("case-{i:02}-{round}.log"));
            let mut v = run_case(p, &log)?;
            v["round"] = json!(round);
            v["pages_per_request"] = json!(ppr);
            cases.push(v);
            bar.inc(1);
        }
        let Some(pd) = &a.pd else { continue };
        for &(ppr, n) in &sizes {
            if a.sliced {
                for &((p, d), paths) in &SLICED {
                    for &what in paths {
                        bar.set_message(format!(
                            "pd flow, TP {p}:{d}, {ppr} pages, {what}, round {round}"
                        ));
                        let log = a
                            .out
                            .join(format!("pd-sliced-{p}-{d}-{ppr}-{what}-{round}.log"));
                        // Per-token descriptors are slow: fewer timed requests on that path.
                        let n = if what == "plain" { n.min(30) } else { n };
                        match crate::pdflow::run_sliced(pd, a.gpu, ppr, n, what, (p, d), &log) {
                            Ok(rows) => pd_rows.extend(rows.into_iter().map(|mut v| {
                                v["round"] = json!(round);
                                v
                            })),
                            Err(e) => pd_rows.push(json!({
                                "pages_per_request": ppr, "path": what, "sliced": format!("{p}:{d}"),
                                "round": round, "failed": format!("{e:#}"),
                            })),
                        }
                        bar.inc(1);
                    }
                }
            }
            for what in crate::pdflow::PATHS {
                bar.set_message(format!("pd flow, {ppr} pages, {what}, round {round}"));
                let log = a.out.join(format!("pd-{ppr}-{what}-{round}.log"));
                match crate::pdflow::run_one(pd, a.gpu, ppr, n, what, &log) {
                    Ok(rows) => pd_rows.extend(rows.into_iter().map(|mut v| {
                        v["round"] = json!(round);
                        v
                    })),
                    Err(e) => pd_rows.push(json!({
                        "pages_per_request": ppr, "path": what, "staged": what == "staged", "round": round,
                        "failed": format!("{e:#}"),
                    })),
                }
                bar.inc(1);
            }
        }
        // After every round, so that a run cut short still leaves its report.
        write_staging(a, &anchors, &kernels, &cases, &pd_rows)?;
    }
    bar.finish_and_clear();
    let md = write_staging(a, &anchors, &kernels, &cases, &pd_rows)?;
    println!("{md}");
    Ok(())
}

/// Writes staging.json and staging.md from what has run so far; returns the Markdown.
fn write_staging(
    a: &StagingArgs,
    anchors: &Value,
    kernels: &Value,
    cases: &[Value],
    pd_rows: &[Value],
) -> anyhow::Result<String> {
    let all = json!({
        "anchors": anchors, "kernels": kernels, "cases": cases, "pd": pd_rows,
        "staging_bytes_per_side": u64::from(crate::pdflow::STAGING_SLOTS)
            * (crate::pdflow::STAGING_SLOT_MIB << 20),
    });
    std::fs::write(
        a.out.join("staging.json"),
        serde_json::to_string_pretty(&all)?,
    )?;
    let md = report::staging_markdown(&all);
    std::fs::write(a.out.join("staging.md"), &md)?;
    Ok(md)
}
