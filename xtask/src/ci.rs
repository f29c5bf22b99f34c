//! `cargo xtask ci`: every check, in order, failing fast.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::{cmd, demo, deps, faults, fuzz, prereq, ptx, runtime, soak, tidy, wheel};

/// Features that turn on the tests needing the real NIXL runtime and the local S3 server.
pub(crate) const RUNTIME_TEST_FEATURES: &str = "nixl-core/nixl-runtime-tests,nixl-testkit/nixl-runtime-tests,nixl-hicache/nixl-runtime-tests,nixl-kv/nixl-runtime-tests,nixl-core/cuda";

#[derive(clap::Args, Debug)]
pub(crate) struct CiArgs {
    /// Skip fmt and clippy (quicker local iterations; CI never passes this).
    #[arg(long)]
    no_lint: bool,
}

pub(crate) fn run(root: &Path, args: &CiArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    step("prerequisites", || {
        prereq::ensure_libclang()?;
        runtime::run(root, &runtime::RuntimeArgs::default_ci())?;
        prereq::ensure_moto(root)?;
        prereq::ensure_python_peer(root).map(drop)
    })?;
    if !args.no_lint {
        step("fmt", || {
            cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        step("clippy", || {
            cmd::run(
                cargo()
                    .args([
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--all-features",
                        "--locked",
                    ])
                    .args(["--", "-D", "warnings"]),
            )
        })?;
    }
    step("tests", || {
        let features = ["--features", RUNTIME_TEST_FEATURES];
        if cmd::exists("cargo-nextest") {
            cmd::run(
                cargo()
                    .args([
                        "nextest",
                        "run",
                        "--workspace",
                        "--locked",
                        "--no-fail-fast",
                    ])
                    .args(features),
            )?;
        } else {
            println!("cargo-nextest not installed; using cargo test");
            cmd::run(
                cargo()
                    .args(["test", "--workspace", "--locked"])
                    .args(features),
            )?;
        }
        cmd::run(
            cargo()
                .args(["test", "--doc", "--workspace", "--locked"])
                .args(features),
        )
    })?;
    step("doc", || {
        cmd::run(
            cargo()
                .args([
                    "doc",
                    "--workspace",
                    "--no-deps",
                    "--all-features",
                    "--locked",
                ])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )
    })?;
    step("deps", || deps::run(root))?;
    step("tidy", || tidy::run(root))?;
    step(
        "demo (pd prefill + decode, two processes, 100 requests verified)",
        || demo::run(root, &demo::DemoArgs::smoke()),
    )?;
    step(
        "demo --profile sglang-0.5.20 and sglang-0.5.23 (both sides in that release's dialect and aux layout)",
        || {
            demo::run(root, &demo::DemoArgs::profile_smoke("sglang-0.5.20"))?;
            demo::run(root, &demo::DemoArgs::profile_smoke("sglang-0.5.23"))
        },
    )?;
    step(
        "demo --tp 2:4 and 4:2 (prefill and decode ranks of different TP sizes, head slicing, every byte verified)",
        || {
            demo::run(root, &demo::DemoArgs::tp_smoke("2:4"))?;
            demo::run(root, &demo::DemoArgs::tp_smoke("4:2"))
        },
    )?;
    step(
        "example (nixl-kv loopback: the crate doc example, run)",
        || {
            cmd::run(cargo().args([
                "run",
                "--quiet",
                "--locked",
                "-p",
                "nixl-kv",
                "--example",
                "loopback",
            ]))
        },
    )?;
    step(
        "soak (one prefill, three decodes, aborts, kills, hostile senders; 30 s, tables flat)",
        || soak::run(root, &soak::SoakArgs::ci()),
    )?;
    step(
        &format!("fuzz ({}: 10 s each)", fuzz::target_names().join(", ")),
        || {
            fuzz::run(
                root,
                &fuzz::FuzzArgs {
                    seconds: 10,
                    target: None,
                },
            )
        },
    )?;
    step(
        "ptx (the committed staging PTX names its source's hash)",
        || ptx::check_hash(root),
    )?;
    step(
        "sglang 0.5.23 and 0.5.22 (our prefill and decode against their own classes, both ways; one prefill serving 0.5.1.post3 and 0.5.23 decodes at once)",
        || {
            let new = wheel::release_venv(root, &wheel::SGLANG_0523)?;
            let v22 = wheel::overlay_venv(root, &wheel::SGLANG_0523, wheel::SGLANG_0522)?;
            let old = wheel::sglang_venv(root)?;
            cmd::run(
                cargo()
                    .args(["test", "-p", "nixl-kv", "--locked"])
                    .args(["--features", "sglang-tests", "--test", "sglang0523"])
                    .env("NIXL_KV_SGLANG0523_PYTHON", new.join("bin/python"))
                    .env("NIXL_KV_SGLANG0522_PYTHON", v22.join("bin/python"))
                    .env("NIXL_KV_SGLANG051_PYTHON", old.join("bin/python")),
            )
        },
    )?;
    step(
        "python (nixl-rs wheel; SGLang 0.5.1.post3's HiCacheNixl suite and KV interop; SGLang 0.5.23's plugin, PD classes both ways, HiCache and shared files)",
        || {
            let built = wheel::build(root)?;
            wheel::test(root, &built)
        },
    )?;
    step(
        "faults (prefill and decode in two network namespaces: delay, loss, cuts, kills)",
        || faults::run(root, &faults::FaultsArgs::ci()),
    )?;
    println!(
        "xtask ci: all steps passed in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("\n==> {name}");
    let start = Instant::now();
    let res = f();
    println!(
        "<== {name}: {} in {:.1}s",
        if res.is_ok() { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    res
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}
