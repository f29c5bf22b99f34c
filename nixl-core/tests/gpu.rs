//! GPU memory: device buffers, VRAM registration and a VRAM→VRAM WRITE between two agents
//! (feature `gpu-tests`, run on a machine with a GPU and the NIXL runtime; set
//! `UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y` so UCX uses cuda_ipc inside one process).
#![cfg(feature = "gpu-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

use std::time::Duration;

use nixl_core::cuda::DeviceBuffer;
use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, MemType, UcxErrorMode, XferDescs, XferOp,
};

#[test]
fn vram_write_between_two_agents_moves_the_bytes() {
    assert!(
        nixl_core::cuda::driver_present(),
        "no CUDA driver on this machine"
    );
    let len = 64 << 20;
    let mut pattern = vec![0u8; len];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = ((i / 4096 * 7 + i) % 251) as u8;
    }
    let mut src = DeviceBuffer::new(0, len).unwrap();
    src.copy_from_host(&pattern).unwrap();
    assert_eq!(src.to_host().unwrap(), pattern, "host round trip");
    let dst = DeviceBuffer::new(0, len).unwrap();

    let a = Agent::new("gpu-a", &AgentConfig::default()).unwrap();
    let b = Agent::new("gpu-b", &AgentConfig::default()).unwrap();
    for agent in [&a, &b] {
        agent
            .create_backend(BackendKind::Ucx, &BackendParams::ucx(UcxErrorMode::None))
            .unwrap();
    }
    let src = a.register(src).unwrap();
    let dst = b.register(dst).unwrap();
    assert_eq!(src.region().mem, MemType::Vram);
    a.load_remote(b.local_metadata().unwrap().as_bytes())
        .unwrap();
    let mut local = XferDescs::new(MemType::Vram);
    local.push_in(&src.region(), 0, len as u64);
    let mut remote = XferDescs::new(MemType::Vram);
    remote.push_in(&dst.region(), 0, len as u64);
    let req = a
        .create_request(XferOp::Write, &local, &remote, b.name(), Some(b"vram"))
        .unwrap();
    let t = std::time::Instant::now();
    let _ = req.post().unwrap();
    let mut notifs = Vec::new();
    req.wait(Duration::from_secs(30), || {
        b.drain_notifications(&mut notifs).unwrap()
    })
    .unwrap();
    let elapsed = t.elapsed();
    while !notifs.iter().any(|n| n.payload == b"vram") {
        b.drain_notifications(&mut notifs).unwrap();
    }
    assert_eq!(dst.buffer().to_host().unwrap(), pattern, "VRAM→VRAM bytes");
    println!("64 MiB VRAM→VRAM WRITE (first, incl. wire-up): {elapsed:?}");
    // Steady state: re-post the same request.
    let reps = 20;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        let _ = req.post().unwrap();
        req.wait(Duration::from_secs(30), || {
            b.drain_notifications(&mut notifs).unwrap()
        })
        .unwrap();
    }
    let per = t.elapsed() / reps;
    println!(
        "64 MiB VRAM→VRAM WRITE, steady: {per:?} = {:.1} GB/s",
        len as f64 / per.as_secs_f64() / 1e9
    );
}
