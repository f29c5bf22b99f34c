//! Hostile or stale peers: claimed rooms that cannot be re-targeted, disagreeing infos, idle
//! decode agents forgotten, and the proof of origin our decodes echo.

use super::*;

#[test]
fn a_claimed_room_cannot_be_retargeted_and_only_the_latecomer_is_told() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    p.handle_inbound(register("d1"), now);
    drv.run(&mut p);
    let room = RoomId::new(50);
    p.handle_inbound(info(50, "d0", &[1, 2], 1), now);
    // A second decode with the same room id (or a spoof under another name) is refused.
    p.handle_inbound(info(50, "d1", &[7, 8, 9], 1), now);
    drv.run(&mut p);
    assert_eq!(drv.notified.len(), 1);
    assert_eq!(drv.notified[0].0, vec![agent("d1")]);
    assert_eq!(
        Notification::decode(&drv.notified[0].1).unwrap(),
        Notification::fail(room, &FailureReason::RoomClaimed.to_string())
    );
    p.sender_new(room, now);
    p.sender_init(room, 2, 0).unwrap();
    p.sender_send(room, &[3], now).unwrap();
    // Once pages move, even the room's own agent cannot change its destination.
    p.handle_inbound(info(50, "d0", &[40, 41], 1), now);
    p.sender_send(room, &[4], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    let dsts: Vec<u64> = posts
        .iter()
        .filter(|p| p.kind == ListKind::Kv)
        .map(|p| drv.copies(p)[0].1)
        .collect();
    assert_eq!(dsts, vec![0x9000_0000 + 4096, 0x9000_0000 + 2 * 4096]);
    assert_eq!(
        drv.notified.len(),
        1,
        "the genuine decode was never told to fail"
    );
}

#[test]
fn infos_that_disagree_fail_the_room() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    p.handle_inbound(register("d1"), now);
    drv.run(&mut p);
    p.handle_inbound(info(60, "d0", &[1, 2], 2), now);
    p.handle_inbound(info(60, "d1", &[1, 2, 3], 2), now);
    assert!(matches!(
        p.failure(RoomId::new(60)),
        Some(FailureReason::InfosDisagree(_))
    ));
    p.handle_inbound(info(61, "d0", &[1], 2), now);
    p.handle_inbound(info(61, "d1", &[1], 1), now);
    assert!(matches!(
        p.failure(RoomId::new(61)),
        Some(FailureReason::InfosDisagree(_))
    ));
}

#[test]
fn idle_decode_agents_are_forgotten_unless_a_room_refers_to_them() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    p.handle_inbound(register("d1"), now);
    drv.run(&mut p);
    let idle = crate::proto::prefill::DEFAULT_PEER_IDLE_TIMEOUT;
    p.sender_new(RoomId::new(70), now);
    p.handle_inbound(info(70, "d1", &[1], 1), now);
    // d0 re-registers (an active decode does so periodically): its clock restarts.
    p.handle_inbound(register("d0"), now + idle / 2);
    p.handle_timeout(now + idle);
    drv.run(&mut p);
    assert!(p.has_peer(&agent("d0")) && p.has_peer(&agent("d1")));
    p.handle_timeout(now + idle / 2 + idle);
    drv.run(&mut p);
    assert!(!p.has_peer(&agent("d0")));
    assert_eq!(drv.forgotten, vec!["d0".to_owned()]);
    assert!(p.has_peer(&agent("d1")), "room 70 still refers to it");
}

fn proving_prefill(now: Instant, strict: bool, drv: &mut FakeDriver) -> PrefillCore {
    let proofs = crate::proto::prefill::Proofs {
        seed: [7; 32],
        endpoint: "tcp://127.0.0.1:5000".into(),
        strict,
    };
    let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300)).with_proofs(proofs);
    let PrefillInbound::Register(mut ours) = register("ours") else {
        unreachable!()
    };
    ours.trailing = vec![nixl_wire::ext::caps_frame(&[nixl_wire::ext::CAP_PROOF])];
    p.handle_inbound(PrefillInbound::Register(ours), now);
    p.handle_inbound(register("python"), now);
    drv.run(&mut p);
    p
}

