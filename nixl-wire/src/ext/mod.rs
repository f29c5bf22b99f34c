//! Our extensions, carried where SGLang peers ignore them (docs/protocol.md §3.5): a capability
//! frame trailing a decode's registration, a proof frame trailing its transfer infos, and the
//! proof notification a prefill sends over NIXL to a decode that advertised `proof`.
//!
//! The staged path (docs/protocol.md §3.5) adds a ring frame to the registration, a slots frame
//! to transfer infos, the staged-chunk notification (prefill → decode) and the slot-freed
//! message (decode → prefill, over ZeroMQ: a decode holds no NIXL metadata of its prefill, so
//! it cannot notify it through NIXL).
//!
//! Frames and payloads all start with `nixl-rs:`, which no SGLang frame or notification does.

mod ipc;

use bytes::Bytes;

pub use ipc::{CAP_DIRECT, IpcAlloc, IpcPools, MAX_IPC_ALLOCATIONS};

use crate::error::{DecodeError, MessageKind, Reason};
use crate::frames::GUARD;
use crate::{AgentName, RoomId};

/// The prefix of every extension frame and payload.
pub const EXT_PREFIX: &[u8] = b"nixl-rs:";

const CAPS: &[u8] = b"nixl-rs:caps:";
const PROOF: &[u8] = b"nixl-rs:proof:";
const RING: &[u8] = b"nixl-rs:ring:";
const SLOTS: &[u8] = b"nixl-rs:slots:";
const STAGED: &[u8] = b"nixl-rs:staged:";
const FREED: &[u8] = b"nixl-rs:freed:";

/// A decode that can echo a prefill's proof in its transfer infos.
pub const CAP_PROOF: &str = "proof";

/// A decode with a GPU staging ring (its registration also carries a [`Ring`] frame).
pub const CAP_STAGING: &str = "staging";

/// The most slots a ring frame may announce, and the most a slots frame may grant.
pub const MAX_SLOTS: u32 = 1024;

/// The capability frame: `nixl-rs:caps:` and comma-separated tokens.
pub fn caps_frame(caps: &[&str]) -> Bytes {
    let mut f = CAPS.to_vec();
    f.extend_from_slice(caps.join(",").as_bytes());
    f.into()
}

/// The capabilities advertised in `trailing` frames (none for SGLang peers).
pub fn caps(trailing: &[Bytes]) -> Vec<String> {
    trailing
        .iter()
        .filter_map(|f| f.strip_prefix(CAPS))
        .filter_map(|t| std::str::from_utf8(t).ok())
        .flat_map(|t| t.split(','))
        .filter(|t| !t.is_empty() && t.len() <= 64)
        .take(32)
        .map(str::to_owned)
        .collect()
}

/// The proof frame a decode adds to its transfer infos: `nixl-rs:proof:` and the secret.
pub fn proof_frame(secret: &str) -> Bytes {
    let mut f = PROOF.to_vec();
    f.extend_from_slice(secret.as_bytes());
    f.into()
}

/// The proof in `trailing` frames, if any.
pub fn proof(trailing: &[Bytes]) -> Option<&[u8]> {
    trailing.iter().find_map(|f| f.strip_prefix(PROOF))
}

/// What a prefill tells a decode over NIXL: echo `secret` in transfer infos to `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofNotice {
    /// The prefill rank's ZeroMQ endpoint, as the decode reaches it (`tcp://host:port`).
    pub endpoint: String,
    /// The secret, printable ASCII without spaces.
    pub secret: String,
}

impl ProofNotice {
    /// `nixl-rs:proof:{endpoint} {secret}`.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = PROOF.to_vec();
        p.extend_from_slice(self.endpoint.as_bytes());
        p.push(b' ');
        p.extend_from_slice(self.secret.as_bytes());
        p
    }

    /// Reads a notification payload; `None` for anything else (SGLang's notifications).
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let rest = std::str::from_utf8(payload.strip_prefix(PROOF)?).ok()?;
        let (endpoint, secret) = rest.split_once(' ')?;
        let printable =
            |s: &str| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic());
        (printable(endpoint) && printable(secret)).then(|| Self {
            endpoint: endpoint.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// Canonical decimal (no sign, no leading zeros, at most 20 digits), or `None`.
fn decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    let canonical = !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

fn fields<'a>(payload: &'a [u8], prefix: &[u8], sep: char, n: usize) -> Option<Vec<&'a str>> {
    let rest = std::str::from_utf8(payload.strip_prefix(prefix)?).ok()?;
    let parts: Vec<&str> = rest.split(sep).collect();
    (parts.len() == n).then_some(parts)
}

