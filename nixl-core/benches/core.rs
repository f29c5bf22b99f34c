//! `cargo xtask bench core`: raw nixl-sys calls against nixl-core doing the same transfers.
//!
//! Each case runs one create + post + wait (+ notification) per repetition, in two processes'
//! worth of agents inside one process (UCX error mode `none`), alternating raw and nixl-core
//! rounds so that machine noise hits both. Prints a table with the per-transfer time, GB/s and
//! the ratio nixl-core / raw.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    missing_docs,
    reason = "benchmark binary"
)]

use std::time::{Duration, Instant};

use nixl_core::__bench::RawHostRegion;
use nixl_core::{MemType, UcxErrorMode, XferDescs, XferOp};
use nixl_testkit::LoopbackPair;

struct Case {
    name: &'static str,
    descs: usize,
    block: usize,
    stride: usize,
}

const CASES: [Case; 5] = [
    Case {
        name: "1 x 4 KiB",
        descs: 1,
        block: 4 << 10,
        stride: 4 << 10,
    },
    Case {
        name: "1 x 64 KiB",
        descs: 1,
        block: 64 << 10,
        stride: 64 << 10,
    },
    Case {
        name: "1 x 1 MiB",
        descs: 1,
        block: 1 << 20,
        stride: 1 << 20,
    },
    Case {
        name: "1 x 64 MiB",
        descs: 1,
        block: 64 << 20,
        stride: 64 << 20,
    },
    Case {
        name: "8192 x 4 KiB",
        descs: 8192,
        block: 4 << 10,
        stride: 8 << 10,
    },
];

fn main() {
    nixl_core::runtime::ensure_loaded().expect("NIXL runtime (run `cargo xtask runtime`)");
    let quick = std::env::args().any(|a| a == "--quick");
    let round = Duration::from_millis(if quick { 150 } else { 600 });
    let rounds = if quick { 2 } else { 3 };
    println!(
        "| case | raw nixl-sys µs | nixl-core µs | raw GB/s | nixl-core GB/s | ratio core/raw | overhead µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for case in &CASES {
        let len = case.descs * case.stride;
        let mut raw = RawPair::new(len);
        let core = CorePair::new(len);
        let (mut r, mut c) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            r.push(time_per_op(round, || raw.transfer(case)));
            c.push(time_per_op(round, || core.transfer(case)));
        }
        let (r, c) = (median(r), median(c));
        let bytes = (case.descs * case.block) as f64;
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:+.2} |",
            case.name,
            r * 1e6,
            c * 1e6,
            bytes / r / 1e9,
            bytes / c / 1e9,
            c / r,
            (c - r) * 1e6
        );
    }
}

fn time_per_op(budget: Duration, mut f: impl FnMut()) -> f64 {
    f(); // warm-up (connection set-up, first-touch)
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The same transfer through nixl-core.
struct CorePair {
    pair: LoopbackPair,
}

impl CorePair {
    fn new(len: usize) -> Self {
        Self {
            pair: LoopbackPair::with_mode(len, UcxErrorMode::None).unwrap(),
        }
    }

    fn transfer(&self, case: &Case) {
        let p = &self.pair;
        let mut local = XferDescs::with_capacity(MemType::Dram, case.descs);
        let mut remote = XferDescs::with_capacity(MemType::Dram, case.descs);
        for i in 0..case.descs {
            local.push_in(&p.src.region(), (i * case.stride) as u64, case.block as u64);
            remote.push_in(&p.dst.region(), (i * case.stride) as u64, case.block as u64);
        }
        let req = p
            .initiator
            .create_request(XferOp::Write, &local, &remote, p.target.name(), Some(b"b"))
            .unwrap();
        let mut notifs = Vec::new();
        if req.post().unwrap() == nixl_core::XferStatus::InProgress {
            while req.status().unwrap() == nixl_core::XferStatus::InProgress {
                p.target.drain_notifications(&mut notifs).unwrap();
            }
        }
        // Receive this transfer's notification before the next one.
        while notifs.is_empty() {
            p.target.drain_notifications(&mut notifs).unwrap();
        }
    }
}

/// The same transfer through nixl-sys directly.
struct RawPair {
    a: nixl_sys::Agent,
    b: nixl_sys::Agent,
    src: nixl_core::HostBuffer,
    dst: nixl_core::HostBuffer,
    _regs: Vec<nixl_sys::RegistrationHandle>,
}

impl RawPair {
    fn new(len: usize) -> Self {
        let cfg = nixl_sys::AgentConfig {
            enable_prog_thread: false,
            thread_sync: nixl_sys::ThreadSync::Rw,
            ..Default::default()
        };
        let a = nixl_sys::Agent::new_configured(&format!("raw-a-{len}"), &cfg).unwrap();
        let b = nixl_sys::Agent::new_configured(&format!("raw-b-{len}"), &cfg).unwrap();
        let params = nixl_sys::Params::from([("ucx_error_handling_mode", "none")]).unwrap();
        a.create_backend("UCX", &params).unwrap();
        b.create_backend("UCX", &params).unwrap();
        // The same page-aligned buffers nixl-core uses, so only the call path differs.
        let mut src = nixl_core::HostBuffer::new(len).unwrap();
        let dst = nixl_core::HostBuffer::new(len).unwrap();
        src.as_mut_slice().fill(1);
        let regs = vec![
            a.register_memory(&RawHostRegion::new(&src), None).unwrap(),
            b.register_memory(&RawHostRegion::new(&dst), None).unwrap(),
        ];
        a.load_remote_md(&b.get_local_md().unwrap()).unwrap();
        Self {
            a,
            b,
            src,
            dst,
            _regs: regs,
        }
    }

    fn transfer(&mut self, case: &Case) {
        let s = self.src.addr() as usize;
        let d = self.dst.addr() as usize;
        let mut local = nixl_sys::XferDescList::new(nixl_sys::MemType::Dram).unwrap();
        let mut remote = nixl_sys::XferDescList::new(nixl_sys::MemType::Dram).unwrap();
        for i in 0..case.descs {
            local.add_desc(s + i * case.stride, case.block, 0);
            remote.add_desc(d + i * case.stride, case.block, 0);
        }
        let mut args = nixl_sys::OptArgs::new().unwrap();
        args.set_notification_message(b"b").unwrap();
        args.set_has_notification(true).unwrap();
        let name = self.b.name();
        let req = self
            .a
            .create_xfer_req(nixl_sys::XferOp::Write, &local, &remote, &name, Some(&args))
            .unwrap();
        let mut map = nixl_sys::NotificationMap::new().unwrap();
        if self.a.post_xfer_req(&req, None).unwrap() {
            while self.a.get_xfer_status(&req).unwrap() == nixl_sys::XferStatus::InProgress {
                self.b.get_notifications(&mut map, None).unwrap();
            }
        }
        loop {
            self.b.get_notifications(&mut map, None).unwrap();
            if !map.is_empty().unwrap() {
                break;
            }
        }
    }
}
