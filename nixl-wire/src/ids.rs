//! Newtypes for the identifiers that cross the wire.

use std::fmt;
use std::sync::Arc;

use crate::error::Reason;

macro_rules! int_id {
    ($(#[$doc:meta])* $name:ident($int:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name($int);

        impl $name {
            /// Wraps a raw value.
            pub const fn new(v: $int) -> Self {
                Self(v)
            }

            /// The raw value.
            pub const fn get(self) -> $int {
                self.0
            }
        }

        impl From<$int> for $name {
            fn from(v: $int) -> Self {
                Self(v)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

int_id!(
    /// A bootstrap room: the request id both sides agree on (SGLang's router draws it from
    /// [0, 2^63 − 1]).
    RoomId(u64)
);
int_id!(
    /// A KV chunk of one request, counted from 0 per sender.
    ChunkId(u32)
);
int_id!(
    /// A page index into a KV pool (non-negative `int32` on the wire).
    PageIndex(u32)
);
int_id!(
    /// A CUDA device ordinal.
    GpuId(u32)
);
int_id!(
    /// A pipeline-parallel rank.
    PpRank(u32)
);

/// A NIXL agent name: non-empty printable ASCII (SGLang uses a uuid4 string).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentName(Arc<str>);

impl AgentName {
    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, Reason> {
        Self::from_bytes(s.as_bytes())
    }

    /// Validates raw bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, Reason> {
        if b.is_empty() {
            return Err(Reason::Empty);
        }
        Ok(Self(crate::scalar::ascii(b)?.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AgentName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
