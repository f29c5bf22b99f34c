//! Transfers between this process and a child process, and the missing-runtime path in a fresh
//! process (needs the NIXL runtime).
#![allow(clippy::unwrap_used, reason = "test code")]
#![cfg(feature = "nixl-runtime-tests")]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, MemType, UcxErrorMode, XferDescs,
    XferOp,
};
use nixl_testkit::{ChildPeer, pattern, unique_name};

const PEER: &str = env!("CARGO_BIN_EXE_nixl-testkit-peer");

fn initiator(mode: UcxErrorMode) -> Agent {
    let a = Agent::new(&unique_name("parent"), &AgentConfig::default()).unwrap();
    a.create_backend(BackendKind::Ucx, &BackendParams::ucx(mode))
        .unwrap();
    a
}

fn write_then_verify(mode: UcxErrorMode) {
    let len = 1 << 20;
    let mut child = ChildPeer::spawn(Path::new(PEER), len, mode).unwrap();
    let a = initiator(mode);
    let mut src = a.register(HostBuffer::new(len).unwrap()).unwrap();
    pattern::fill(src.buffer_mut().as_mut_slice(), 21);
    assert_eq!(a.load_remote(child.metadata()).unwrap(), child.name());

    let mut local = XferDescs::new(MemType::Dram);
    local.push_in(&src.region(), 0, len as u64);
    let mut remote = XferDescs::new(MemType::Dram);
    remote.push_in(&child.region(), 0, len as u64);
    let req = a
        .create_request(
            XferOp::Write,
            &local,
            &remote,
            child.name(),
            Some(b"2p-write"),
        )
        .unwrap();
    req.post().unwrap();
    req.wait(Duration::from_secs(30), std::thread::yield_now)
        .unwrap();
    let mut sink = Vec::new();
    let from = child
        .wait_notification(b"2p-write", Duration::from_secs(30), &mut || {
            let _ = a.drain_notifications(&mut sink);
        })
        .unwrap();
    assert_eq!(from, a.name());
    assert_eq!(child.verify(0, len as u64, 21).unwrap(), Ok(()));
}

#[test]
fn write_with_notification_across_processes_peer_mode() {
    write_then_verify(UcxErrorMode::Peer);
}

#[test]
fn write_with_notification_across_processes_none_mode() {
    write_then_verify(UcxErrorMode::None);
}

#[test]
fn read_from_a_child_process() {
    let len = 256 * 1024;
    let mut child = ChildPeer::spawn(Path::new(PEER), len, UcxErrorMode::Peer).unwrap();
    child.fill(22).unwrap();
    let a = initiator(UcxErrorMode::Peer);
    let dst = a.register(HostBuffer::new(len).unwrap()).unwrap();
    a.load_remote(child.metadata()).unwrap();
    let mut local = XferDescs::new(MemType::Dram);
    local.push_in(&dst.region(), 0, len as u64);
    let mut remote = XferDescs::new(MemType::Dram);
    remote.push_in(&child.region(), 0, len as u64);
    let req = a
        .create_request(
            XferOp::Read,
            &local,
            &remote,
            child.name(),
            Some(b"2p-read"),
        )
        .unwrap();
    req.post().unwrap();
    req.wait(Duration::from_secs(30), std::thread::yield_now)
        .unwrap();
    let mut sink = Vec::new();
    child
        .wait_notification(b"2p-read", Duration::from_secs(30), &mut || {
            let _ = a.drain_notifications(&mut sink);
        })
        .unwrap();
    assert_eq!(pattern::verify(dst.buffer().as_slice(), 22), Ok(()));
}

#[test]
fn a_dead_peer_fails_the_transfer_instead_of_hanging() {
    let len = 64 * 1024;
    let child = ChildPeer::spawn(Path::new(PEER), len, UcxErrorMode::Peer).unwrap();
    let a = initiator(UcxErrorMode::Peer);
    let src = a.register(HostBuffer::new(len).unwrap()).unwrap();
    a.load_remote(child.metadata()).unwrap();
    let (name, region) = (child.name().to_owned(), child.region());
    let pid = child.pid();
    // Kill the child hard (no QUIT), then keep writing to it.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    drop(child);
    let mut local = XferDescs::new(MemType::Dram);
    local.push_in(&src.region(), 0, len as u64);
    let mut remote = XferDescs::new(MemType::Dram);
    remote.push_in(&region, 0, len as u64);
    let mut failed = false;
    for _ in 0..50 {
        let res = a
            .create_request(XferOp::Write, &local, &remote, &name, Some(b"x"))
            .and_then(|req| {
                req.post()?;
                req.wait(Duration::from_secs(10), std::thread::yield_now)
            });
        if res.is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(failed, "writes to a killed peer kept succeeding");
}

#[test]
fn missing_runtime_is_an_error_not_an_abort() {
    let out = Command::new(PEER)
        .args(["4096", "peer"])
        .env("NIXL_RUNTIME_DIR", "/nonexistent/nixl-runtime")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("no NIXL runtime found"), "stderr: {stderr}");
}
