//! Waiting on a condition: the one way tests deal with time. A test states what it waits
//! for and a deadline far above the normal case; it never asserts on how long something
//! took (that is a benchmark's job) or on which node ended up leading.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::watchdog;

/// A deadline far above what any single condition normally needs (elections, catch-up,
/// repairs take seconds on a loaded CI machine): long enough that only a real hang
/// reaches it, short enough that the test still fails well inside the per-test deadline.
pub const PATIENCE: Duration = Duration::from_secs(120);

const POLL_EVERY: Duration = Duration::from_millis(20);

/// Waits until `check` is true, polling; panics naming `what` (and how long it waited)
/// after `timeout`. While it waits, the [`watchdog`] knows what the test is waiting for.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let polled = check();
        async move { polled.await.then_some(()) }
    })
    .await
}

/// Waits until `check` yields a value and returns it, polling; panics naming `what` after
/// `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let _waiting = watchdog::waiting_for(what);
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`wait_until`] for code outside an async runtime.
pub fn wait_until_blocking(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let _waiting = watchdog::waiting_for(what);
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(POLL_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut polls = 0;
        let got = wait_for(PATIENCE, "the third poll", || {
            polls += 1;
            let n = polls;
            async move { (n == 3).then_some(n) }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for: a condition that never holds")]
    async fn names_what_was_awaited_when_the_deadline_passes() {
        wait_until(
            Duration::from_millis(50),
            "a condition that never holds",
            || async { false },
        )
        .await;
    }

    #[test]
    #[should_panic(expected = "waiting for: never, blocking")]
    fn the_blocking_wait_names_it_too() {
        wait_until_blocking(Duration::from_millis(50), "never, blocking", || false);
    }
}
