//! Both cores stepped against each other (quinn's `Pair`): a decode core bootstraps, registers
//! and sends its infos through real frames; the prefill core lowers the room by its route; the
//! fake driver executes every post into one byte model of the decode's memory and delivers its
//! notification; both must end in Success with exactly the naive model's bytes in place.

use std::collections::BTreeMap;

use nixl_wire::ext::{IpcAlloc, IpcPools};

use super::*;

/// A source byte, a function of its address.
fn byte(a: u64) -> u8 {
    (a ^ (a >> 8) ^ (a >> 16)) as u8
}

/// A prefill core and its decode cores (one per decode rank, each named by its agent), the fake
/// driver, and the decodes' memory as the posts left it.
struct Pair {
    prefill: PrefillCore,
    decodes: Vec<(String, DecodeCore)>,
    drv: FakeDriver,
    now: Instant,
    memory: BTreeMap<u64, u8>,
    /// The decodes' staging rings as the WRITEs left them.
    ring: BTreeMap<u64, u8>,
    /// Each decode's ring, by agent name.
    rings: HashMap<String, nixl_wire::ext::Ring>,
}

impl Pair {
    fn new(prefill: PrefillCore, me: DecodeConfig) -> Self {
        Self::with_decodes(prefill, vec![me])
    }

    fn with_decodes(prefill: PrefillCore, decodes: Vec<DecodeConfig>) -> Self {
        let now = Instant::now();
        let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
        let mut drv = FakeDriver::new();
        drv.open_ok = Some(true);
        let rings = decodes
            .iter()
            .filter_map(|me| Some((me.agent.as_str().to_owned(), me.staging?.ring)))
            .collect();
        let decodes = decodes
            .into_iter()
            .map(|me| {
                (
                    me.agent.as_str().to_owned(),
                    DecodeCore::new(me, timers, now),
                )
            })
            .collect();
        Self {
            prefill,
            decodes,
            drv,
            now,
            memory: BTreeMap::new(),
            ring: BTreeMap::new(),
            rings,
        }
    }

    /// One room of `src` pages sent in `chunks` to every decode (decode `i` at its pages
    /// `dst[i]`), every post executed into the memory and its notification delivered to its
    /// decode. Returns the posts.
    fn run_room(&mut self, room: RoomId, src: &[u32], dst: &[&[u32]], chunks: usize) -> Vec<Post> {
        for ((_, d), pages) in self.decodes.iter_mut().zip(dst) {
            bootstrap(d, room, 5000, self.now);
            d.receiver_init(room, pages, 1, self.now);
            while let Some(c) = d.poll_command() {
                if let decode::Command::Send { frames, .. } = c {
                    let msg = PrefillInbound::decode(&frames).unwrap();
                    self.prefill.handle_inbound(msg, self.now);
                    self.drv.run(&mut self.prefill);
                }
            }
        }
        let p = &mut self.prefill;
        p.sender_new(room, self.now);
        p.sender_init(room, src.len() as u32, 2).unwrap();
        for part in src.chunks(src.len().div_ceil(chunks)) {
            p.sender_send(room, part, self.now).unwrap();
        }
        self.drv.run(p);
        let mut posts = Vec::new();
        while self.step(&mut posts) {}
        assert!(
            self.drv.posts.is_empty() && self.drv.stages.is_empty(),
            "work left over"
        );
        assert_eq!(self.prefill.sender_poll(room), KvPoll::Success);
        for (name, d) in &mut self.decodes {
            assert_eq!(d.poll(room, self.now), KvPoll::Success, "decode {name}");
        }
        posts
    }

    /// One round of work on both sides: the prefill's posts (executed, notified, reported) and
    /// staged pieces (gathered into our slot, written into the decode's ring, notified); the
    /// decodes' frames (to the prefill) and scatters (out of the ring into their pages). Whether
    /// anything happened.
    fn step(&mut self, posts: &mut Vec<Post>) -> bool {
        let mut worked = false;
        for post in self.drv.take_posts() {
            for (s, d, len) in self.drv.copies(&post) {
                for k in 0..len {
                    assert!(
                        self.memory.insert(d + k, byte(s + k)).is_none(),
                        "byte {:#x} written twice",
                        d + k
                    );
                }
            }
            self.decode_of(&post.peer)
                .handle_notification("prefill", &post.notif);
            self.prefill.transfer_done(post.room, Ok(()));
            posts.push(post);
            worked = true;
        }
        for w in std::mem::take(&mut self.drv.stages) {
            // Our gather of whole pages into the slot, then the WRITE of the slot into the ring.
            let (ours, _) = self.drv.pools_for_agent(&w.peer);
            let table = crate::proto::staging::staging_layout(ours)
                .unwrap()
                .table(&w.src_pages, w.bytes)
                .unwrap();
            for (pool, off, len) in table.segments() {
                for k in 0..len {
                    self.ring.insert(w.remote_addr + off + k, byte(pool + k));
                }
            }
            self.prefill
                .staged_done(w.room, w.local_slot, Ok(()), self.now);
            self.decode_of(&w.peer)
                .handle_notification("prefill", &w.notif);
            self.drv.run(&mut self.prefill);
            worked = true;
        }
        for i in 0..self.decodes.len() {
            while let Some(c) = self.decodes[i].1.poll_command() {
                worked = true;
                match c {
                    decode::Command::Send { frames, .. } => {
                        let msg = PrefillInbound::decode(&frames).unwrap();
                        self.prefill.handle_inbound(msg, self.now);
                        self.drv.run(&mut self.prefill);
                    }
                    decode::Command::Scatter {
                        room, slot, pages, ..
                    } => {
                        let name = self.decodes[i].0.clone();
                        let (_, theirs) = self.drv.pools_for_agent(&agent(&name));
                        let ring = self.rings[&name];
                        let base = ring.addr + u64::from(slot) * ring.slot_bytes;
                        let bytes = pages.len() as u64 * theirs.kv_item_lens.iter().sum::<u64>();
                        let table = crate::proto::staging::staging_layout(theirs)
                            .unwrap()
                            .table(&pages, bytes)
                            .unwrap();
                        for (pool, off, len) in table.segments() {
                            for k in 0..len {
                                let b = self.ring[&(base + off + k)];
                                assert!(
                                    self.memory.insert(pool + k, b).is_none(),
                                    "byte {:#x} scattered twice",
                                    pool + k
                                );
                            }
                        }
                        self.decodes[i].1.scatter_done(room, slot, Ok(()));
                    }
                }
            }
        }
        worked
    }

