//! NIXL notification payloads that travel with the prefill's WRITEs (docs/protocol.md §4).
//!
//! | form | meaning |
//! |---|---|
//! | `{room}_kv_{chunk}_{0\|1}` | a KV chunk landed; `1` marks the last chunk (seed) |
//! | `{room}_kv_{chunk}_{0\|1}_{pp}` | the same from pipeline rank `pp` (later SGLang) |
//! | `{room}_aux` | the aux row landed |
//! | `{room}_state_{pp}` | the mamba/SWA state landed (later SGLang) |
//! | `{room}_kv_{chunk}_{0\|1}_{src}_part_{i}_{n}` | part `i` of `n` of a chunk (0.5.20–0.5.22) |
//! | `{room}_aux_nokv_{src}_{chunks}` | aux landed; `src` sent `chunks` KV chunks (0.5.20–0.5.22) |
//! | `{room}_state_{src}_{i}` | state component `i` landed (0.5.20–0.5.22) |
//! | `{room}_stg_...` | SGLang's staging (0.5.20–0.5.22); decoded, never acted on |
//! | `{room}_fail_{reason}` | ours: the prefill failed the room; seed decodes ignore it |

use std::fmt;

use crate::error::{DecodeError, MessageKind, Reason};
use crate::ids::{ChunkId, PpRank, RoomId};
use crate::scalar;

/// The longest failure reason we send; longer reasons are cut.
pub const MAX_REASON_LEN: usize = 256;

/// A decoded notification payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Notification {
    /// A KV chunk of `room` is in place.
    Kv {
        /// The request.
        room: RoomId,
        /// The chunk, counted from 0.
        chunk: ChunkId,
        /// Whether this is the request's last chunk.
        last: bool,
        /// The sending pipeline rank, for the 5-part form.
        pp: Option<PpRank>,
    },
    /// The aux row of `room` is in place.
    Aux {
        /// The request.
        room: RoomId,
    },
    /// The state buffers of `room` from pipeline rank `pp` are in place.
    State {
        /// The request.
        room: RoomId,
        /// The sending pipeline rank.
        pp: PpRank,
    },
    /// One part of a KV chunk (0.5.20–0.5.22 mixed-memory or DCP transfers): the chunk is in
    /// place once all `parts` parts are.
    KvPart {
        /// The request.
        room: RoomId,
        /// The chunk, counted from 0.
        chunk: ChunkId,
        /// Whether this is the request's last chunk.
        last: bool,
        /// The sending rank (`pp_rank · tp_size + tp_rank`).
        src: PpRank,
        /// This part, counted from 0.
        part: u32,
        /// How many parts the chunk has.
        parts: u32,
    },
    /// The aux row of `room` is in place and `src` sent `chunks` KV chunks in all (its last
    /// chunk had no pages, so no KV notification said so; 0.5.20–0.5.22).
    AuxNoKv {
        /// The request.
        room: RoomId,
        /// The sending rank.
        src: PpRank,
        /// KV chunks that rank sent.
        chunks: u32,
    },
    /// State component `component` of `room` from rank `src` is in place (0.5.20–0.5.22).
    StatePart {
        /// The request.
        room: RoomId,
        /// The sending rank.
        src: PpRank,
        /// The state component.
        component: u32,
    },
    /// SGLang's own staging path (`{room}_stg_...`); the rest is kept as it came.
    Staged {
        /// The request.
        room: RoomId,
        /// What follows `stg_`.
        rest: String,
    },
    /// The prefill failed `room`.
    Fail {
        /// The request.
        room: RoomId,
        /// Why, as printable ASCII (see [`Notification::fail`]).
        reason: FailReason,
    },
}

/// A failure reason made safe for the notification format: printable ASCII, at most
/// [`MAX_REASON_LEN`] bytes, never empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FailReason(String);

impl FailReason {
    /// Replaces anything but printable ASCII with `?`, cuts to [`MAX_REASON_LEN`] bytes and
    /// names an empty reason `unknown`.
    pub fn sanitize(reason: &str) -> Self {
        let mut s: String = reason
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
            .take(MAX_REASON_LEN)
            .collect();
        if s.is_empty() {
            s.push_str("unknown");
        }
        Self(s)
    }

    /// The reason.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Notification {
    /// The failure push for `room`, with `reason` sanitized.
    pub fn fail(room: RoomId, reason: &str) -> Self {
        Self::Fail {
            room,
            reason: FailReason::sanitize(reason),
        }
    }

