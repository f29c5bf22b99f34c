//! Simulated prefill/decode pairs over the sans-IO cores, with a virtual clock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nixl_core::MemType;
use nixl_wire::http::{ParallelInfo, RankInfo};
use nixl_wire::{
    AgentName, GpuId, KvArgsRegister, Notification, PageIndex, PrefillInbound, RoomId, TransferInfo,
};
use proptest::prelude::*;

use super::decode::{self, DecodeConfig, DecodeCore, DecodeTimers, Heartbeat, Lookup};
use super::lower::{ListId, ListKind, ListSpec, Work};
use super::prefill::{Command, Post, PrefillCore};
use super::{BootstrapAddr, FailureReason, KvPoll, Layout};

/// The freed-slot message a decode command carries to its prefill.
fn freed_message(c: decode::Command) -> nixl_wire::ext::FreedMessage {
    let decode::Command::Send { frames, .. } = c else {
        panic!("a freed-slot message expected, got {c:?}")
    };
    match PrefillInbound::decode(&frames) {
        Ok(PrefillInbound::Freed(m)) => m,
        other => panic!("a freed-slot message expected, got {other:?}"),
    }
}

fn layout(base: u64) -> Layout {
    Layout {
        kv_mem: MemType::Dram,
        kv_ptrs: vec![base, base + 0x10_0000],
        kv_item_lens: vec![4096, 4096],
        kv_pages: 64,
        aux_ptrs: vec![base + 0x100_0000],
        aux_item_lens: vec![64],
        aux_slots: 8,
        gpu_id: 0,
        tp: crate::proto::TpPlace::default(),
    }
}

fn agent(n: &str) -> AgentName {
    AgentName::new(n).unwrap()
}

fn register_with(name: &str, peer: &Layout) -> PrefillInbound {
    PrefillInbound::Register(KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: agent(name),
        metadata: Bytes::from_static(b"md"),
        kv_ptrs: peer.kv_ptrs.clone(),
        aux_ptrs: peer.aux_ptrs.clone(),
        gpu_id: GpuId::new(1),
        tp_info: None,
        trailing: Vec::new(),
    })
}

fn register(name: &str) -> PrefillInbound {
    register_with(name, &layout(0x9000_0000))
}

fn info(room: u64, name: &str, pages: &[u32], required: u32) -> PrefillInbound {
    PrefillInbound::Transfer(TransferInfo {
        room: RoomId::new(room),
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: agent(name),
        dst_pages: pages.iter().copied().map(PageIndex::new).collect(),
        dst_aux_index: 2,
        required_dst_info_num: required,
        trailing: Vec::new(),
    })
}

/// A stand-in driver: answers every command (loads succeed with the claimed name, lists are
/// prepared when `prepare_ok`), keeps the prepared lists, and returns the posts and
/// notifications in queue order.
#[derive(Default)]
struct FakeDriver {
    lists: HashMap<ListId, ListSpec>,
    posts: Vec<Post>,
    notified: Vec<(Vec<AgentName>, Vec<u8>)>,
    forgotten: Vec<String>,
    prepare_ok: bool,
    /// Staged WRITEs, in queue order (the test reports their ends).
    stages: Vec<super::prefill::StagedWrite>,
    /// Agents whose pools the core asked to map, in order.
    opened: Vec<AgentName>,
    /// The answer to each mapping (`None`: none; the test answers).
    open_ok: Option<bool>,
    /// Our pool and each decode's, for the posts that name pages rather than descriptors
    /// (direct copies and packed chunks): see [`FakeDriver::with_pools`].
    pools: Option<(Layout, HashMap<String, Layout>)>,
    /// Messages to decode listeners (0.5.2x `KV_STATUS`, `ABORT_ACK`), in order.
    statuses: Vec<(String, Vec<Bytes>)>,
}

impl FakeDriver {
    fn new() -> Self {
        Self {
            prepare_ok: true,
            ..Self::default()
        }
    }

    fn run(&mut self, p: &mut PrefillCore) {
        while let Some(cmd) = p.poll_command() {
            match cmd {
                Command::LoadRemote { agent, .. } => {
                    let name = agent.as_str().to_owned();
                    p.remote_loaded(&agent, Ok(name));
                }
                Command::Prepare(spec) => {
                    let ok = self.prepare_ok;
                    if ok {
                        self.lists.insert(spec.id.clone(), spec.clone());
                    }
                    p.list_prepared(&spec.id, ok);
                }
                Command::Release(id) => {
                    assert!(self.lists.remove(&id).is_some(), "released twice: {id:?}");
                }
                Command::Forget { agent } => self.forgotten.push(agent),
                Command::Post(post) => self.posts.push(post),
                Command::Notify { agents, payload } => self.notified.push((agents, payload)),
                Command::Stage(w) => self.stages.push(w),
                Command::SendStatus { endpoint, frames } => self.statuses.push((endpoint, frames)),
                Command::OpenDirect { agent, .. } => {
                    self.opened.push(agent.clone());
                    if let Some(ok) = self.open_ok {
                        let res = if ok { Ok(()) } else { Err("refused".into()) };
                        p.direct_opened(&agent, res);
                    }
                }
            }
        }
    }