    /// The decode core named `agent`.
    fn decode_of(&mut self, agent: &AgentName) -> &mut DecodeCore {
        &mut self
            .decodes
            .iter_mut()
            .find(|(name, _)| name == agent.as_str())
            .expect("a decode of the pair")
            .1
    }
}

/// The naive model: every byte of page `s` of every KV buffer of `ours` at page `d` of `theirs`,
/// and our aux row 2 at their row 1 (every aux buffer both have).
fn naive_bytes(ours: &Layout, theirs: &Layout, src: &[u32], dst: &[u32]) -> BTreeMap<u64, u8> {
    let mut want = BTreeMap::new();
    for (s, d, len) in naive_kv(
        ours,
        theirs,
        &src.iter()
            .copied()
            .zip(dst.iter().copied())
            .collect::<Vec<_>>(),
    ) {
        for k in 0..len {
            want.insert(d + k, byte(s + k));
        }
    }
    let n = ours.aux_ptrs.len().min(theirs.aux_ptrs.len());
    for b in 0..n {
        let item = ours.aux_item_lens[b];
        for k in 0..item {
            want.insert(
                theirs.aux_ptrs[b] + item + k,
                byte(ours.aux_ptrs[b] + 2 * item + k),
            );
        }
    }
    want
}

#[test]
fn a_pair_moves_a_room_by_whole_pages_to_exactly_the_naive_bytes() {
    let ours = layout(0x1000_0000);
    let prefill = PrefillCore::new(ours.clone(), Duration::from_secs(300));
    let mut pair = Pair::new(prefill, identity());
    pair.drv.with_pools(&ours, &[("dec", &layout(0x9000_0000))]);
    let (src, dst): (Vec<u32>, Vec<u32>) = ((10..20).collect(), (30..40).rev().collect());
    let posts = pair.run_room(RoomId::new(1), &src, &[&dst], 2);
    assert!(
        posts
            .iter()
            .all(|p| matches!(p.work, Work::Indexed { .. } | Work::Explicit { .. })),
        "SGLang's path between host pools"
    );
    assert_eq!(
        pair.memory,
        naive_bytes(&ours, &layout(0x9000_0000), &src, &dst)
    );
}

#[test]
fn a_pair_on_one_node_moves_a_room_by_the_direct_path_to_exactly_the_naive_bytes() {
    let mut ours = layout(0x1000_0000);
    ours.kv_mem = MemType::Vram;
    let prefill = PrefillCore::new(ours.clone(), Duration::from_secs(300))
        .with_staging(4 * 8192, 2)
        .with_direct("node-a");
    let mut me = identity();
    me.direct = Some(IpcPools {
        host: "node-a".into(),
        gpu: 0,
        allocs: vec![IpcAlloc {
            base: 0x9000_0000,
            len: 0x20_0000,
            handle: [7; 64],
        }],
    });
    let mut pair = Pair::new(prefill, me);
    pair.drv.with_pools(&ours, &[("dec", &layout(0x9000_0000))]);
    let (src, dst): (Vec<u32>, Vec<u32>) = ((0..8).collect(), (50..58).collect());
    let posts = pair.run_room(RoomId::new(2), &src, &[&dst], 3);
    let direct = posts
        .iter()
        .filter(|p| matches!(p.work, Work::Direct { .. }))
        .count();
    assert_eq!(direct, 3, "every KV chunk by one kernel; aux by NIXL");
    assert_eq!(
        pair.memory,
        naive_bytes(&ours, &layout(0x9000_0000), &src, &dst)
    );
}

