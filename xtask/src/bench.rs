//! `cargo xtask bench <suite>`: benchmark entry points.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::{cmd, runtime};

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Which suite: core, wire, kv, hicache or py (SGLang 0.5.1.post3's Python classes
    /// against the nixl-rs wheel under their names).
    suite: String,
    /// Extra arguments for the benchmark binary (after `--`).
    #[arg(last = true)]
    rest: Vec<String>,
}

pub(crate) fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    if args.suite == "py" {
        return crate::wheel::bench(root, &args.rest);
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
        other => bail!("unknown suite `{other}`; choose core, wire, kv, hicache or py"),
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