    /// Lets [`FakeDriver::copies`] execute direct and packed posts, which name pages: `ours`
    /// is the prefill's pool, `peers` each decode's.
    fn with_pools(&mut self, ours: &Layout, peers: &[(&str, &Layout)]) {
        let peers = peers
            .iter()
            .map(|(n, l)| ((*n).to_owned(), (*l).clone()))
            .collect();
        self.pools = Some((ours.clone(), peers));
    }

    fn take_posts(&mut self) -> Vec<Post> {
        std::mem::take(&mut self.posts)
    }

    /// The byte copies a post performs, as (src, dst, len), adjacent copies merged.
    fn copies(&self, post: &Post) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        match &post.work {
            Work::Indexed {
                local,
                remote,
                local_idx,
                remote_idx,
            } => {
                let (l, r) = (&self.lists[local], &self.lists[remote]);
                for (&li, &ri) in local_idx.iter().zip(remote_idx) {
                    let (a, b) = (
                        l.descs.as_slice()[li as usize],
                        r.descs.as_slice()[ri as usize],
                    );
                    assert_eq!(a.len, b.len);
                    out.push((a.addr, b.addr, a.len));
                }
            }
            Work::Explicit { local, remote } => {
                for (a, b) in local.as_slice().iter().zip(remote.as_slice()) {
                    assert_eq!(a.len, b.len);
                    out.push((a.addr, b.addr, a.len));
                }
            }
            Work::Direct { src, dst, slice } => {
                let (ours, peer) = self.pools_for(post);
                let pairs: Vec<(u32, u32)> = src.iter().copied().zip(dst.iter().copied()).collect();
                let Some(t) = slice else {
                    return naive_kv(ours, peer, &pairs);
                };
                for b in 0..ours.kv_ptrs.len() {
                    let (si, di) = (ours.kv_item_lens[b], peer.kv_item_lens[b]);
                    for &(s, d) in &pairs {
                        for k in 0..u64::from(t.tokens) {
                            out.push((
                                ours.kv_ptrs[b]
                                    + u64::from(s) * si
                                    + k * t.src_token
                                    + t.src_offset,
                                peer.kv_ptrs[b]
                                    + u64::from(d) * di
                                    + k * t.dst_token
                                    + t.dst_offset,
                                t.len,
                            ));
                        }
                    }
                }
            }
            Work::Packed {
                slice,
                item,
                pieces,
                ..
            } => {
                // Each piece: the gather (the kernels' table over a packing area), then its
                // WRITE; each byte followed from our pool to the decode's.
                use nixl_core::staging::StagingLayout;
                const AREA: u64 = 0x7000_0000;
                let (ours, _) = self.pools_for(post);
                let layout = crate::proto::staging::staging_layout(ours).unwrap();
                let nb = ours.kv_ptrs.len();
                for piece in pieces {
                    let n = piece.src.len();
                    let area = StagingLayout::packed(AREA, nb, n, *item).unwrap();
                    let slots: Vec<u32> = (0..n as u32).collect();
                    let table = layout
                        .sliced_table(&piece.src, &area, &slots, slice)
                        .unwrap();
                    let mut packed: Vec<Option<u64>> = vec![None; nb * n * *item as usize];
                    for (s, d, len) in table.copies() {
                        for k in 0..len {
                            packed[(d - AREA + k) as usize] = Some(s + k);
                        }
                    }
                    for &(off, dst, len) in &piece.copies {
                        for k in 0..len {
                            let src = packed[(off + k) as usize]
                                .expect("a packed byte the gather never wrote");
                            out.push((src, dst + k, 1));
                        }
                    }
                }
            }
        }
        merged(out)
    }

    /// Our pool and the decode's of `post`, given by [`FakeDriver::with_pools`].
    fn pools_for(&self, post: &Post) -> (&Layout, &Layout) {
        self.pools_for_agent(&post.peer)
    }

    /// Our pool and `agent`'s, given by [`FakeDriver::with_pools`].
    fn pools_for_agent(&self, agent: &AgentName) -> (&Layout, &Layout) {
        let (ours, peers) = self
            .pools
            .as_ref()
            .expect("FakeDriver::with_pools first: this post names pages, not descriptors");
        let peer = peers
            .get(agent.as_str())
            .expect("FakeDriver::with_pools has no pool for this decode");
        (ours, peer)
    }
}

fn merged(v: Vec<(u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for c in v {
        match out.last_mut() {
            Some(last) if last.0 + last.2 == c.0 && last.1 + last.2 == c.1 => last.2 += c.2,
            _ => out.push(c),
        }
    }
    out
}

/// The naive model: every page of every buffer, one copy each, buffer-major.
fn naive_kv(src: &Layout, dst: &Layout, pairs: &[(u32, u32)]) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for b in 0..src.kv_ptrs.len() {
        let item = src.kv_item_lens[b];
        for &(s, d) in pairs {
            out.push((
                src.kv_ptrs[b] + u64::from(s) * item,
                dst.kv_ptrs[b] + u64::from(d) * item,
                item,
            ));
        }
    }
    merged(out)
}

fn prefill_with_peer(now: Instant, drv: &mut FakeDriver) -> PrefillCore {
    let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300));
    p.handle_inbound(register("d0"), now);
    drv.run(&mut p);
    assert!(p.has_peer(&agent("d0")));
    // A second registration of the same agent is ignored (metadata not reloaded).
    p.handle_inbound(register("d0"), now);
    assert_eq!(p.poll_command(), None);
    p
}

