//! Accepting under a cap of connections, and rate-limited logging of what peers trigger:
//! shared by the PULL listener and the bootstrap server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::proto::log_budget::LogBudget;
use tokio::sync::Semaphore;

/// Pause after an accept error such as `EMFILE`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections under a cap of concurrent ones. Accept errors (EMFILE and the like)
/// back off; connections past the cap are closed at once; both are logged at most once per
/// 5 s ([`RateLog`]). The accept loop itself never ends on either.
pub(crate) struct AcceptGate {
    permits: Arc<Semaphore>,
    cap: usize,
    what: &'static str,
    refused: RateLog,
    failed: RateLog,
}

impl AcceptGate {
    pub(crate) fn new(cap: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            what,
            refused: RateLog::new(1),
            failed: RateLog::new(1),
        }
    }

    /// The next connection and its permit (held while it is served), or `None` after an error
    /// or a refusal.
    pub(crate) async fn accept(
        &mut self,
        listener: &TcpListener,
    ) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                if let Some(n) = self.failed.tick() {
                    tracing::warn!(error = %e, suppressed = n, "{} accept failed; backing off", self.what);
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                return None;
            }
        };
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            if let Some(n) = self.refused.tick() {
                tracing::warn!(
                    %peer,
                    cap = self.cap,
                    suppressed = n,
                    "{} at its connection cap; connection closed",
                    self.what
                );
            }
            drop(stream);
            return None;
        };
        Some((stream, peer, permit))
    }
}

/// Rate-limits a kind of log line that peers can trigger: at most `burst` lines per
/// [`WINDOW`](crate::proto::log_budget::WINDOW), counting the ones left out (the cores'
/// [`LogBudget`] on this thread's clock).
#[derive(Debug)]
pub(crate) struct RateLog(LogBudget);

impl RateLog {
    pub(crate) const fn new(burst: u32) -> Self {
        Self(LogBudget::new(burst))
    }

    /// `Some(n)`: log this one, `n` having been left out since the last logged one.
    pub(crate) fn tick(&mut self) -> Option<u64> {
        self.0.admit(Instant::now())
    }
}

/// [`RateLog::tick`] through a shared lock.
pub(crate) fn tick(log: &Mutex<RateLog>) -> Option<u64> {
    log.lock().unwrap_or_else(|p| p.into_inner()).tick()
}
