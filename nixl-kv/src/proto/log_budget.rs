//! Bounds on the log lines a peer can cause. A core owns no clock, so the window runs on the
//! `now` its callers pass: at most `burst` lines of one budget per [`WINDOW`], each logged line
//! counting the events left out since the last one.

use std::time::{Duration, Instant};

/// How long one budget's burst lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// One kind of peer-triggered log line.
#[derive(Debug)]
pub(crate) struct LogBudget {
    burst: u32,
    start: Option<Instant>,
    in_window: u32,
    left_out: u64,
}

impl LogBudget {
    /// `burst` lines per [`WINDOW`].
    pub(crate) const fn new(burst: u32) -> Self {
        Self {
            burst,
            start: None,
            in_window: 0,
            left_out: 0,
        }
    }

    /// `Some(n)`: log this event, `n` having been left out since the last logged one; `None`:
    /// leave it out.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .start
            .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW)
        {
            self.start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.left_out))
        } else {
            self.left_out += 1;
            None
        }
    }
}

/// `tracing::warn!` through a [`LogBudget`]: `peer_warn!(budget, now, fields..., "message")`.
macro_rules! peer_warn {
    ($budget:expr, $now:expr, $($arg:tt)+) => {
        if let Some(left_out) = $budget.admit($now) {
            tracing::warn!(left_out, $($arg)+);
        }
    };
}
pub(crate) use peer_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let mut b = LogBudget::new(3);
        let t0 = Instant::now();
        let logged: Vec<_> = (0..10).map(|_| b.admit(t0)).collect();
        assert_eq!(logged[..3], [Some(0), Some(0), Some(0)]);
        assert!(logged[3..].iter().all(Option::is_none));
        assert_eq!(b.admit(t0 + WINDOW), Some(7));
        assert_eq!(b.admit(t0 + WINDOW), Some(0));
        // A clock that goes backwards (callers pass their own) does not open a window.
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0), None);
    }
}