#[test]
fn status_is_max_merged_whatever_arrives_first() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let room = RoomId::new(5);
    // The info can arrive before the sender exists (SGLang's reason for the max rule).
    p.handle_inbound(info(5, "d0", &[1, 2], 1), now);
    p.sender_new(room, now);
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    let room2 = RoomId::new(6);
    p.sender_new(room2, now);
    assert_eq!(p.sender_poll(room2), KvPoll::Bootstrapping);
}

#[test]
fn full_exchange_lowers_chunks_to_prepared_indices_and_completes_on_notifications() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let mut d = decode_core(now);
    let room = RoomId::new(77);
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    assert_eq!(d.poll(room, now), KvPoll::WaitingForInput);
    p.sender_new(room, now);
    p.handle_inbound(info(77, "d0", &[10, 11, 12, 30], 1), now);
    p.sender_init(room, 4, 3).unwrap();
    p.sender_send(room, &[1, 5], now).unwrap();
    drv.run(&mut p);
    let c0 = drv.take_posts();
    assert_eq!(c0.len(), 1);
    assert_eq!(c0[0].notif, b"77_kv_0_0");
    assert!(
        matches!(c0[0].work, Work::Indexed { .. }),
        "the prepared path"
    );
    let peer = layout(0x9000_0000);
    assert_eq!(
        drv.copies(&c0[0]),
        naive_kv(p.layout(), &peer, &[(1, 10), (5, 11)])
    );
    p.sender_send(room, &[3, 9], now).unwrap();
    drv.run(&mut p);
    let c1 = drv.take_posts();
    assert_eq!(c1.len(), 2, "last chunk: KV and aux");
    assert_eq!(c1[0].notif, b"77_kv_1_1");
    assert_eq!(c1[1].notif, b"77_aux");
    assert_eq!(
        drv.copies(&c1[1]),
        vec![(0x1100_0000 + 3 * 64, 0x9100_0000 + 2 * 64, 64)]
    );
    // Transfers still running: WaitingForInput, as SGLang reports.
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    for _ in 0..3 {
        p.transfer_done(room, Ok(()));
    }
    assert_eq!(p.sender_poll(room), KvPoll::Success);
    // Out of order and duplicated notifications still complete the decode exactly once.
    d.next_lookup(room);
    d.parallel_learned(room, Ok(parallel(1, 1)));
    let Lookup::Ranks { key, .. } = d.next_lookup(room) else {
        panic!("ranks expected")
    };
    d.ranks_learned(room, key, Ok(vec![rank_info(5000)]));
    d.receiver_init(room, &[10, 11, 12, 30], 2, now);
    for n in ["77_aux", "77_kv_1_1", "77_kv_1_1", "77_kv_0_0"] {
        assert_ne!(d.poll(room, now), KvPoll::Success);
        d.handle_notification("p", n.as_bytes());
    }
    assert_eq!(d.poll(room, now), KvPoll::Success);
    p.release(room);
    d.release(room);
    assert_eq!((p.rooms(), d.rooms()), (0, 0));
}

#[test]
fn long_runs_go_merged_as_one_descriptor_per_buffer_and_run() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let room = RoomId::new(9);
    p.sender_new(room, now);
    p.handle_inbound(info(9, "d0", &[10, 11, 12, 13, 30, 31], 1), now);
    p.sender_init(room, 6, 0).unwrap();
    p.sender_send(room, &[1, 2, 3, 4, 8, 9], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    let Work::Explicit { local, .. } = &posts[0].work else {
        panic!("merged explicit copies expected")
    };
    assert_eq!(
        local.len(),
        2 * 2,
        "two buffers × two runs, not 2 × 6 page descriptors"
    );
    let pairs = [(1, 10), (2, 11), (3, 12), (4, 13), (8, 30), (9, 31)];
    assert_eq!(
        drv.copies(&posts[0]),
        naive_kv(p.layout(), &layout(0x9000_0000), &pairs)
    );
}

#[test]
fn without_prepared_lists_the_same_bytes_go_as_explicit_runs() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    drv.prepare_ok = false;
    let mut p = prefill_with_peer(now, &mut drv);
    let room = RoomId::new(8);
    p.sender_new(room, now);
    p.handle_inbound(info(8, "d0", &[10, 11, 12, 30], 1), now);
    p.sender_init(room, 4, 0).unwrap();
    p.sender_send(room, &[1, 2, 3, 9], now).unwrap();
    drv.run(&mut p);
    let posts = drv.take_posts();
    let Work::Explicit { local, .. } = &posts[0].work else {
        panic!("explicit expected")
    };
    // Two buffers × runs [1,2,3]→[10,11,12] and [9]→[30].
    assert_eq!(local.len(), 4);
    let peer = layout(0x9000_0000);
    let pairs = [(1, 10), (2, 11), (3, 12), (9, 30)];
    assert_eq!(drv.copies(&posts[0]), naive_kv(p.layout(), &peer, &pairs));
}

