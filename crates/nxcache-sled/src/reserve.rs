//! Room kept free on the data dir's file system for the metadata log.
//!
//! Raft cannot take a failed write back: when sled reports ENOSPC while openraft appends
//! an entry or saves a vote, openraft stops its core for good. So the artifact store, which
//! fills the disk, must never use the last bytes: it refuses uploads (507) while less than
//! [`SpaceReserve::bytes`] is free. A disk filled by something else (another process, a
//! volume shrunk under the node) would still leave Raft nothing, so the reserve is also
//! held as a file (ballast): once free space drops below half the reserve, the file is
//! deleted, which gives Raft that room back at once; it is made again when the disk has
//! room for it and the reserve beside it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Name of the ballast file in the directory the reserve is kept in.
pub const RESERVE_FILE: &str = "space-reserve";
/// The reserve on a large file system.
pub const MAX_RESERVE: u64 = 32 << 20;
/// The reserve on a small one (never less than this).
pub const MIN_RESERVE: u64 = 2 << 20;

/// What [`SpaceReserve::check`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveChange {
    None,
    /// The ballast was deleted: the disk is (nearly) full.
    Released,
    /// The ballast is back: the disk has room again.
    Restored,
}

#[derive(Debug)]
pub struct SpaceReserve {
    dir: PathBuf,
    file: PathBuf,
    bytes: u64,
    /// The ballast file is absent (deleted on a full disk, or never made).
    released: AtomicBool,
    /// Free bytes at the last look.
    available: AtomicU64,
    /// One [`SpaceReserve::check`] at a time: two that both made the ballast would share
    /// its temporary file, and the loser's clean-up would delete the winner's ballast.
    checking: std::sync::Mutex<()>,
}

impl SpaceReserve {
    /// A reserve for the file system holding `dir` (created if missing): 1/16 of its size,
    /// between [`MIN_RESERVE`] and [`MAX_RESERVE`]. Makes the ballast when there is room.
    pub fn open(dir: &Path) -> std::io::Result<SpaceReserve> {
        std::fs::create_dir_all(dir)?;
        let total = fs2::total_space(dir)?;
        let bytes = (total / 16).clamp(MIN_RESERVE, MAX_RESERVE);
        let file = dir.join(RESERVE_FILE);
        let present = std::fs::metadata(&file).is_ok_and(|m| m.len() == bytes);
        let reserve = SpaceReserve {
            dir: dir.to_path_buf(),
            file,
            bytes,
            released: AtomicBool::new(!present),
            available: AtomicU64::new(fs2::available_space(dir)?),
            checking: std::sync::Mutex::new(()),
        };
        reserve.check()?;
        Ok(reserve)
    }

    /// Bytes kept for the metadata log.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the ballast is deleted (its room handed to the metadata log).
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Free bytes of the file system when it was last looked at.
    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Relaxed)
    }

    /// Whether `len` more bytes of artifacts leave the reserve untouched: at least
    /// [`SpaceReserve::bytes`] free after them (the ballast, when present, is on top).
    /// Looks at the file system now (one statvfs, cheap enough for an async thread);
    /// the ballast is brought back by the watcher's [`SpaceReserve::check`], never here.
    pub fn admits(&self, len: u64) -> bool {
        let available = match fs2::available_space(&self.dir) {
            Ok(a) => a,
            // Cannot tell: the write itself will find out.
            Err(_) => return true,
        };
        self.available.store(available, Ordering::Relaxed);
        !self.is_released() && available >= self.bytes.saturating_add(len)
    }

    /// Deletes the ballast when less than half the reserve is free; makes it again when
    /// twice the reserve is free. Call it often (every few hundred milliseconds): the
    /// metadata log gets the room back only when this runs.
    pub fn check(&self) -> std::io::Result<ReserveChange> {
        let _one_at_a_time = self
            .checking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let available = fs2::available_space(&self.dir)?;
        self.available.store(available, Ordering::Relaxed);
        if !self.is_released() && available < self.bytes / 2 {
            match std::fs::remove_file(&self.file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.released.store(true, Ordering::SeqCst);
            self.available
                .store(fs2::available_space(&self.dir)?, Ordering::Relaxed);
            return Ok(ReserveChange::Released);
        }
        if self.is_released() && available >= self.bytes.saturating_mul(2) {
            if let Err(e) = self.make_ballast() {
                let _ = std::fs::remove_file(&self.file);
                return Err(e);
            }
            self.released.store(false, Ordering::SeqCst);
            self.available
                .store(fs2::available_space(&self.dir)?, Ordering::Relaxed);
            return Ok(ReserveChange::Restored);
        }
        Ok(ReserveChange::None)
    }

    fn make_ballast(&self) -> std::io::Result<()> {
        use fs2::FileExt;
        let tmp = self.file.with_extension("tmp");
        let f = std::fs::File::create(&tmp)?;
        // Real blocks, not a sparse file (posix_fallocate: written out where the file
        // system cannot allocate).
        f.allocate(self.bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_ballast_of_the_reserve_on_a_disk_with_room() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = SpaceReserve::open(dir.path()).unwrap();
        let ballast = std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap();
        assert_eq!(ballast.len(), reserve.bytes());
        assert!(!reserve.is_released());
        assert!((MIN_RESERVE..=MAX_RESERVE).contains(&reserve.bytes()));
        assert!(reserve.admits(1024));
        assert!(!reserve.admits(u64::MAX / 2), "more than the disk holds");
        assert_eq!(reserve.check().unwrap(), ReserveChange::None);
    }
}
