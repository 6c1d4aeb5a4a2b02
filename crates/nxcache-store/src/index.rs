//! The per-node metadata index, behind a small trait so that the embedded database is
//! measured and replaceable (sled in production, a map in tests).

use crate::copy::{CopyIdentity, EvictionMark, Version};

/// What the index knows of one stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobMeta {
    pub size: u64,
    /// XXH3-128 of the bytes, taken while they were received.
    pub checksum: crate::checksum::Checksum,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub accessed_ms: u64,
    /// Position in the least-recently-used order; larger is more recent.
    pub access_seq: u64,
    /// The write this copy came from (kept by every copy of it, wherever it moves).
    pub version: Version,
}

/// Format 1 (49 bytes) had no version; format 2 appends it. Both are read.
const META_V1: u8 = 1;
const META_V1_LEN: usize = 1 + 8 + 16 + 8 + 8 + 8;
const META_V2: u8 = 2;
const META_LEN: usize = META_V1_LEN + 16;

impl BlobMeta {
    pub fn identity(&self) -> CopyIdentity {
        CopyIdentity {
            size: self.size,
            checksum: self.checksum,
            version: self.version,
        }
    }

    pub fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0] = META_V2;
        out[1..9].copy_from_slice(&self.size.to_le_bytes());
        out[9..25].copy_from_slice(&self.checksum);
        out[25..33].copy_from_slice(&self.created_ms.to_le_bytes());
        out[33..41].copy_from_slice(&self.accessed_ms.to_le_bytes());
        out[41..49].copy_from_slice(&self.access_seq.to_le_bytes());
        out[49..65].copy_from_slice(&self.version.to_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Self, IndexError> {
        let known = matches!(
            (raw.first(), raw.len()),
            (Some(&META_V1), META_V1_LEN) | (Some(&META_V2), META_LEN)
        );
        if !known {
            return Err(IndexError::Corrupt(format!(
                "metadata record of {} bytes, version {:?}",
                raw.len(),
                raw.first()
            )));
        }
        let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        let mut checksum = [0u8; 16];
        checksum.copy_from_slice(&raw[9..25]);
        let version = match raw.get(49..65) {
            Some(v) => Version::from_bytes(v.try_into().expect("16 bytes")),
            None => Version::legacy(&checksum),
        };
        Ok(BlobMeta {
            size: u64_at(1),
            checksum,
            created_ms: u64_at(25),
            accessed_ms: u64_at(33),
            access_seq: u64_at(41),
            version,
        })
    }
}

/// Value of a row of the ring order: the copy's identity.
pub(crate) fn encode_copy(copy: &CopyIdentity) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&copy.size.to_le_bytes());
    out[8..24].copy_from_slice(&copy.checksum);
    out[24..40].copy_from_slice(&copy.version.to_bytes());
    out
}

pub(crate) fn decode_copy(raw: &[u8]) -> Result<CopyIdentity, IndexError> {
    if raw.len() != 40 {
        return Err(IndexError::Corrupt(format!(
            "ring order row of {} bytes",
            raw.len()
        )));
    }
    Ok(CopyIdentity {
        size: u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")),
        checksum: raw[8..24].try_into().expect("16 bytes"),
        version: Version::from_bytes(raw[24..40].try_into().expect("16 bytes")),
    })
}

/// Key of a row of the ring order: the position big-endian (byte order is ring order),
/// then the key.
pub(crate) fn ring_row(position: u64, key: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + key.len());
    row.extend_from_slice(&position.to_be_bytes());
    row.extend_from_slice(key.as_bytes());
    row
}

pub(crate) fn split_ring_row(row: &[u8]) -> Option<(u64, &str)> {
    let position = u64::from_be_bytes(row.get(..8)?.try_into().ok()?);
    let key = std::str::from_utf8(row.get(8..)?).ok()?;
    Some((position, key))
}

/// Where a visit of the ring order starts: just after this (position, key).
pub type RingCursor<'a> = Option<(u64, &'a str)>;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("the index database failed: {0}")]
    Backend(String),
    #[error("the index holds a record it cannot read: {0}")]
    Corrupt(String),
}