#[test]
fn a_decode_pool_larger_than_ours_grows_the_peer_list_and_a_huge_index_stays_explicit() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let send = |p: &mut PrefillCore, drv: &mut FakeDriver, room: u64, dst: u32| {
        let r = RoomId::new(room);
        p.sender_new(r, now);
        p.handle_inbound(info(room, "d0", &[dst], 1), now);
        p.sender_init(r, 1, 0).unwrap();
        p.sender_send(r, &[0], now).unwrap();
        drv.run(p);
        drv.take_posts().remove(0)
    };
    // Page 100 is past our 64-page pool: explicit now, a 128-page list prepared meanwhile.
    assert!(matches!(
        send(&mut p, &mut drv, 1, 100).work,
        Work::Explicit { .. }
    ));
    let post = send(&mut p, &mut drv, 2, 100);
    let Work::Indexed { remote, .. } = &post.work else {
        panic!("indexed expected")
    };
    assert_eq!(drv.lists[remote].count, 128);
    assert_eq!(
        drv.lists
            .keys()
            .filter(|id| matches!(
                id,
                ListId::Peer {
                    kind: ListKind::Kv,
                    ..
                }
            ))
            .count(),
        1,
        "the 64-page list was released"
    );
    // An index near 2^31 is never sized into a list: one explicit descriptor per buffer.
    let post = send(&mut p, &mut drv, 3, i32::MAX as u32 - 1);
    let Work::Explicit { local, .. } = &post.work else {
        panic!("explicit expected")
    };
    assert_eq!(local.len(), 2);
    assert!(drv.lists.values().all(|l| l.count <= 256));
}

#[test]
fn aux_rows_go_for_every_buffer_only_when_both_sides_have_the_same_count() {
    let now = Instant::now();
    let mut six = layout(0x1000_0000);
    six.aux_ptrs = (0..6).map(|i| 0x1100_0000 + i * 0x10_0000).collect();
    six.aux_item_lens = vec![64, 64, 64, 512, 512, 8192];
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(six.clone(), Duration::from_secs(300));
    let mut dec_six = six.clone();
    for a in &mut dec_six.aux_ptrs {
        *a += 0x8000_0000;
    }
    let mut dec_three = dec_six.clone();
    dec_three.aux_ptrs.truncate(3);
    p.handle_inbound(register_with("six", &dec_six), now);
    p.handle_inbound(register_with("three", &dec_three), now);
    drv.run(&mut p);
    for (room, name, rows) in [(1u64, "six", 6usize), (2, "three", 1)] {
        let r = RoomId::new(room);
        p.sender_new(r, now);
        p.handle_inbound(info(room, name, &[5], 1), now);
        p.sender_init(r, 1, 1).unwrap();
        p.sender_send(r, &[0], now).unwrap();
        drv.run(&mut p);
        let posts = drv.take_posts();
        let aux = drv.copies(&posts[1]);
        assert_eq!(aux.len(), rows, "{name}");
        let dst = if rows == 6 { &dec_six } else { &dec_three };
        for (k, &(s, dd, len)) in aux.iter().enumerate() {
            let item = six.aux_item_lens[k];
            assert_eq!(
                (s, dd, len),
                (six.aux_ptrs[k] + item, dst.aux_ptrs[k] + 2 * item, item)
            );
        }
    }
}

#[test]
fn dummy_targets_get_nothing_and_a_dummy_only_rank_succeeds_at_once() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let room = RoomId::new(3);
    p.sender_new(room, now);
    p.handle_inbound(info(3, "d0", &[], 1), now);
    p.sender_init(room, 2, 0).unwrap();
    p.sender_send(room, &[1, 2], now).unwrap();
    drv.run(&mut p);
    assert!(drv.take_posts().is_empty());
    assert_eq!(p.sender_poll(room), KvPoll::Success);
}

#[test]
fn required_dst_info_num_waits_for_every_decode() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    p.handle_inbound(register("d1"), now);
    drv.run(&mut p);
    let room = RoomId::new(4);
    p.sender_new(room, now);
    p.handle_inbound(info(4, "d0", &[1], 2), now);
    assert_eq!(p.sender_poll(room), KvPoll::Bootstrapping);
    // A repeat from the same agent overwrites and does not count twice.
    p.handle_inbound(info(4, "d0", &[2], 2), now);
    assert_eq!(p.sender_poll(room), KvPoll::Bootstrapping);
    p.handle_inbound(info(4, "d1", &[5], 2), now);
    assert_eq!(p.sender_poll(room), KvPoll::WaitingForInput);
    p.sender_init(room, 1, 0).unwrap();
    p.sender_send(room, &[7], now).unwrap();
    drv.run(&mut p);
    let t = drv.take_posts();
    assert_eq!(
        t.iter().filter(|t| t.kind == ListKind::Kv).count(),
        2,
        "one KV write per decode"
    );
    assert_eq!(
        drv.copies(&t[0])[0].1,
        0x9000_0000 + 2 * 4096,
        "the overwritten info is used"
    );
}

