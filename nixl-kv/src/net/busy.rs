//! Busy polling ([`crate::ManagerConfig::busy_poll`]): for a short window after traffic, a wait
//! polls without sleeping, so that the next message does not pay for waking a sleeping thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Calls `poll` until it gives a value or `window` has passed, yielding the core between
/// calls; `None` when the window passed without one (at once for a zero window).
pub(crate) fn poll_for<T>(window: Duration, mut poll: impl FnMut() -> Option<T>) -> Option<T> {
    if window.is_zero() {
        return None;
    }
    let until = Instant::now() + window;
    loop {
        if let Some(v) = poll() {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::yield_now();
    }
}

/// When traffic was last seen, readable from any thread.
pub(crate) struct Activity {
    base: Instant,
    /// Nanoseconds from `base` to the last [`Activity::touch`]; `u64::MAX`: never.
    last_ns: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            last_ns: AtomicU64::new(u64::MAX),
        }
    }

    /// Traffic now.
    pub(crate) fn touch(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    /// What is left of a `window` that opened at the last traffic (zero if none was seen).
    pub(crate) fn left(&self, window: Duration) -> Duration {
        let last = self.last_ns.load(Ordering::Relaxed);
        if last == u64::MAX || window.is_zero() {
            return Duration::ZERO;
        }
        let end = self.base + Duration::from_nanos(last) + window;
        end.saturating_duration_since(Instant::now())
    }
}

/// Keeps a current-thread tokio runtime polling its sockets, not parked, for a window after
/// each [`Hot::touch`]: a message arriving or sent within it is handled without waking the
/// thread from sleep.
pub(crate) struct Hot {
    activity: Activity,
    window: Duration,
    wake: Notify,
}

impl Hot {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            activity: Activity::new(),
            window,
            wake: Notify::new(),
        }
    }

    /// The window.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// Traffic now: the window (re)opens.
    pub(crate) fn touch(&self) {
        if !self.window.is_zero() {
            self.activity.touch();
            self.wake.notify_one();
        }
    }

    /// Run as a task on the runtime to keep hot; yields while the window is open, waits for
    /// the next touch once it has closed. Never ends (it goes with its runtime).
    pub(crate) async fn keep_polling(&self) {
        loop {
            if self.activity.left(self.window).is_zero() {
                self.wake.notified().await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    use super::{Activity, poll_for};

    #[test]
    fn a_zero_window_never_polls() {
        let calls = Cell::new(0);
        let got = poll_for(Duration::ZERO, || {
            calls.set(calls.get() + 1);
            Some(1)
        });
        assert_eq!((got, calls.get()), (None, 0));
    }

    #[test]
    fn polling_stops_at_the_first_value_or_at_the_end_of_the_window() {
        let calls = Cell::new(0);
        let got = poll_for(Duration::from_secs(5), || {
            calls.set(calls.get() + 1);
            (calls.get() == 3).then_some("third")
        });
        assert_eq!((got, calls.get()), (Some("third"), 3));
        let start = Instant::now();
        assert_eq!(poll_for(Duration::from_millis(20), || None::<()>), None);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn the_window_opens_at_the_last_touch_and_only_then() {
        let a = Activity::new();
        assert_eq!(a.left(Duration::from_secs(10)), Duration::ZERO);
        a.touch();
        let left = a.left(Duration::from_secs(10));
        assert!(left > Duration::from_secs(9) && left <= Duration::from_secs(10));
        assert_eq!(a.left(Duration::ZERO), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(a.left(Duration::from_millis(1)), Duration::ZERO);
    }
}
