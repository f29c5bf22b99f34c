//! Benchmarks of the nixl workspace that need more than one library: `gpubench` (GPU-memory
//! transfers with UCX's protocol choices checked against nixl-core's emulation rules) and the
//! `kv` bench (raw nixl-core WRITEs against the `nixl-pd` prefill/decode pair). Not published.
//!
//! The library holds what the benchmarks share: [`proto_info`], the parser of UCX's protocol
//! tables.
#![forbid(unsafe_code)]

pub mod proto_info;
