//! The blob store of one node.
//!
//! Bytes live in files (written to a temp file, then renamed into place, so a crash never
//! leaves a partial blob visible); the metadata of each blob (size, checksum, times) lives
//! in an [`Index`], sled-backed in production. Every read is verified against the checksum
//! taken while the bytes were written, and the store keeps itself under a byte budget by
//! evicting the least recently used blobs (and, optionally, those idle longer than a TTL).

mod checksum;
mod copy;
mod error;
mod index;
mod key;
mod layout;
mod memory_index;
mod metrics;
mod read;
mod sled_index;
mod store;
mod write;

pub use checksum::{Checksum, ChecksumHasher, checksum_of};
pub use copy::{
    CopyIdentity, DeleteReason, EvictionMark, RangeDigest, RingEntry, Version, entry_digest,
    ring_position,
};
pub use error::StoreError;
pub use index::{BlobMeta, Index, IndexError, RingCursor};
pub use key::{BlobKey, InvalidKey};
pub use layout::create_private_dir;
pub use memory_index::MemoryIndex;
pub use read::{BlobBody, BlobRead, ByteStream, verify_stream};
pub use sled_index::SledIndex;
pub use store::{
    BlobStore, Committed, DIGEST_BUCKET_BITS, EVICTION_MARK_TTL, EvictionListener,
    MAX_EVICTION_MARKS, ScrubOutcome, StoreConfig, StoreStats,
};
pub use write::BlobWriter;

#[cfg(test)]
mod store_tests;
