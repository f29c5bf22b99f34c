//! Project automation, run as `cargo xtask <task>` (see `cargo xtask --help`).
//!
//! Every task provisions what it needs on a fresh machine (libclang, the NIXL runtime from PyPI,
//! a moto S3 server in a venv) or says exactly what to run.
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask reports to the terminal"
)]

mod bench;
mod ci;
mod cmd;
mod demo;
mod demo_tp;
mod deps;
mod faults;
mod fuzz;
mod gpu;
mod prereq;
mod ptx;
mod runtime;
mod soak;
mod tidy;
mod wheel;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project automation for the nixl workspace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Provision the NIXL runtime from PyPI into target/nixl-runtime (instant when present).
    Runtime(runtime::RuntimeArgs),
    /// Install missing build prerequisites (libclang) and test tools (moto S3 server venv).
    Prereq,
    /// Everything CI checks: fmt, clippy, tests with the real runtime, docs, dependency rules, tidy.
    Ci(ci::CiArgs),
    /// Dependency-direction check (the rules in ARCHITECTURE.md).
    Deps,
    /// Source hygiene checks (unsafe placement, SAFETY comments, prints, file headers).
    Tidy,
    /// Build and pack everything the GPU machine needs; print the command to run there.
    Gpu,
    /// Compile nixl-core's CUDA kernels to the committed PTX with nvcc from PyPI (`--check`: compare).
    Ptx(ptx::PtxArgs),
    /// Coverage-guided fuzzing (stable toolchain, bounded time): nixl-wire's decoders, raw ZMTP
    /// into the PULL listener, raw HTTP into the bootstrap server.
    Fuzz(fuzz::FuzzArgs),
    /// Benchmarks: `core`, `wire`, `kv`, `hicache` or `py` (SGLang's Python classes vs the wheel).
    Bench(bench::BenchArgs),
    /// The main job: a prefill and a decode moving KV pages over NIXL (see README).
    Demo(demo::DemoArgs),
    /// A bounded soak: one prefill, several decodes, aborts, kills and hostile senders; RSS,
    /// fds and tables must stay flat.
    Soak(soak::SoakArgs),
    /// Multi-host faults, simulated: prefill and decode in two network namespaces (root).
    Faults(faults::FaultsArgs),
    /// Build the nixl-rs Python wheel (crate nixl-py) into target/wheels; `--test` runs its
    /// tests against SGLang 0.5.1.post3.
    Wheel(wheel::WheelArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Runtime(args) => runtime::run(&root, &args).map(drop),
        Task::Prereq => {
            prereq::ensure_libclang()?;
            // the Python peer venv installs NIXL's Python API from the runtime's wheel
            runtime::run(&root, &runtime::RuntimeArgs::default_ci())?;
            prereq::ensure_moto(&root)?;
            prereq::ensure_python_peer(&root).map(drop)
        }
        Task::Ci(args) => ci::run(&root, &args),
        Task::Deps => deps::run(&root),
        Task::Tidy => tidy::run(&root),
        Task::Fuzz(args) => fuzz::run(&root, &args),
        Task::Gpu => gpu::run(&root),
        Task::Ptx(args) => ptx::run(&root, &args),
        Task::Bench(args) => bench::run(&root, &args),
        Task::Demo(args) => demo::run(&root, &args),
        Task::Soak(args) => soak::run(&root, &args),
        Task::Faults(args) => faults::run(&root, &args),
        Task::Wheel(args) => wheel::run(&root, &args),
    }
}

/// The workspace root (the parent of this crate's directory).
fn project_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}
