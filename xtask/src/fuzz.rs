//! `cargo xtask fuzz`: builds the cargo-fuzz target with libFuzzer's coverage instrumentation on
//! the stable toolchain (the sanitizer-coverage passes are stable codegen options; only ASan
//! would need nightly) and runs it for a bounded time.

use std::path::Path;
use std::process::Command;

use crate::cmd;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const RUSTFLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

#[derive(clap::Args, Debug)]
pub(crate) struct FuzzArgs {
    /// How long to fuzz, in seconds.
    #[arg(long, default_value_t = 15)]
    pub(crate) seconds: u32,
}

pub(crate) fn run(root: &Path, args: &FuzzArgs) -> anyhow::Result<()> {
    let target_dir = root.join("target/fuzz");
    cmd::run(
        Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                TARGET,
                "--bin",
                "dispatch",
                "--target-dir",
            ])
            .arg(&target_dir)
            .env("RUSTFLAGS", RUSTFLAGS),
    )?;
    let corpus = target_dir.join("corpus/dispatch");
    std::fs::create_dir_all(&corpus)?;
    cmd::run(
        Command::new(target_dir.join(TARGET).join("release/dispatch"))
            .arg(format!("-max_total_time={}", args.seconds))
            .args(["-max_len=1024", "-print_final_stats=1"])
            .arg(&corpus),
    )
}