/// A decode's staging ring, as its registration announces it:
/// `nixl-rs:ring:{addr},{slot_bytes},{slots},{gpu}`. The ring is one VRAM buffer of
/// `slot_bytes * slots` bytes at `addr` on device `gpu`, registered with the decode's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    /// Base address of slot 0.
    pub addr: u64,
    /// Bytes of one slot (slot `i` starts at `addr + i * slot_bytes`).
    pub slot_bytes: u64,
    /// Slots in the ring, 1..=[`MAX_SLOTS`].
    pub slots: u32,
    /// CUDA ordinal of the ring's memory.
    pub gpu: u32,
}

impl Ring {
    /// The trailing frame.
    pub fn frame(&self) -> Bytes {
        let mut f = RING.to_vec();
        f.extend_from_slice(
            format!(
                "{},{},{},{}",
                self.addr, self.slot_bytes, self.slots, self.gpu
            )
            .as_bytes(),
        );
        f.into()
    }

    /// The first well-formed ring frame in `trailing`; `None` if there is none, or if it
    /// is malformed (no slots, empty slots, too many slots, or a ring whose end overflows).
    pub fn find(trailing: &[Bytes]) -> Option<Self> {
        trailing.iter().find_map(|f| Self::decode(f))
    }

    fn decode(f: &[u8]) -> Option<Self> {
        let p = fields(f, RING, ',', 4)?;
        let r = Self {
            addr: decimal(p[0])?,
            slot_bytes: decimal(p[1])?,
            slots: decimal(p[2])?,
            gpu: decimal(p[3])?,
        };
        let fits = r
            .slot_bytes
            .checked_mul(u64::from(r.slots))
            .and_then(|len| r.addr.checked_add(len))
            .is_some();
        (r.slot_bytes > 0 && r.slots > 0 && r.slots <= MAX_SLOTS && fits).then_some(r)
    }

    /// The address of `slot`, if the ring has it.
    pub fn slot_addr(&self, slot: u32) -> Option<u64> {
        (slot < self.slots).then(|| self.addr + u64::from(slot) * self.slot_bytes)
    }
}

/// The slots a decode grants one room, a trailing frame of its transfer infos:
/// `nixl-rs:slots:{i,j,...}` (comma-separated slot numbers, at least one).
pub fn slots_frame(slots: &[u32]) -> Bytes {
    let mut f = SLOTS.to_vec();
    let text: Vec<String> = slots.iter().map(u32::to_string).collect();
    f.extend_from_slice(text.join(",").as_bytes());
    f.into()
}

/// The slots granted in `trailing` frames: `None` without a slots frame, or if it is malformed
/// (empty, a slot repeated, a slot `>= ring_slots`, or more than [`MAX_SLOTS`] of them).
pub fn slots(trailing: &[Bytes], ring_slots: u32) -> Option<Vec<u32>> {
    let f = trailing.iter().find(|f| f.starts_with(SLOTS))?;
    let text = std::str::from_utf8(f.strip_prefix(SLOTS)?).ok()?;
    if text.is_empty() || text.len() > 8 * MAX_SLOTS as usize {
        return None;
    }
    let mut out: Vec<u32> = Vec::new();
    for t in text.split(',') {
        let s: u32 = decimal(t)?;
        if s >= ring_slots || out.contains(&s) || out.len() >= MAX_SLOTS as usize {
            return None;
        }
        out.push(s);
    }
    Some(out)
}

