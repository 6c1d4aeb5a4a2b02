//! Helpers shared by the tests of several crates. Never a dependency of shipped code.
//!
//! - [`free_port`]: loopback ports nothing else takes;
//! - [`wait_until`] / [`wait_for`] / [`wait_until_blocking`]: wait on a condition with a
//!   deadline, naming what was awaited when it expires (tests never assert on elapsed
//!   time);
//! - [`watchdog`]: a per-test deadline, so a hung test fails in minutes instead of
//!   eating the CI budget;
//! - [`env`]: child processes started without the caller's `NXCACHE_*` / `OTEL_*`
//!   variables, nested `cargo` runs without the outer cargo's.

pub mod env;
mod wait;
pub mod watchdog;

pub use wait::{PATIENCE, wait_for, wait_until, wait_until_blocking};

pub mod pki;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports handed out lie in `[FIRST, FIRST + SPAN)`, below Linux's default ephemeral
/// range (32768-60999): the kernel gives those to outgoing connections and to `bind` on
/// port 0. A port the test reserves now and a node binds later (or binds again after a
/// restart) could otherwise be taken in between by any client socket of the same test
/// run, which made cluster tests fail with "address in use" under load.
const FIRST: u32 = 12_000;
const SPAN: u32 = 20_000;

/// A loopback port that is free now and that neither the kernel nor another call of
/// this function (in this process) will hand out. Test binaries running at the same time
/// start at different places, and a port in use is skipped.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "every test port is taken");
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
        for port in ports {
            assert!((FIRST..FIRST + SPAN).contains(&u32::from(port)), "{port}");
            assert!(port < 32_768);
        }
        let port = free_port();
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
