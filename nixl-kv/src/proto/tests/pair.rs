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

/// A prefill and a decode core, the fake driver, and the decode's memory as the posts left it.
struct Pair {
    prefill: PrefillCore,
    decode: DecodeCore,
    drv: FakeDriver,
    now: Instant,
    memory: BTreeMap<u64, u8>,
}

impl Pair {
    fn new(prefill: PrefillCore, me: Identity) -> Self {
        let now = Instant::now();
        let timers = DecodeTimers::new(Some(Duration::from_secs(5)), Duration::from_secs(5), 2);
        let mut drv = FakeDriver::new();
        drv.open_ok = Some(true);
        Self {
            prefill,
            decode: DecodeCore::new(me, timers, now),
            drv,
            now,
            memory: BTreeMap::new(),
        }
    }

    /// The decode's frames of `room` (registration, infos) to the prefill, its commands run.
    fn deliver_sends(&mut self) {
        while let Some(c) = self.decode.poll_command() {
            if let decode::Command::Send { frames, .. } = c {
                let msg = PrefillInbound::decode(&frames).unwrap();
                self.prefill.handle_inbound(msg, self.now);
                self.drv.run(&mut self.prefill);
            }
        }
    }

    /// One room of `src` → `dst` pages sent in `chunks`, every post executed into the memory
    /// and its notification delivered. Returns the posts.
    fn run_room(&mut self, room: RoomId, src: &[u32], dst: &[u32], chunks: usize) -> Vec<Post> {
        bootstrap(&mut self.decode, room, 5000, self.now);
        self.decode.receiver_init(room, dst, 1, self.now);
        self.deliver_sends();
        let p = &mut self.prefill;
        p.sender_new(room, self.now);
        p.sender_init(room, src.len() as u32, 2).unwrap();
        for part in src.chunks(src.len().div_ceil(chunks)) {
            p.sender_send(room, part, self.now).unwrap();
        }
        self.drv.run(p);
        let posts = self.drv.take_posts();
        for post in &posts {
            for (s, d, len) in self.drv.copies(post) {
                for k in 0..len {
                    assert!(
                        self.memory.insert(d + k, byte(s + k)).is_none(),
                        "byte {:#x} written twice",
                        d + k
                    );
                }
            }
            self.decode.handle_notification("prefill", &post.notif);
            self.prefill.transfer_done(post.room, Ok(()));
        }
        assert_eq!(self.prefill.sender_poll(room), KvPoll::Success);
        assert_eq!(self.decode.poll(room, self.now), KvPoll::Success);
        posts
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
    let posts = pair.run_room(RoomId::new(1), &src, &dst, 2);
    assert!(
        posts
            .iter()
            .all(|p| matches!(p.coords, Coords::Indexed { .. } | Coords::Explicit { .. })),
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
    let posts = pair.run_room(RoomId::new(2), &src, &dst, 3);
    let direct = posts
        .iter()
        .filter(|p| matches!(p.coords, Coords::Direct { .. }))
        .count();
    assert_eq!(direct, 3, "every KV chunk by one kernel; aux by NIXL");
    assert_eq!(
        pair.memory,
        naive_bytes(&ours, &layout(0x9000_0000), &src, &dst)
    );
}
