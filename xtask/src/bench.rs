//! `cargo xtask bench <suite>`: benchmark entry points.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::{cmd, runtime};

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Which suite: core, wire, kv, hicache, sliced (head slicing 1 → 2 against the same TP,
    /// host memory), py (SGLang 0.5.1.post3's and 0.5.23's Python classes against the nixl-rs
    /// wheel under their names) or sglang (SGLang 0.5.23's own classes against the Rust engine,
    /// each mix).
    suite: String,
    /// Extra arguments for the benchmark binary (after `--`).
    #[arg(last = true)]
    rest: Vec<String>,
}

pub(crate) fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    if args.suite == "py" {
        return crate::wheel::bench(root, &args.rest);
    }
    if args.suite == "sliced" {
        return sliced(root);
    }
    if args.suite == "sglang" {
        return sglang(root, &args.rest);
    }
    let (package, bench, features) = match args.suite.as_str() {
        "core" => {
            runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
            ("nixl-core", "core", "nixl-core/__bench")
        }
        "wire" => ("nixl-wire", "codec", ""),
        "hicache" => {
            runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
            ("nixl-hicache", "hicache", "")
        }
        "kv" => {
            runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
            crate::demo::build_pd(root)?;
            ("nixl-bench", "kv", "")
        }
        other => {
            bail!("unknown suite `{other}`; choose core, wire, kv, hicache, sliced, py or sglang")
        }
    };
    cmd::run(
        Command::new("cargo")
            .env("PD_BIN", root.join("target/release/nixl-pd"))
            .args([
                "bench",
                "--locked",
                "-p",
                package,
                "--bench",
                bench,
                "--features",
                features,
                "--",
            ])
            .args(&args.rest),
    )
}

/// Rounds of the sliced suite, and requests of pages per decode rank in each run.
const SLICED_ROUNDS: usize = 2;
const SLICED_REQUESTS: usize = 300;
const SLICED_PAGES: usize = 16;

/// `bench sliced`: one prefill rank of 8 heads with one decode rank of the same TP, then with
/// two decode ranks of TP 2 (4 heads each, every request to both), the same bytes leaving the
/// prefill, first as SGLang's per-token descriptors (`--no-packed`), then packed (whole decode
/// pages gathered on the CPU, one WRITE of pages); `nixl-pd` processes with host pools, not
/// verified, rounds alternating. Prints the GB/s of each (the ranks' sum when sliced) and their
/// ratios to the same TP.
fn sliced(root: &Path) -> anyhow::Result<()> {
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    let pd = crate::demo::build_pd(root)?;
    let gbps = |lines: &[String]| -> anyhow::Result<f64> {
        lines
            .iter()
            .map(|l| {
                l.split(", ")
                    .find_map(|f| f.strip_suffix(" GB/s"))
                    .and_then(|g| g.trim().parse::<f64>().ok())
                    .ok_or_else(|| anyhow::anyhow!("no GB/s in {l:?}"))
            })
            .sum()
    };
    let mut rows = Vec::new();
    for round in 1..=SLICED_ROUNDS {
        let run = |tp, args: &[&str]| {
            crate::demo_tp::serve(&pd, tp, SLICED_REQUESTS, SLICED_PAGES, false, args)
        };
        let same = run((1, 1), &[])?;
        let tokens = run((1, 2), &["--no-packed"])?;
        let packed = run((1, 2), &[])?;
        rows.push((round, [same, tokens, packed]));
    }
    println!(
        "\n| round | same TP GB/s | sliced 1 -> 2, per-token GB/s (both ranks) | per-token / same | sliced 1 -> 2, packed GB/s (both ranks) | packed / same |"
    );
    println!("|---|---|---|---|---|---|");
    for (round, runs) in &rows {
        let [same, tokens, packed] = [gbps(&runs[0])?, gbps(&runs[1])?, gbps(&runs[2])?];
        println!(
            "| {round} | {same:.2} | {tokens:.2} | {:.2} | {packed:.2} | {:.2} |",
            tokens / same,
            packed / same
        );
    }
    for (round, runs) in &rows {
        for (name, lines) in ["same TP", "sliced per-token", "sliced packed"]
            .iter()
            .zip(runs)
        {
            println!("round {round}, {name}: {}", lines.join(" / "));
        }
    }
    Ok(())
}

/// `cargo xtask bench sglang`: `sglang-bench` (nixl-bench) with SGLang 0.5.23's venv: its
/// classes against ours, each mix, time to Success and idle CPU; `rest` goes to the program.
fn sglang(root: &Path, rest: &[String]) -> anyhow::Result<()> {
    runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
    let venv = crate::wheel::release_venv(root, &crate::wheel::SGLANG_0523)?;
    let bin = crate::demo::build_bin(root, "nixl-bench", "sglang-bench")?;
    cmd::run(
        Command::new(bin)
            .env("SGLANG_PYTHON", venv.join("bin/python"))
            .args(rest),
    )
}
