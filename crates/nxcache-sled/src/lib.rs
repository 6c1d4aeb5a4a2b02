//! Opening the sled databases nxcache keeps (blob index, Raft state, hint log).
//!
//! sled locks a database directory while a handle is open, which is what stops a second
//! nxcache from sharing a data dir. But sled releases that lock from its background
//! threads: a handle dropped a moment ago (a node restarted inside one process, an
//! index reopened after a crash check) can still hold it for a few milliseconds, longer
//! on a loaded machine. So an open that finds the lock taken tries again for a short
//! while before it concludes that somebody else holds the directory.

mod reserve;

pub use reserve::{MAX_RESERVE, MIN_RESERVE, RESERVE_FILE, ReserveChange, SpaceReserve};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`open`] waits for a held lock before it reports the directory as taken.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

const RETRY_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{} is locked by another process: is another nxcache using this data dir?",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("cannot open the database at {}: {source}", path.display())]
    Sled { path: PathBuf, source: sled::Error },
}

/// Opens (or creates) the database at `dir` with `config`'s settings, waiting up to
/// [`LOCK_WAIT`] for a lock that is still held.
pub fn open(config: sled::Config, dir: &Path) -> Result<sled::Db, OpenError> {
    open_waiting(config, dir, LOCK_WAIT)
}

/// [`open`] with a chosen wait.
pub fn open_waiting(
    config: sled::Config,
    dir: &Path,
    wait: Duration,
) -> Result<sled::Db, OpenError> {
    let config = config.path(dir);
    let deadline = Instant::now() + wait;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(err) if is_lock_error(&err) => {
                if Instant::now() >= deadline {
                    return Err(OpenError::Locked {
                        path: dir.to_path_buf(),
                    });
                }
                std::thread::sleep(RETRY_EVERY);
            }
            Err(source) => {
                return Err(OpenError::Sled {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

fn is_lock_error(err: &sled::Error) -> bool {
    matches!(err, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> sled::Config {
        sled::Config::new().cache_capacity(1024 * 1024)
    }

    #[test]
    fn a_live_holder_keeps_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(small(), dir.path()).unwrap();
        // That it waits is `waits_for_a_holder_that_lets_go`'s to show; here: the answer.
        let err = open_waiting(small(), dir.path(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another nxcache"), "{err}");
    }

    #[test]
    fn waits_for_a_holder_that_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = open(small(), dir.path()).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let db = open(small(), dir.path()).unwrap();
        releaser.join().unwrap();
        db.insert("k", "v").unwrap();
    }

    #[test]
    fn reopening_right_after_a_drop_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0u32..30 {
            let db = open(small(), dir.path()).unwrap();
            assert_eq!(db.len(), round as usize);
            db.insert(round.to_be_bytes(), "v").unwrap();
            db.flush().unwrap();
        }
    }
}
