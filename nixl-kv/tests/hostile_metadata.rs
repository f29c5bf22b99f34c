//! Metadata that used to end the prefill (hostile peers R1, R2): registrations whose NIXL
//! metadata is a live agent's with one byte changed. R1: a worker-address version UCX asserts on
//! aborted the whole process. R2: an agent name that is not UTF-8 panicked the inbound thread
//! inside nixl-sys, silently, and every later request timed out. Each is now refused before NIXL
//! sees it, and the prefill keeps serving a genuine decode. Own file: an abort here would take
//! the test binary with it, which is exactly the failure this guards against.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use common::{decode, exchange, flood, prefill, server};
use nixl_kv::{KvPoll, ManagerConfig};

/// Offset of the UCX worker address in an agent's metadata (the first `c` entry's value).
fn worker_address_at(blob: &[u8]) -> usize {
    let tag = b"|t\x03\x00\x00\x00\x00\x00\x00\x00UCX|c";
    blob.windows(tag.len()).position(|w| w == tag).unwrap() + tag.len() + 8
}

#[test]
fn mutated_metadata_neither_aborts_the_prefill_nor_kills_its_inbound_thread() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(&addr, 2, 16, 1024, ManagerConfig::default());
    let d = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 1, &[2], &[1], 0);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );

    let live = common::agent();
    let good = live.local_metadata().unwrap().into_bytes();
    let at = worker_address_at(&good);
    let mut bad_version = good.clone();
    bad_version[at] = (bad_version[at] & 0xf0) | 8;
    let mut bad_name = good.clone();
    bad_name[b"nixlSerDes|Agent".len() + 8] = 0xff;

    // Each flood ends with an info the prefill must apply: it handled every registration.
    flood(&p.mgr, live.name(), &bad_version, 2, 1);
    flood(&p.mgr, "not-utf8", &bad_name, 3, 1);
    assert_eq!(
        p.mgr.table_sizes().peers,
        1,
        "no mutated registration loaded"
    );

    // The first decode is still served, and so is a new one.
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d.mgr, &addr, 4, &[3], &[4], 1);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
    let d2 = decode(2, 16, 1024, ManagerConfig::default());
    let (states, tx_err, rx_err) = exchange(&p.mgr, &d2.mgr, &addr, 5, &[5], &[6], 2);
    assert_eq!(
        states,
        (KvPoll::Success, KvPoll::Success),
        "{tx_err:?} {rx_err:?}"
    );
}
