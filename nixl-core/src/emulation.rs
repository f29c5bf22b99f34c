//! Predicting when UCX would move GPU memory by software emulation.
//!
//! UCX picks a "software emulation" protocol (the CPU copying through bounce buffers, under
//! 1 GB/s) whenever no zero-copy transport can reach both sides of a transfer, and says nothing
//! about it at default log levels. On one host the fast path for GPU memory is `cuda_ipc`; the
//! rules below are the situations in which it is not available, each measured on an H100
//! (docs/runtime.md §5) and each reported by [`crate::Agent`] as a `tracing` warning the
//! first time a transfer of that shape is created.

use std::fmt;

use crate::mem::MemType;
use crate::xfer::XferOp;

/// Where the peer agent of a transfer lives, as seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_enums, reason = "there are exactly these places")]
pub enum PeerPlace {
    /// The initiator itself (local copies, file I/O).
    SameAgent,
    /// Another agent of this process.
    SameProcess,
    /// An agent of another process (or one this process does not know).
    OtherProcess,
}

/// The UCX settings that decide whether `cuda_ipc` can serve a transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UcxEnv {
    /// `UCX_TLS`, if set.
    pub tls: Option<String>,
    /// `UCX_CUDA_IPC_ENABLE_SAME_PROCESS` is set to a true value.
    pub cuda_ipc_same_process: bool,
    /// `UCX_CUDA_IPC_ENABLE_GET_ZCOPY` is set to a true value.
    pub cuda_ipc_get_zcopy: bool,
}

impl UcxEnv {
    /// Reads the settings from this process's environment.
    pub fn from_process() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the settings through `lookup` (for tests and for peers' environments).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let yes = |k: &str| {
            lookup(k).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "y" | "yes" | "on" | "1" | "true"
                )
            })
        };
        Self {
            tls: lookup("UCX_TLS").filter(|v| !v.trim().is_empty()),
            cuda_ipc_same_process: yes("UCX_CUDA_IPC_ENABLE_SAME_PROCESS"),
            cuda_ipc_get_zcopy: yes("UCX_CUDA_IPC_ENABLE_GET_ZCOPY"),
        }
    }

    /// Whether `UCX_TLS` leaves `cuda_ipc` out (directly, or by a `^` exclusion list).
    fn excludes_cuda_ipc(&self) -> bool {
        let Some(tls) = &self.tls else { return false };
        let names = |s: &str| -> Vec<String> {
            s.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect()
        };
        let ipc = |t: &String| t == "cuda_ipc" || t == "cuda";
        match tls.trim().strip_prefix('^') {
            Some(excluded) => names(excluded).iter().any(ipc),
            None => !names(tls).iter().any(|t| ipc(t) || t == "all"),
        }
    }
}

/// The shape of a transfer, as far as transport selection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransferShape {
    /// READ or WRITE.
    pub op: XferOp,
    /// The initiator's memory.
    pub local: MemType,
    /// The peer's memory.
    pub remote: MemType,
    /// Where the peer is.
    pub place: PeerPlace,
    /// Whether the initiator's UCX backend runs with peer-failure detection
    /// (`ucx_error_handling_mode=peer`, NIXL's default).
    pub peer_error_mode: bool,
}

impl TransferShape {
    /// A shape from its parts.
    pub fn new(
        op: XferOp,
        local: MemType,
        remote: MemType,
        place: PeerPlace,
        peer_error_mode: bool,
    ) -> Self {
        Self {
            op,
            local,
            remote,
            place,
            peer_error_mode,
        }
    }
}

/// Why UCX would emulate a GPU-memory transfer in software.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmulationRisk {
    /// `UCX_TLS` does not include `cuda_ipc`.
    TransportsExcludeCudaIpc {
        /// The `UCX_TLS` value.
        tls: String,
    },
    /// Host memory on one side and GPU memory on the other, between two agents.
    HostAndPeerVram,
    /// Host↔GPU copies inside one agent whose UCX backend runs in peer error mode.
    LocalHostVramInPeerMode,
    /// Two agents of one process without `UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y`.
    SameProcessWithoutIpc,
    /// A READ of a peer's GPU memory without `UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y`.
    ReadWithoutGetZcopy,
    /// GPU memory that cannot be exported with legacy CUDA IPC handles.
    NotIpcExportable {
        /// The region's address.
        addr: u64,
    },
}

impl fmt::Display for EmulationRisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TransportsExcludeCudaIpc { tls } => write!(
                f,
                "UCX_TLS={tls} leaves out cuda_ipc, the only zero-copy GPU transport between \
                 agents on one host; add cuda_ipc (or cuda) to UCX_TLS"
            ),
            Self::HostAndPeerVram => f.write_str(
                "host memory on one side and GPU memory on the other: cuda_ipc moves only GPU \
                 to GPU memory between agents (measured 0.8-1 GB/s emulated); register GPU \
                 memory on both sides, or copy locally first",
            ),
            Self::LocalHostVramInPeerMode => f.write_str(
                "host<->GPU copies inside one agent use cuda_copy only with \
                 ucx_error_handling_mode=none; in peer mode they go over tcp (measured 0.5 GB/s)",
            ),
            Self::SameProcessWithoutIpc => f.write_str(
                "both agents live in this process, and UCX's cuda_ipc refuses same-process peers \
                 unless UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y (measured 0.4 GB/s emulated)",
            ),
            Self::ReadWithoutGetZcopy => f.write_str(
                "READ of a peer's GPU memory: UCX's cuda_ipc disables GET zero-copy unless it \
                 detects NVLink or UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y (measured 0.8 GB/s emulated \
                 on a single H100); use WRITE from the side that holds the data, or set it",
            ),
            Self::NotIpcExportable { addr } => write!(
                f,
                "GPU memory at {addr:#x} cannot be exported with legacy CUDA IPC handles \
                 (stream-ordered pool or virtual-memory allocation), so cuda_ipc cannot reach it \
                 from another process (measured 0.4 GB/s emulated); allocate it with cuMemAlloc"
            ),
        }
    }
}

