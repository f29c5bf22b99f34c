//! Which SGLang release family a peer speaks (docs/protocol.md §10.1).

use std::fmt;
use std::str::FromStr;

/// A protocol profile: the wire format of one family of SGLang releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Profile {
    /// SGLang 0.5.1.x: 9-frame registrations, 8-frame TransferInfos, completion and failure by
    /// NIXL notifications, the decode binds no socket.
    #[default]
    Sglang051,
    /// SGLang 0.5.20–0.5.22: 24-frame registrations, 11-frame TransferInfos, Success by NIXL
    /// notifications, failures by `KV_STATUS` to the decode's listener.
    Sglang0520,
    /// SGLang 0.5.23: 25-frame registrations, Success and failure both by `KV_STATUS`, no
    /// notifications.
    Sglang0523,
}

impl Profile {
    /// Every profile, oldest first.
    pub const ALL: [Self; 3] = [Self::Sglang051, Self::Sglang0520, Self::Sglang0523];

    /// The name flags and logs use: `sglang-0.5.1`, `sglang-0.5.20`, `sglang-0.5.23`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sglang051 => "sglang-0.5.1",
            Self::Sglang0520 => "sglang-0.5.20",
            Self::Sglang0523 => "sglang-0.5.23",
        }
    }

    /// The profile an SGLang release speaks (`0.5.1.post3`, `0.5.22`, ...), if we speak it.
    pub fn for_release(version: &str) -> Option<Self> {
        let mut parts = version.split(['.', '+']);
        let (major, minor) = (parts.next()?, parts.next()?);
        let patch: u32 = parts.next()?.parse().ok()?;
        if (major, minor) != ("0", "5") {
            return None;
        }
        match patch {
            1 => Some(Self::Sglang051),
            20..=22 => Some(Self::Sglang0520),
            23 => Some(Self::Sglang0523),
            _ => None,
        }
    }

    /// The decode binds a PULL listener and advertises its port (0.5.20 on).
    pub fn decode_listens(self) -> bool {
        self != Self::Sglang051
    }

    /// Success reaches the decode as `KV_STATUS` (0.5.23) rather than NIXL notifications.
    pub fn success_by_status(self) -> bool {
        self == Self::Sglang0523
    }

    /// Failures reach the decode as `KV_STATUS` with a reason (0.5.20 on) rather than as a
    /// failure notification.
    pub fn failure_by_status(self) -> bool {
        self != Self::Sglang051
    }
}

/// Bytes per slot of 0.5.20–0.5.23's ten default aux buffers: output ids, cached tokens, token
/// logprob values and indices, top-logprob values and indices, top-k probabilities and indices,
/// hidden states (16 × float32 by default) and the bootstrap room.
pub const AUX_LAYOUT_0520: [u64; 10] = [64, 64, 64, 64, 512, 512, 64, 128, 64, 64];

/// The index of the `bootstrap_room` aux buffer in [`AUX_LAYOUT_0520`]: a 0.5.2x decode keeps a
/// request waiting while its row is 0 and aborts it when the row names another room.
pub const AUX_ROOM_BUFFER_0520: usize = 9;

impl Profile {
    /// The release's default aux layout (`MetadataBuffers`), bytes per slot of each buffer.
    /// 0.5.1's last buffer holds the hidden states, `hidden_bytes` per slot (hidden size × dtype
    /// size); 0.5.2x's is [`AUX_LAYOUT_0520`].
    pub fn aux_layout(self, hidden_bytes: u64) -> Vec<u64> {
        match self {
            Self::Sglang051 => vec![64, 64, 64, 512, 512, hidden_bytes],
            Self::Sglang0520 | Self::Sglang0523 => AUX_LAYOUT_0520.to_vec(),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A profile name that is not one of [`Profile::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol profile {0:?}: expected sglang-0.5.1, sglang-0.5.20 or sglang-0.5.23")]
pub struct UnknownProfile(pub String);

impl FromStr for Profile {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_releases() {
        for p in Profile::ALL {
            assert_eq!(p.name().parse::<Profile>(), Ok(p));
        }
        assert!("sglang-0.5.22".parse::<Profile>().is_err());
        assert_eq!(
            Profile::for_release("0.5.1.post3"),
            Some(Profile::Sglang051)
        );
        assert_eq!(Profile::for_release("0.5.1"), Some(Profile::Sglang051));
        assert_eq!(Profile::for_release("0.5.20"), Some(Profile::Sglang0520));
        assert_eq!(Profile::for_release("0.5.22"), Some(Profile::Sglang0520));
        assert_eq!(Profile::for_release("0.5.23"), Some(Profile::Sglang0523));
        for other in ["0.5.2", "0.5.19", "0.5.24", "0.4.1", "1.5.1", "", "0.5"] {
            assert_eq!(Profile::for_release(other), None, "{other}");
        }
    }
}
