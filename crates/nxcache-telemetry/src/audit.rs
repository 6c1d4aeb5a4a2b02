//! Rate limits for what a stranger can make a node do cheaply: audit lines (each one a
//! write to the log) and, in the HTTP API, failed authentication.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, Opts, Registry};

/// A token bucket: `burst` at once, then `per_second` on average.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, burst: f64, per_second: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.updated = now;
    }

    /// Takes one token if there is one; otherwise returns how long until there is.
    pub fn take(&mut self, burst: f64, per_second: f64, now: Instant) -> Result<(), Duration> {
        self.refill(burst, per_second, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }

    /// How long until a token is there (zero when one is), without taking it.
    pub fn wait(&mut self, burst: f64, per_second: f64, now: Instant) -> Duration {
        self.refill(burst, per_second, now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / per_second)
        }
    }

    /// Whether it has refilled to `burst` (nothing to remember about its owner).
    pub fn is_full(&mut self, burst: f64, per_second: f64, now: Instant) -> bool {
        self.refill(burst, per_second, now);
        self.tokens >= burst
    }
}

/// Audit lines a source may write at once, then per second.
const AUDIT_BURST: f64 = 20.0;
const AUDIT_PER_SECOND: f64 = 5.0;

/// Limits the audit lines of one source (failed logins, refused inter-node calls), so
/// that a flood of bad requests cannot flood the log: beyond the limit lines are
/// counted, not written, and the next line written says how many were left out.
#[derive(Clone)]
pub struct AuditLimiter {
    state: Arc<Mutex<(Bucket, u64)>>,
    suppressed: IntCounter,
}

impl AuditLimiter {
    /// Registers `nxcache_audit_lines_suppressed_total{source}` in `registry`.
    pub fn register(registry: &Registry, source: &str) -> prometheus::Result<Self> {
        let suppressed = IntCounter::with_opts(
            Opts::new(
                "nxcache_audit_lines_suppressed_total",
                "Audit lines left out by the rate limit (the next line written gives their number), by source.",
            )
            .const_label("source", source),
        )?;
        registry.register(Box::new(suppressed.clone()))?;
        Ok(AuditLimiter {
            state: Arc::new(Mutex::new((Bucket::full(AUDIT_BURST, Instant::now()), 0))),
            suppressed,
        })
    }

    /// `Some(n)`: write the line, and say that `n` lines were left out since the last one
    /// written. `None`: leave it out (it is counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (bucket, left_out) = &mut *state;
        match bucket.take(AUDIT_BURST, AUDIT_PER_SECOND, now) {
            Ok(()) => Some(std::mem::take(left_out)),
            Err(_) => {
                *left_out += 1;
                self.suppressed.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut b = Bucket::full(3.0, start);
        for _ in 0..3 {
            assert!(b.take(3.0, 2.0, start).is_ok());
        }
        let wait = b.take(3.0, 2.0, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(!b.is_full(3.0, 2.0, start));
        let later = start + Duration::from_millis(500);
        assert!(b.take(3.0, 2.0, later).is_ok());
        assert!(b.is_full(3.0, 2.0, later + Duration::from_secs(2)));
    }

    #[test]
    fn audit_lines_beyond_the_limit_are_counted_and_reported_with_the_next() {
        let registry = Registry::new();
        let limiter = AuditLimiter::register(&registry, "test").unwrap();
        let start = Instant::now();
        let written = (0..100)
            .filter(|_| limiter.admit_at(start).is_some())
            .count();
        assert_eq!(written, 20);
        assert_eq!(limiter.suppressed.get(), 80);
        // A quarter of a second later there is room for one line, which carries the count.
        let later = start + Duration::from_millis(250);
        assert_eq!(limiter.admit_at(later), Some(80));
        assert_eq!(limiter.admit_at(later), None);
        // A second source registers beside it.
        AuditLimiter::register(&registry, "other").unwrap();
    }
}
