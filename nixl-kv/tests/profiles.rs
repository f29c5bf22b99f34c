//! One of our prefills serving decodes of every profile at once, over real UCX (needs the NIXL
//! runtime): each decode completes in its own dialect (notifications, or `KV_STATUS` to its
//! listener), every byte lands, failures and aborts reach the other side with their reason.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::Duration;

use common::{both, decode, exchange, prefill, reach, server};
use nixl_kv::{KvPoll, KvReceiver, KvSender, ManagerConfig, RoomId};
use nixl_wire::Profile;

const T: Duration = Duration::from_secs(30);

fn speaking(profile: Profile) -> ManagerConfig {
    ManagerConfig::default()
        .profile(profile)
        .sglang_pages(16, "bfloat16")
}

#[test]
fn one_prefill_serves_decodes_of_every_profile_byte_for_byte() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(
        &addr,
        4,
        64,
        4096,
        ManagerConfig::default().sglang_pages(16, "bfloat16"),
    );
    let decodes: Vec<_> = Profile::ALL
        .into_iter()
        .map(|profile| (profile, decode(4, 64, 4096, speaking(profile))))
        .collect();
    for (i, (profile, d)) in decodes.iter().enumerate() {
        let src: Vec<u32> = (0..6).map(|k| (k * 5 + i as u32) % 64).collect();
        let dst: Vec<u32> = (0..6).map(|k| 60 - k * 3 - i as u32).collect();
        let room = 7_000 + i as u64;
        let (states, tx, rx) = exchange(&p.mgr, &d.mgr, &addr, room, &src, &dst, 2);
        assert_eq!(
            states,
            (KvPoll::Success, KvPoll::Success),
            "{profile}: {tx:?} {rx:?}"
        );
        for b in 0..4 {
            let (from, to) = (p.kv[b].buffer().as_slice(), d.kv[b].buffer().as_slice());
            for (s, t) in src.iter().zip(&dst) {
                let (s, t) = (*s as usize * 4096, *t as usize * 4096);
                assert_eq!(
                    &to[t..t + 4096],
                    &from[s..s + 4096],
                    "{profile}: buffer {b}"
                );
            }
        }
        if profile.decode_listens() {
            assert_ne!(d.mgr.rank_port(), 0, "{profile}: a bound listener");
        }
    }
}

#[test]
fn failures_and_aborts_cross_in_the_0523_dialect() {
    let bs = server();
    let addr = bs.addr().to_string();
    let p = prefill(
        &addr,
        2,
        16,
        1024,
        ManagerConfig::default().sglang_pages(16, "bfloat16"),
    );
    let d = decode(2, 16, 1024, speaking(Profile::Sglang0523));
    // The prefill fails the room: the decode hears it by KV_STATUS, with the reason.
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(42), None).unwrap();
    let mut tx = KvSender::new(&p.mgr, RoomId::new(42)).unwrap();
    rx.init(&[1, 2], 0);
    assert_eq!(
        reach(T, KvPoll::WaitingForInput, || tx.poll()),
        KvPoll::WaitingForInput
    );
    tx.init(2, 0);
    tx.send(&[1, 999]);
    assert_eq!(both(T, &mut tx, &mut rx), (KvPoll::Failed, KvPoll::Failed));
    let why = rx.failure().unwrap().to_string();
    assert!(why.contains("page index 999"), "{why}");
    // The decode aborts a room: the prefill's sender fails with the decode's abort.
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(43), None).unwrap();
    let mut tx = KvSender::new(&p.mgr, RoomId::new(43)).unwrap();
    rx.init(&[3], 0);
    assert_eq!(
        reach(T, KvPoll::WaitingForInput, || tx.poll()),
        KvPoll::WaitingForInput
    );
    rx.abort("client went away");
    assert_eq!(reach(T, KvPoll::Failed, || tx.poll()), KvPoll::Failed);
    assert!(
        tx.failure()
            .unwrap()
            .to_string()
            .contains("aborted by the decode")
    );
}

#[test]
fn a_0523_decode_refuses_a_prefill_of_another_page_size_with_the_reason() {
    let bs = server();
    let addr = bs.addr().to_string();
    let _p = prefill(
        &addr,
        2,
        16,
        1024,
        ManagerConfig::default().sglang_pages(32, "bfloat16"),
    );
    let d = decode(2, 16, 1024, speaking(Profile::Sglang0523));
    let mut rx = KvReceiver::new(&d.mgr, &addr, RoomId::new(44), None).unwrap();
    assert_eq!(rx.poll(), KvPoll::Failed);
    let why = rx.failure().unwrap().to_string();
    assert!(why.contains("page size"), "{why}");
}
