//! Real transfers between two agents of one process over UCX (needs the NIXL runtime).
#![allow(clippy::unwrap_used, reason = "test code")]
#![cfg(feature = "nixl-runtime-tests")]

use nixl_core::{Error, MemType, UcxErrorMode, XferDescs, XferOp};
use nixl_testkit::{LoopbackPair, pattern};

const KIB: usize = 1024;

fn descs(region: &nixl_core::MemRegion, ranges: &[(u64, u64)]) -> XferDescs {
    let mut d = XferDescs::new(MemType::Dram);
    for &(off, len) in ranges {
        d.push_in(region, off, len);
    }
    d
}

#[test]
fn write_with_notification_moves_the_bytes() {
    let mut p = LoopbackPair::new(64 * KIB).unwrap();
    pattern::fill(p.src.buffer_mut().as_mut_slice(), 1);
    let local = descs(&p.src.region(), &[(0, 64 * KIB as u64)]);
    let remote = descs(&p.dst.region(), &[(0, 64 * KIB as u64)]);
    let req = p
        .initiator
        .create_request(XferOp::Write, &local, &remote, p.target.name(), Some(b"w1"))
        .unwrap();
    req.post().unwrap();
    let mut notifs = Vec::new();
    p.wait(&req, &mut notifs).unwrap();
    let n = p.wait_notification(&mut notifs, b"w1").unwrap();
    assert_eq!(n.peer, p.initiator.name());
    assert_eq!(pattern::verify(p.dst.buffer().as_slice(), 1), Ok(()));
}

#[test]
fn read_pulls_remote_bytes_and_notifies_the_target() {
    let mut p = LoopbackPair::with_mode(128 * KIB, UcxErrorMode::None).unwrap();
    pattern::fill(p.dst.buffer_mut().as_mut_slice(), 2);
    // The target's contents changed after its metadata was loaded; that is fine for RMA.
    let local = descs(&p.src.region(), &[(0, 128 * KIB as u64)]);
    let remote = descs(&p.dst.region(), &[(0, 128 * KIB as u64)]);
    let req = p
        .initiator
        .create_request(XferOp::Read, &local, &remote, p.target.name(), Some(b"r1"))
        .unwrap();
    req.post().unwrap();
    let mut notifs = Vec::new();
    p.wait(&req, &mut notifs).unwrap();
    p.wait_notification(&mut notifs, b"r1").unwrap();
    assert_eq!(pattern::verify(p.src.buffer().as_slice(), 2), Ok(()));
}

#[test]
fn one_request_of_8192_scattered_descriptors() {
    // 4 KiB blocks at an 8 KiB stride so NIXL cannot merge them; the destination is reversed.
    let n = 8192u64;
    let block = 4 * KIB as u64;
    let mut p = LoopbackPair::with_mode((n * 2 * block) as usize, UcxErrorMode::None).unwrap();
    pattern::fill(p.src.buffer_mut().as_mut_slice(), 3);
    let src_ranges: Vec<(u64, u64)> = (0..n).map(|i| (i * 2 * block, block)).collect();
    let dst_ranges: Vec<(u64, u64)> = (0..n).map(|i| ((n - 1 - i) * 2 * block, block)).collect();
    let local = descs(&p.src.region(), &src_ranges);
    let remote = descs(&p.dst.region(), &dst_ranges);
    assert_eq!(local.len(), 8192);
    let req = p
        .initiator
        .create_request(
            XferOp::Write,
            &local,
            &remote,
            p.target.name(),
            Some(b"many"),
        )
        .unwrap();
    req.post().unwrap();
    let mut notifs = Vec::new();
    p.wait(&req, &mut notifs).unwrap();
    p.wait_notification(&mut notifs, b"many").unwrap();
    let src = p.src.buffer().as_slice();
    let dst = p.dst.buffer().as_slice();
    for i in 0..n {
        let s = (i * 2 * block) as usize;
        let d = ((n - 1 - i) * 2 * block) as usize;
        assert_eq!(
            &src[s..s + block as usize],
            &dst[d..d + block as usize],
            "block {i}"
        );
        // The gaps were not written.
        assert!(
            dst[d + block as usize..d + 2 * block as usize]
                .iter()
                .all(|&b| b == 0),
            "gap {i}"
        );
    }
}

