use crate::index::IndexError;

/// What can go wrong in the local store. The HTTP layer maps each to one status code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key is already stored; entries are immutable.
    #[error("an artifact with this hash is already stored")]
    Exists,
    /// The blob can never fit: it is larger than the whole byte budget.
    #[error(
        "the artifact ({size} bytes) is larger than the cache's whole disk budget ({budget} bytes)"
    )]
    LargerThanBudget { size: u64, budget: u64 },
    /// The budget is used up by blobs that cannot be evicted right now (uploads in flight).
    #[error("the cache's disk budget ({budget} bytes) is used up by uploads in progress")]
    BudgetExhausted { budget: u64 },
    /// The file system itself is full (ENOSPC or a quota).
    #[error("the disk holding the cache is full")]
    DiskFull,
    /// The writer was fed a different number of bytes than announced.
    #[error("expected {expected} bytes, received {received}")]
    LengthMismatch { expected: u64, received: u64 },
    /// The bytes did not have the checksum their sender announced.
    #[error("the received bytes do not match the sender's checksum")]
    ChecksumMismatch,
    #[error("index: {0}")]
    Index(#[from] IndexError),
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for StoreError {
    fn from(err: std::io::Error) -> Self {
        if is_disk_full(&err) {
            StoreError::DiskFull
        } else {
            StoreError::Io(err)
        }
    }
}

pub(crate) fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}