/// Decode rank `rank` of TP 2 (agent `dec{rank}`, its pool at `0x9000_0000 + rank·0x1000_0000`)
/// taking 2 of the 4 heads of 8 bytes per token, 2 tokens per page (32-byte pages).
fn sliced_decode(rank: u32) -> DecodeConfig {
    let mut me = identity();
    me.agent = agent(&format!("dec{rank}"));
    me.kv_ptrs = decode_layout(rank).kv_ptrs;
    me.aux_ptrs = decode_layout(rank).aux_ptrs;
    me.tp_per_dp = 2;
    me.engine_rank = rank;
    me.sliced_tp = true;
    me.kv_item_len = 32;
    me
}

/// A prefill rank of TP 1 holding all 4 heads (64-byte pages).
fn heads_layout() -> Layout {
    let mut l = layout(0x1000_0000);
    l.kv_item_lens = vec![64; l.kv_ptrs.len()];
    l.tp.heads = Some((4, 2));
    l
}

fn decode_layout(rank: u32) -> Layout {
    let mut l = layout(0x9000_0000 + u64::from(rank) * 0x1000_0000);
    l.kv_item_lens = vec![32; l.kv_ptrs.len()];
    l
}

/// The naive model of head slices: decode rank `r` holds heads `2r..2r+2` of every token of our
/// page `s` at its page `d` (`dst[r]`); aux as in [`naive_bytes`].
fn naive_heads(src: &[u32], dst: &[&[u32]]) -> BTreeMap<u64, u8> {
    let ours = heads_layout();
    let mut want = BTreeMap::new();
    for (rank, pages) in dst.iter().enumerate() {
        let theirs = decode_layout(rank as u32);
        want.extend(naive_bytes(&ours, &theirs, &[], &[]));
        for b in 0..ours.kv_ptrs.len() {
            for (&s, &d) in src.iter().zip(pages.iter()) {
                for t in 0..2u64 {
                    for k in 0..16u64 {
                        let from =
                            ours.kv_ptrs[b] + u64::from(s) * 64 + t * 32 + rank as u64 * 16 + k;
                        let to = theirs.kv_ptrs[b] + u64::from(d) * 32 + t * 16 + k;
                        want.insert(to, byte(from));
                    }
                }
            }
        }
    }
    want
}

#[test]
fn a_pair_of_other_tp_sizes_moves_head_slices_per_token_and_packed_to_the_same_bytes() {
    let src: Vec<u32> = (3..9).collect();
    let (d0, d1): (Vec<u32>, Vec<u32>) = ((20..26).rev().collect(), (0..6).collect());
    let dst: [&[u32]; 2] = [&d0, &d1];
    // Per-token descriptors (SGLang's way), then packed into host areas of 2 decode pages.
    let plain = PrefillCore::new(heads_layout(), Duration::from_secs(300));
    let packed =
        PrefillCore::new(heads_layout(), Duration::from_secs(300)).with_host_packing(2 * 2 * 32);
    for (prefill, packs) in [(plain, false), (packed, true)] {
        let mut pair = Pair::with_decodes(prefill, vec![sliced_decode(0), sliced_decode(1)]);
        let (l0, l1) = (decode_layout(0), decode_layout(1));
        pair.drv
            .with_pools(&heads_layout(), &[("dec0", &l0), ("dec1", &l1)]);
        let posts = pair.run_room(RoomId::new(3), &src, &dst, 2);
        let kv: Vec<&Post> = posts.iter().filter(|p| p.kind == ListKind::Kv).collect();
        assert_eq!(kv.len(), 4, "two chunks to each decode rank");
        assert!(
            kv.iter()
                .all(|p| matches!(p.work, Work::Packed { .. }) == packs),
            "packed: {packs}"
        );
        assert_eq!(pair.memory, naive_heads(&src, &dst), "packed: {packs}");
    }
}

#[test]
fn a_pair_with_a_ring_stages_a_room_to_exactly_the_naive_bytes() {
    let mut ours = layout(0x1000_0000);
    ours.kv_mem = MemType::Vram;
    // Our slots hold 4 pages of both buffers; the decode's ring 2 slots of 8, both for the room.
    let prefill =
        PrefillCore::new(ours.clone(), Duration::from_secs(300)).with_staging(4 * 8192, 3);
    let ring = nixl_wire::ext::Ring {
        addr: 0x7000_0000,
        slot_bytes: 8 * 8192,
        slots: 2,
        gpu: 0,
    };
    let mut me = identity();
    me.staging = Some(decode::DecodeStaging::new(ring, 2));
    let mut pair = Pair::new(prefill, me);
    pair.drv.with_pools(&ours, &[("dec", &layout(0x9000_0000))]);
    let (src, dst): (Vec<u32>, Vec<u32>) = ((30..40).collect(), (0..10).rev().collect());
    let posts = pair.run_room(RoomId::new(4), &src, &[&dst], 2);
    assert!(
        posts.iter().all(|p| p.kind == ListKind::Aux),
        "KV pages only by staged pieces"
    );
    assert_eq!(
        pair.memory,
        naive_bytes(&ours, &layout(0x9000_0000), &src, &dst)
    );
}
