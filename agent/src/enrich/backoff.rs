//! Retry delays for the enrichment sources: exponential with jitter, capped,
//! reset after a success.
//!
//! Why not kube-runtime's `StreamBackoff` (`.default_backoff()`): it resets
//! on every `Ok` item, and the watcher yields `Ok(Event::Init)` before each
//! relist attempt, so against an API server that refuses connections the
//! delay never grew past its first step (about 1.2 s: 0.8 s plus jitter).

use std::time::Duration;

use backon::BackoffBuilder;

/// How long to wait before the next attempt after consecutive failures.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: backon::ExponentialBuilder,
    current: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays start in `[initial, 2 * initial)` and double per failure;
    /// none exceeds `max`. Jitter (each delay drawn from `[d, 2d)`) keeps
    /// the agents of a cluster from retrying in step after a shared outage.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        // backon's jitter adds up to 100 % on top of a delay capped at its
        // maximum: cap at half so that the jittered delay stays below `max`.
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay((max / 2).max(initial))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff { current: builder.build(), builder, max }
    }

    /// The delay before the next attempt; grows with each call.
    pub fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(self.max).min(self.max)
    }

    /// After a success: the next failure starts from the initial delay.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_caps_and_resets() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut b = Backoff::new(initial, max);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= initial && delays[0] < 2 * initial, "{delays:?}");
        // Doubling: step n lies in [2^n, 2^(n+1)) seconds until the cap.
        for (n, d) in delays.iter().enumerate().take(5) {
            let low = initial * (1 << n);
            assert!(*d >= low && *d < 2 * low, "step {n}: {d:?} in {delays:?}");
        }
        assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
        assert!(delays[11] >= max / 2, "capped near the maximum: {delays:?}");
        b.reset();
        assert!(b.next_delay() < 2 * initial, "reset starts over");
    }

    #[test]
    fn jitter_spreads_agents() {
        let draws: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).next_delay()).collect();
        assert!(draws.len() > 10, "20 agents should not retry in step: {draws:?}");
    }
}
