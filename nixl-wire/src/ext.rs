//! Our extensions, carried where SGLang peers ignore them (docs/protocol.md §3.5): a capability
//! frame trailing a decode's registration, a proof frame trailing its transfer infos, and the
//! proof notification a prefill sends over NIXL to a decode that advertised `proof`.
//!
//! Frames and payloads all start with `nixl-rs:`, which no SGLang frame or notification does.

use bytes::Bytes;

/// The prefix of every extension frame and payload.
pub const EXT_PREFIX: &[u8] = b"nixl-rs:";

const CAPS: &[u8] = b"nixl-rs:caps:";
const PROOF: &[u8] = b"nixl-rs:proof:";

/// A decode that can echo a prefill's proof in its transfer infos.
pub const CAP_PROOF: &str = "proof";

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