fn with_proof(msg: PrefillInbound, proof: &str) -> PrefillInbound {
    let PrefillInbound::Transfer(mut t) = msg else {
        unreachable!()
    };
    t.trailing = vec![nixl_wire::ext::proof_frame(proof)];
    PrefillInbound::Transfer(t)
}

#[test]
fn our_decodes_get_a_proof_and_once_they_echo_it_impostors_are_refused() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = proving_prefill(now, false, &mut drv);
    // Only the decode that advertised the capability is sent a proof, and only it.
    assert_eq!(drv.notified.len(), 1);
    let (to, payload) = &drv.notified[0];
    assert_eq!(to, &vec![agent("ours")]);
    let notice = nixl_wire::ext::ProofNotice::decode(payload).unwrap();
    assert_eq!(notice.endpoint, "tcp://127.0.0.1:5000");
    let offered = |p: &PrefillCore| -> Vec<u64> {
        let mut v: Vec<u64> = p.unclaimed().iter().map(|u| u.room.get()).collect();
        v.sort_unstable();
        v
    };
    // Before its proof arrived a decode's infos are taken (its first request races the proof).
    p.handle_inbound(info(1, "ours", &[1], 1), now);
    // The echo proves it; from then on an info naming it without the proof is an impostor.
    p.handle_inbound(with_proof(info(2, "ours", &[1], 1), &notice.secret), now);
    p.handle_inbound(info(3, "ours", &[1], 1), now);
    p.handle_inbound(
        with_proof(info(4, "ours", &[1], 1), "0123456789abcdef"),
        now,
    );
    // SGLang's decodes cannot prove anything and keep SGLang's behaviour.
    p.handle_inbound(info(5, "python", &[1], 1), now);
    assert_eq!(offered(&p), vec![1, 2, 5]);
}

#[test]
fn strict_prefills_take_only_proven_infos() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = proving_prefill(now, true, &mut drv);
    let secret = nixl_wire::ext::ProofNotice::decode(&drv.notified[0].1)
        .unwrap()
        .secret;
    p.handle_inbound(info(1, "ours", &[1], 1), now);
    p.handle_inbound(with_proof(info(2, "ours", &[1], 1), &secret), now);
    p.handle_inbound(info(3, "python", &[1], 1), now);
    p.handle_inbound(info(4, "stranger", &[1], 1), now);
    let rooms: Vec<u64> = p.unclaimed().iter().map(|u| u.room.get()).collect();
    assert_eq!(rooms, vec![2]);
}

#[test]
fn decodes_advertise_proofs_and_echo_the_one_their_prefill_sent() {
    let now = Instant::now();
    let mut d = decode_core(now);
    bootstrap(&mut d, RoomId::new(1), 5000, now);
    d.receiver_init(RoomId::new(1), &[1], 0, now);
    let s = sends(&mut d);
    let Ok(PrefillInbound::Register(reg)) = PrefillInbound::decode(&s[0].1) else {
        panic!("registration expected")
    };
    assert_eq!(nixl_wire::ext::caps(&reg.trailing), vec!["proof"]);
    assert_eq!(
        s[0].1.len(),
        13,
        "SGLang's 12 frames and our capability frame"
    );
    let Ok(PrefillInbound::Transfer(t)) = PrefillInbound::decode(&s[1].1) else {
        panic!("info expected")
    };
    assert!(t.trailing.is_empty(), "no proof yet");
    let notice = nixl_wire::ext::ProofNotice {
        endpoint: "tcp://127.0.0.1:5000".into(),
        secret: "feedbeef".into(),
    };
    d.handle_notification("prefill", &notice.encode());
    d.receiver_new(RoomId::new(2), BootstrapAddr::new("b:1"), None, now);
    d.next_lookup(RoomId::new(2));
    d.receiver_init(RoomId::new(2), &[1], 0, now);
    let Ok(PrefillInbound::Transfer(t)) = PrefillInbound::decode(&sends(&mut d)[0].1) else {
        panic!("info expected")
    };
    assert_eq!(nixl_wire::ext::proof(&t.trailing), Some(&b"feedbeef"[..]));
}
