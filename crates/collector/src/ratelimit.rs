//! Per-key token buckets: `rate` requests per second on average, bursts up to `burst`.

use crate::auth::KeyId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets, one per API key. A `rate` of 0 turns limiting off.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<KeyId, Bucket>>,
}

impl RateLimiter {
    /// `rate` requests per second, bursts of `burst` (at least 1).
    pub fn new(rate: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate: if rate.is_finite() { rate.max(0.0) } else { 0.0 },
            burst: if burst.is_finite() {
                burst.max(1.0)
            } else {
                1.0
            },
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `Err(wait)` says how long until one is available.
    pub fn take(&self, key: &KeyId) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &KeyId, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        let b = buckets.entry(*key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

/// `Retry-After` in whole seconds for a wait (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_per_key() {
        let r = RateLimiter::new(10.0, 3.0);
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.take_at(&a, t0).is_ok());
        }
        let wait = r.take_at(&a, t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(r.take_at(&b, t0).is_ok(), "keys have their own buckets");
        assert!(r.take_at(&a, t0 + Duration::from_millis(101)).is_ok());
        assert!(r.take_at(&a, t0 + Duration::from_millis(102)).is_err());
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        let off = RateLimiter::new(0.0, 1.0);
        for _ in 0..1000 {
            assert!(off.take_at(&a, t0).is_ok());
        }
    }
}
