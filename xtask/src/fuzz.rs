//! `cargo xtask fuzz`: builds the cargo-fuzz targets with libFuzzer's coverage instrumentation
//! on the stable toolchain (the sanitizer-coverage passes are stable codegen options; only ASan
//! would need nightly) and runs them for a bounded time each.
//!
//! Targets (`fuzz/fuzz_targets`): `dispatch` (nixl-wire's frame-level decoders of what a prefill
//! receives, every profile), `decode_inbound` (what a 0.5.2x decode's listener receives, and
//! packed integer lists), `zmtp_stream`
//! (raw ZMTP byte streams into the prefill's PULL listener), `http_stream` (raw HTTP into the
//! bootstrap server). Each runs on `target/fuzz/corpus/NAME` (kept between runs) plus the
//! committed seeds in `fuzz/seeds/NAME`, with its dictionary from `fuzz/dicts` when there is
//! one; crashes land in `target/fuzz/artifacts/NAME/`.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::cmd;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const RUSTFLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// A fuzz target and how to run it.
struct Target {
    name: &'static str,
    /// libFuzzer's `-max_len`.
    max_len: u32,
    /// A file in `fuzz/dicts`.
    dict: Option<&'static str>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "dispatch",
        max_len: 1024,
        dict: None,
    },
    Target {
        name: "zmtp_stream",
        max_len: 4096,
        dict: Some("zmtp.dict"),
    },
    Target {
        name: "http_stream",
        // Past the server's 16 KiB head limit, so that 431 is reachable.
        max_len: 20480,
        dict: Some("http.dict"),
    },
    Target {
        name: "decode_inbound",
        max_len: 1024,
        dict: None,
    },
    Target {
        name: "metadata",
        // The captured seed is 3.5 KiB; room to grow it.
        max_len: 8192,
        dict: None,
    },
];

#[derive(clap::Args, Debug)]
pub(crate) struct FuzzArgs {
    /// How long to fuzz each target, in seconds.
    #[arg(long, default_value_t = 15)]
    pub(crate) seconds: u32,
    /// One target (`dispatch`, `decode_inbound`, `zmtp_stream`, `http_stream`, `metadata`);
    /// default: each in turn.
    #[arg(long)]
    pub(crate) target: Option<String>,
}

/// The names of every target, for CI's step title.
pub(crate) fn target_names() -> Vec<&'static str> {
    TARGETS.iter().map(|t| t.name).collect()
}

pub(crate) fn run(root: &Path, args: &FuzzArgs) -> anyhow::Result<()> {
    let chosen: Vec<&Target> = match &args.target {
        None => TARGETS.iter().collect(),
        Some(name) => match TARGETS.iter().find(|t| t.name == name) {
            Some(t) => vec![t],
            None => bail!(
                "no fuzz target {name}; there are {}",
                target_names().join(", ")
            ),
        },
    };
    let target_dir = root.join("target/fuzz");
    let mut build = Command::new("cargo");
    build
        .current_dir(root.join("fuzz"))
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS);
    for t in &chosen {
        build.args(["--bin", t.name]);
    }
    cmd::run(&mut build)?;
    for t in chosen {
        let corpus = target_dir.join("corpus").join(t.name);
        let artifacts = target_dir.join("artifacts").join(t.name);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut run = Command::new(target_dir.join(TARGET).join("release").join(t.name));
        run.arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-max_len={}", t.max_len))
            .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        if let Some(d) = t.dict {
            run.arg(format!(
                "-dict={}",
                root.join("fuzz/dicts").join(d).display()
            ));
        }
        run.arg(&corpus);
        let seeds = root.join("fuzz/seeds").join(t.name);
        if seeds.is_dir() {
            run.arg(seeds);
        }
        cmd::run(&mut run)?;
    }
    Ok(())
}
