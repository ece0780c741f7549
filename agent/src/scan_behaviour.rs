//! Telling internet scans from real use of a port, by behaviour.
//!
//! A scanner touches many ports in a short time, each a few times (one SYN
//! per port: one audited or denied verdict). Counting a port's lifetime
//! notifications cannot tell that apart from a quiet real service: a
//! scanner that comes back every hour makes every port it probes look used.
//! So each growth of a world port's count is judged when it happens: growth
//! while at least [`BURST_PORTS`] world ports grew within [`BURST_WINDOW`]
//! and by at most [`BURST_MAX_PER_PORT`] notifications is scan-like; any
//! other growth is real use, and marks the port *service-like* for good. A
//! port only ever touched by scan-like growth is noise, however often the
//! scanner returns; a real service on a high port is not.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, SystemTime},
};

/// Distinct world ports growing within [`BURST_WINDOW`] that make a burst.
pub const BURST_PORTS: usize = 10;
/// How far back a burst reaches.
pub const BURST_WINDOW: Duration = Duration::from_secs(60);
/// More notifications than this on one port in one read is real use, burst
/// or not (a scanner probes a port once or a few times).
pub const BURST_MAX_PER_PORT: u64 = 3;

#[derive(Debug, Default)]
pub struct ScanBehaviour {
    /// When each port last grew, oldest first (for the window).
    recent: VecDeque<(SystemTime, (u8, u16))>,
    last_grew: HashMap<(u8, u16), SystemTime>,
    service_like: HashSet<(u8, u16)>,
}

impl ScanBehaviour {
    /// One read's growth per (protocol, port); returns the ports newly
    /// judged service-like.
    pub fn observe(&mut self, grown: &[(u8, u16, u64)], at: SystemTime) -> Vec<(u8, u16)> {
        for &(proto, port, _) in grown {
            self.last_grew.insert((proto, port), at);
            self.recent.push_back((at, (proto, port)));
        }
        let horizon = at.checked_sub(BURST_WINDOW).unwrap_or(SystemTime::UNIX_EPOCH);
        while let Some(&(t, p)) = self.recent.front() {
            if t >= horizon {
                break;
            }
            self.recent.pop_front();
            if self.last_grew.get(&p).is_some_and(|&last| last < horizon) {
                self.last_grew.remove(&p);
            }
        }
        let in_burst = self.last_grew.len() >= BURST_PORTS;
        let mut newly = Vec::new();
        for &(proto, port, growth) in grown {
            let scan_like = in_burst && growth <= BURST_MAX_PER_PORT;
            if !scan_like && self.service_like.insert((proto, port)) {
                newly.push((proto, port));
            }
        }
        newly
    }

    pub fn service_like(&self, proto: u8, port: u16) -> bool {
        self.service_like.contains(&(proto, port))
    }

    /// A judgement persisted by an earlier agent.
    pub fn restore_service_like(&mut self, proto: u8, port: u16) {
        self.service_like.insert((proto, port));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn scan(ports: std::ops::Range<u16>) -> Vec<(u8, u16, u64)> {
        ports.map(|p| (6, p, 1)).collect()
    }

    #[test]
    fn a_scanner_returning_every_hour_for_a_day_stays_noise() {
        let mut b = ScanBehaviour::default();
        for hour in 0..24 {
            // The scan spreads over three reads of 5 s.
            for read in 0..3u16 {
                let newly = b.observe(&scan(1000 + read * 400..1400 + read * 400), at(hour * 3600 + read as u64 * 5));
                assert!(newly.is_empty(), "hour {hour}: scan ports judged real use: {newly:?}");
            }
        }
        assert!(!b.service_like(6, 1028));
    }

    #[test]
    fn a_real_service_on_a_high_port_is_not_noise() {
        let mut b = ScanBehaviour::default();
        // A few connections per read, outside any burst.
        assert_eq!(b.observe(&[(6, 8443, 2)], at(0)), vec![(6, 8443)]);
        assert!(b.service_like(6, 8443));
        // Busy during a scan too: more than a probe's worth.
        let mut during = scan(2000..2100);
        during.push((6, 9443, 40));
        assert_eq!(b.observe(&during, at(10)), vec![(6, 9443)]);
    }

    #[test]
    fn a_slow_scan_is_still_a_burst() {
        let mut b = ScanBehaviour::default();
        // Two ports per read: within the window the burst builds up; the
        // first reads (before it has 10 ports) count as real use, which is
        // the safe side (suggested, never hidden).
        let mut judged = 0;
        for read in 0..20u16 {
            judged += b.observe(&scan(3000 + read * 2..3002 + read * 2), at(read as u64 * 5)).len();
        }
        assert!(judged < 10, "{judged} ports of a slow scan judged real use");
    }
}
