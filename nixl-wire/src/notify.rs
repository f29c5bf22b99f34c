//! NIXL notification payloads that travel with the prefill's WRITEs (docs/protocol.md §4).
//!
//! | form | meaning |
//! |---|---|
//! | `{room}_kv_{chunk}_{0\|1}` | a KV chunk landed; `1` marks the last chunk (seed) |
//! | `{room}_kv_{chunk}_{0\|1}_{pp}` | the same from pipeline rank `pp` (later SGLang) |
//! | `{room}_aux` | the aux row landed |
//! | `{room}_state_{pp}` | the mamba/SWA state landed (later SGLang) |
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
        match (tag, rest) {
            (Some("aux"), None) => Ok(Self::Aux { room }),
            (Some("kv"), Some(rest)) => {
                let f: Vec<&str> = rest.split('_').collect();
                let (chunk, last, pp) = match f[..] {
                    [c, l] => (c, l, None),
                    [c, l, p] => (c, l, Some(p)),
                    _ => {
                        return Err(DecodeError::FrameCount {
                            message: MessageKind::Notification,
                            expected: "4 or 5 parts",
                            got: f.len() + 2,
                        });
                    }
                };
                let chunk = ChunkId::new(u32_field(chunk, 2, "chunk")?);
                let last = match last {
                    "0" => false,
                    "1" => true,
                    _ => return Err(err(3, "last", Reason::Unexpected { expected: "0 or 1" })),
                };
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
            (Some("state"), Some(pp)) => Ok(Self::State {
                room,
                pp: PpRank::new(u32_field(pp, 2, "pp rank")?),
            }),
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
                    expected: "kv, aux, state or fail",
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
