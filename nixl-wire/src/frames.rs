//! A cursor over a message's frames that turns every problem into a [`DecodeError`], and the
//! GUARD frame (docs/protocol.md §3.2).

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind, Reason};
use crate::ids::AgentName;
use crate::scalar;

/// The 12-byte frame every decode→prefill message starts with.
pub const GUARD: &[u8; 12] = b"NixlMsgGuard";

/// The room frame of a registration message.
pub(crate) const NONE: &[u8] = b"None";

/// Reads typed fields from frames, naming the message, frame index and field on error.
pub(crate) struct FrameReader<'a> {
    frames: &'a [Bytes],
    message: MessageKind,
}

impl<'a> FrameReader<'a> {
    /// Checks the frame count (at least `min`; later frames are trailing frames the caller
    /// keeps, as SGLang's prefill ignores them) and the GUARD frame.
    pub(crate) fn new(
        frames: &'a [Bytes],
        message: MessageKind,
        min: usize,
        expected: &'static str,
    ) -> Result<Self, DecodeError> {
        if frames.len() < min {
            return Err(DecodeError::FrameCount {
                message,
                expected,
                got: frames.len(),
            });
        }
        let r = Self { frames, message };
        r.literal(0, "guard", GUARD, "NixlMsgGuard")?;
        Ok(r)
    }

    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    fn err(&self, i: usize, field: &'static str, reason: Reason) -> DecodeError {
        DecodeError::field(self.message, i, field, reason)
    }

    pub(crate) fn literal(
        &self,
        i: usize,
        field: &'static str,
        want: &[u8],
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        if self.frames[i].as_ref() == want {
            Ok(())
        } else {
            Err(self.err(i, field, Reason::Unexpected { expected }))
        }
    }

    pub(crate) fn raw(&self, i: usize) -> Bytes {
        self.frames[i].clone()
    }

    pub(crate) fn unsigned(
        &self,
        i: usize,
        field: &'static str,
        max: u64,
    ) -> Result<u64, DecodeError> {
        scalar::parse_unsigned(&self.frames[i], max).map_err(|r| self.err(i, field, r))
    }

    pub(crate) fn text(&self, i: usize, field: &'static str) -> Result<String, DecodeError> {
        scalar::ascii(&self.frames[i])
            .map(str::to_owned)
            .map_err(|r| self.err(i, field, r))
    }

    pub(crate) fn agent(&self, i: usize) -> Result<AgentName, DecodeError> {
        AgentName::from_bytes(&self.frames[i]).map_err(|r| self.err(i, "agent name", r))
    }

    pub(crate) fn u64s(&self, i: usize, field: &'static str) -> Result<Vec<u64>, DecodeError> {
        scalar::u64_le_array(&self.frames[i]).map_err(|r| self.err(i, field, r))
    }

    pub(crate) fn indices(&self, i: usize, field: &'static str) -> Result<Vec<u32>, DecodeError> {
        scalar::index_le_array(&self.frames[i]).map_err(|r| self.err(i, field, r))
    }
}

/// Concatenated little-endian u64s.
pub(crate) fn u64s_frame(v: &[u64]) -> Bytes {
    let mut out = Vec::with_capacity(v.len() * 8);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.into()
}

/// Decimal text as a frame.
pub(crate) fn decimal_frame(v: u64) -> Bytes {
    scalar::decimal(v).into()
}
