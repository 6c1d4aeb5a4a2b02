use std::io::{IoSlice, Write};
use std::path::PathBuf;

use bytes::Bytes;

use crate::checksum::{Checksum, ChecksumHasher};
use crate::copy::{CopyIdentity, Version};
use crate::error::StoreError;
use crate::index::BlobMeta;
use crate::key::BlobKey;
use crate::store::{BlobStore, Committed};

/// Bytes gathered before they go to disk in one blocking call. Large enough that a
/// typical artifact is written, synced and published in a single hop to the blocking
/// pool; small enough to bound the memory of an upload whatever its size.
const WRITE_BUFFER: usize = 1024 * 1024;

/// An upload in progress. Bytes go to a temp file; nothing is visible to readers until
/// [`BlobWriter::commit`] renames it into place. Budget is reserved for the bytes received
/// so far, never for the announced length. Dropping the writer without committing removes
/// the temp file and gives the reserved budget back.
pub struct BlobWriter {
    pub(crate) store: BlobStore,
    pub(crate) key: BlobKey,
    pub(crate) expected_len: u64,
    /// Bytes received, and the budget this upload holds.
    pub(crate) written: u64,
    pub(crate) hasher: ChecksumHasher,
    /// Received chunks not yet on disk, written with one vectored write: no copy.
    pub(crate) pending: Vec<Bytes>,
    pub(crate) pending_len: usize,
    /// Created on the first flush: small uploads never touch the disk before commit.
    pub(crate) file: Option<std::fs::File>,
    pub(crate) tmp_path: PathBuf,
    /// A temp file may exist at `tmp_path` (its creation was attempted), even when the
    /// handle was lost to a failed write: dropping the writer removes it.
    pub(crate) may_be_on_disk: bool,
    pub(crate) finished: bool,
    pub(crate) version: Version,
    pub(crate) replaces: Option<Version>,
}

impl BlobWriter {
    pub(crate) fn new(
        store: BlobStore,
        key: BlobKey,
        expected_len: u64,
        tmp_path: PathBuf,
        version: Version,
        replaces: Option<Version>,
    ) -> Self {
        BlobWriter {
            store,
            key,
            expected_len,
            written: 0,
            hasher: ChecksumHasher::new(),
            pending: Vec::new(),
            pending_len: 0,
            file: None,
            tmp_path,
            may_be_on_disk: false,
            finished: false,
            version,
            replaces,
        }
    }

    pub fn key(&self) -> &BlobKey {
        &self.key
    }

    /// The version the copy will carry.
    pub fn version(&self) -> Version {
        self.version
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends bytes. More bytes than announced is an error, and the upload is void.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let received = self.written + chunk.len() as u64;
        if received > self.expected_len {
            self.store.count_write_failure("length");
            return Err(StoreError::LengthMismatch {
                expected: self.expected_len,
                received,
            });
        }
        // Space follows the bytes that arrived: reserved (and evicted for) only now.
        if let Err(err) = self.store.reserve_received(chunk.len() as u64).await {
            self.store.count_write_failure(failure_reason(&err));
            return Err(err);
        }
        self.hasher.update(&chunk);
        self.written = received;
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        if self.pending_len >= WRITE_BUFFER {
            self.flush_pending().await?;
        }
        Ok(())
    }

    async fn flush_pending(&mut self) -> Result<(), StoreError> {
        let chunks = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        let file = self.file.take();
        let path = self.tmp_path.clone();
        self.may_be_on_disk = true;
        let outcome = tokio::task::spawn_blocking(move || {
            let mut file = match file {
                Some(file) => file,
                None => create_temp(&path)?,
            };
            write_chunks(&mut file, &chunks)?;
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        match outcome {
            Ok(file) => {
                self.file = Some(file);
                Ok(())
            }
            Err(err) => {
                let err = StoreError::from(err);
                self.store.count_write_failure(failure_reason(&err));
                Err(err)
            }
        }
    }

    /// Makes the blob durable (per the fsync policy) and visible. Fails with
    /// [`StoreError::Exists`] when another upload of the same key committed first.
    pub async fn commit(self) -> Result<BlobMeta, StoreError> {
        stored(self.finish(None).await?)
    }

    /// Like [`BlobWriter::commit`], but publishes only if the bytes have the checksum the
    /// sender computed (replica transfers): a blob damaged on the way is never stored.
    pub async fn commit_verified(self, expected: Checksum) -> Result<BlobMeta, StoreError> {
        stored(self.finish(Some(expected)).await?)
    }

    /// Like [`BlobWriter::commit_verified`] (when `expected` is given), telling which copy
    /// holds the key when another one got there first.
    pub async fn finish(mut self, expected: Option<Checksum>) -> Result<Committed, StoreError> {
        if self.written != self.expected_len {
            self.store.count_write_failure("length");
            return Err(StoreError::LengthMismatch {
                expected: self.expected_len,
                received: self.written,
            });
        }
        let checksum = self.hasher.finish();
        if expected.is_some_and(|e| e != checksum) {
            self.store.count_write_failure("checksum");
            return Err(StoreError::ChecksumMismatch);
        }
        let (chunks, file) = (std::mem::take(&mut self.pending), self.file.take());
        let (store, key, path, len, replaces) = (
            self.store.clone(),
            self.key.clone(),
            self.tmp_path.clone(),
            self.expected_len,
            self.replaces,
        );
        let copy = CopyIdentity {
            size: len,
            checksum,
            version: self.version,
        };
        // From here on the blocking task owns the temp file and the reservation.
        self.finished = true;
        // One hop to the blocking pool: last bytes, fsync, rename, index.
        tokio::task::spawn_blocking(move || {
            let written = (|| {
                let mut file = match file {
                    Some(file) => file,
                    None => create_temp(&path)?,
                };
                write_chunks(&mut file, &chunks)?;
                if store.fsync_enabled() {
                    file.sync_all()?;
                }
                Ok::<_, std::io::Error>(())
            })();
            match written {
                Ok(()) => store.publish_blocking(&key, &path, copy, replaces),
                Err(err) => {
                    let _ = std::fs::remove_file(&path);
                    store.release_reservation(len);
                    let err = StoreError::from(err);
                    store.count_write_failure(failure_reason(&err));
                    Err(err)
                }
            }
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }
}

fn stored(outcome: Committed) -> Result<BlobMeta, StoreError> {
    match outcome {
        Committed::Stored(meta) => Ok(meta),
        Committed::Existing(_) => Err(StoreError::Exists),
    }
}

/// Writes every chunk, in order, with as few system calls as the kernel allows.
fn write_chunks(file: &mut std::fs::File, chunks: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// A new artifact file, readable by the server's user only (0600 on Unix); the rename
/// that commits it keeps the mode.
fn create_temp(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

pub(crate) fn failure_reason(err: &StoreError) -> &'static str {
    match err {
        StoreError::DiskFull => "disk_full",
        StoreError::LengthMismatch { .. } => "length",
        StoreError::Exists => "exists",
        StoreError::ChecksumMismatch => "checksum",
        StoreError::BudgetExhausted { .. } => "budget",
        _ => "io",
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Aborted upload (client went away, too short, error, disk full): leave no
            // trace.
            drop(self.file.take());
            if self.may_be_on_disk
                && let Err(err) = std::fs::remove_file(&self.tmp_path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %self.tmp_path.display(), %err, "could not remove temp file");
            }
            // The budget held is what was received (see `write`).
            self.store.release_reservation(self.written);
        }
    }
}
