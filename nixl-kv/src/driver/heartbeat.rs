//! Decode-side heartbeats: the core says which bootstrap servers are due; this thread asks
//! each one's `/health` and reports the answer. Counting failures and failing rooms is the
//! core's (see `DecodeCore::heartbeat_result`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::{Shared, lock};
use crate::error::Error;
use crate::net::bootstrap::{BootstrapClient, Health};
use crate::proto::decode::Heartbeat;

pub(crate) fn start(shared: &Arc<Shared>) -> Result<(), Error> {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let interval = shared.config.heartbeat_interval;
    let handle = std::thread::Builder::new()
        .name("kv-heartbeat".into())
        .spawn(move || {
            loop {
                // The core says when the next round is due; a stop wakes the thread earlier.
                loop {
                    let Some(s) = weak.upgrade() else { return };
                    if s.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(d) = s.decode() else { return };
                    let deadline = lock(&d.core).poll_timeout();
                    drop(s);
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::park_timeout(deadline - now);
                }
                let Some(s) = weak.upgrade() else { return };
                let Some(d) = s.decode() else { return };
                let due = lock(&d.core).heartbeat_due(Instant::now());
                // Re-checks of cached rank entries share one deadline per round, so a server
                // naming many slow ranks cannot hold the other prefills' heartbeats.
                let round_deadline = Instant::now() + s.config.bootstrap_deadline;
                for addr in due {
                    let client =
                        BootstrapClient::new(addr.as_str(), s.config.http_timeout.min(interval));
                    let outcome = match client.health() {
                        Health::Up => Heartbeat::Up,
                        Health::NoRoute => Heartbeat::NoRoute,
                        Health::Down(reason) => Heartbeat::Down(reason),
                    };
                    lock(&d.core).heartbeat_result(&addr, outcome);
                    // The core says which cached pool entries to look up again.
                    let checks = lock(&d.core).take_pool_checks();
                    for (key, ranks) in checks {
                        let now = super::receiver::lookup_ranks(&ranks, round_deadline, |r| {
                            client.rank_info(r, key.dp_group).map_err(|e| e.to_string())
                        });
                        lock(&d.core).pool_checked(&key, now);
                    }
                }
            }
        })
        .map_err(|source| Error::Thread {
            name: "kv-heartbeat",
            source,
        })?;
    lock(&shared.threads).push(handle);
    Ok(())
}