#[test]
fn prepared_lists_make_requests_by_index_and_repost() {
    let blocks = 64u64;
    let block = 4 * KIB as u64;
    let mut p = LoopbackPair::with_mode((blocks * block) as usize, UcxErrorMode::None).unwrap();
    pattern::fill(p.src.buffer_mut().as_mut_slice(), 4);
    let ranges: Vec<(u64, u64)> = (0..blocks).map(|i| (i * block, block)).collect();
    let local = p
        .initiator
        .prepare(None, &descs(&p.src.region(), &ranges))
        .unwrap();
    let remote = p
        .initiator
        .prepare(Some(p.target.name()), &descs(&p.dst.region(), &ranges))
        .unwrap();
    assert_eq!(local.len(), 64);
    // Pair source block i with destination block 63 - i, for the even blocks only.
    let li: Vec<i32> = (0..64).step_by(2).collect();
    let ri: Vec<i32> = li.iter().map(|i| 63 - i).collect();
    let req = p
        .initiator
        .make_request(XferOp::Write, &local, &li, &remote, &ri, Some(b"prep"))
        .unwrap();
    let mut notifs = Vec::new();
    for round in 0..3 {
        req.post().unwrap();
        p.wait(&req, &mut notifs).unwrap();
        p.wait_notification(&mut notifs, b"prep")
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    let (src, dst) = (p.src.buffer().as_slice(), p.dst.buffer().as_slice());
    for i in 0..64usize {
        let d = (63 - i) * block as usize;
        let got = &dst[d..d + block as usize];
        if i % 2 == 0 {
            assert_eq!(
                got,
                &src[i * block as usize..(i + 1) * block as usize],
                "block {i}"
            );
        } else {
            assert!(got.iter().all(|&b| b == 0), "block {i} should be untouched");
        }
    }
    // Indices outside the prepared lists are refused before NIXL sees them.
    let err = p
        .initiator
        .make_request(XferOp::Write, &local, &[64], &remote, &[0], None)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let err = p
        .initiator
        .make_request(XferOp::Write, &local, &[0, 1], &remote, &[0], None)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[test]
fn unregistered_local_memory_is_a_typed_error() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    let stray = vec![0u8; 4 * KIB];
    let mut local = XferDescs::new(MemType::Dram);
    local.push(stray.as_ptr() as u64, 4 * KIB as u64, 0);
    let remote = descs(&p.dst.region(), &[(0, 4 * KIB as u64)]);
    let err = p
        .initiator
        .create_request(XferOp::Write, &local, &remote, p.target.name(), None)
        .unwrap_err();
    assert!(matches!(err, Error::Nixl { .. }), "{err}");
}

#[test]
fn descriptor_past_the_registered_region_is_a_typed_error() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    let local = descs(&p.src.region(), &[(0, 4 * KIB as u64)]);
    let remote = descs(&p.dst.region(), &[(2 * KIB as u64, 4 * KIB as u64)]);
    let err = p
        .initiator
        .create_request(XferOp::Write, &local, &remote, p.target.name(), None)
        .unwrap_err();
    assert!(matches!(err, Error::Nixl { .. }), "{err}");
}

#[test]
fn unknown_remote_agent_is_a_typed_error() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    let local = descs(&p.src.region(), &[(0, 4 * KIB as u64)]);
    let remote = descs(&p.dst.region(), &[(0, 4 * KIB as u64)]);
    let err = p
        .initiator
        .create_request(XferOp::Write, &local, &remote, "nobody", None)
        .unwrap_err();
    assert!(matches!(err, Error::Nixl { .. }), "{err}");
    assert!(!p.initiator.has_remote("nobody"));
}

#[test]
fn mismatched_lengths_and_bad_metadata_are_refused() {
    let p = LoopbackPair::new(8 * KIB).unwrap();
    let local = descs(&p.src.region(), &[(0, 8 * KIB as u64)]);
    let remote = descs(&p.dst.region(), &[(0, 4 * KIB as u64)]);
    let err = p
        .initiator
        .create_request(XferOp::Write, &local, &remote, p.target.name(), None)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(p.initiator.load_remote(b"").is_err());
    assert!(p.initiator.load_remote(b"nixlSerDes|garbage").is_err());
}

/// Offset of the UCX worker address inside a live agent's metadata (the first `c` entry).
fn worker_address_at(blob: &[u8]) -> usize {
    let tag = b"|t\x03\x00\x00\x00\x00\x00\x00\x00UCX|c";
    blob.windows(tag.len()).position(|w| w == tag).unwrap() + tag.len() + 8
}

/// Regression (hostile peers R1): UCX aborts the process (`ucs_assertv_always`) on a worker
/// address whose version nibble is neither V1 nor V2. Without the check this test's process ends
/// at the first load; with it, each one is refused and the untouched blob still loads.
#[test]
fn metadata_with_an_unknown_worker_address_version_is_refused_and_the_process_lives() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    p.initiator.invalidate_remote(p.target.name()).unwrap();
    let good = p.target.local_metadata().unwrap().into_bytes();
    let at = worker_address_at(&good);
    for version in [2u8, 8, 15] {
        let mut bad = good.clone();
        bad[at] = (bad[at] & 0xf0) | version;
        let err = p.initiator.load_remote(&bad).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        assert!(!p.initiator.has_remote(p.target.name()));
    }
    assert_eq!(p.initiator.load_remote(&good).unwrap(), p.target.name());
}