#[test]
fn misuse_fails_the_room_with_a_reason_and_pushes_it_once() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let room = RoomId::new(9);
    p.sender_new(room, now);
    // Sending before the decode asked.
    assert_eq!(
        p.sender_send(room, &[1], now),
        Err(FailureReason::SendBeforeInfo)
    );
    assert_eq!(p.sender_poll(room), KvPoll::Failed);

    let room = RoomId::new(10);
    p.sender_new(room, now);
    p.handle_inbound(info(10, "ghost", &[1], 1), now);
    p.sender_init(room, 1, 0).unwrap();
    let err = p.sender_send(room, &[1], now).unwrap_err();
    assert_eq!(err, FailureReason::DecodeNotRegistered(agent("ghost")));

    let room = RoomId::new(11);
    p.sender_new(room, now);
    p.handle_inbound(info(11, "d0", &[1], 1), now);
    p.sender_init(room, 1, 0).unwrap();
    assert!(
        p.sender_send(room, &[1, 2], now).is_err(),
        "more pages than the request has"
    );
    assert!(matches!(
        p.sender_init(RoomId::new(12), 1, 99),
        Err(FailureReason::AuxOutsideSlots {
            index: 99,
            slots: 8
        })
    ));
    // A transfer error fails the room and tells its decode once, with the first reason.
    let room = RoomId::new(13);
    p.sender_new(room, now);
    p.handle_inbound(info(13, "d0", &[1], 1), now);
    p.sender_init(room, 1, 0).unwrap();
    p.sender_send(room, &[1], now).unwrap();
    drv.run(&mut p);
    drv.notified.clear();
    let died = FailureReason::Transfer {
        peer: "d0".into(),
        reason: "peer died".into(),
    };
    p.transfer_done(room, Err(died.clone()));
    p.abort(room, FailureReason::Aborted("x".into()));
    drv.run(&mut p);
    assert_eq!(p.sender_poll(room), KvPoll::Failed);
    assert_eq!(p.failure(room), Some(&died));
    assert_eq!(drv.notified.len(), 1);
    let (agents, payload) = &drv.notified[0];
    assert_eq!(agents, &vec![agent("d0")]);
    assert_eq!(
        Notification::decode(payload).unwrap(),
        Notification::fail(room, &died.to_string())
    );
}

#[test]
fn metadata_naming_another_agent_is_forgotten_unless_that_agent_is_registered() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    for (claimed, actual, forgotten) in [("x1", "intruder", true), ("x2", "d0", false)] {
        p.handle_inbound(register(claimed), now);
        let Some(Command::LoadRemote { agent: a, .. }) = p.poll_command() else {
            panic!("load expected")
        };
        p.remote_loaded(&a, Ok(actual.to_owned()));
        drv.run(&mut p);
        assert!(!p.has_peer(&a));
        assert_eq!(drv.forgotten.contains(&actual.to_owned()), forgotten);
    }
    assert!(
        p.has_peer(&agent("d0")),
        "a replay cannot disconnect a registered decode"
    );
}

#[test]
fn rooms_of_dummy_infos_are_never_offered_to_claim_and_expire_as_orphans() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    p.handle_inbound(info(40, "d0", &[], 1), now);
    p.handle_inbound(info(41, "d0", &[3], 1), now);
    // Nor is a room naming a decode that never registered (a sender could only fail).
    p.handle_inbound(info(42, "ghost", &[3], 1), now);
    let offered: Vec<u64> = p.unclaimed().iter().map(|u| u.room.get()).collect();
    assert_eq!(offered, vec![41]);
    assert_eq!(p.handle_timeout(now + Duration::from_secs(301)), 3);
}

#[test]
fn a_refused_load_is_retried_after_the_backoff_not_banned_for_good() {
    let now = Instant::now();
    let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300));
    let load = |p: &mut PrefillCore| loop {
        match p.poll_command() {
            Some(Command::LoadRemote { agent, .. }) => return Some(agent),
            Some(_) => {}
            None => return None,
        }
    };
    p.handle_inbound(register("d0"), now);
    let a = load(&mut p).unwrap();
    // The link was down: NIXL could not reach the decode's worker.
    p.remote_loaded(&a, Err("failed to create ep".into()));
    p.handle_inbound(register("d0"), now + Duration::from_secs(1));
    assert_eq!(
        load(&mut p),
        None,
        "not reloaded at once (each failed load costs UCX state)"
    );
    let later = now + super::prefill::REFUSED_BACKOFF;
    p.handle_inbound(register("d0"), later);
    let a = load(&mut p).expect("reloaded after the backoff");
    p.remote_loaded(&a, Ok("d0".into()));
    assert!(p.has_peer(&agent("d0")));
}

#[test]
fn a_room_that_timed_out_makes_the_next_request_register_again() {
    let now = Instant::now();
    let mut d = decode_core(now);
    bootstrap(&mut d, RoomId::new(1), 5000, now);
    d.receiver_init(RoomId::new(1), &[1], 0, now);
    assert_eq!(sends(&mut d).len(), 2);
    assert_eq!(
        d.poll(RoomId::new(1), now + Duration::from_secs(6)),
        KvPoll::Failed
    );
    d.receiver_new(RoomId::new(2), BootstrapAddr::new("b:1"), None, now);
    d.next_lookup(RoomId::new(2));
    d.receiver_init(RoomId::new(2), &[1], 0, now + Duration::from_secs(7));
    let s = sends(&mut d);
    assert_eq!(s.len(), 2, "registration, then the info");
    assert!(matches!(
        PrefillInbound::decode(&s[0].1),
        Ok(PrefillInbound::Register(_))
    ));
}

#[test]
fn orphan_rooms_expire_and_senders_keep_theirs() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    p.handle_inbound(info(20, "d0", &[1], 1), now);
    p.sender_new(RoomId::new(21), now);
    assert_eq!(p.handle_timeout(now + Duration::from_secs(299)), 0);
    assert_eq!(p.handle_timeout(now + Duration::from_secs(301)), 1);
    assert_eq!(p.rooms(), 1);
}