/// The reasons UCX would emulate a transfer of `shape` under `env`; empty when neither side is
/// GPU memory or `cuda_ipc`/`cuda_copy` can serve it.
pub fn risks(shape: &TransferShape, env: &UcxEnv) -> Vec<EmulationRisk> {
    let is_mem = |m: MemType| matches!(m, MemType::Dram | MemType::Vram);
    if !is_mem(shape.local) || !is_mem(shape.remote) {
        return Vec::new();
    }
    let vram = (shape.local == MemType::Vram, shape.remote == MemType::Vram);
    if vram == (false, false) {
        return Vec::new();
    }
    let mixed = vram.0 != vram.1;
    if shape.place == PeerPlace::SameAgent {
        return if mixed && shape.peer_error_mode {
            vec![EmulationRisk::LocalHostVramInPeerMode]
        } else {
            Vec::new()
        };
    }
    if env.excludes_cuda_ipc() {
        return vec![EmulationRisk::TransportsExcludeCudaIpc {
            tls: env.tls.clone().unwrap_or_default(),
        }];
    }
    if mixed {
        return vec![EmulationRisk::HostAndPeerVram];
    }
    let mut out = Vec::new();
    if shape.place == PeerPlace::SameProcess && !env.cuda_ipc_same_process {
        out.push(EmulationRisk::SameProcessWithoutIpc);
    }
    if shape.op == XferOp::Read && !env.cuda_ipc_get_zcopy {
        out.push(EmulationRisk::ReadWithoutGetZcopy);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> UcxEnv {
        UcxEnv::from_lookup(|k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    fn shape(op: XferOp, local: MemType, remote: MemType, place: PeerPlace) -> TransferShape {
        TransferShape::new(op, local, remote, place, false)
    }

    use MemType::{Dram, Vram};
    use PeerPlace::{OtherProcess, SameAgent, SameProcess};
    use XferOp::{Read, Write};

    #[test]
    fn host_only_transfers_have_no_risk() {
        let e = env(&[("UCX_TLS", "tcp")]);
        assert!(risks(&shape(Write, Dram, Dram, OtherProcess), &e).is_empty());
        assert!(risks(&shape(Write, MemType::File, Vram, SameAgent), &e).is_empty());
    }

    #[test]
    fn vram_between_processes_is_zero_copy_by_default() {
        assert!(risks(&shape(Write, Vram, Vram, OtherProcess), &env(&[])).is_empty());
    }

    #[test]
    fn same_process_needs_the_ucx_switch() {
        let s = shape(Write, Vram, Vram, SameProcess);
        assert_eq!(
            risks(&s, &env(&[])),
            vec![EmulationRisk::SameProcessWithoutIpc]
        );
        let on = env(&[("UCX_CUDA_IPC_ENABLE_SAME_PROCESS", "y")]);
        assert!(risks(&s, &on).is_empty());
    }

    #[test]
    fn host_to_peer_vram_is_emulated_in_both_directions() {
        for (l, r) in [(Dram, Vram), (Vram, Dram)] {
            for place in [SameProcess, OtherProcess] {
                assert_eq!(
                    risks(&shape(Write, l, r, place), &env(&[])),
                    vec![EmulationRisk::HostAndPeerVram]
                );
            }
        }
    }

    #[test]
    fn local_host_vram_copies_depend_on_the_error_mode() {
        let mut s = shape(Write, Dram, Vram, SameAgent);
        assert!(risks(&s, &env(&[])).is_empty());
        s.peer_error_mode = true;
        assert_eq!(
            risks(&s, &env(&[])),
            vec![EmulationRisk::LocalHostVramInPeerMode]
        );
    }

    #[test]
    fn reads_need_get_zcopy() {
        let s = shape(Read, Vram, Vram, OtherProcess);
        assert_eq!(
            risks(&s, &env(&[])),
            vec![EmulationRisk::ReadWithoutGetZcopy]
        );
        assert!(risks(&s, &env(&[("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "yes")])).is_empty());
    }

    #[test]
    fn ucx_tls_lists_are_read_like_ucx_does() {
        let s = shape(Write, Vram, Vram, OtherProcess);
        for ok in ["all", "cuda_ipc,sm", "tcp, CUDA", "^tcp", "^ib,rc"] {
            assert!(risks(&s, &env(&[("UCX_TLS", ok)])).is_empty(), "{ok}");
        }
        for bad in ["tcp,cuda_copy", "sm", "^cuda_ipc", "^tcp,cuda"] {
            assert_eq!(
                risks(&s, &env(&[("UCX_TLS", bad)])),
                vec![EmulationRisk::TransportsExcludeCudaIpc { tls: bad.into() }],
                "{bad}"
            );
        }
    }

    #[test]
    fn every_reason_names_its_remedy() {
        let all = [
            EmulationRisk::TransportsExcludeCudaIpc { tls: "tcp".into() },
            EmulationRisk::HostAndPeerVram,
            EmulationRisk::LocalHostVramInPeerMode,
            EmulationRisk::SameProcessWithoutIpc,
            EmulationRisk::ReadWithoutGetZcopy,
            EmulationRisk::NotIpcExportable { addr: 0x1000 },
        ];
        for r in all {
            let text = r.to_string();
            assert!(
                text.contains("measured") || text.contains("add cuda_ipc"),
                "{text}"
            );
        }
    }
}
