//! What a decode knows about the prefills it reaches: each bootstrap server's parallel sizes and
//! heartbeat count, the connection-pool entries (the prefill ranks of a (bootstrap, DP group,
//! rank)), when each prefill endpoint last got our registration, and the proof each one asked us
//! to echo. It owns these and their rules; [`super::DecodeCore`] asks it and fails rooms.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_wire::http::RankInfo;

use super::{PoolKey, REREGISTER_INTERVAL, Target, endpoint_of};
use crate::proto::BootstrapAddr;

/// Most prefill endpoints whose proofs are kept (a decode reaches a few).
const MAX_PROOFS: usize = 4096;

/// One bootstrap server as the decode knows it.
#[derive(Debug, Default)]
struct KnownPrefill {
    /// (TP size, DP size).
    parallel: Option<(u32, u32)>,
    /// The profile its bootstrap server answered in (learned with the sizes).
    profile: Option<nixl_wire::Profile>,
    /// Consecutive failed heartbeats.
    failures: u32,
    /// It answered `/health` with 404 (a seed SGLang server): no heartbeats.
    no_route: bool,
}

/// The decode's directory of prefills.
#[derive(Debug)]
pub(super) struct PrefillDirectory {
    prefills: HashMap<BootstrapAddr, KnownPrefill>,
    pools: HashMap<PoolKey, Vec<Target>>,
    /// When each prefill endpoint last got our registration.
    registered: HashMap<String, Instant>,
    /// The proof each prefill endpoint asked us to echo (ours; SGLang prefills send none).
    proofs: HashMap<String, String>,
    last_heartbeat: Instant,
}

