//! At most one log line per key per interval, so that a flood — of connections refused
//! by a limit, of failed accepts while the node is out of file descriptors — cannot flood
//! the log too: what it writes is bounded by the number of keys, not by the flood. The
//! metric that goes with each line counts every event; the log only says that it happens
//! and what to do about it.
//!
//! Invariants:
//! - The first line about a key is always written; the next ones within the interval are
//!   held back, and counted: the next line written says how many were.
//! - The map holds one entry per key ever seen, so keys must come from a small fixed set
//!   (an enum, a listener kind), never from addresses or names that a peer chooses.
use std::{collections::HashMap, hash::Hash, sync::Mutex, time::Duration};

// tokio's clock: the real one, but tests that pause time see lines held back by it.
use tokio::time::Instant;

/// The interval of the agent's rate-limited lines.
pub const EVERY_SECOND: Duration = Duration::from_secs(1);

/// When each key was last logged, and what was held back since.
#[derive(Debug)]
pub struct LogLimit<K> {
    every: Duration,
    keys: Mutex<HashMap<K, Window>>,
}

#[derive(Debug)]
struct Window {
    logged_at: Instant,
    held_back: u64,
}

impl<K: Eq + Hash> LogLimit<K> {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            keys: Mutex::default(),
        }
    }

    /// At most one line per key a second.
    pub fn per_second() -> Self {
        Self::new(EVERY_SECOND)
    }

    /// Whether a line about `key` may be written now; if so, how many lines about it were
    /// held back since the last one written (say so in the line).
    pub fn allow(&self, key: K) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: K, now: Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(&key) {
            Some(window) if now.duration_since(window.logged_at) < self.every => {
                window.held_back += 1;
                None
            }
            Some(window) => {
                window.logged_at = now;
                Some(std::mem::take(&mut window.held_back))
            }
            None => {
                keys.insert(
                    key,
                    Window {
                        logged_at: now,
                        held_back: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_interval_and_the_next_one_counts_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(1));
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(limit.allow_at("a", at(0)), Some(0), "the first line");
        assert_eq!(limit.allow_at("b", at(1)), Some(0), "keys are apart");
        for ms in [10, 500, 999] {
            assert_eq!(limit.allow_at("a", at(ms)), None);
        }
        assert_eq!(limit.allow_at("a", at(1000)), Some(3), "three held back");
        assert_eq!(limit.allow_at("a", at(1500)), None);
        assert_eq!(limit.allow_at("a", at(5000)), Some(1));
        assert_eq!(limit.allow_at("b", at(5000)), Some(0));
        assert_eq!(limit.keys.lock().unwrap().len(), 2, "one entry per key");
    }
}
