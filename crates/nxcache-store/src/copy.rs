//! The identity of a stored copy: which write it came from, and what bytes it holds.
//!
//! A key is written once, but in a cluster two writers may race, and copies move between
//! nodes (repair, hand-off, rebalance). Every write gets a [`Version`] from the node that
//! coordinates it; every copy of that write, wherever it lands, keeps it. A copy is
//! deleted only by naming its version, so a decision taken about one copy can never
//! remove another writer's copy of the same key.

use std::fmt;

use crate::checksum::Checksum;

/// The version of one write of a key: the coordinator's clock (Unix milliseconds) in the
/// high 64 bits, 64 random bits below. Ordered by time first, so "the earlier write" has
/// the smaller version (clocks permitting); unique without coordination.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Version(u128);

impl Version {
    /// A new version for a write starting now.
    pub fn new() -> Self {
        let ms = crate::store::now_ms().max(1);
        Version((u128::from(ms) << 64) | u128::from(rand::random::<u64>()))
    }

    /// The version given to a copy recorded before versions existed (index records of
    /// format 1, files adopted after a crash): derived from its bytes, so every replica
    /// of one old write agrees on it. Its time is 0, so it sorts before any new write.
    pub fn legacy(checksum: &Checksum) -> Self {
        let low = u64::from_le_bytes(checksum[..8].try_into().expect("8 bytes"));
        Version(u128::from(low))
    }

    /// When the write started, by its coordinator's clock (0 for a legacy copy).
    pub fn created_ms(&self) -> u64 {
        (self.0 >> 64) as u64
    }

    /// Big-endian, so byte order is version order.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(raw: [u8; 16]) -> Self {
        Version(u128::from_be_bytes(raw))
    }

    /// From a wire field: exactly 16 bytes, or nothing.
    pub fn from_slice(raw: &[u8]) -> Option<Self> {
        Some(Version::from_bytes(raw.try_into().ok()?))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({self})")
    }
}

/// What one copy of a key is: its bytes (size and checksum) and the write it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CopyIdentity {
    pub size: u64,
    pub checksum: Checksum,
    pub version: Version,
}

impl CopyIdentity {
    /// The same bytes. Two writers of identical bytes made the same artifact, whatever
    /// their versions.
    pub fn same_content(&self, other: &CopyIdentity) -> bool {
        self.size == other.size && self.checksum == other.checksum
    }
}

/// Why a copy is removed on request. Each reason is counted apart; a withdrawal also
/// spares a copy that another writer of the same bytes counted (see
/// [`crate::BlobStore::delete_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// The write that made it was refused (strict policy) or lost to another body (409).
    Withdrawn,
    /// A node that no longer owns the key handed it to the owners.
    HandedOff,
    /// Another owner evicted this artifact: owners keep the same keys.
    Evicted,
}

impl DeleteReason {
    pub fn label(self) -> &'static str {
        match self {
            DeleteReason::Withdrawn => "withdrawn",
            DeleteReason::HandedOff => "handed_off",
            DeleteReason::Evicted => "evicted_elsewhere",
        }
    }
}

/// A short-lived record that this node evicted a copy (by budget, TTL, or because
/// another owner did), so that repair does not bring the artifact back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictionMark {
    pub copy: CopyIdentity,
    /// When it was evicted here (Unix milliseconds).
    pub at_ms: u64,
}

impl EvictionMark {
    /// Whether `copy` is the evicted artifact: the same write, or the same bytes written
    /// before the eviction (a concurrent writer of identical bytes). A copy written after
    /// the eviction (a rebuild uploaded again) is a new artifact and is never covered.
    pub fn covers(&self, copy: &CopyIdentity) -> bool {
        copy.version == self.copy.version
            || (copy.same_content(&self.copy) && copy.version.created_ms() <= self.at_ms)
    }

    pub(crate) const ENCODED_LEN: usize = 8 + 16 + 16 + 8;

    pub(crate) fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.copy.size.to_le_bytes());
        out[8..24].copy_from_slice(&self.copy.checksum);
        out[24..40].copy_from_slice(&self.copy.version.to_bytes());
        out[40..48].copy_from_slice(&self.at_ms.to_le_bytes());
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<Self> {
        if raw.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(EvictionMark {
            copy: CopyIdentity {
                size: u64::from_le_bytes(raw[..8].try_into().ok()?),
                checksum: raw[8..24].try_into().ok()?,
                version: Version::from_bytes(raw[24..40].try_into().ok()?),
            },
            at_ms: u64::from_le_bytes(raw[40..48].try_into().ok()?),
        })
    }
}

/// Where a key sits on the placement ring: XXH3-64 of the key, the same position
/// `nxcache-placement` places it by. The index keeps keys in this order, so one ring
/// range is one range scan.
pub fn ring_position(key: &str) -> u64 {
    crate::checksum::key_hash(key.as_bytes())
}

/// One key in ring order, with its copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingEntry {
    pub position: u64,
    pub key: String,
    pub copy: CopyIdentity,
}

/// Summary of the copies in a ring range: XOR of each entry's content digest (key, size,
/// checksum; not the version: identical bytes are one artifact) and their number. XOR
/// makes it independent of order and cheap to keep up to date as copies come and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeDigest {
    pub xor: u64,
    pub count: u64,
}

impl RangeDigest {
    pub fn add(&mut self, other: RangeDigest) {
        self.xor ^= other.xor;
        self.count += other.count;
    }
}

/// The contribution of one copy to its range's digest.
pub fn entry_digest(key: &str, copy: &CopyIdentity) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(key.as_bytes());
    h.update(&[0]);
    h.update(&copy.size.to_le_bytes());
    h.update(&copy.checksum);
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_and_round_trip() {
        let a = Version::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = Version::new();
        assert!(a < b);
        assert_ne!(a, Version::new());
        assert_eq!(Version::from_bytes(a.to_bytes()), a);
        assert_eq!(Version::from_slice(&a.to_bytes()), Some(a));
        assert_eq!(Version::from_slice(&[1, 2]), None);
        let legacy = Version::legacy(&[7; 16]);
        assert_eq!(legacy.created_ms(), 0);
        assert!(legacy < a);
        assert_eq!(legacy, Version::legacy(&[7; 16]));
    }

    #[test]
    fn an_eviction_mark_covers_the_evicted_write_and_older_identical_bytes_only() {
        let copy = |sum: u8, v: Version| CopyIdentity {
            size: 10,
            checksum: [sum; 16],
            version: v,
        };
        let evicted = Version::new();
        let mark = EvictionMark {
            copy: copy(1, evicted),
            at_ms: evicted.created_ms() + 1000,
        };
        assert!(mark.covers(&copy(1, evicted)));
        // Same bytes from a concurrent writer before the eviction: the same artifact.
        let older =
            Version::from_bytes((u128::from(evicted.created_ms() + 10) << 64).to_be_bytes());
        assert!(mark.covers(&copy(1, older)));
        // Other bytes, or the same bytes uploaded again after the eviction: kept.
        assert!(!mark.covers(&copy(2, older)));
        let later = Version::from_bytes((u128::from(mark.at_ms + 1) << 64).to_be_bytes());
        assert!(!mark.covers(&copy(1, later)));
        assert_eq!(EvictionMark::decode(&mark.encode()), Some(mark));
    }
}
