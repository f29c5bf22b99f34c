//! Byte-exact codecs for what crosses between an SGLang prefill and decode besides the KV data:
//! the ZeroMQ multipart messages, the NIXL notification payloads and the bootstrap HTTP bodies.
//!
//! Compatible byte for byte with SGLang 0.5.1.x Python peers (and the three trailing
//! registration frames later versions append), and with SGLang 0.5.20–0.5.23 ([`v2x`]): a
//! [`Profile`] names which family a peer speaks. Pure: no IO, no NIXL, no ZeroMQ, no raw memory code;
//! it compiles and is fuzzed anywhere.
//!
//! Every `decode` returns a [`DecodeError`] naming the message, the frame and the reason, and
//! never panics, whatever a peer sends; no allocation is sized by anything but the frame itself.
//! Every `encode` is infallible. Binary integers are little-endian, as on every SGLang host.
//!
//! The formats are specified in the repository's `docs/protocol.md`: encodings §1.2, bootstrap
//! HTTP §2, the ZeroMQ frames §3, notifications §4.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use nixl_wire::{AgentName, PageIndex, PrefillInbound, RoomId, TransferInfo};
//!
//! let info = TransferInfo {
//!     room: RoomId::new(42),
//!     local_ip: "127.0.0.1".into(),
//!     rank_port: 5000,
//!     agent: AgentName::new("decode-0").unwrap(),
//!     dst_pages: vec![PageIndex::new(7), PageIndex::new(8)],
//!     dst_aux_index: 3,
//!     required_dst_info_num: 1,
//!     trailing: Vec::new(),
//! };
//! let frames: Vec<Bytes> = info.encode();
//! assert_eq!(frames.len(), 8);
//! assert_eq!(PrefillInbound::decode(&frames), Ok(PrefillInbound::Transfer(info)));
//! ```
#![forbid(unsafe_code)]

mod dispatch;
mod error;
pub mod ext;
mod frames;
pub mod http;
mod ids;
mod int_lists;
mod notify;
mod profile;
mod register;
mod scalar;
mod transfer;
pub mod v2x;

pub use dispatch::PrefillInbound;
pub use error::{DecodeError, MessageKind, Reason};
pub use frames::GUARD;
pub use ids::{AgentName, ChunkId, GpuId, PageIndex, PpRank, RoomId};
pub use int_lists::{PackedInt, pack_int_lists, unpack_int_lists};
pub use notify::{FailReason, MAX_REASON_LEN, Notification};
pub use profile::{AUX_LAYOUT_0520, AUX_ROOM_BUFFER_0520, Profile, UnknownProfile};
pub use register::{DecodeTpInfo, KvArgsRegister};
pub use transfer::TransferInfo;
