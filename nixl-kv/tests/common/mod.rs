//! Helpers for nixl-kv's integration tests: a prefill and a decode with host-memory pools.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    reason = "test helpers"
)]

use std::time::{Duration, Instant};

use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Registered};
use nixl_kv::BootstrapServer;
use nixl_kv::{FailureReason, KvArgs, KvManager, KvPoll, ManagerConfig, RoomId};
use nixl_testkit::unique_name;

/// SGLang 0.5.1's `MetadataBuffers`, one row per request: output ids (16 × int32), logprob
/// values (16 × f32), logprob indices (16 × int32), top-logprob values (128 × f32), top-logprob
/// indices (128 × int32), hidden states (hidden size 4096 × bf16).
pub(crate) const AUX_ITEMS: [u64; 6] = [64, 64, 64, 512, 512, 8192];

/// One side: agent, registered KV and aux buffers, manager.
pub(crate) struct Side {
    pub(crate) mgr: KvManager,
    pub(crate) kv: Vec<Registered<HostBuffer>>,
    pub(crate) aux: Vec<Registered<HostBuffer>>,
    pub(crate) page: u64,
}

fn side_memory(
    agent: &Agent,
    buffers: usize,
    pages: u64,
    page: u64,
    slots: u64,
) -> (Vec<Registered<HostBuffer>>, Vec<Registered<HostBuffer>>) {
    let kv = (0..buffers)
        .map(|_| {
            agent
                .register(HostBuffer::new((pages * page) as usize).unwrap())
                .unwrap()
        })
        .collect();
    let aux = AUX_ITEMS
        .iter()
        .map(|item| {
            agent
                .register(HostBuffer::new((slots * item) as usize).unwrap())
                .unwrap()
        })
        .collect();
    (kv, aux)
}

fn args(kv: &[Registered<HostBuffer>], aux: &[Registered<HostBuffer>], page: u64) -> KvArgs {
    KvArgs::new(
        kv.iter().map(|b| (b.region(), page)),
        aux.iter()
            .zip(AUX_ITEMS)
            .map(|(b, item)| (b.region(), item)),
    )
    .unwrap()
}

pub(crate) fn agent() -> Agent {
    let a = Agent::new(&unique_name("kv"), &AgentConfig::default()).unwrap();
    a.create_backend(BackendKind::Ucx, &BackendParams::new())
        .unwrap();
    a
}

pub(crate) fn prefill(
    bootstrap: &str,
    buffers: usize,
    pages: u64,
    page: u64,
    config: ManagerConfig,
) -> Side {
    let agent = agent();
    let (mut kv, aux) = side_memory(&agent, buffers, pages, page, 16);
    for (b, buf) in kv.iter_mut().enumerate() {
        for (j, byte) in buf.buffer_mut().as_mut_slice().iter_mut().enumerate() {
            *byte = ((7 * b + j) % 251) as u8;
        }
    }
    let a = args(&kv, &aux, page);
    let mgr = KvManager::prefill(agent, a, bootstrap, config).unwrap();
    Side { mgr, kv, aux, page }
}

pub(crate) fn decode(buffers: usize, pages: u64, page: u64, config: ManagerConfig) -> Side {
    let agent = agent();
    let (kv, aux) = side_memory(&agent, buffers, pages, page, 16);
    let a = args(&kv, &aux, page);
    let mgr = KvManager::decode(agent, a, config).unwrap();
    Side { mgr, kv, aux, page }
}

pub(crate) fn server() -> BootstrapServer {
    BootstrapServer::start("127.0.0.1:0").unwrap()
}

