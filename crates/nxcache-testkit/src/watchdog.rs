//! A per-test deadline. A test that hangs (an await with no timeout, a child that never
//! answers) must fail within minutes and say what it was waiting for, not eat the CI
//! budget until the job is cancelled.
//!
//! [`arm`] registers the calling test (libtest runs each test on a thread named after
//! it); the registration ends when that thread ends, whether the test passed or
//! panicked. The shared helpers (cluster and node starters, [`crate::wait_until`]) arm it,
//! so tests need not. A watchdog thread checks the registered tests every second; once
//! one has run longer than [`limit`] it prints the test's name and every wait in
//! progress, SIGKILLs the child processes registered with [`adopt`], and exits the test
//! process with a failure: libtest cannot fail one test from another thread, and a
//! process stuck in a hang must not live on.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long one test may run unless `NXCACHE_TEST_DEADLINE_SECS` says otherwise. The
/// slowest tests take about two minutes on a loaded 2-core machine.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(10 * 60);

/// The per-test limit: `NXCACHE_TEST_DEADLINE_SECS` (whole seconds) or [`DEFAULT_LIMIT`].
pub fn limit() -> Duration {
    static LIMIT: OnceLock<Duration> = OnceLock::new();
    *LIMIT.get_or_init(|| match std::env::var("NXCACHE_TEST_DEADLINE_SECS") {
        Ok(secs) => Duration::from_secs(secs.trim().parse().unwrap_or_else(|_| {
            panic!("NXCACHE_TEST_DEADLINE_SECS must be a whole number of seconds, not {secs:?}")
        })),
        Err(_) => DEFAULT_LIMIT,
    })
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    tests: HashMap<u64, (String, Instant)>,
    waits: HashMap<u64, (String, String, Instant)>,
    children: Vec<u32>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("nxcache-test-watchdog".into())
                .spawn(watch)
                .expect("start the test watchdog");
            Mutex::default()
        })
        .lock()
        // A test that panicked while holding the lock left consistent data behind: every
        // update is a single insert or remove.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn thread_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("an unnamed thread")
        .to_owned()
}

/// Ends a registration (test, wait) when dropped.
struct Registered {
    id: u64,
    wait: bool,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut registry = registry();
        if self.wait {
            registry.waits.remove(&self.id);
        } else {
            registry.tests.remove(&self.id);
        }
    }
}

thread_local! {
    static ARMED: Option<Registered> = {
        let name = thread_name();
        // Only a test's own thread: not the process's main thread (it outlives every
        // test) nor a runtime's worker (it is not the test).
        (name != "main" && !name.starts_with("tokio-")).then(|| {
            let mut registry = registry();
            registry.next_id += 1;
            let id = registry.next_id;
            registry.tests.insert(id, (name, Instant::now()));
            Registered { id, wait: false }
        })
    };
}

/// Puts the calling test under the deadline (idempotent; cheap after the first call).
pub fn arm() {
    // During the thread's teardown the slot is gone; nothing to arm then.
    let _ = ARMED.try_with(|_| ());
}

/// Records that the calling test waits for `what` until the returned guard is dropped;
/// the watchdog prints it if the test runs out of time.
pub fn waiting_for(what: &str) -> impl Drop {
    arm();
    let mut registry = registry();
    registry.next_id += 1;
    let id = registry.next_id;
    registry
        .waits
        .insert(id, (thread_name(), what.to_owned(), Instant::now()));
    Registered { id, wait: true }
}

/// A child process to SIGKILL if the watchdog ends the test process.
pub fn adopt(pid: u32) {
    registry().children.push(pid);
}

/// The child has been stopped (or reaped); forget it.
pub fn release(pid: u32) {
    registry().children.retain(|p| *p != pid);
}

fn watch() {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let registry = registry();
        let limit = limit();
        let Some((name, started)) = registry
            .tests
            .values()
            .find(|(_, started)| started.elapsed() > limit)
        else {
            continue;
        };
        eprintln!(
            "\nTEST DEADLINE: `{name}` has run for {:?}, longer than its limit of {limit:?} \
             (NXCACHE_TEST_DEADLINE_SECS); the test process stops here.",
            started.elapsed()
        );
        if registry.waits.is_empty() {
            eprintln!("  no wait in progress: it is stuck outside a wait_until");
        }
        for (thread, what, since) in registry.waits.values() {
            eprintln!(
                "  {thread} is waiting for: {what} (for {:?})",
                since.elapsed()
            );
        }
        for pid in &registry.children {
            if let Ok(pid) = libc::pid_t::try_from(*pid) {
                eprintln!("  killing child process {pid}");
                // SAFETY: kill(2) on a pid this test process started; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::process::exit(101);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hangs inside a wait, but only when run by the test below (with a short limit).
    #[test]
    fn hangs_when_asked() {
        if std::env::var_os("NXCACHE_TESTKIT_HANG").is_none() {
            return;
        }
        let _waiting = waiting_for("a condition that never holds");
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    #[test]
    fn a_hung_test_fails_in_time_naming_itself_and_its_wait() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "watchdog::tests::hangs_when_asked",
                "--nocapture",
            ])
            .env("NXCACHE_TESTKIT_HANG", "1")
            .env("NXCACHE_TEST_DEADLINE_SECS", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reading = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
            text
        });
        let mut status = None;
        crate::wait_until_blocking(Duration::from_secs(60), "the hung test's exit", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let text = reading.join().unwrap();
        assert_eq!(status.unwrap().code(), Some(101), "{text}");
        assert!(
            text.contains("TEST DEADLINE: `watchdog::tests::hangs_when_asked`"),
            "{text}"
        );
        assert!(
            text.contains("waiting for: a condition that never holds"),
            "{text}"
        );
    }
}
