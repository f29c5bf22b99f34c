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

    /// A reader for a tagged message (`KV_STATUS`, `ABORT`, ...): frame 0 is `tag`, and
    /// `min..=max` frames in all.
    pub(crate) fn tagged(
        frames: &'a [Bytes],
        message: MessageKind,
        tag: &'static [u8],
        (min, max): (usize, usize),
        expected: &'static str,
    ) -> Result<Self, DecodeError> {
        if frames.len() < min || frames.len() > max {
            return Err(DecodeError::FrameCount {
                message,
                expected,
                got: frames.len(),
            });
        }
        let r = Self { frames, message };
        let name = std::str::from_utf8(tag).unwrap_or("tag");
        r.literal(0, "tag", tag, name)?;
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

    pub(crate) fn signed(&self, i: usize, field: &'static str) -> Result<i64, DecodeError> {
        scalar::parse_signed(&self.frames[i]).map_err(|r| self.err(i, field, r))
    }

    pub(crate) fn int_lists<T: crate::int_lists::PackedInt>(
        &self,
        i: usize,
        field: &'static str,
    ) -> Result<Vec<Vec<T>>, DecodeError> {
        crate::int_lists::unpack_int_lists(&self.frames[i]).map_err(|r| self.err(i, field, r))
    }

    pub(crate) fn u32s(&self, i: usize, field: &'static str) -> Result<Vec<u32>, DecodeError> {
        let b = &self.frames[i];
        if !b.len().is_multiple_of(4) {
            let reason = Reason::BadLength {
                len: b.len(),
                elem_size: 4,
            };
            return Err(self.err(i, field, reason));
        }
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// An error about frame `i`, for checks the caller makes.
    pub(crate) fn invalid(&self, i: usize, field: &'static str, what: &'static str) -> DecodeError {
        self.err(i, field, Reason::Malformed { what })
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

/// Concatenated little-endian u32s.
pub(crate) fn u32s_frame(v: &[u32]) -> Bytes {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.into()
}

/// Signed decimal text as a frame (`str(int)`).
pub(crate) fn signed_frame(v: i64) -> Bytes {
    v.to_string().into_bytes().into()
}

/// Decimal text as a frame.
pub(crate) fn decimal_frame(v: u64) -> Bytes {
    scalar::decimal(v).into()
}