/// Polls `f` until it returns a terminal state or `timeout` passes.
pub(crate) fn until(timeout: Duration, mut f: impl FnMut() -> KvPoll) -> KvPoll {
    let start = Instant::now();
    loop {
        let s = f();
        if matches!(s, KvPoll::Success | KvPoll::Failed) || start.elapsed() > timeout {
            return s;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Polls `f` until it returns `want` or a terminal state, or `timeout` passes.
pub(crate) fn reach(timeout: Duration, want: KvPoll, mut f: impl FnMut() -> KvPoll) -> KvPoll {
    let start = Instant::now();
    loop {
        let s = f();
        if s == want || matches!(s, KvPoll::Success | KvPoll::Failed) || start.elapsed() > timeout {
            return s;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Polls a sender and a receiver together (as two schedulers do) until both are terminal.
pub(crate) fn both(
    timeout: Duration,
    tx: &mut nixl_kv::KvSender,
    rx: &mut nixl_kv::KvReceiver,
) -> (KvPoll, KvPoll) {
    let start = Instant::now();
    loop {
        let (a, b) = (tx.poll(), rx.poll());
        let done = |s: KvPoll| matches!(s, KvPoll::Success | KvPoll::Failed);
        if (done(a) && done(b)) || start.elapsed() > timeout {
            return (a, b);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One whole room: the decode asks for `dst` (aux row `aux`), the prefill sees the info and
/// sends `src` in one chunk from aux row `aux`; both are polled to the end. Returns both states
/// and the failure reasons.
pub(crate) fn exchange(
    p: &KvManager,
    d: &KvManager,
    bootstrap: &str,
    room: u64,
    src: &[u32],
    dst: &[u32],
    aux: u32,
) -> (
    (KvPoll, KvPoll),
    Option<FailureReason>,
    Option<FailureReason>,
) {
    let room = RoomId::new(room);
    let mut rx = nixl_kv::KvReceiver::new(d, bootstrap, room, None).unwrap();
    let mut tx = nixl_kv::KvSender::new(p, room).unwrap();
    rx.init(dst, aux);
    assert_eq!(
        reach(Duration::from_secs(30), KvPoll::WaitingForInput, || tx
            .poll()),
        KvPoll::WaitingForInput,
        "room {room}"
    );
    tx.init(src.len() as u32, aux);
    tx.send(src);
    let states = both(Duration::from_secs(30), &mut tx, &mut rx);
    (states, tx.failure(), rx.failure())
}

/// Sends raw frames to a ZMQ endpoint from a throw-away PUSH socket (hostile-input tests).
pub(crate) fn send_raw(endpoint: &str, frames: Vec<Vec<u8>>) {
    send_messages(
        endpoint,
        vec![frames.into_iter().map(bytes::Bytes::from).collect()],
    );
}

/// Sends `msgs`, in order, over one throw-away PUSH socket connected to `endpoint`.
pub(crate) fn send_messages(endpoint: &str, msgs: Vec<Vec<bytes::Bytes>>) {
    use zeromq::{Socket, SocketSend};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = zeromq::PushSocket::new();
        s.connect(endpoint).await.unwrap();
        for m in msgs {
            s.send(zeromq::ZmqMessage::try_from(m).unwrap())
                .await
                .unwrap();
        }
        // Let the socket flush before it closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
}

/// A 0.5.1 registration of agent `name` carrying `metadata`, with dummy pools.
pub(crate) fn registration(name: &str, metadata: &[u8]) -> Vec<bytes::Bytes> {
    nixl_wire::KvArgsRegister {
        local_ip: "127.0.0.1".into(),
        rank_port: 1,
        agent: nixl_wire::AgentName::new(name).unwrap(),
        metadata: bytes::Bytes::copy_from_slice(metadata),
        kv_ptrs: vec![0, 0],
        aux_ptrs: vec![0; 6],
        gpu_id: nixl_wire::GpuId::new(0),
        tp_info: None,
        trailing: Vec::new(),
    }
    .encode()
}

/// Sends `count` registrations named `{prefix}-{i}` carrying `metadata`, then an info for a
/// fresh room, all over one connection, so that once the prefill applied the info it has
/// handled every registration (loaded or refused its metadata).
pub(crate) fn flood(p: &KvManager, prefix: &str, metadata: &[u8], room: u64, count: usize) {
    let room = RoomId::new(room);
    let mut tx = nixl_kv::KvSender::new(p, room).unwrap();
    let mut msgs: Vec<Vec<bytes::Bytes>> = (0..count)
        .map(|i| registration(&format!("{prefix}-{i}"), metadata))
        .collect();
    msgs.push(
        nixl_wire::TransferInfo {
            room,
            local_ip: "127.0.0.1".into(),
            rank_port: 1,
            agent: nixl_wire::AgentName::new(&format!("{prefix}-marker")).unwrap(),
            dst_pages: vec![nixl_wire::PageIndex::new(0)],
            dst_aux_index: 0,
            required_dst_info_num: 1,
            trailing: Vec::new(),
        }
        .encode(),
    );
    send_messages(&format!("tcp://127.0.0.1:{}", p.rank_port()), msgs);
    assert_eq!(
        reach(Duration::from_secs(30), KvPoll::WaitingForInput, || tx
            .poll()),
        KvPoll::WaitingForInput,
        "{prefix}: the prefill never applied the flood"
    );
}