fn identity() -> DecodeConfig {
    DecodeConfig {
        local_ip: "127.0.0.1".into(),
        rank_port: 7,
        agent: agent("dec"),
        metadata: Bytes::from_static(b"meta"),
        kv_ptrs: layout(0x9000_0000).kv_ptrs,
        kv_item_len: 4096,
        aux_ptrs: layout(0x9000_0000).aux_ptrs,
        gpu_id: GpuId::new(0),
        engine_rank: 0,
        tp_per_dp: 1,
        is_mla: false,
        kv_pages: 64,
        aux_slots: 8,
        staging: None,
        direct: None,
        sliced_tp: false,
        profile: nixl_wire::Profile::Sglang051,
        kv_mem: nixl_wire::v2x::MemKind::Dram,
        sglang_pages: None,
    }
}

fn decode_core(now: Instant) -> DecodeCore {
    let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
    DecodeCore::new(identity(), timers, now)
}

fn parallel(tp: u32, dp: u32) -> ParallelInfo {
    serde_json::from_value(serde_json::json!({"prefill_tp_size": tp, "prefill_dp_size": dp}))
        .unwrap()
}

fn rank_info(port: u16) -> RankInfo {
    serde_json::from_value(serde_json::json!({"rank_ip": "127.0.0.1", "rank_port": port})).unwrap()
}

fn sends(d: &mut DecodeCore) -> Vec<(String, Vec<Bytes>)> {
    let mut out = Vec::new();
    while let Some(c) = d.poll_command() {
        let decode::Command::Send {
            endpoint, frames, ..
        } = c
        else {
            continue;
        };
        out.push((endpoint, frames));
    }
    out
}

/// Bootstraps `room` against "b:1" with one prefill rank on `port`.
fn bootstrap(d: &mut DecodeCore, room: RoomId, port: u16, now: Instant) {
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    loop {
        match d.next_lookup(room) {
            Lookup::Parallel(_) => d.parallel_learned(room, Ok(parallel(1, 1))),
            Lookup::Ranks { key, ranks } => {
                assert_eq!(ranks, vec![0]);
                d.ranks_learned(room, key, Ok(vec![rank_info(port)]));
            }
            _ => break,
        }
    }
}

#[test]
fn decode_registers_once_per_prefill_rank_then_sends_infos() {
    let now = Instant::now();
    let mut d = decode_core(now);
    bootstrap(&mut d, RoomId::new(1), 5000, now);
    assert!(sends(&mut d).is_empty(), "nothing before the request");
    d.receiver_init(RoomId::new(1), &[3, 4], 1, now);
    let first = sends(&mut d);
    assert_eq!(first.len(), 2, "the registration, then the transfer info");
    assert_eq!(first[0].0, "tcp://127.0.0.1:5000");
    let PrefillInbound::Register(reg) = PrefillInbound::decode(&first[0].1).unwrap() else {
        panic!("registration expected")
    };
    assert_eq!(
        (reg.agent, reg.tp_info.unwrap().dst_kv_item_len),
        (agent("dec"), 4096)
    );
    let PrefillInbound::Transfer(t) = PrefillInbound::decode(&first[1].1).unwrap() else {
        panic!("transfer info expected")
    };
    assert_eq!((t.dst_pages.len(), t.dst_aux_index), (2, 1));
    // The second room reuses the cached pool: no lookups, no registration.
    d.receiver_new(RoomId::new(2), BootstrapAddr::new("b:1"), None, now);
    assert_eq!(d.next_lookup(RoomId::new(2)), Lookup::Ready);
    assert!(sends(&mut d).is_empty());
    // Our own pool bounds: page 64 and aux row 8 are outside.
    d.receiver_init(RoomId::new(2), &[64], 0, now);
    assert!(matches!(
        d.failure(RoomId::new(2)),
        Some(FailureReason::PageOutsidePool { page: 64, .. })
    ));
    assert!(
        sends(&mut d).is_empty(),
        "nothing sent for a refused request"
    );
    d.receiver_new(RoomId::new(3), BootstrapAddr::new("b:1"), None, now);
    d.next_lookup(RoomId::new(3));
    d.receiver_init(RoomId::new(3), &[5], 0, now + Duration::from_secs(1));
    assert_eq!(sends(&mut d).len(), 1, "only the transfer info");
    // An active decode registers again once the last registration is old.
    let later = now + decode::REREGISTER_INTERVAL;
    d.receiver_new(RoomId::new(4), BootstrapAddr::new("b:1"), None, later);
    d.next_lookup(RoomId::new(4));
    d.receiver_init(RoomId::new(4), &[6], 0, later);
    let again = sends(&mut d);
    assert_eq!(again.len(), 2);
    assert!(matches!(
        PrefillInbound::decode(&again[0].1),
        Ok(PrefillInbound::Register(_))
    ));
}

#[test]
fn implausible_bootstrap_answers_fail_the_room_without_sizing_anything() {
    let now = Instant::now();
    let mut d = decode_core(now);
    let room = RoomId::new(1);
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    assert!(matches!(d.next_lookup(room), Lookup::Parallel(_)));
    d.parallel_learned(room, Ok(parallel(u32::MAX, 1)));
    assert_eq!(d.poll(room, now), KvPoll::Failed);
    let room = RoomId::new(2);
    d.receiver_new(room, BootstrapAddr::new("b:1"), None, now);
    d.parallel_learned(room, Ok(serde_json::from_str("{}").unwrap()));
    assert!(matches!(
        d.failure(room),
        Some(FailureReason::NoPrefillRegistered(_))
    ));
}

