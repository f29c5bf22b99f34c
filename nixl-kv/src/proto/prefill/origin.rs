//! Proof of origin (docs/protocol.md §3.5): how a prefill tells its own decodes from impostors
//! naming them. A decode that advertises proofs is sent a secret to echo; once it echoed it, every
//! later message naming it must carry it.

use bytes::Bytes;
use nixl_wire::AgentName;
use nixl_wire::ext;

use super::PrefillCore;

/// How a prefill tells its own decodes from impostors naming them (docs/protocol.md §3.5).
#[derive(Debug, Clone)]
pub struct Proofs {
    /// Secret input of every agent's proof (random, from the driver).
    pub seed: [u8; 32],
    /// Our ZeroMQ endpoint as decodes reach it.
    pub endpoint: String,
    /// Refuse transfer infos from decodes that cannot prove their origin (SGLang peers).
    pub strict: bool,
}

impl Proofs {
    /// The proof `agent` must echo: hex of SHA-256(seed ‖ agent name), 32 characters.
    pub(super) fn secret(&self, agent: &AgentName) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.seed);
        h.update(agent.as_str().as_bytes());
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl PrefillCore {
    /// The proof `agent` must echo, when proofs are on.
    pub(super) fn secret(&self, agent: &AgentName) -> Option<String> {
        self.proofs.as_ref().map(|p| p.secret(agent))
    }

    /// Whether a message may come from the decode `agent` it names: a proven agent must echo its proof; an
    /// unproven one becomes proven by echoing it; with `strict`, proof is required.
    pub(super) fn origin_ok(&mut self, agent: &AgentName, trailing: &[Bytes]) -> bool {
        let Some(strict) = self.proofs.as_ref().map(|p| p.strict) else {
            return true;
        };
        let secret = self.secret(agent);
        let Some(peer) = self.peers.get_mut(agent) else {
            return !strict;
        };
        let echoed = ext::proof(trailing);
        let right = echoed.is_some() && echoed == secret.as_deref().map(str::as_bytes);
        if right {
            peer.proven = true;
            true
        } else {
            !peer.proven && !strict
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_32_hex_characters_per_agent_and_seed() {
        let proofs = |seed: u8| Proofs {
            seed: [seed; 32],
            endpoint: "tcp://127.0.0.1:1".into(),
            strict: false,
        };
        let a = AgentName::new("decode-a").unwrap();
        let b = AgentName::new("decode-b").unwrap();
        let s = proofs(1).secret(&a);
        assert_eq!(s.len(), 32);
        assert!(
            s.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(s, proofs(1).secret(&a), "deterministic");
        assert_ne!(s, proofs(1).secret(&b), "per agent");
        assert_ne!(s, proofs(2).secret(&a), "per seed");
    }
}
