//! Decode-side heartbeats to each prefill's bootstrap server.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::Shared;
use crate::bootstrap::{BootstrapClient, Health};

/// Starts the heartbeat thread: every interval, `GET /health` on every bootstrap server with
/// unfinished rooms; after `max_failures` consecutive failures all its rooms fail and its cached
/// connection info is dropped. A server that answers 404 (a seed SGLang server) is not checked
/// again; the waiting timeout covers its rooms.
pub(crate) fn start(shared: &Arc<Shared>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let interval = shared.config.heartbeat_interval;
    let handle = std::thread::Builder::new().name("kv-heartbeat".into()).spawn(move || {
        let mut failures: HashMap<String, u32> = HashMap::new();
        let mut no_route: HashSet<String> = HashSet::new();
        loop {
            let deadline = Instant::now() + interval;
            while Instant::now() < deadline {
                std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
                match weak.upgrade() {
                    Some(s) if !s.stop.load(Ordering::Relaxed) => {}
                    _ => return,
                }
            }
            let Some(s) = weak.upgrade() else { return };
            let live = s.decode.lock().unwrap_or_else(|e| e.into_inner()).live_bootstraps();
            for addr in &live {
                if no_route.contains(addr) {
                    continue;
                }
                match BootstrapClient::new(addr, s.config.http_timeout.min(interval)).health() {
                    Health::Up => {
                        failures.remove(addr);
                    }
                    Health::NoRoute => {
                        tracing::info!(bootstrap = %addr, "bootstrap server has no /health; heartbeats off for it");
                        no_route.insert(addr.clone());
                    }
                    Health::Down(reason) => {
                        let n = failures.entry(addr.clone()).or_insert(0);
                        *n += 1;
                        tracing::warn!(bootstrap = %addr, failures = *n, %reason, "heartbeat failed");
                        if *n >= s.config.heartbeat_max_failures {
                            let msg = format!("prefill at {addr} is unreachable: {reason}");
                            let failed = s.decode.lock().unwrap_or_else(|e| e.into_inner()).fail_bootstrap(addr, &msg);
                            tracing::error!(bootstrap = %addr, rooms = failed, "prefill declared dead");
                            s.parallel.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
                            s.pools.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !k.starts_with(&format!("{addr}_")));
                            failures.remove(addr);
                        }
                    }
                }
            }
        }
    });
    match handle {
        Ok(h) => *shared.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
        Err(e) => tracing::error!(error = %e, "heartbeat thread did not start"),
    }
}
