//! Which per-endpoint series leave the scrape: those of endpoints the
//! directory knew and reports gone, once their counters have stopped
//! moving for a grace period. The grace keeps a deleted pod's final
//! increments in the scrape long enough for every scraper to read them
//! once; the kernel's per-endpoint counters are never evicted, so without
//! this a deleted pod's series would stay forever.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

/// How long a gone endpoint's series stay after their last change: longer
/// than any sensible scrape interval, so a final increment is read.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Retiring {
    total: u64,
    unchanged_since: Instant,
}

/// State across scrapes of the endpoints that are gone.
#[derive(Debug)]
pub struct SeriesRetirement {
    grace: Duration,
    retiring: HashMap<u16, Retiring>,
}

impl Default for SeriesRetirement {
    fn default() -> SeriesRetirement {
        SeriesRetirement::new(DEFAULT_GRACE)
    }
}

impl SeriesRetirement {
    pub fn new(grace: Duration) -> SeriesRetirement {
        SeriesRetirement { grace, retiring: HashMap::new() }
    }

    /// The endpoints whose series to leave out at `now`, from this scrape's
    /// (endpoint ID, sum of its counters) and the directory's word on
    /// which IDs are gone. An endpoint whose counters move again is back.
    pub fn retired(
        &mut self,
        now: Instant,
        endpoints: impl IntoIterator<Item = (u16, u64)>,
        is_gone: impl Fn(u16) -> bool,
    ) -> HashSet<u16> {
        let mut out = HashSet::new();
        let mut seen = HashSet::new();
        for (id, total) in endpoints {
            seen.insert(id);
            if !is_gone(id) {
                self.retiring.remove(&id);
                continue;
            }
            let r = self.retiring.entry(id).or_insert(Retiring { total, unchanged_since: now });
            if r.total != total {
                *r = Retiring { total, unchanged_since: now };
            }
            if now.saturating_duration_since(r.unchanged_since) >= self.grace {
                out.insert(id);
            }
        }
        self.retiring.retain(|id, _| seen.contains(id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_and_quiet_for_the_grace_period() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = SeriesRetirement::new(s(60));
        let gone = |id: u16| id == 7;
        assert!(r.retired(t0, [(7, 10), (8, 5)], gone).is_empty(), "a final increment is still scraped");
        assert!(r.retired(t0 + s(59), [(7, 10), (8, 5)], gone).is_empty());
        assert_eq!(r.retired(t0 + s(60), [(7, 10), (8, 5)], gone), HashSet::from([7]));
        // Late counts for the gone ID: the series comes back, and leaves
        // again a grace period after its last change.
        assert!(r.retired(t0 + s(70), [(7, 11), (8, 5)], gone).is_empty());
        assert_eq!(r.retired(t0 + s(130), [(7, 11), (8, 5)], gone), HashSet::from([7]));
        // Reused by a new owner (no longer gone): exported again.
        assert!(r.retired(t0 + s(140), [(7, 11)], |_| false).is_empty());
        assert!(r.retired(t0 + s(141), [(7, 11)], gone).is_empty(), "the grace starts over");
        // Never known to the directory: never gone, never retired.
        assert!(r.retired(t0 + s(999), [(9, 1)], |_| false).is_empty());
    }
}
