//! `gpubench`: NIXL GPU-memory benchmarks for the lent GPU machine (feature `cuda`).
//!
//! ```text
//! gpubench all [--gpu 0] [--remote-gpu 1] [--pd path/to/nixl-pd] [--out DIR] [--seconds S]
//! gpubench staging [--gpu 0] [--out DIR] [--seconds S] [--rounds R] [--pd path/to/nixl-pd]
//! gpubench kernels [--gpu 0]
//! gpubench case --name N --place one|two [--op write|read] [--local vram|pinned] ...
//! gpubench target ...   (started by `case --place two`)
//! ```
//!
//! `all` measures the copy-engine anchors, runs each case in a child process with
//! `UCX_PROTO_INFO=y` (recording the protocol and transport UCX chose and comparing it with
//! nixl-core's emulation prediction), runs the `nixl-pd` flow with VRAM pools when given the binary,
//! and writes `results.json` and `report.md`. Every case verifies every byte it moved.
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    missing_docs,
    reason = "command-line benchmark program"
)]

mod anchors;
mod case;
mod driver;
mod pdflow;
mod report;
mod side;
mod staged;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gpubench", about = "NIXL GPU-memory benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Anchors, every case, the pd flow, and the report.
    All(driver::AllArgs),
    /// The staged path and the NIXL-only settings (issue 12's table), alternating rounds.
    Staging(driver::StagingArgs),
    /// One case, printed as one JSON line.
    Case(case::CaseArgs),
    /// The staging kernels alone in this process (check and timings), as one JSON line.
    Kernels {
        #[arg(long, default_value_t = 0)]
        gpu: u32,
        /// Time the gather next to a NIXL agent of this process: none, with a UCX backend, or
        /// with the gather's buffers registered to it.
        #[arg(long, value_enum, default_value_t = staged::WithAgent::No)]
        with_agent: staged::WithAgent,
    },
    /// Re-renders the Markdown report from a results.json or a staging.json.
    Report { results: std::path::PathBuf },
    /// The target side of a two-process case.
    Target {
        #[arg(long, value_enum)]
        mem: side::MemKind,
        #[arg(long, default_value_t = 0)]
        gpu: u32,
        #[command(flatten)]
        layout: side::Layout,
    },
}

fn main() -> anyhow::Result<()> {
    nixl_tools::init_logging();
    match Cli::parse().cmd {
        Cmd::All(a) => driver::all(&a),
        Cmd::Staging(a) => driver::staging(&a),
        Cmd::Case(c) => {
            let out = case::run(&c)?.to_string();
            match &c.result {
                Some(path) => std::fs::write(path, out)?,
                None => println!("{out}"),
            }
            Ok(())
        }
        Cmd::Kernels { gpu, with_agent } => {
            println!("{}", staged::kernel_check_with(gpu, with_agent)?);
            Ok(())
        }
        Cmd::Report { results } => {
            let all: serde_json::Value = serde_json::from_slice(&std::fs::read(results)?)?;
            // A staging.json (of `gpubench staging`) has kernel checks; a results.json not.
            if all["kernels"].is_null() {
                println!("{}", report::markdown(&all));
            } else {
                println!("{}", report::staging_markdown(&all));
            }
            Ok(())
        }
        Cmd::Target { mem, gpu, layout } => side::serve(mem, gpu, layout),
    }
}