#[test]
fn a_failed_send_forgets_the_prefill_so_a_restarted_one_gets_a_new_registration() {
    let now = Instant::now();
    let mut d = decode_core(now);
    bootstrap(&mut d, RoomId::new(1), 5000, now);
    d.receiver_init(RoomId::new(1), &[1], 0, now);
    sends(&mut d);
    d.send_failed(
        RoomId::new(1),
        "tcp://127.0.0.1:5000",
        "connection refused".into(),
    );
    assert_eq!(d.poll(RoomId::new(1), now), KvPoll::Failed);
    assert_eq!(d.pools(), 0);
    // The next room looks everything up again and registers with the new rank.
    bootstrap(&mut d, RoomId::new(2), 5001, now);
    d.receiver_init(RoomId::new(2), &[1], 0, now);
    let again = sends(&mut d);
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].0, "tcp://127.0.0.1:5001");
    assert!(matches!(
        PrefillInbound::decode(&again[0].1),
        Ok(PrefillInbound::Register(_))
    ));
}

#[test]
fn a_heartbeat_that_finds_the_ranks_moved_drops_the_cached_pool() {
    let now = Instant::now();
    let mut d = decode_core(now);
    bootstrap(&mut d, RoomId::new(1), 5000, now);
    d.release(RoomId::new(1));
    // No room is live, but the cached pool keeps its prefill under heartbeat.
    let b1 = BootstrapAddr::new("b:1");
    assert_eq!(
        d.heartbeat_due(now + Duration::from_secs(5)),
        vec![b1.clone()]
    );
    let pools = d.pools_of(&b1);
    assert_eq!(pools.len(), 1);
    // The core asks for the re-check itself once a heartbeat finds the prefill up.
    assert!(d.take_pool_checks().is_empty());
    d.heartbeat_result(&b1, Heartbeat::Down("refused".into()));
    assert!(
        d.take_pool_checks().is_empty(),
        "a prefill that is down is not asked"
    );
    d.heartbeat_result(&b1, Heartbeat::Up);
    assert_eq!(d.take_pool_checks(), pools);
    assert!(d.take_pool_checks().is_empty(), "asked once");
    d.pool_checked(&pools[0].0, Ok(vec![rank_info(5000)]));
    assert_eq!(d.pools(), 1, "same endpoint: kept");
    d.pool_checked(&pools[0].0, Err("timeout".into()));
    assert_eq!(d.pools(), 1, "an error proves nothing");
    d.pool_checked(&pools[0].0, Ok(vec![rank_info(6000)]));
    assert_eq!(d.pools(), 0, "the prefill restarted elsewhere");
    bootstrap(&mut d, RoomId::new(2), 6000, now);
    d.receiver_init(RoomId::new(2), &[1], 0, now);
    let s = sends(&mut d);
    assert_eq!(s[0].0, "tcp://127.0.0.1:6000");
    assert!(matches!(
        PrefillInbound::decode(&s[0].1),
        Ok(PrefillInbound::Register(_))
    ));
}

#[test]
fn heartbeats_count_failures_on_the_clock_and_fail_only_that_prefills_rooms() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut d = decode_core(t0);
    for (r, b) in [(1, "b:1"), (2, "b:1"), (3, "other:1")] {
        d.receiver_new(RoomId::new(r), BootstrapAddr::new(b), None, t0);
    }
    assert_eq!(
        d.poll_timeout(),
        t0 + s(5),
        "the driver sleeps until the first round"
    );
    assert!(
        d.heartbeat_due(t0 + s(4)).is_empty(),
        "not before one interval"
    );
    let due = d.heartbeat_due(t0 + s(5));
    assert_eq!(d.poll_timeout(), t0 + s(10), "and then until the next");
    assert_eq!(
        due,
        vec![BootstrapAddr::new("b:1"), BootstrapAddr::new("other:1")]
    );
    assert!(
        d.heartbeat_due(t0 + s(6)).is_empty(),
        "one round per interval"
    );
    let b1 = BootstrapAddr::new("b:1");
    assert_eq!(
        d.heartbeat_result(&b1, Heartbeat::Down("refused".into())),
        0
    );
    // A success in between resets the count.
    assert_eq!(d.heartbeat_result(&b1, Heartbeat::Up), 0);
    assert_eq!(
        d.heartbeat_result(&b1, Heartbeat::Down("refused".into())),
        0
    );
    assert_eq!(
        d.heartbeat_result(&b1, Heartbeat::Down("refused".into())),
        2
    );
    assert!(matches!(
        d.failure(RoomId::new(1)),
        Some(FailureReason::PrefillUnreachable { .. })
    ));
    assert_eq!(d.poll(RoomId::new(3), t0 + s(6)), KvPoll::WaitingForInput);
    // A seed server without /health is not checked again.
    d.heartbeat_result(&BootstrapAddr::new("other:1"), Heartbeat::NoRoute);
    assert!(d.heartbeat_due(t0 + s(20)).is_empty());
}

