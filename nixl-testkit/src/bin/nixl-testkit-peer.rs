//! The child side of [`nixl_testkit::ChildPeer`]: a NIXL target agent in its own process.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    reason = "stdout is the protocol"
)]

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Notification, UcxErrorMode,
};
use nixl_testkit::{pattern, unique_name};

fn main() {
    if let Err(e) = run() {
        // A binary reporting its own failure on stderr (the parent test reads it).
        let _ = writeln!(std::io::stderr(), "nixl-testkit-peer: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let len: usize = args
        .get(1)
        .ok_or("usage: nixl-testkit-peer LEN peer|none")?
        .parse()?;
    let mode = match args.get(2).map(String::as_str) {
        Some("none") => UcxErrorMode::None,
        _ => UcxErrorMode::Peer,
    };
    let agent = Agent::new(&unique_name("child"), &AgentConfig::default())?;
    agent.create_backend(BackendKind::Ucx, &BackendParams::ucx(mode))?;
    let mut buf = agent.register(HostBuffer::new(len)?)?;
    let md = agent.local_metadata()?;
    let region = buf.region();

    // Progress the agent continuously; keep what arrives.
    let inbox: Arc<Mutex<Vec<Notification>>> = Arc::default();
    let progress_agent = agent.clone();
    let progress_inbox = Arc::clone(&inbox);
    std::thread::spawn(move || {
        let mut batch = Vec::new();
        loop {
            if progress_agent.drain_notifications(&mut batch).is_err() {
                return;
            }
            if !batch.is_empty() {
                progress_inbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&mut batch);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    });

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "READY {} {} {} {}",
        agent.name(),
        region.addr,
        region.len,
        nixl_testkit::hex(md.as_bytes())
    )?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split(' ').collect();
        let reply = match words[..] {
            ["FILL", seed] => {
                pattern::fill(buf.buffer_mut().as_mut_slice(), seed.parse()?);
                "OK".to_owned()
            }
            ["VERIFY", off, n, seed] => {
                let (off, n): (usize, usize) = (off.parse()?, n.parse()?);
                let slice = buf
                    .buffer()
                    .as_slice()
                    .get(off..off + n)
                    .ok_or("range outside buffer")?;
                match pattern::verify(slice, seed.parse()?) {
                    Ok(()) => "OK".to_owned(),
                    Err(i) => format!("BAD {i}"),
                }
            }
            ["NOTIF", hex, ms] => {
                let want = nixl_testkit::unhex(hex).ok_or("bad hex")?;
                let deadline = Instant::now() + Duration::from_millis(ms.parse()?);
                loop {
                    let mut inbox = inbox.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(i) = inbox.iter().position(|n| n.payload == want) {
                        break format!("NOTIF {}", inbox.remove(i).peer);
                    }
                    drop(inbox);
                    if Instant::now() > deadline {
                        break "TIMEOUT".to_owned();
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            ["QUIT"] => break,
            _ => format!("ERR unknown command {line}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}
