//! Descriptors and decode metadata (issue item D6): UCX leaves one socket open in a worker for
//! every endpoint it tried to create, also when the creation failed (metadata naming a worker
//! that is gone) or the metadata was invalidated since, until the worker is destroyed. A
//! prefill flooded with registrations carrying such metadata must keep its open descriptors
//! bounded, and still serve a genuine decode afterwards. One test in this file, because it
//! counts the descriptors of its whole process.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::{Duration, Instant};

use common::{decode, exchange, flood, prefill, server};
use nixl_kv::{KvPoll, ManagerConfig};

/// Registrations per flood.
const FLOOD: usize = 200;

/// How many more descriptors the prefill's process may hold after a flood than before it: a
/// probe agent's own (about a dozen) and one socket per load into it (16 at most) with room to
/// spare, far below one per registration.
const BOUND: usize = 48;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn registrations_with_unloadable_metadata_leave_descriptors_bounded() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d1 = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d1.mgr, &addr, 1, &[2], &[1], 0);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    // Metadata of an agent that is gone: its worker's sockets are closed, so loading it fails.
    let dead = common::agent();
    let gone = dead.local_metadata().unwrap().into_bytes();
    drop(dead);
    // A live agent no registration names: its metadata loads, under its own name.
    let live = common::agent();
    let other = live.local_metadata().unwrap().into_bytes();

    let before = open_fds();
    flood(&p.mgr, "forged", &gone, 2, FLOOD);
    let after = open_fds();
    assert!(
        after < before + BOUND,
        "{FLOOD} failed metadata loads: open descriptors {before} -> {after}"
    );

    // Each of these loads, names `live`, and is refused; the live agent closes its side of the
    // connections once it is progressed and their other ends are closed.
    flood(&p.mgr, "misnamed", &other, 3, FLOOD);
    let start = Instant::now();
    let mut notifs = Vec::new();
    let settled = loop {
        live.drain_notifications(&mut notifs).unwrap();
        let n = open_fds();
        if n < before + BOUND || start.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        settled < before + BOUND,
        "{FLOOD} metadata loads naming another agent: open descriptors {before} -> {settled}"
    );
    assert_eq!(
        p.mgr.table_sizes().peers,
        1,
        "no flooded name is registered"
    );

    // A genuine decode registers and is served, and so is the first one still.
    let d2 = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d2.mgr, &addr, 4, &[3], &[5], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d1.mgr, &addr, 5, &[4], &[6], 2);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    assert_eq!(p.mgr.table_sizes().peers, 2);
}