impl PrefillDirectory {
    /// An empty directory; the first heartbeat round is due one interval after `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            prefills: HashMap::new(),
            pools: HashMap::new(),
            registered: HashMap::new(),
            proofs: HashMap::new(),
            last_heartbeat: now,
        }
    }

    /// The parallel sizes (TP, DP) of `bootstrap`, once learned.
    pub(super) fn parallel(&self, bootstrap: &BootstrapAddr) -> Option<(u32, u32)> {
        self.prefills.get(bootstrap).and_then(|p| p.parallel)
    }

    /// Stores the parallel sizes of `bootstrap`.
    pub(super) fn learn_parallel(
        &mut self,
        bootstrap: BootstrapAddr,
        sizes: (u32, u32),
        profile: nixl_wire::Profile,
    ) {
        let p = self.prefills.entry(bootstrap).or_default();
        p.parallel = Some(sizes);
        p.profile = Some(profile);
    }

    /// The profile `bootstrap`'s prefill speaks, once its sizes were learned.
    pub(super) fn profile(&self, bootstrap: &BootstrapAddr) -> Option<nixl_wire::Profile> {
        self.prefills.get(bootstrap).and_then(|p| p.profile)
    }

    /// The cached prefill ranks of `key`.
    pub(super) fn pool(&self, key: &PoolKey) -> Option<&Vec<Target>> {
        self.pools.get(key)
    }

    /// Caches the prefill ranks of `key`; endpoints new to it get our registration again.
    pub(super) fn store_pool(&mut self, key: PoolKey, pool: Vec<Target>) {
        for target in &pool {
            self.registered.remove(&target.endpoint);
        }
        self.pools.insert(key, pool);
    }

    /// Whether `endpoint` needs our registration (again) before a transfer info at `now`.
    pub(super) fn registration_due(&self, endpoint: &str, now: Instant) -> bool {
        self.registered
            .get(endpoint)
            .is_none_or(|&at| now.saturating_duration_since(at) >= REREGISTER_INTERVAL)
    }

    /// `endpoint` got our registration at `now`.
    pub(super) fn registered(&mut self, endpoint: String, now: Instant) {
        self.registered.insert(endpoint, now);
    }

    /// `endpoint` may have lost our registration: the next info to it registers again.
    pub(super) fn unregister(&mut self, endpoint: &str) {
        self.registered.remove(endpoint);
    }

    /// The proof `endpoint` asked us to echo.
    pub(super) fn proof(&self, endpoint: &str) -> Option<&String> {
        self.proofs.get(endpoint)
    }

    /// Keeps the proof `endpoint` asked us to echo (at most [`MAX_PROOFS`] endpoints).
    pub(super) fn learn_proof(&mut self, endpoint: String, secret: String) {
        if self.proofs.len() < MAX_PROOFS || self.proofs.contains_key(&endpoint) {
            tracing::debug!(%endpoint, "prefill proof received");
            self.proofs.insert(endpoint, secret);
        }
    }

    /// Forgets every cached pool entry that leads to `endpoint`, with its bootstrap's sizes.
    pub(super) fn forget_endpoint(&mut self, endpoint: &str) {
        let stale: Vec<BootstrapAddr> = self
            .pools
            .iter()
            .filter(|(_, targets)| targets.iter().any(|t| t.endpoint == endpoint))
            .map(|(k, _)| k.bootstrap.clone())
            .collect();
        for bootstrap in stale {
            self.forget(&bootstrap);
        }
    }

    /// Forgets `bootstrap`'s pool entries and sizes, so that the next receiver bootstraps
    /// afresh and registers again.
    pub(super) fn forget(&mut self, bootstrap: &BootstrapAddr) {
        let registered = &mut self.registered;
        self.pools.retain(|k, targets| {
            let keep = &k.bootstrap != bootstrap;
            if !keep {
                for t in targets.iter() {
                    registered.remove(&t.endpoint);
                }
            }
            keep
        });
        if let Some(p) = self.prefills.get_mut(bootstrap) {
            p.parallel = None;
            p.profile = None;
        }
    }

    /// Whether a heartbeat round is due at `now` (every `interval`); stamps it when it is.
    pub(super) fn heartbeat_round(&mut self, now: Instant, interval: Duration) -> bool {
        if now.saturating_duration_since(self.last_heartbeat) < interval {
            return false;
        }
        self.last_heartbeat = now;
        true
    }

    /// When the next heartbeat round is due.
    pub(super) fn next_round(&self, interval: Duration) -> Instant {
        self.last_heartbeat + interval
    }

    /// The bootstrap servers with cached pool entries.
    pub(super) fn pooled(&self) -> impl Iterator<Item = &BootstrapAddr> {
        self.pools.keys().map(|k| &k.bootstrap)
    }

    /// Whether `bootstrap` answers heartbeats (it has `/health`).
    pub(super) fn heartbeats(&self, bootstrap: &BootstrapAddr) -> bool {
        !self.prefills.get(bootstrap).is_some_and(|p| p.no_route)
    }

    /// Counts a heartbeat to `bootstrap`: up resets the count, no route turns heartbeats off for
    /// it, down counts one more failure. Returns whether it is now declared dead (`max`
    /// failures in a row); the count starts over then.
    pub(super) fn heartbeat_outcome(
        &mut self,
        bootstrap: &BootstrapAddr,
        outcome: &super::Heartbeat,
        max: u32,
    ) -> bool {
        let p = self.prefills.entry(bootstrap.clone()).or_default();
        match outcome {
            super::Heartbeat::Up => {
                p.failures = 0;
                false
            }
            super::Heartbeat::NoRoute => {
                tracing::info!(%bootstrap, "bootstrap server has no /health; heartbeats off for it");
                p.no_route = true;
                false
            }
            super::Heartbeat::Down(reason) => {
                p.failures += 1;
                tracing::warn!(%bootstrap, failures = p.failures, %reason, "heartbeat failed");
                if p.failures < max {
                    return false;
                }
                p.failures = 0;
                true
            }
        }
    }

    /// The cached pool entries of `bootstrap` for the prefill rank `real`.
    pub(super) fn pool_keys(&self, bootstrap: &BootstrapAddr, real: u32) -> Vec<PoolKey> {
        self.pools
            .keys()
            .filter(|k| &k.bootstrap == bootstrap && k.rank == real)
            .cloned()
            .collect()
    }

    /// What the bootstrap server says now about a cached pool entry: when a rank moved (a
    /// prefill restarted), the entry is forgotten, so the next receiver registers afresh.
    pub(super) fn pool_checked(&mut self, key: &PoolKey, ranks: Result<Vec<RankInfo>, String>) {
        let Ok(infos) = ranks else { return };
        let Some(targets) = self.pools.get(key) else {
            return;
        };
        let now: Vec<String> = infos.iter().map(endpoint_of).collect();
        let cached: Vec<&str> = targets.iter().map(|t| t.endpoint.as_str()).collect();
        if cached != now.iter().map(String::as_str).collect::<Vec<_>>() {
            tracing::info!(
                bootstrap = %key.bootstrap,
                ?cached,
                ?now,
                "prefill ranks moved; cached connection info dropped"
            );
            if let Some(old) = self.pools.remove(key) {
                for t in old {
                    self.registered.remove(&t.endpoint);
                }
            }
        }
    }

    /// Cached pool entries (for leak checks).
    pub(super) fn pools(&self) -> usize {
        self.pools.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::decode::Heartbeat;

    fn key(bootstrap: &str, rank: u32) -> PoolKey {
        PoolKey {
            bootstrap: BootstrapAddr::new(bootstrap),
            dp_group: 0,
            rank,
        }
    }

    fn target(endpoint: &str) -> Target {
        Target {
            endpoint: endpoint.into(),
            dummy: false,
        }
    }

    #[test]
    fn registrations_are_due_for_new_endpoints_and_again_after_the_interval() {
        let t0 = Instant::now();
        let mut d = PrefillDirectory::new(t0);
        assert!(d.registration_due("tcp://a:1", t0));
        d.registered("tcp://a:1".into(), t0);
        assert!(!d.registration_due("tcp://a:1", t0 + Duration::from_secs(59)));
        assert!(d.registration_due("tcp://a:1", t0 + REREGISTER_INTERVAL));
        // A pool that names the endpoint again makes it due at once.
        d.store_pool(key("b:1", 0), vec![target("tcp://a:1")]);
        assert!(d.registration_due("tcp://a:1", t0));
    }

    #[test]
    fn a_send_failure_forgets_every_pool_and_size_that_leads_to_the_endpoint() {
        let t0 = Instant::now();
        let mut d = PrefillDirectory::new(t0);
        d.learn_parallel(
            BootstrapAddr::new("b:1"),
            (2, 1),
            nixl_wire::Profile::Sglang051,
        );
        d.store_pool(key("b:1", 0), vec![target("tcp://a:1")]);
        d.store_pool(key("c:1", 0), vec![target("tcp://c:1")]);
        d.registered("tcp://a:1".into(), t0);
        d.forget_endpoint("tcp://a:1");
        assert_eq!(d.pools(), 1);
        assert_eq!(d.parallel(&BootstrapAddr::new("b:1")), None);
        assert!(d.registration_due("tcp://a:1", t0));
    }

    #[test]
    fn heartbeats_declare_a_prefill_dead_after_max_failures_in_a_row() {
        let mut d = PrefillDirectory::new(Instant::now());
        let b = BootstrapAddr::new("b:1");
        let down = Heartbeat::Down("refused".into());
        assert!(!d.heartbeat_outcome(&b, &down, 2));
        assert!(!d.heartbeat_outcome(&b, &Heartbeat::Up, 2));
        assert!(!d.heartbeat_outcome(&b, &down, 2));
        assert!(d.heartbeat_outcome(&b, &down, 2));
        // The count starts over.
        assert!(!d.heartbeat_outcome(&b, &down, 2));
        assert!(d.heartbeats(&b));
        assert!(!d.heartbeat_outcome(&b, &Heartbeat::NoRoute, 2));
        assert!(!d.heartbeats(&b));
    }

    #[test]
    fn a_pool_whose_ranks_moved_is_dropped_and_one_that_did_not_is_kept() {
        let t0 = Instant::now();
        let mut d = PrefillDirectory::new(t0);
        let k = key("b:1", 0);
        d.store_pool(k.clone(), vec![target("tcp://127.0.0.2:5000")]);
        d.registered("tcp://127.0.0.2:5000".into(), t0);
        let same = RankInfo {
            rank_ip: "127.0.0.2".into(),
            rank_port: 5000,
        };
        d.pool_checked(&k, Ok(vec![same]));
        assert_eq!(d.pools(), 1);
        let moved = RankInfo {
            rank_ip: "127.0.0.2".into(),
            rank_port: 5001,
        };
        d.pool_checked(&k, Err("timeout".into()));
        assert_eq!(d.pools(), 1, "a failed lookup proves nothing");
        d.pool_checked(&k, Ok(vec![moved]));
        assert_eq!(d.pools(), 0);
        assert!(d.registration_due("tcp://127.0.0.2:5000", t0));
    }

    #[test]
    fn proofs_are_kept_for_a_bounded_number_of_endpoints() {
        let mut d = PrefillDirectory::new(Instant::now());
        for i in 0..MAX_PROOFS + 10 {
            d.learn_proof(format!("tcp://a:{i}"), "s".into());
        }
        assert_eq!(d.proofs.len(), MAX_PROOFS);
        d.learn_proof("tcp://a:0".into(), "new".into());
        assert_eq!(d.proof("tcp://a:0").map(String::as_str), Some("new"));
    }
}