/// Key -> [`BlobMeta`], plus the least-recently-used order.
///
/// Implementations must be safe under concurrent use. The LRU order may briefly hold rows
/// that no longer match a blob (a crash or a race between a touch and a removal); readers
/// of [`Index::least_recent`] get only rows that match and implementations clean the rest.
pub trait Index: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<BlobMeta>, IndexError>;

    /// Records a blob, replacing the key's record if it has one (the caller holds the key
    /// lock, and replaces only on purpose: a conflict repair).
    fn insert(&self, key: &str, meta: &BlobMeta) -> Result<(), IndexError>;

    /// Replaces `old` with `new` only if the stored record is still exactly `old`; returns
    /// whether it did. Used to move a blob to the recent end of the LRU order.
    fn touch(&self, key: &str, old: &BlobMeta, new: &BlobMeta) -> Result<bool, IndexError>;

    /// Removes the blob's record; `Some` only for the one caller that actually removed it.
    fn remove(&self, key: &str) -> Result<Option<BlobMeta>, IndexError>;

    /// Up to `limit` blobs, least recently used first.
    fn least_recent(&self, limit: usize) -> Result<Vec<(String, BlobMeta)>, IndexError>;

    /// Visits every record (start-up accounting and reconciliation).
    fn for_each(&self, visit: &mut dyn FnMut(&str, &BlobMeta)) -> Result<(), IndexError>;

    /// Visits the records whose ring position (see [`crate::ring_position`]) lies in
    /// `first..=last`, in (position, key) order, starting after `after`, until `visit`
    /// returns false. Costs the records visited, not the whole index.
    fn visit_ring(
        &self,
        first: u64,
        last: u64,
        after: RingCursor<'_>,
        visit: &mut dyn FnMut(u64, &str, &CopyIdentity) -> bool,
    ) -> Result<(), IndexError>;

    /// Whether the ring order is known to match the records (false for an index written
    /// by a version without it, or until [`Index::rebuild_ring`] ran after a crash).
    fn ring_is_built(&self) -> Result<bool, IndexError>;

    /// Makes the ring order match the records exactly: after a crash (its rows and the
    /// records are not written atomically) and for an index written before it existed.
    fn rebuild_ring(&self) -> Result<(), IndexError>;

    /// Remembers that this node evicted `key`'s copy (see [`EvictionMark`]).
    fn mark_evicted(&self, key: &str, mark: &EvictionMark) -> Result<(), IndexError>;

    fn eviction_mark(&self, key: &str) -> Result<Option<EvictionMark>, IndexError>;

    /// Forgets eviction marks made before `before_ms`; returns how many are left.
    fn purge_eviction_marks(&self, before_ms: u64) -> Result<u64, IndexError>;

    /// A number larger than every one returned before, across restarts.
    fn next_seq(&self) -> Result<u64, IndexError>;

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), IndexError>;
}

/// Key of the LRU row for a blob: the sequence number big-endian (so byte order is age
/// order), then the key.
pub(crate) fn lru_row(seq: u64, key: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + key.len());
    row.extend_from_slice(&seq.to_be_bytes());
    row.extend_from_slice(key.as_bytes());
    row
}

pub(crate) fn split_lru_row(row: &[u8]) -> Option<(u64, &str)> {
    if row.len() < 9 {
        return None;
    }
    let seq = u64::from_be_bytes(row[..8].try_into().ok()?);
    let key = std::str::from_utf8(&row[8..]).ok()?;
    Some((seq, key))
}

#[cfg(test)]
pub(crate) mod contract_tests {
    //! The behaviour every [`Index`] must have, run against each implementation.
    use super::*;

    pub fn meta(size: u64, seq: u64) -> BlobMeta {
        BlobMeta {
            size,
            checksum: [seq as u8; 16],
            created_ms: 1,
            accessed_ms: seq,
            access_seq: seq,
            version: Version::from_bytes([seq as u8; 16]),
        }
    }

    fn ring_keys(index: &dyn Index, first: u64, last: u64, after: RingCursor<'_>) -> Vec<String> {
        let mut keys = Vec::new();
        index
            .visit_ring(first, last, after, &mut |_, k, _| {
                keys.push(k.to_owned());
                true
            })
            .unwrap();
        keys
    }