/// A staged chunk landed in a decode's ring slot (prefill → decode, with the WRITE):
/// `nixl-rs:staged:{room}:{chunk}:{last}:{slot}:{first_page_offset}:{pages}`, optionally
/// followed by `:{tokens}:{src_token}:{dst_token}:{src_offset}:{dst_offset}:{len}` (a
/// [`StagedSlice`]). The slot holds the chunk's pages `first_page_offset..first_page_offset +
/// pages` of the room's page list, in the staging layout both sides share; with a slice, it
/// holds the writer's own pages (buffer-major, `tokens · src_token` bytes each), of which the
/// decode scatters `len` bytes of every token into its token slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_structs)] // plain data by design
pub struct StagedNotice {
    /// The room.
    pub room: RoomId,
    /// The chunk number, counted like `_kv_` chunks (§4.1).
    pub chunk: u32,
    /// The room's last chunk.
    pub last: bool,
    /// The ring slot that holds it.
    pub slot: u32,
    /// Offset of its first page in the room's page list (the decode's `dst_pages`).
    pub first_page_offset: u32,
    /// Pages it carries (at least one).
    pub pages: u32,
    /// Head slices of a larger prefill (heterogeneous TP): how the decode scatters the slot.
    pub slice: Option<StagedSlice>,
}

/// How a decode scatters a staged slot of a larger prefill's pages: for every token `t <
/// tokens` of every page, `len` bytes from `src_offset + t·src_token` of the slot's page to
/// `dst_offset + t·dst_token` of the decode's page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_structs)] // plain data by design
pub struct StagedSlice {
    /// Tokens per page.
    pub tokens: u32,
    /// Bytes of one token slot in the slot's pages.
    pub src_token: u64,
    /// Bytes of one token slot in the decode's pages.
    pub dst_token: u64,
    /// Offset of the slice in a slot token slot.
    pub src_offset: u64,
    /// Offset of the slice in a decode token slot.
    pub dst_offset: u64,
    /// Bytes per token.
    pub len: u64,
}

impl StagedNotice {
    /// The notification payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = STAGED.to_vec();
        p.extend_from_slice(
            format!(
                "{}:{}:{}:{}:{}:{}",
                self.room.get(),
                self.chunk,
                u8::from(self.last),
                self.slot,
                self.first_page_offset,
                self.pages
            )
            .as_bytes(),
        );
        if let Some(t) = &self.slice {
            p.extend_from_slice(
                format!(
                    ":{}:{}:{}:{}:{}:{}",
                    t.tokens, t.src_token, t.dst_token, t.src_offset, t.dst_offset, t.len
                )
                .as_bytes(),
            );
        }
        p
    }

    /// Reads a notification payload; `None` for anything else.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let p = fields(payload, STAGED, ':', 12).or_else(|| fields(payload, STAGED, ':', 6))?;
        let slice = match p.get(6..12) {
            Some(t) => Some(StagedSlice {
                tokens: decimal(t[0])?,
                src_token: decimal(t[1])?,
                dst_token: decimal(t[2])?,
                src_offset: decimal(t[3])?,
                dst_offset: decimal(t[4])?,
                len: decimal(t[5])?,
            }),
            None => None,
        };
        let last = match p[2] {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let n = Self {
            room: RoomId::new(decimal(p[0])?),
            chunk: decimal(p[1])?,
            last,
            slot: decimal(p[3])?,
            first_page_offset: decimal(p[4])?,
            pages: decimal(p[5])?,
            slice,
        };
        (n.pages > 0 && n.first_page_offset.checked_add(n.pages).is_some()).then_some(n)
    }
}

/// A decode scattered a slot and frees it for the room's next chunk (decode → prefill, a
/// stand-alone notification): `nixl-rs:freed:{room}:{slot}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedNotice {
    /// The room the slot was granted to.
    pub room: RoomId,
    /// The slot.
    pub slot: u32,
}

impl FreedNotice {
    /// The notification payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = FREED.to_vec();
        p.extend_from_slice(format!("{}:{}", self.room.get(), self.slot).as_bytes());
        p
    }

    /// Reads a notification payload; `None` for anything else.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let p = fields(payload, FREED, ':', 2)?;
        Some(Self {
            room: RoomId::new(decimal(p[0])?),
            slot: decimal(p[1])?,
        })
    }
}