/// Regression (hostile peers R2): nixl-sys unwraps the loaded agent name as UTF-8, so a name with
/// a byte that is not UTF-8 panicked the loading thread after NIXL had loaded it. The blob is now
/// refused before NIXL sees it: nothing loads and nothing panics.
#[test]
fn metadata_whose_agent_name_is_not_utf8_is_refused_before_nixl_loads_it() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    p.initiator.invalidate_remote(p.target.name()).unwrap();
    let good = p.target.local_metadata().unwrap().into_bytes();
    let name_at = b"nixlSerDes|Agent".len() + 8;
    let mut bad = good.clone();
    bad[name_at] = 0xff;
    let err = p.initiator.load_remote(&bad).unwrap_err();
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    assert_eq!(p.initiator.load_remote(&good).unwrap(), p.target.name());
}

#[test]
fn invalidated_remote_can_no_longer_be_targeted() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    assert!(p.initiator.has_remote(p.target.name()));
    p.initiator.invalidate_remote(p.target.name()).unwrap();
    assert!(!p.initiator.has_remote(p.target.name()));
    let local = descs(&p.src.region(), &[(0, 4 * KIB as u64)]);
    let remote = descs(&p.dst.region(), &[(0, 4 * KIB as u64)]);
    assert!(
        p.initiator
            .create_request(XferOp::Write, &local, &remote, p.target.name(), None)
            .is_err()
    );
}

#[test]
fn standalone_notification_reaches_the_peer() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    p.initiator
        .send_notification(p.target.name(), b"\x00binary\xff")
        .unwrap();
    let mut notifs = Vec::new();
    let n = p.wait_notification(&mut notifs, b"\x00binary\xff").unwrap();
    assert_eq!(n.peer, p.initiator.name());
}

#[test]
fn plugins_include_the_extracted_ones() {
    let p = LoopbackPair::new(4 * KIB).unwrap();
    let plugins = p.initiator.plugins().unwrap();
    for want in ["UCX", "POSIX", "OBJ"] {
        assert!(
            plugins.iter().any(|x| x == want),
            "{want} missing from {plugins:?}"
        );
    }
    let ucx = p
        .initiator
        .plugin_params(&nixl_core::BackendKind::Ucx)
        .unwrap();
    assert!(ucx.value("ucx_error_handling_mode").is_some(), "{ucx:?}");
}

#[test]
fn emulation_risks_know_where_the_peer_lives() {
    use nixl_core::emulation::EmulationRisk;
    use nixl_core::{Agent, AgentConfig};
    let a = Agent::new(&nixl_testkit::unique_name("emu-a"), &AgentConfig::default()).unwrap();
    let b = Agent::new(&nixl_testkit::unique_name("emu-b"), &AgentConfig::default()).unwrap();
    let (w, v, d) = (XferOp::Write, MemType::Vram, MemType::Dram);
    // Host-only transfers never warn.
    assert!(a.emulation_risks(w, d, d, b.name()).is_empty());
    // Another agent of this process needs UCX's same-process switch.
    let same_process_ok = std::env::var("UCX_CUDA_IPC_ENABLE_SAME_PROCESS").is_ok_and(|v| v == "y");
    let risks = a.emulation_risks(w, v, v, b.name());
    assert_eq!(
        risks.contains(&EmulationRisk::SameProcessWithoutIpc),
        !same_process_ok,
        "{risks:?}"
    );
    // Host memory to a peer's GPU memory is emulated wherever the peer is.
    assert_eq!(
        a.emulation_risks(w, d, v, b.name()),
        vec![EmulationRisk::HostAndPeerVram]
    );
    // A copy inside one agent without a UCX backend is not a peer transfer.
    assert!(a.emulation_risks(w, v, v, a.name()).is_empty());
    // Once the peer agent is gone, the same name is taken to be another process.
    let name = b.name().to_owned();
    drop(b);
    assert!(
        !a.emulation_risks(w, v, v, &name)
            .contains(&EmulationRisk::SameProcessWithoutIpc)
    );
}

/// Collects what a `tracing` fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_emulated_transfer_shape_is_warned_about_once() {
    use nixl_core::{Agent, AgentConfig};
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let a = Agent::new(
            &nixl_testkit::unique_name("warn-a"),
            &AgentConfig::default(),
        )
        .unwrap();
        let b = Agent::new(
            &nixl_testkit::unique_name("warn-b"),
            &AgentConfig::default(),
        )
        .unwrap();
        let mut local = XferDescs::new(MemType::Dram);
        local.push(0x1000, 4096, 0);
        let mut remote = XferDescs::new(MemType::Vram);
        remote.push(0x2000, 4096, 0);
        // Host memory to a peer's GPU memory: NIXL refuses these unregistered addresses, but
        // the warning comes first, and only once for the same shape and peer.
        for _ in 0..3 {
            let _ = a.create_request(XferOp::Write, &local, &remote, b.name(), None);
        }
        // Host-only transfers never warn.
        let mut host = XferDescs::new(MemType::Dram);
        host.push(0x2000, 4096, 0);
        let _ = a.create_request(XferOp::Write, &local, &host, b.name(), None);
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("software emulation").count(),
        1,
        "captured log:\n{text}"
    );
    assert!(text.contains("host memory on one side"), "{text}");
}
