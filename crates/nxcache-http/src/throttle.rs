//! Failed authentication, limited per client address: a client that keeps presenting
//! wrong tokens (guessing, or a misconfigured job in a loop) gets 429 with Retry-After
//! instead of another token lookup and another audit line, while requests with a valid
//! token from the same address (a shared NAT, a proxy) are never held back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use nxcache_auth::bearer_token;
use nxcache_telemetry::{AuditLimiter, Bucket};
use prometheus::{IntCounter, Registry};

use crate::ApiState;
use crate::error::ApiError;

/// The address a request came from, put in its extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Failed authentications an address may make at once, then per second.
const FAILURE_BURST: f64 = 20.0;
const FAILURES_PER_SECOND: f64 = 1.0;
/// Addresses remembered at most; beyond them, new addresses share one bucket (so the
/// table stays bounded while a flood comes from many addresses).
const MAX_TRACKED: usize = 65_536;

/// IPv6 clients get whole /64s: one host usually holds one, and could otherwise change
/// address for every attempt.
fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The failure budgets of client addresses, with the metrics and the audit limit.
#[derive(Clone)]
pub struct AuthThrottle {
    buckets: Arc<Mutex<HashMap<IpAddr, Bucket>>>,
    failures: IntCounter,
    throttled: IntCounter,
    audit: AuditLimiter,
}

/// Stands for every address beyond [`MAX_TRACKED`].
const OVERFLOW: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

impl AuthThrottle {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let failures = IntCounter::new(
            "nxcache_http_auth_failures_total",
            "Requests answered 401 (no, malformed or unknown token).",
        )?;
        let throttled = IntCounter::new(
            "nxcache_http_auth_throttled_total",
            "Requests answered 429 because their address failed authentication too often.",
        )?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(throttled.clone()))?;
        Ok(AuthThrottle {
            buckets: Arc::new(Mutex::new(HashMap::new())),
            failures,
            throttled,
            audit: AuditLimiter::register(registry, "http_auth")?,
        })
    }

    /// Seconds until `addr` may fail again, if it has used up its failures.
    fn blocked(&self, addr: IpAddr, now: Instant) -> Option<u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = if buckets.contains_key(&addr) {
            addr
        } else {
            OVERFLOW
        };
        let wait = buckets
            .get_mut(&key)?
            .wait(FAILURE_BURST, FAILURES_PER_SECOND, now);
        (!wait.is_zero()).then(|| wait.as_secs_f64().ceil() as u64)
    }

    /// Records a failure of `addr`.
    fn failed(&self, addr: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&addr) && buckets.len() >= MAX_TRACKED {
            // Forget the addresses whose budget is whole again before giving up on one.
            buckets.retain(|_, b| !b.is_full(FAILURE_BURST, FAILURES_PER_SECOND, now));
        }
        let key = if buckets.contains_key(&addr) || buckets.len() < MAX_TRACKED {
            addr
        } else {
            OVERFLOW
        };
        let bucket = buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(FAILURE_BURST, now));
        let _ = bucket.take(FAILURE_BURST, FAILURES_PER_SECOND, now);
    }
}

/// The middleware: refuses an address out of failures unless its request carries a valid
/// token, and counts the 401s of every address.
pub(crate) async fn guard(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let throttle = &state.metrics.auth_throttle;
    let Some(ClientAddr(peer)) = request.extensions().get::<ClientAddr>().copied() else {
        return next.run(request).await;
    };
    let addr = client_key(peer.ip());
    // Probes and an unauthenticated scrape present no credential to guess with: they are
    // answered even from an address out of failures (a scraper behind the same NAT).
    let probe = match request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str())
    {
        Some("/healthz" | "/readyz") => true,
        Some("/metrics") => !request.headers().contains_key(header::AUTHORIZATION),
        _ => false,
    };
    if !probe && let Some(retry) = throttle.blocked(addr, Instant::now()) {
        let valid = bearer_token(
            request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
        .is_ok_and(|token| state.auth.authenticate(token).is_some());
        if !valid {
            throttle.throttled.inc();
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Too many requests without a valid token from {addr}: try again in {retry} s with a token issued by this nxcache server (NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN)."
                ),
            )
            .retry_after(u32::try_from(retry).unwrap_or(u32::MAX))
            .into_response();
        }
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        throttle.failures.inc();
        throttle.failed(addr, Instant::now());
        if let Some(suppressed) = throttle.audit.admit() {
            tracing::warn!(
                target: "audit",
                action = "auth.failed",
                client = %peer.ip(),
                suppressed,
                "refused a request without a valid token ({suppressed} such lines left out before this one)"
            );
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_address_is_blocked_after_its_burst_and_freed_by_time() {
        let throttle = AuthThrottle::register(&Registry::new()).unwrap();
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..20 {
            assert_eq!(throttle.blocked(a, now), None);
            throttle.failed(a, now);
        }
        assert_eq!(throttle.blocked(a, now), Some(1));
        assert_eq!(
            throttle.blocked(b, now),
            None,
            "another address is not held"
        );
        assert_eq!(throttle.blocked(a, now + Duration::from_secs(1)), None);
    }

    #[test]
    fn ipv6_clients_are_grouped_by_their_64() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_key(one), client_key(other));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_table_stays_bounded_under_many_addresses() {
        let throttle = AuthThrottle::register(&Registry::new()).unwrap();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            throttle.failed(IpAddr::V4(i.into()), now);
        }
        let len = throttle.buckets.lock().unwrap().len();
        assert!(len <= MAX_TRACKED + 1, "{len}");
    }
}
