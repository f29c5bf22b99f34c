//! A Rust prefill serving a decode that speaks exactly SGLang 0.5.1's frames with SGLang's
//! libraries (pyzmq over libzmq, NIXL's Python API with its default config): ZMTP interop,
//! NIXL metadata interop between Python and Rust agents, the registration and transfer
//! messages, chunked notifications parsed the seed's way, and every byte verified by Python.
//! Needs the NIXL runtime and the peer venv (`cargo xtask prereq`).
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{AUX_ITEMS, prefill, server};
use nixl_kv::{KvPoll, KvSender, ManagerConfig, RoomId};

/// Kills the Python peer if the test fails before it exits.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next line the Python peer printed as JSON (NIXL's Python logger also writes to stdout).
fn next_json(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> String {
    lines
        .map_while(Result::ok)
        .find(|l| l.starts_with('{'))
        .unwrap_or_default()
}

fn python() -> PathBuf {
    std::env::var_os("NIXL_KV_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-peer-venv"))
        .join("bin/python")
}

#[test]
fn a_python_decode_speaking_sglang_frames_receives_every_byte() {
    let (buffers, page, pool) = (4usize, 4096u64, 64u64);
    let bs = server();
    let addr = bs.addr().to_string();
    let mut p = prefill(&addr, buffers, pool, page, ManagerConfig::default());
    let room: u64 = 8_181_933_191_833_708_945;
    // The pd pattern: byte j of page q of buffer b is (7b + 13q + j) mod 251; aux row 0.
    for (b, buf) in p.kv.iter_mut().enumerate() {
        for (q, chunk) in buf
            .buffer_mut()
            .as_mut_slice()
            .chunks_mut(page as usize)
            .enumerate()
        {
            for (j, byte) in chunk.iter_mut().enumerate() {
                *byte = ((7 * b + 13 * q + j) % 251) as u8;
            }
        }
    }
    for (k, aux) in p.aux.iter_mut().enumerate() {
        for (j, byte) in aux.buffer_mut().as_mut_slice()[..AUX_ITEMS[k] as usize]
            .iter_mut()
            .enumerate()
        {
            *byte = ((room as usize % 256 + 17 * k + j) % 256) as u8;
        }
    }
    let dst = "3,4,5,9,10,11,40,2";
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/seed_decode.py");
    let mut child = Reap(
        Command::new(python())
            .args([
                script,
                &addr,
                &buffers.to_string(),
                &page.to_string(),
                &pool.to_string(),
                &room.to_string(),
                "5",
                dst,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );

    // Serve the room the way the pd prefill does: learn it from the decode's infos.
    let start = Instant::now();
    let n = loop {
        if let Some(u) = p.mgr.unclaimed_rooms().first() {
            assert_eq!(u.room, RoomId::new(room));
            break u.pages;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the Python decode never asked"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(n, 8);
    let mut tx = KvSender::new(&p.mgr, RoomId::new(room)).unwrap();
    tx.init(n, 0);
    let src: Vec<u32> = (0..u64::from(n))
        .map(|i| ((room + 97 * i) % pool) as u32)
        .collect();
    tx.send(&src[..3]);
    tx.send(&src[3..]);
    let mut state = tx.poll();
    while !matches!(state, KvPoll::Success | KvPoll::Failed)
        && start.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(1));
        state = tx.poll();
    }
    assert_eq!(state, KvPoll::Success, "{:?}", tx.failure());
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(child.0.wait().unwrap().success(), "python decode: {stdout}");
    assert!(stdout.contains(r#""ok": true"#), "{stdout}");
    assert!(stdout.contains(r#""chunks": 2"#), "{stdout}");
}

#[test]
fn a_rust_decode_receives_from_a_python_prefill_speaking_sglang_frames() {
    use std::io::{BufRead, BufReader};

    use common::decode;
    use nixl_kv::KvReceiver;

    let (buffers, page, pool) = (4usize, 4096u64, 64u64);
    let bs = server();
    let addr = bs.addr().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/seed_prefill.py");
    let mut child = Reap(
        Command::new(python())
            .args([
                script,
                &addr,
                &buffers.to_string(),
                &page.to_string(),
                &pool.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let ready = next_json(&mut lines);
    assert!(ready.contains("ready"), "{ready}");

    let d = decode(buffers, pool, page, ManagerConfig::default());
    let room = 569_328_129_861_315_033u64;
    let pages = [7u32, 8, 20, 21, 22, 0];
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(room), None).unwrap();
    rx.init(&pages, 3);
    let start = Instant::now();
    let mut state = rx.poll();
    while !matches!(state, KvPoll::Success | KvPoll::Failed)
        && start.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(1));
        state = rx.poll();
    }
    assert_eq!(state, KvPoll::Success, "{:?}", rx.failure());
    for (b, buf) in d.kv.iter().enumerate() {
        let data = buf.buffer().as_slice();
        for (i, &dp) in pages.iter().enumerate() {
            let src = (room + 97 * i as u64) % pool;
            let got = &data[dp as usize * page as usize..(dp as usize + 1) * page as usize];
            for (j, &byte) in got.iter().enumerate() {
                assert_eq!(
                    byte,
                    ((7 * b as u64 + 13 * src + j as u64) % 251) as u8,
                    "buffer {b} page {dp} byte {j}"
                );
            }
        }
    }
    let item = AUX_ITEMS[0] as usize;
    let row = &d.aux[0].buffer().as_slice()[3 * item..4 * item];
    let want: Vec<u8> = (0..item as u64).map(|j| ((room + j) % 256) as u8).collect();
    assert_eq!(
        row,
        &want[..],
        "aux buffer 0 (the only one a seed prefill sends)"
    );
    let done = next_json(&mut lines);
    assert!(done.contains(r#""ok": true"#), "{done}");
    assert!(child.0.wait().unwrap().success());
}
