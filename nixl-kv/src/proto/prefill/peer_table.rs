//! The prefill's table of decode agents: registered ones, ones whose metadata is loading, and
//! ones whose metadata NIXL refused lately. It owns these and their admission rule; the core
//! ([`super::PrefillCore`]) owns what follows from them (loads, lists, proofs, mappings).

use std::collections::HashMap;
use std::time::Instant;

use nixl_wire::AgentName;

use super::{MAX_PEERS, Peer, PeerState, REFUSED_BACKOFF};

/// What [`PeerTable::admit`] decided about a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// A new agent: load its metadata.
    Load,
    /// Registered already (seen again now), or loading: nothing to do.
    Known,
    /// Refused lately: not loaded again before the back-off passed.
    BackingOff,
    /// The table is full: dropped.
    Full,
}

/// The decode agents a prefill knows.
#[derive(Debug, Default)]
pub(super) struct PeerTable {
    ready: HashMap<AgentName, PeerState>,
    pending: HashMap<AgentName, (Peer, Instant)>,
    refused: HashMap<AgentName, Instant>,
}

impl PeerTable {
    /// The rule for a registration of `agent` at `now`: a registered agent is only seen again;
    /// one loading or refused less than [`REFUSED_BACKOFF`] ago is ignored; at most
    /// [`MAX_PEERS`] agents are registered or loading at once.
    pub(super) fn admit(&mut self, agent: &AgentName, now: Instant) -> Admission {
        if let Some(p) = self.ready.get_mut(agent) {
            p.last_seen = now;
            return Admission::Known;
        }
        if self.pending.contains_key(agent) {
            return Admission::Known;
        }
        if let Some(&at) = self.refused.get(agent) {
            if now.saturating_duration_since(at) < REFUSED_BACKOFF {
                return Admission::BackingOff;
            }
            self.refused.remove(agent);
        }
        if self.ready.len() + self.pending.len() >= MAX_PEERS {
            return Admission::Full;
        }
        Admission::Load
    }

    /// `agent`'s metadata is loading; `peer` is what it registered.
    pub(super) fn loading(&mut self, agent: AgentName, peer: Peer, now: Instant) {
        self.pending.insert(agent, (peer, now));
    }

    /// Takes `agent` out of loading, with when it registered.
    pub(super) fn take_loading(&mut self, agent: &AgentName) -> Option<(Peer, Instant)> {
        self.pending.remove(agent)
    }

    /// NIXL refused `agent`'s metadata at `at` (the refusals kept are bounded).
    pub(super) fn refuse(&mut self, agent: AgentName, at: Instant) {
        if self.refused.len() >= MAX_PEERS {
            self.refused.clear();
        }
        self.refused.insert(agent, at);
    }

    /// A registered agent.
    pub(super) fn get(&self, agent: &AgentName) -> Option<&PeerState> {
        self.ready.get(agent)
    }

    /// A registered agent, to change.
    pub(super) fn get_mut(&mut self, agent: &AgentName) -> Option<&mut PeerState> {
        self.ready.get_mut(agent)
    }

    /// Whether `agent` is registered.
    pub(super) fn contains_key(&self, agent: &AgentName) -> bool {
        self.ready.contains_key(agent)
    }

    /// Registers `agent` (its metadata loaded).
    pub(super) fn insert(&mut self, agent: AgentName, state: PeerState) {
        self.ready.insert(agent, state);
    }

    /// Forgets `agent`, registered or loading; whether it was either.
    pub(super) fn forget(&mut self, agent: &AgentName) -> bool {
        let known = self.ready.remove(agent).is_some();
        self.pending.remove(agent).is_some() || known
    }

    /// Registered agents.
    pub(super) fn len(&self) -> usize {
        self.ready.len()
    }

    /// Registered agents and their state.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&AgentName, &PeerState)> {
        self.ready.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nixl_wire::GpuId;

    use super::*;

    fn peer() -> Peer {
        Peer {
            kv_ptrs: vec![0x1000],
            aux_ptrs: vec![0x2000],
            gpu_id: GpuId::new(0),
            tp_info: None,
            proves: false,
            ring: None,
            ipc: None,
            profile: nixl_wire::Profile::Sglang051,
            ours: false,
            unsupported: None,
        }
    }

    #[test]
    fn admission_loads_new_agents_once_and_backs_off_after_a_refusal() {
        let t0 = Instant::now();
        let a = AgentName::new("d0").unwrap();
        let mut t = PeerTable::default();
        assert_eq!(t.admit(&a, t0), Admission::Load);
        t.loading(a.clone(), peer(), t0);
        assert_eq!(t.admit(&a, t0), Admission::Known, "loading already");
        let (_, seen) = t.take_loading(&a).unwrap();
        assert_eq!(seen, t0);
        t.refuse(a.clone(), t0);
        assert_eq!(t.admit(&a, t0 + REFUSED_BACKOFF / 2), Admission::BackingOff);
        assert_eq!(t.admit(&a, t0 + REFUSED_BACKOFF), Admission::Load);
        t.loading(a.clone(), peer(), t0);
        assert!(t.forget(&a), "a loading agent is forgotten too");
        assert!(!t.forget(&a));
    }

    #[test]
    fn at_most_max_peers_are_registered_or_loading() {
        let t0 = Instant::now();
        let mut t = PeerTable::default();
        for i in 0..MAX_PEERS {
            t.loading(AgentName::new(&format!("d{i}")).unwrap(), peer(), t0);
        }
        let late = AgentName::new("late").unwrap();
        assert_eq!(t.admit(&late, t0), Admission::Full);
        t.take_loading(&AgentName::new("d0").unwrap());
        assert_eq!(t.admit(&late, t0 + Duration::from_secs(1)), Admission::Load);
    }
}
