//! Limits preauth guessing per address, in bounded memory.
//!
//! Each address gets a window that opens at its first failed preauth. The `max`-th failure
//! within `period` seconds locks the address: it is refused — valid token or not — for
//! `period` seconds from that failure. IPv6 addresses count per /64 (what one subscriber
//! gets), IPv4 per address, and an IPv4 address written as IPv6 (`::ffff:a.b.c.d`) as that
//! IPv4 address. At most `capacity` addresses are tracked: when full, closed windows are
//! dropped first, then the oldest ones, so an attacker with many addresses costs bounded
//! memory (and at worst frees the budget of the oldest address, never grants anything).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

#[derive(Clone, Copy, Debug)]
struct Window {
    opened: i64,
    failures: u32,
    /// Refused until then (set by the `max`-th failure).
    locked_until: Option<i64>,
}

impl Window {
    /// When this window stops mattering: the end of its period or of its lock.
    fn ends(&self, period: i64) -> i64 {
        let open_until = self.opened.saturating_add(period);
        self.locked_until.map_or(open_until, |l| l.max(open_until))
    }
}

#[derive(Debug)]
pub struct Throttle {
    max: u32,
    period: i64,
    capacity: usize,
    windows: HashMap<String, Window>,
}

/// Longest address text kept as a key: anything longer is not an IP address, and is cut so
/// that odd input cannot make a key large.
const MAX_KEY: usize = 64;

/// The key `address` is counted under: an IPv6 address's /64 prefix, an IPv4 address
/// (also when written as IPv6), or the text itself (cut to `MAX_KEY` bytes) if it is not an
/// IP address.
pub fn address_key(address: &str) -> String {
    match address.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
        Err(_) => {
            let mut end = address.len().min(MAX_KEY);
            while !address.is_char_boundary(end) {
                end -= 1;
            }
            address[..end].to_owned()
        }
    }
}

impl Throttle {
    pub fn new(max: u32, period: i64, capacity: usize) -> Throttle {
        Throttle {
            max: max.max(1),
            period: period.max(1),
            capacity: capacity.max(1),
            windows: HashMap::new(),
        }
    }

    /// Is `address` allowed to try a token now?
    pub fn allows(&self, address: &str, now: i64) -> bool {
        match self.windows.get(&address_key(address)) {
            Some(Window {
                locked_until: Some(until),
                ..
            }) => now >= *until,
            _ => true,
        }
    }

    /// Seconds until `address` may try again (at least 1), or `None` if it may now.
    pub fn retry_after(&self, address: &str, now: i64) -> Option<i64> {
        match self.windows.get(&address_key(address)) {
            Some(Window {
                locked_until: Some(until),
                ..
            }) if now < *until => Some(until - now),
            _ => None,
        }
    }

    /// Counts a failed attempt from `address`.
    pub fn failed(&mut self, address: &str, now: i64) {
        let key = address_key(address);
        let (max, period) = (self.max, self.period);
        if !self.windows.contains_key(&key) && self.windows.len() >= self.capacity {
            self.make_room(now);
        }
        let w = self.windows.entry(key).or_insert(Window {
            opened: now,
            failures: 0,
            locked_until: None,
        });
        if now >= w.ends(period) {
            *w = Window {
                opened: now,
                failures: 0,
                locked_until: None,
            };
        }
        w.failures = w.failures.saturating_add(1);
        if w.failures >= max && w.locked_until.is_none_or(|l| l <= now) {
            w.locked_until = Some(now.saturating_add(period));
        }
    }

    /// Drops ended windows, then (if still full) the eighth that ends first, so the cost of
    /// a full table is paid once per `capacity / 8` new addresses, not per address.
    fn make_room(&mut self, now: i64) {
        let period = self.period;
        self.windows.retain(|_, w| now < w.ends(period));
        if self.windows.len() < self.capacity {
            return;
        }
        let mut by_end: Vec<(i64, String)> = self
            .windows
            .iter()
            .map(|(k, w)| (w.ends(period), k.clone()))
            .collect();
        by_end.sort_unstable();
        let evict = (self.capacity / 8).max(1);
        for (_, k) in by_end.into_iter().take(evict) {
            self.windows.remove(&k);
        }
    }

    /// Addresses currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engages_after_max_failures_and_lifts_after_the_period() {
        let mut t = Throttle::new(3, 60, 100);
        for _ in 0..3 {
            assert!(t.allows("1.2.3.4", 100));
            t.failed("1.2.3.4", 100);
        }
        assert!(!t.allows("1.2.3.4", 101));
        assert!(!t.allows("1.2.3.4", 159));
        assert!(t.allows("5.6.7.8", 101));
        assert!(t.allows("1.2.3.4", 160));
        t.failed("1.2.3.4", 160);
        assert!(t.allows("1.2.3.4", 160));
    }

    #[test]
    fn the_lock_lasts_a_whole_period_from_the_failure_that_set_it() {
        let mut t = Throttle::new(3, 60, 100);
        t.failed("1.2.3.4", 0);
        t.failed("1.2.3.4", 0);
        t.failed("1.2.3.4", 59); // the third, just inside the window
        assert!(!t.allows("1.2.3.4", 60));
        assert!(!t.allows("1.2.3.4", 118));
        assert_eq!(t.retry_after("1.2.3.4", 60), Some(59));
        assert_eq!(t.retry_after("1.2.3.4", 118), Some(1));
        assert!(t.allows("1.2.3.4", 119));
        assert_eq!(t.retry_after("1.2.3.4", 119), None);
        assert_eq!(t.retry_after("5.6.7.8", 60), None);
        // After the lock, counting starts afresh.
        t.failed("1.2.3.4", 119);
        assert!(t.allows("1.2.3.4", 120));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let mut t = Throttle::new(2, 60, 100);
        t.failed("2001:db8:1:2::1", 0);
        t.failed("2001:db8:1:2:ffff:0:0:99", 0);
        assert!(!t.allows("2001:db8:1:2::abcd", 1));
        assert!(t.allows("2001:db8:1:3::1", 1));

        t.failed("::ffff:192.0.2.7", 0);
        t.failed("192.0.2.7", 0);
        assert!(!t.allows("192.0.2.7", 1));
        assert!(t.allows("192.0.2.8", 1));
        assert_eq!(t.tracked(), 2);
    }

    #[test]
    fn address_keys() {
        assert_eq!(address_key("2001:DB8::1"), "2001:db8::/64");
        assert_eq!(address_key("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(address_key(" 10.0.0.1 "), "10.0.0.1");
        assert_eq!(address_key("unknown"), "unknown");
        assert_eq!(address_key(&"é".repeat(100)).len(), 64);
    }

    #[test]
    fn memory_stays_bounded_under_many_addresses() {
        let mut t = Throttle::new(10, 60, 1000);
        for i in 0..100_000 {
            t.failed(
                &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                100 + i / 1000,
            );
            assert!(t.tracked() <= 1000);
        }
        assert!(t.tracked() > 800);
    }

    #[test]
    fn an_engaged_address_survives_a_flood_of_new_ones_while_it_is_younger() {
        let mut t = Throttle::new(2, 60, 10);
        for i in 0..9 {
            t.failed(&format!("old{i}"), 0);
        }
        t.failed("attacker", 10);
        t.failed("attacker", 10);
        for i in 0..5 {
            t.failed(&format!("new{i}"), 20);
        }
        assert!(!t.allows("attacker", 21));
    }
}
