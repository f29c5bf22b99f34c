//! Two agents in one process: agent `a` WRITEs a buffer into agent `b`'s registered memory with
//! a notification, and `b` waits for the notification and checks the bytes.
//!
//! ```text
//! cargo run -p nixl-core --example write
//! ```
//!
//! Needs the NIXL runtime (see the crate docs: `NIXL_RUNTIME_DIR`, or `cargo xtask runtime` in
//! this repository).
#![allow(clippy::print_stdout, reason = "example program")]

use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, MemType, XferDescs, XferOp,
};

const LEN: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pid = std::process::id();
    let a = Agent::new(&format!("example-a-{pid}"), &AgentConfig::default())?;
    let b = Agent::new(&format!("example-b-{pid}"), &AgentConfig::default())?;
    for agent in [&a, &b] {
        agent.create_backend(BackendKind::Ucx, &BackendParams::new())?;
    }

    // Registered memory on both sides; the source holds a pattern.
    let mut src = a.register(HostBuffer::new(LEN)?)?;
    let dst = b.register(HostBuffer::new(LEN)?)?;
    for (i, byte) in src.buffer_mut().as_mut_slice().iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }

    // `a` learns `b`'s metadata (across processes it would arrive over a socket).
    a.load_remote(b.local_metadata()?.as_bytes())?;

    // One descriptor on each side, and a WRITE that notifies `b` when the data has landed.
    let mut local = XferDescs::new(MemType::Dram);
    local.push_in(&src.region(), 0, LEN as u64);
    let mut remote = XferDescs::new(MemType::Dram);
    remote.push_in(&dst.region(), 0, LEN as u64);
    let start = Instant::now();
    let req = a.create_request(
        XferOp::Write,
        &local,
        &remote,
        b.name(),
        Some(b"page-0 done"),
    )?;
    req.post()?;

    // No progress thread by default: the initiator polls its request, the target drains its
    // notifications, and both progress their agents by doing so.
    let mut seen = Vec::new();
    req.wait(Duration::from_secs(10), || {
        let _ = b.drain_notifications(&mut seen);
    })?;
    while !seen.iter().any(|n| n.payload == b"page-0 done") {
        if start.elapsed() > Duration::from_secs(10) {
            return Err("no notification within 10 s".into());
        }
        b.drain_notifications(&mut seen)?;
    }
    let elapsed = start.elapsed();

    if src.buffer().as_slice() != dst.buffer().as_slice() {
        return Err("the destination differs from the source".into());
    }
    let from = &seen[0].peer;
    println!(
        "{LEN} bytes written from {from} in {:.2} ms, notification received, every byte matches",
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}
