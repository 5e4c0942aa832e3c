//! Limits preauth guessing per IP address, in bounded memory.
//!
//! Each address gets a window that opens at its first failed preauth. After `max` failures
//! within `period` seconds the address is refused — valid token or not — until the window
//! closes. At most `capacity` addresses are tracked: when full, closed windows are dropped
//! first, then the oldest window, so an attacker with many addresses costs bounded memory
//! (and at worst frees the budget of the oldest address, never grants anything).

use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
struct Window {
    opened: i64,
    failures: u32,
}

#[derive(Debug)]
pub struct Throttle {
    max: u32,
    period: i64,
    capacity: usize,
    windows: HashMap<String, Window>,
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
        match self.windows.get(address) {
            Some(w) if now < w.opened.saturating_add(self.period) => w.failures < self.max,
            _ => true,
        }
    }

    /// Counts a failed attempt from `address`.
    pub fn failed(&mut self, address: &str, now: i64) {
        if let Some(w) = self.windows.get_mut(address) {
            if now < w.opened.saturating_add(self.period) {
                w.failures = w.failures.saturating_add(1);
            } else {
                *w = Window {
                    opened: now,
                    failures: 1,
                };
            }
            return;
        }
        if self.windows.len() >= self.capacity {
            self.make_room(now);
        }
        self.windows.insert(
            address.to_owned(),
            Window {
                opened: now,
                failures: 1,
            },
        );
    }

    /// Drops closed windows, then (if still full) the oldest eighth of the windows, so the
    /// cost of a full table is paid once per `capacity / 8` new addresses, not per address.
    fn make_room(&mut self, now: i64) {
        let period = self.period;
        self.windows
            .retain(|_, w| now < w.opened.saturating_add(period));
        if self.windows.len() < self.capacity {
            return;
        }
        let mut by_age: Vec<(i64, String)> = self
            .windows
            .iter()
            .map(|(k, w)| (w.opened, k.clone()))
            .collect();
        by_age.sort_unstable();
        let evict = (self.capacity / 8).max(1);
        for (_, k) in by_age.into_iter().take(evict) {
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