    /// The ring order follows inserts, replacements and removals; a visit is one range.
    pub fn check_ring_order(index: &dyn Index) {
        let mut all: Vec<(u64, String)> = (0..200)
            .map(|n| {
                let k = format!("k{n}");
                (crate::ring_position(&k), k)
            })
            .collect();
        for (i, (_, k)) in all.iter().enumerate() {
            index.insert(k, &meta(i as u64 + 1, i as u64 + 1)).unwrap();
        }
        all.sort();
        let keys: Vec<String> = all.iter().map(|(_, k)| k.clone()).collect();
        assert_eq!(ring_keys(index, 0, u64::MAX, None), keys);
        // A sub-range, and a visit resumed after a cursor.
        let (lo, hi) = (all[50].0, all[120].0);
        assert_eq!(ring_keys(index, lo, hi, None), keys[50..=120].to_vec());
        assert_eq!(
            ring_keys(index, lo, hi, Some((all[99].0, &all[99].1))),
            keys[100..=120].to_vec()
        );
        // A replaced record's identity is what the ring order reports.
        let k = &keys[7];
        let newer = BlobMeta {
            size: 999,
            version: Version::new(),
            ..meta(999, 10_000)
        };
        index.insert(k, &newer).unwrap();
        let mut seen = None;
        let p = crate::ring_position(k);
        index
            .visit_ring(p, p, None, &mut |_, key, copy| {
                if key == k {
                    seen = Some(*copy);
                }
                true
            })
            .unwrap();
        assert_eq!(seen, Some(newer.identity()));
        assert_eq!(index.get(k).unwrap(), Some(newer));
        // The replaced record left no LRU row behind.
        assert_eq!(
            index
                .least_recent(1000)
                .unwrap()
                .iter()
                .filter(|(key, _)| key == k)
                .count(),
            1
        );
        index.remove(k).unwrap();
        assert!(!ring_keys(index, 0, u64::MAX, None).contains(k));
        assert!(index.ring_is_built().unwrap());
        index.rebuild_ring().unwrap();
        assert_eq!(ring_keys(index, 0, u64::MAX, None).len(), keys.len() - 1);
        // Eviction marks: kept, then purged by age.
        let mark = EvictionMark {
            copy: meta(5, 5).identity(),
            at_ms: 100,
        };
        index.mark_evicted("gone", &mark).unwrap();
        assert_eq!(index.eviction_mark("gone").unwrap(), Some(mark));
        assert_eq!(index.purge_eviction_marks(100).unwrap(), 1);
        assert_eq!(index.purge_eviction_marks(101).unwrap(), 0);
        assert_eq!(index.eviction_mark("gone").unwrap(), None);
    }

    pub fn check_all(index: &dyn Index) {
        assert!(index.get("a").unwrap().is_none());
        let a = meta(10, index.next_seq().unwrap());
        let b = meta(20, index.next_seq().unwrap());
        let c = meta(30, index.next_seq().unwrap());
        index.insert("a", &a).unwrap();
        index.insert("b", &b).unwrap();
        index.insert("c", &c).unwrap();
        assert_eq!(index.get("b").unwrap(), Some(b));
        let order: Vec<_> = index
            .least_recent(10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(order, ["a", "b", "c"]);

        // Touching "a" makes it the most recent; a touch from a stale view is refused.
        let a2 = BlobMeta {
            access_seq: index.next_seq().unwrap(),
            ..a
        };
        assert!(index.touch("a", &a, &a2).unwrap());
        assert!(!index.touch("a", &a, &a2).unwrap());
        let order: Vec<_> = index
            .least_recent(2)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(order, ["b", "c"]);

        // Only one remover gets the record.
        assert_eq!(index.remove("b").unwrap(), Some(b));
        assert_eq!(index.remove("b").unwrap(), None);
        assert!(!index.touch("b", &b, &b).unwrap());

        let mut seen = Vec::new();
        index
            .for_each(&mut |k, m| seen.push((k.to_owned(), m.size)))
            .unwrap();
        seen.sort();
        assert_eq!(seen, [("a".to_owned(), 10), ("c".to_owned(), 30)]);
        let order: Vec<_> = index
            .least_recent(10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(order, ["c", "a"]);
        index.flush().unwrap();
    }

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let m = meta(123, 456);
        assert_eq!(BlobMeta::decode(&m.encode()).unwrap(), m);
        assert!(BlobMeta::decode(&[1, 2, 3]).is_err());
        let mut wrong_version = m.encode();
        wrong_version[0] = 9;
        assert!(BlobMeta::decode(&wrong_version).is_err());
        // A format 2 length with the format 1 tag (or the reverse) is not a record.
        let mut mixed = m.encode();
        mixed[0] = META_V1;
        assert!(BlobMeta::decode(&mixed).is_err());
    }

    #[test]
    fn records_of_format_1_are_still_read() {
        let m = meta(123, 456);
        let mut old = m.encode()[..META_V1_LEN].to_vec();
        old[0] = META_V1;
        let read = BlobMeta::decode(&old).unwrap();
        assert_eq!(read.size, 123);
        assert_eq!(read.checksum, m.checksum);
        assert_eq!(read.access_seq, m.access_seq);
        // Every replica of one old write derives the same version from its bytes.
        assert_eq!(read.version, Version::legacy(&m.checksum));
    }

    #[test]
    fn lru_rows_sort_by_age() {
        let old = lru_row(2, "zzz");
        let new = lru_row(256, "aaa");
        assert!(old < new);
        assert_eq!(split_lru_row(&new), Some((256, "aaa")));
        assert_eq!(split_lru_row(&[0; 8]), None);
    }
}
