//! One process, one prefill and one decode: the decode asks for 4 pages of room 42, the prefill
//! writes them over UCX, and both see Success. Run: `cargo run -p nixl-kv --example loopback`.
#![allow(clippy::print_stdout, reason = "an example program")]

use std::time::{Duration, Instant};

use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Registered};
use nixl_kv::BootstrapServer;
use nixl_kv::{KvArgs, KvManager, KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId};

const PAGE: u64 = 4096;
const PAGES: u64 = 16;
const AUX_ROW: u64 = 64;

type Side = (Agent, Vec<Registered<HostBuffer>>, KvArgs);

/// An agent with UCX, two KV buffers and one aux buffer registered.
fn side(name: &str) -> Result<Side, Box<dyn std::error::Error>> {
    let agent = Agent::new(name, &AgentConfig::default())?;
    agent.create_backend(BackendKind::Ucx, &BackendParams::new())?;
    let mut bufs = Vec::new();
    for len in [PAGE * PAGES, PAGE * PAGES, AUX_ROW * 8] {
        bufs.push(agent.register(HostBuffer::new(len as usize)?)?);
    }
    let args = KvArgs::new(
        [(bufs[0].region(), PAGE), (bufs[1].region(), PAGE)],
        [(bufs[2].region(), AUX_ROW)],
    )?;
    Ok((agent, bufs, args))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = BootstrapServer::start("127.0.0.1:0")?;
    let bootstrap = server.addr().to_string();

    let (pa, mut pbufs, pargs) = side(&format!("loopback-prefill-{}", std::process::id()))?;
    for (i, b) in pbufs[0].buffer_mut().as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let prefill = KvManager::prefill(pa, pargs, &bootstrap, ManagerConfig::default())?;
    let (da, dbufs, dargs) = side(&format!("loopback-decode-{}", std::process::id()))?;
    let decode = KvManager::decode(da, dargs, ManagerConfig::default())?;

    let room = RoomId::new(42);
    let mut rx = KvReceiver::new(&decode, &bootstrap, room, None)?;
    let mut tx = KvSender::new(&prefill, room)?;
    rx.init(&[8, 9, 10, 11], 0); // destination pages, aux row
    let start = Instant::now();
    while tx.poll() != KvPoll::WaitingForInput {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("the decode never asked: {:?}", tx.failure()).into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    tx.init(4, 0);
    tx.send(&[0, 1, 2, 3]); // source pages, one chunk
    let (mut sent, mut got) = (tx.poll(), rx.poll());
    while !(matches!(sent, KvPoll::Success | KvPoll::Failed)
        && matches!(got, KvPoll::Success | KvPoll::Failed))
    {
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        (sent, got) = (tx.poll(), rx.poll());
    }
    if (sent, got) != (KvPoll::Success, KvPoll::Success) {
        return Err(format!("{sent} / {got}: {:?} / {:?}", tx.failure(), rx.failure()).into());
    }
    let src = &pbufs[0].buffer().as_slice()[..(4 * PAGE) as usize];
    let dst = &dbufs[0].buffer().as_slice()[(8 * PAGE) as usize..(12 * PAGE) as usize];
    if src != dst {
        return Err("the pages differ".into());
    }
    println!("room {room}: 4 pages of 2 buffers moved and verified");
    Ok(())
}