#[test]
fn decode_failures_and_timeouts() {
    let now = Instant::now();
    let mut d = decode_core(now);
    for r in 1..=2 {
        bootstrap(&mut d, RoomId::new(r), 5000, now);
        d.receiver_init(RoomId::new(r), &[1], 0, now);
    }
    d.handle_notification("p", &Notification::fail(RoomId::new(1), "oom").encode());
    assert_eq!(d.poll(RoomId::new(1), now), KvPoll::Failed);
    assert_eq!(
        d.failure(RoomId::new(1)),
        Some(&FailureReason::PrefillFailed("oom".into()))
    );
    assert_eq!(
        d.poll(RoomId::new(2), now + Duration::from_secs(4)),
        KvPoll::WaitingForInput
    );
    assert_eq!(
        d.poll(RoomId::new(2), now + Duration::from_secs(6)),
        KvPoll::Failed
    );
    // Unknown rooms and garbage are dropped without creating state.
    d.handle_notification("p", b"999_kv_0_1");
    d.handle_notification("p", b"\xff\xfe");
    assert_eq!(d.rooms(), 2);
}

proptest! {
    /// The hot path cannot drift from the planner: whatever the pages, the prepared-index
    /// lowering and the explicit lowering move exactly the bytes of the naive per-page model.
    #[test]
    fn both_lowerings_equal_the_naive_per_page_copy(
        pairs in prop::collection::vec((0u32..64, 0u32..200), 1..40),
        prepare_ok in any::<bool>(),
    ) {
        let now = Instant::now();
        let mut drv = FakeDriver::new();
        drv.prepare_ok = prepare_ok;
        let mut p = PrefillCore::new(layout(0x1000_0000), Duration::from_secs(300));
        p.handle_inbound(register("d0"), now);
        drv.run(&mut p);
        let (src, dst): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
        // Twice: the first request may be explicit while a larger peer list is prepared.
        for room in [1u64, 2] {
            let r = RoomId::new(room);
            p.sender_new(r, now);
            p.handle_inbound(info(room, "d0", &dst, 1), now);
            p.sender_init(r, src.len() as u32, 0).unwrap();
            p.sender_send(r, &src, now).unwrap();
            drv.run(&mut p);
            let posts = drv.take_posts();
            let peer = layout(0x9000_0000);
            prop_assert_eq!(drv.copies(&posts[0]), naive_kv(p.layout(), &peer, &pairs));
            let mut runs = Vec::new();
            super::plan::group_runs(&src, &dst, &mut runs);
            let merged = runs.len() * super::prefill::MERGE_RUN_PAGES <= pairs.len();
            let indexed = matches!(posts[0].work, Work::Indexed { .. });
            if merged {
                prop_assert!(!indexed, "long runs go merged");
            } else if prepare_ok && room == 2 {
                prop_assert!(indexed, "the second request uses the prepared lists");
            }
        }
    }
}

#[test]
fn golden_frames_drive_the_prefill_and_golden_notifications_the_decode() {
    // The TransferInfo captured from SGLang 0.5.1.post3 (tests/data in nixl-wire).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nixl-wire/tests/data/transfer_info_32pages_a.json"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hex = |s: &str| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let frames: Vec<Bytes> = doc["frames_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| Bytes::from(hex(h.as_str().unwrap())))
        .collect();
    let msg = PrefillInbound::decode(&frames).unwrap();
    let PrefillInbound::Transfer(t) = &msg else {
        panic!("not a TransferInfo")
    };
    let now = Instant::now();
    let mut lay = layout(0x1000_0000);
    lay.kv_pages = 4096;
    lay.aux_slots = 512;
    let mut drv = FakeDriver::new();
    let mut p = PrefillCore::new(lay, Duration::from_secs(300));
    p.handle_inbound(register(t.agent.as_str()), now);
    drv.run(&mut p);
    p.sender_new(t.room, now);
    p.handle_inbound(msg.clone(), now);
    assert_eq!(p.sender_poll(t.room), KvPoll::WaitingForInput);
    p.sender_init(t.room, 32, 0).unwrap();
    let src: Vec<u32> = (0..32).collect();
    p.sender_send(t.room, &src, now).unwrap();
    drv.run(&mut p);
    let plan = drv.take_posts();
    // The capture's KV write had 2048 descriptors for 64 buffers × 32 scattered pages; ours, with
    // two buffers, has 2 × 32 (no two destination pages are consecutive).
    assert_eq!(plan[0].work.len(), 64);
    let sent: Vec<&str> = doc["nixl_notifs_sent_by_prefill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["notif_ascii"].as_str().unwrap())
        .collect();
    let ours: Vec<String> = plan
        .iter()
        .map(|t| String::from_utf8(t.notif.clone()).unwrap())
        .collect();
    assert_eq!(
        ours, sent,
        "the same notification strings as the Python prefill"
    );

    let mut d = DecodeCore::new(
        identity(),
        DecodeTimers::new(None, Duration::from_secs(5), 2),
        now,
    );
    let ident_pages: Vec<u32> = t.dst_pages.iter().map(|p| p.get() % 64).collect();
    bootstrap(&mut d, t.room, 5000, now);
    d.receiver_init(t.room, &ident_pages, 0, now);
    for n in doc["nixl_notifs_received_by_decode"].as_array().unwrap() {
        d.handle_notification(
            n["peer"].as_str().unwrap(),
            n["notif_ascii"].as_str().unwrap().as_bytes(),
        );
    }
    assert_eq!(d.poll(t.room, now), KvPoll::Success);
}

mod dialect;
mod direct;
mod golden_0523;
mod origin;
mod pair;
mod sliced;
mod staged;
mod timers;
