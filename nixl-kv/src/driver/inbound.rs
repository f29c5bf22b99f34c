//! The prefill's inbound thread: the ZeroMQ thread only queues raw frame sets (a bounded
//! crossbeam channel); this thread decodes them, applies them to the core, runs the commands
//! they cause (NIXL metadata loads stay off the socket's runtime) and runs the core's timeouts
//! when it says they are due, whether or not traffic arrives.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use nixl_wire::PrefillInbound;

use super::{Shared, exec, lock};
use crate::error::Error;
use crate::net::busy;
use crate::net::gate::{RateLog, tick};

/// Frame sets waiting for the inbound thread; past this a message is dropped (and logged), so
/// a flood cannot grow memory without bound.
const QUEUE: usize = 4096;

/// How often the agent is progressed when nothing else wakes the thread (freed-slot notices of
/// our decodes arrive as notifications).
const PROGRESS: Duration = Duration::from_secs(1);
/// How soon the inbound thread looks at posted requests again while any are in flight.
const REAP: Duration = Duration::from_micros(100);

pub(crate) fn queue() -> (Sender<Vec<Bytes>>, Receiver<Vec<Bytes>>) {
    channel::bounded(QUEUE)
}

/// Warnings of a full inbound queue, per 5 s (a flood of junk would write one per message).
static QUEUE_FULL: Mutex<RateLog> = Mutex::new(RateLog::new(5));

/// Called on the ZeroMQ thread for every message.
pub(crate) fn offer(tx: &Sender<Vec<Bytes>>, frames: Vec<Bytes>) {
    match tx.try_send(frames) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            if let Some(suppressed) = tick(&QUEUE_FULL) {
                tracing::warn!(
                    capacity = QUEUE,
                    suppressed,
                    "prefill inbound queue full; message dropped"
                );
            }
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

pub(crate) fn start(shared: &Arc<Shared>, rx: Receiver<Vec<Bytes>>) -> Result<(), Error> {
    let weak = Arc::downgrade(shared);
    let busy = shared.config.busy_poll;
    let handle = std::thread::Builder::new()
        .name("kv-inbound".into())
        .spawn(move || run(&weak, &rx, busy))
        .map_err(|source| Error::Thread {
            name: "kv-inbound",
            source,
        })?;
    lock(&shared.threads).push(handle);
    Ok(())
}

/// The next frame set within `wait`: polled without sleeping while the busy window that the
/// last message opened lasts, then waited for.
fn next(
    rx: &Receiver<Vec<Bytes>>,
    wait: Duration,
    spin: Duration,
) -> Result<Vec<Bytes>, RecvTimeoutError> {
    let polled = busy::poll_for(spin.min(wait), || match rx.try_recv() {
        Ok(frames) => Some(Ok(frames)),
        Err(TryRecvError::Disconnected) => Some(Err(RecvTimeoutError::Disconnected)),
        Err(TryRecvError::Empty) => None,
    });
    polled.unwrap_or_else(|| rx.recv_timeout(wait.saturating_sub(spin)))
}

/// Applies messages as they come; between them, sleeps until the core's next timeout
/// ([`crate::proto::prefill::PrefillCore::poll_timeout`]) or the next progress of the agent,
/// whichever is first.
fn run(weak: &Weak<Shared>, rx: &Receiver<Vec<Bytes>>, busy: Duration) {
    let mut malformed = RateLog::new(20);
    let mut next_progress = Instant::now() + PROGRESS;
    let mut next_timeout: Option<Instant> = None;
    // What is left of the busy window the last message opened.
    let mut spin = Duration::ZERO;
    // Requests were in flight at the last look: look again soon, so that a room's end (and the
    // `KV_STATUS` a 0.5.23 decode waits for) does not wait for its sender's next poll.
    let mut in_flight = false;
    loop {
        let mut wake = next_timeout.map_or(next_progress, |t| t.min(next_progress));
        if in_flight {
            wake = wake.min(Instant::now() + REAP);
        }
        let wait = wake.saturating_duration_since(Instant::now());
        let got = next(rx, wait, spin);
        let Some(s) = weak.upgrade() else { return };
        if s.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Some(p) = s.prefill() else { return };
        match got {
            Ok(frames) => match PrefillInbound::decode(&frames) {
                Ok(msg) => {
                    p.activity.touch();
                    lock(&p.core).handle_inbound(msg, Instant::now());
                }
                Err(e) => {
                    if let Some(suppressed) = malformed.tick() {
                        tracing::warn!(error = %e, suppressed, "malformed message from a decode; dropped");
                    }
                }
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if now >= next_progress {
            exec::progress(&s.agent, p);
            next_progress = now + PROGRESS;
        }
        if next_timeout.is_some_and(|t| now >= t) {
            let expired = lock(&p.core).handle_timeout(now);
            if expired > 0 {
                tracing::debug!(expired, "orphan rooms dropped");
            }
        }
        in_flight = exec::reap(p, None);
        exec::drive_prefill(&s);
        // After the commands ran: a room naming a decode whose metadata just loaded counts.
        p.arrivals.notify_all();
        next_timeout = lock(&p.core).poll_timeout();
        spin = p.activity.left(busy);
    }
}