/// The slot-freed message a decode PUSHes to its prefill: `[GUARD, nixl-rs:freed:<room>:<slot>,
/// agent, trailing...]`, the trailing frames carrying the decode's proof when it has one. Only
/// our prefills, which alone send staged pieces, are ever sent one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreedMessage {
    /// The room and the slot.
    pub notice: FreedNotice,
    /// The decode agent that frees it.
    pub agent: AgentName,
    /// Frames after the agent (its proof frame).
    pub trailing: Vec<Bytes>,
}

impl FreedMessage {
    /// Whether `frames` are a freed message (its second frame has the tag), before decoding.
    pub fn is_freed(frames: &[Bytes]) -> bool {
        frames.get(1).is_some_and(|f| f.starts_with(FREED))
    }

    /// The frames.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut v = vec![
            Bytes::from_static(GUARD),
            Bytes::from(self.notice.encode()),
            Bytes::copy_from_slice(self.agent.as_str().as_bytes()),
        ];
        v.extend(self.trailing.iter().cloned());
        v
    }

    /// Reads the frames of a freed message.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let message = MessageKind::PrefillInbound;
        if frames.len() < 3 || frames.len() > 3 + 8 {
            return Err(DecodeError::FrameCount {
                message,
                expected: "3 to 11",
                got: frames.len(),
            });
        }
        let bad = |i, name, reason| DecodeError::field(message, i, name, reason);
        if frames[0].as_ref() != GUARD {
            let expected = "NixlMsgGuard";
            return Err(bad(0, "guard", Reason::Unexpected { expected }));
        }
        let notice = FreedNotice::decode(&frames[1]).ok_or_else(|| {
            bad(
                1,
                "freed",
                Reason::Unexpected {
                    expected: "nixl-rs:freed:<room>:<slot>",
                },
            )
        })?;
        let agent = AgentName::from_bytes(&frames[2]).map_err(|r| bad(2, "agent", r))?;
        Ok(Self {
            notice,
            agent,
            trailing: frames[3..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_messages_round_trip_and_refuse_malformed_frames() {
        let m = FreedMessage {
            notice: FreedNotice {
                room: RoomId::new(77),
                slot: 3,
            },
            agent: AgentName::new("decode-1").unwrap(),
            trailing: vec![proof_frame("abc")],
        };
        let frames = m.encode();
        assert!(FreedMessage::is_freed(&frames));
        assert_eq!(FreedMessage::decode(&frames).unwrap(), m);
        assert_eq!(&frames[1][..], b"nixl-rs:freed:77:3");
        let mut cut = frames.clone();
        cut.truncate(2);
        assert!(FreedMessage::decode(&cut).is_err());
        let mut bad = frames.clone();
        bad[1] = Bytes::from_static(b"nixl-rs:freed:x:3");
        assert!(FreedMessage::decode(&bad).is_err());
        let mut bad = frames;
        bad[0] = Bytes::from_static(b"NixlMsgGuarD");
        assert!(FreedMessage::decode(&bad).is_err());
    }

    #[test]
    fn frames_and_notices_round_trip_and_ignore_everything_else() {
        let trailing = vec![Bytes::from_static(b"x"), caps_frame(&["proof", "staging"])];
        assert_eq!(caps(&trailing), vec!["proof", "staging"]);
        assert!(caps(&[]).is_empty());
        let t = vec![proof_frame("abc123")];
        assert_eq!(proof(&t), Some(&b"abc123"[..]));
        assert_eq!(proof(&trailing), None);
        let n = ProofNotice {
            endpoint: "tcp://127.0.0.1:5000".into(),
            secret: "00ff".into(),
        };
        assert_eq!(ProofNotice::decode(&n.encode()), Some(n));
        assert_eq!(ProofNotice::decode(b"42_kv_0_1"), None);
        assert_eq!(ProofNotice::decode(b"nixl-rs:proof:nospace"), None);
        assert_eq!(ProofNotice::decode(b"nixl-rs:proof:a \xff"), None);
    }

    #[test]
    fn staging_frames_round_trip_and_reject_malformed() {
        let ring = Ring {
            addr: 0x7f00_0000_0000,
            slot_bytes: 64 << 20,
            slots: 4,
            gpu: 1,
        };
        let trailing = vec![caps_frame(&[CAP_PROOF, CAP_STAGING]), ring.frame()];
        assert_eq!(Ring::find(&trailing), Some(ring));
        assert_eq!(ring.slot_addr(3), Some(0x7f00_0000_0000 + 3 * (64 << 20)));
        assert_eq!(ring.slot_addr(4), None);
        assert_eq!(Ring::find(&[]), None);
        for bad in [
            &b"nixl-rs:ring:1,2,3"[..],
            b"nixl-rs:ring:1,0,3,0",
            b"nixl-rs:ring:1,2,0,0",
            b"nixl-rs:ring:1,2,1025,0",
            b"nixl-rs:ring:18446744073709551615,2,2,0",
            b"nixl-rs:ring:01,2,2,0",
            b"nixl-rs:ring:+1,2,2,0",
            b"nixl-rs:ring:1,2,2,0,5",
        ] {
            assert_eq!(Ring::find(&[Bytes::copy_from_slice(bad)]), None, "{bad:?}");
        }

        let t = vec![proof_frame("s"), slots_frame(&[2, 0, 3])];
        assert_eq!(slots(&t, 4), Some(vec![2, 0, 3]));
        assert_eq!(slots(&t, 3), None, "slot 3 is outside a 3-slot ring");
        assert_eq!(slots(&[proof_frame("s")], 4), None);
        for bad in [
            &b"nixl-rs:slots:"[..],
            b"nixl-rs:slots:1,1",
            b"nixl-rs:slots:1,,2",
            b"nixl-rs:slots:x",
            b"nixl-rs:slots:-1",
        ] {
            assert_eq!(slots(&[Bytes::copy_from_slice(bad)], 4), None, "{bad:?}");
        }

        let n = StagedNotice {
            room: RoomId::new(8181933191833708945),
            chunk: 3,
            last: true,
            slot: 1,
            first_page_offset: 96,
            pages: 32,
            slice: None,
        };
        assert_eq!(
            n.encode(),
            b"nixl-rs:staged:8181933191833708945:3:1:1:96:32".to_vec()
        );
        assert_eq!(StagedNotice::decode(&n.encode()), Some(n));
        let sliced = StagedNotice {
            slice: Some(StagedSlice {
                tokens: 16,
                src_token: 1024,
                dst_token: 2048,
                src_offset: 0,
                dst_offset: 1024,
                len: 1024,
            }),
            ..n
        };
        assert_eq!(
            sliced.encode(),
            b"nixl-rs:staged:8181933191833708945:3:1:1:96:32:16:1024:2048:0:1024:1024".to_vec()
        );
        assert_eq!(StagedNotice::decode(&sliced.encode()), Some(sliced));
        for bad in [
            &b"nixl-rs:staged:1:0:2:0:0:1"[..],
            b"nixl-rs:staged:1:0:1:0:0:0",
            b"nixl-rs:staged:1:0:1:0:4294967295:2",
            b"nixl-rs:staged:1:0:1:0:0",
            b"nixl-rs:staged:1:0:1:0:0:1:9",
            b"nixl-rs:staged:1:0:1:0:0:1:16:1024:2048:0:1024",
            b"nixl-rs:staged:1:0:1:0:0:1:16:1024:2048:0:1024:x",
            b"1_kv_0_1",
        ] {
            assert_eq!(StagedNotice::decode(bad), None, "{bad:?}");
        }

        let f = FreedNotice {
            room: RoomId::new(7),
            slot: 2,
        };
        assert_eq!(f.encode(), b"nixl-rs:freed:7:2".to_vec());
        assert_eq!(FreedNotice::decode(&f.encode()), Some(f));
        assert_eq!(FreedNotice::decode(b"nixl-rs:freed:7"), None);
        assert_eq!(FreedNotice::decode(b"nixl-rs:freed:7:02"), None);
        assert_eq!(StagedNotice::decode(&f.encode()), None);
        assert_eq!(ProofNotice::decode(&n.encode()), None);
    }
}