    /// The room every form names.
    pub fn room(&self) -> RoomId {
        match self {
            Self::Kv { room, .. }
            | Self::Aux { room }
            | Self::State { room, .. }
            | Self::KvPart { room, .. }
            | Self::AuxNoKv { room, .. }
            | Self::StatePart { room, .. }
            | Self::Staged { room, .. }
            | Self::Fail { room, .. } => *room,
        }
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        self.encode_into(&mut out);
        out
    }

    /// Appends the payload to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        scalar::push_decimal(out, self.room().get());
        match self {
            Self::Kv {
                chunk, last, pp, ..
            } => {
                out.extend_from_slice(b"_kv_");
                scalar::push_decimal(out, chunk.get().into());
                out.extend_from_slice(if *last { b"_1" } else { b"_0" });
                if let Some(pp) = pp {
                    out.push(b'_');
                    scalar::push_decimal(out, pp.get().into());
                }
            }
            Self::Aux { .. } => out.extend_from_slice(b"_aux"),
            Self::State { pp, .. } => {
                out.extend_from_slice(b"_state_");
                scalar::push_decimal(out, pp.get().into());
            }
            Self::KvPart {
                chunk,
                last,
                src,
                part,
                parts,
                ..
            } => {
                out.extend_from_slice(b"_kv_");
                scalar::push_decimal(out, chunk.get().into());
                out.extend_from_slice(if *last { b"_1_" } else { b"_0_" });
                scalar::push_decimal(out, src.get().into());
                out.extend_from_slice(b"_part_");
                scalar::push_decimal(out, (*part).into());
                out.push(b'_');
                scalar::push_decimal(out, (*parts).into());
            }
            Self::AuxNoKv { src, chunks, .. } => {
                out.extend_from_slice(b"_aux_nokv_");
                scalar::push_decimal(out, src.get().into());
                out.push(b'_');
                scalar::push_decimal(out, (*chunks).into());
            }
            Self::StatePart { src, component, .. } => {
                out.extend_from_slice(b"_state_");
                scalar::push_decimal(out, src.get().into());
                out.push(b'_');
                scalar::push_decimal(out, (*component).into());
            }
            Self::Staged { rest, .. } => {
                out.extend_from_slice(b"_stg_");
                out.extend_from_slice(rest.as_bytes());
            }
            Self::Fail { reason, .. } => {
                out.extend_from_slice(b"_fail_");
                out.extend_from_slice(reason.0.as_bytes());
            }
        }
    }

    /// Decodes a payload. Anything that is not one of the forms above is an error (a decode
    /// logs and drops it; SGLang ignores unknown tags the same way).
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let err = |part: usize, field: &'static str, reason: Reason| {
            DecodeError::field(MessageKind::Notification, part, field, reason)
        };
        let text = scalar::ascii(payload).map_err(|r| err(0, "payload", r))?;
        let mut parts = text.splitn(3, '_');
        let room_s = parts.next().unwrap_or("");
        let room = RoomId::new(
            scalar::parse_unsigned(room_s.as_bytes(), u64::MAX).map_err(|r| err(0, "room", r))?,
        );
        let tag = parts.next();
        let rest = parts.next();
        let u32_field = |s: &str, part, field| {
            scalar::parse_unsigned(s.as_bytes(), u32::MAX.into())
                .map(|v| v as u32)
                .map_err(|r| err(part, field, r))
        };
        let last_flag = |s: &str| match s {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(err(3, "last", Reason::Unexpected { expected: "0 or 1" })),
        };
        match (tag, rest) {
            (Some("aux"), None) => Ok(Self::Aux { room }),
            (Some("aux"), Some(rest)) => match rest.split('_').collect::<Vec<_>>()[..] {
                ["nokv", src, chunks] => Ok(Self::AuxNoKv {
                    room,
                    src: PpRank::new(u32_field(src, 3, "source rank")?),
                    chunks: u32_field(chunks, 4, "chunks")?,
                }),
                _ => Err(err(
                    2,
                    "aux suffix",
                    Reason::Unexpected {
                        expected: "nokv_{src}_{chunks}",
                    },
                )),
            },
            (Some("stg"), Some(rest)) if !rest.is_empty() => Ok(Self::Staged {
                room,
                rest: rest.to_owned(),
            }),
            (Some("kv"), Some(rest)) => {
                let f: Vec<&str> = rest.split('_').collect();
                let (chunk, last, pp) = match f[..] {
                    [c, l] => (c, l, None),
                    [c, l, p] => (c, l, Some(p)),
                    [c, l, src, "part", i, n] => {
                        return Ok(Self::KvPart {
                            room,
                            chunk: ChunkId::new(u32_field(c, 2, "chunk")?),
                            last: last_flag(l)?,
                            src: PpRank::new(u32_field(src, 4, "source rank")?),
                            part: u32_field(i, 6, "part")?,
                            parts: u32_field(n, 7, "parts")?,
                        });
                    }
                    _ => {
                        return Err(DecodeError::FrameCount {
                            message: MessageKind::Notification,
                            expected: "4, 5 or 8 parts",
                            got: f.len() + 2,
                        });
                    }
                };
                let chunk = ChunkId::new(u32_field(chunk, 2, "chunk")?);
                let last = last_flag(last)?;
                let pp = pp
                    .map(|p| u32_field(p, 4, "pp rank").map(PpRank::new))
                    .transpose()?;
                Ok(Self::Kv {
                    room,
                    chunk,
                    last,
                    pp,
                })
            }
            (Some("state"), Some(rest)) => match rest.split_once('_') {
                None => Ok(Self::State {
                    room,
                    pp: PpRank::new(u32_field(rest, 2, "pp rank")?),
                }),
                Some((src, i)) => Ok(Self::StatePart {
                    room,
                    src: PpRank::new(u32_field(src, 2, "source rank")?),
                    component: u32_field(i, 3, "component")?,
                }),
            },
            (Some("fail"), Some(reason))
                if !reason.is_empty() && reason.len() <= MAX_REASON_LEN =>
            {
                Ok(Self::Fail {
                    room,
                    reason: FailReason(reason.to_owned()),
                })
            }
            (Some("fail"), _) => Err(err(2, "reason", Reason::Empty)),
            _ => Err(err(
                1,
                "tag",
                Reason::Unexpected {
                    expected: "kv, aux, state, stg or fail",
                },
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(s: &str) -> Notification {
        let n = Notification::decode(s.as_bytes()).unwrap();
        assert_eq!(n.encode(), s.as_bytes());
        n
    }

    #[test]
    fn every_form_round_trips() {
        assert_eq!(
            rt("8181933191833708945_kv_0_1"),
            Notification::Kv {
                room: RoomId::new(8181933191833708945),
                chunk: ChunkId::new(0),
                last: true,
                pp: None
            }
        );
        assert_eq!(
            rt("5_aux"),
            Notification::Aux {
                room: RoomId::new(5)
            }
        );
        assert!(
            matches!(rt("5_kv_3_0_2"), Notification::Kv { pp: Some(p), last: false, .. } if p.get() == 2)
        );
        assert!(matches!(rt("5_state_1"), Notification::State { .. }));
        // 0.5.20–0.5.22's forms.
        assert_eq!(
            rt("5_kv_2_1_3_part_0_2"),
            Notification::KvPart {
                room: RoomId::new(5),
                chunk: ChunkId::new(2),
                last: true,
                src: PpRank::new(3),
                part: 0,
                parts: 2
            }
        );
        assert_eq!(
            rt("5_aux_nokv_1_4"),
            Notification::AuxNoKv {
                room: RoomId::new(5),
                src: PpRank::new(1),
                chunks: 4
            }
        );
        assert_eq!(
            rt("5_state_1_0"),
            Notification::StatePart {
                room: RoomId::new(5),
                src: PpRank::new(1),
                component: 0
            }
        );
        assert!(matches!(
            rt("5_stg_0_1_0_0_0_4_decode-agent"),
            Notification::Staged { .. }
        ));
        assert!(
            matches!(rt("5_fail_peer_gone: timeout"), Notification::Fail { ref reason, .. } if reason.as_str() == "peer_gone: timeout")
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [
            "",
            "x_aux",
            "5",
            "5_",
            "5_kv",
            "5_kv_1",
            "5_kv_1_2",
            "5_kv_a_1",
            "5_kv_1_1_1_1",
            "5_aux_1",
            "5_fail_",
            "5_hello",
            "05_aux",
            "-5_aux",
            "5_state_",
            "5_state_1_",
            "5_aux_nokv_1",
            "5_aux_x_1_2",
            "5_kv_1_1_0_part_0",
            "5_kv_1_1_0_prt_0_1",
            "5_stg_",
        ] {
            assert!(
                Notification::decode(bad.as_bytes()).is_err(),
                "{bad:?} decoded"
            );
        }
        assert!(Notification::decode(b"5_fail_\xff").is_err());
    }

    #[test]
    fn fail_reasons_are_sanitized() {
        let n = Notification::fail(RoomId::new(1), "bad\nthing é");
        assert_eq!(n.encode(), b"1_fail_bad?thing ?");
        assert_eq!(
            Notification::fail(RoomId::new(1), "").encode(),
            b"1_fail_unknown"
        );
        let long = "x".repeat(1000);
        assert_eq!(
            Notification::fail(RoomId::new(1), &long).encode().len(),
            2 + 5 + MAX_REASON_LEN
        );
    }
}
