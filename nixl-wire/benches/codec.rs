//! `cargo xtask bench wire`: encode and decode of the transfer message (32 and 4096 pages) and
//! of the registration message.
#![allow(missing_docs, clippy::unwrap_used, reason = "benchmark binary")]

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nixl_wire::{
    AgentName, GpuId, KvArgsRegister, Notification, PageIndex, PrefillInbound, RoomId, TransferInfo,
};

fn transfer(pages: u32) -> TransferInfo {
    TransferInfo {
        room: RoomId::new(8_181_933_191_833_708_945),
        local_ip: "127.0.0.1".into(),
        rank_port: 48689,
        agent: AgentName::new("c218bba5-06de-41cd-82e8-2f8404efccb0").unwrap(),
        // Scattered pages, like a real decode pool.
        dst_pages: (0..pages)
            .map(|i| PageIndex::new((i * 2_654_435_761) % 100_000))
            .collect(),
        dst_aux_index: 3,
        required_dst_info_num: 1,
        trailing: Vec::new(),
    }
}

fn register() -> KvArgsRegister {
    KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 48689,
        agent: AgentName::new("c218bba5-06de-41cd-82e8-2f8404efccb0").unwrap(),
        metadata: Bytes::from(vec![7u8; 3493]),
        kv_ptrs: (0..64).map(|i| 0x7f00_0000_0000 + i * (1 << 30)).collect(),
        aux_ptrs: (0..6).map(|i| 0x5600_0000_0000 + i * (1 << 20)).collect(),
        gpu_id: GpuId::new(0),
        tp_info: None,
        trailing: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    for pages in [32, 4096] {
        let m = transfer(pages);
        let frames = m.encode();
        g.bench_function(format!("transfer_{pages}p/encode"), |b| {
            b.iter(|| std::hint::black_box(&m).encode())
        });
        g.bench_function(format!("transfer_{pages}p/decode"), |b| {
            b.iter(|| PrefillInbound::decode(std::hint::black_box(&frames)).unwrap())
        });
    }
    let r = register();
    let frames = r.encode();
    g.bench_function("register/encode", |b| {
        b.iter(|| std::hint::black_box(&r).encode())
    });
    g.bench_function("register/decode", |b| {
        b.iter(|| PrefillInbound::decode(std::hint::black_box(&frames)).unwrap())
    });
    let n = Notification::Kv {
        room: RoomId::new(8_181_933_191_833_708_945),
        chunk: nixl_wire::ChunkId::new(3),
        last: true,
        pp: None,
    };
    let bytes = n.encode();
    g.bench_function("notification/encode", |b| {
        b.iter(|| std::hint::black_box(&n).encode())
    });
    g.bench_function("notification/decode", |b| {
        b.iter(|| Notification::decode(std::hint::black_box(&bytes)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
