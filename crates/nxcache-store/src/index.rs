//! The per-node metadata index, behind a small trait so that the embedded database is
//! measured and replaceable (sled in production, a map in tests).

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
}

const META_VERSION: u8 = 1;
const META_LEN: usize = 1 + 8 + 16 + 8 + 8 + 8;

impl BlobMeta {
    pub fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0] = META_VERSION;
        out[1..9].copy_from_slice(&self.size.to_le_bytes());
        out[9..25].copy_from_slice(&self.checksum);
        out[25..33].copy_from_slice(&self.created_ms.to_le_bytes());
        out[33..41].copy_from_slice(&self.accessed_ms.to_le_bytes());
        out[41..49].copy_from_slice(&self.access_seq.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Self, IndexError> {
        if raw.len() != META_LEN || raw[0] != META_VERSION {
            return Err(IndexError::Corrupt(format!(
                "metadata record of {} bytes, version {:?}",
                raw.len(),
                raw.first()
            )));
        }
        let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        let mut checksum = [0u8; 16];
        checksum.copy_from_slice(&raw[9..25]);
        Ok(BlobMeta {
            size: u64_at(1),
            checksum,
            created_ms: u64_at(25),
            accessed_ms: u64_at(33),
            access_seq: u64_at(41),
        })
    }
}

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

    /// Records a new blob. The caller guarantees the key is absent (it holds the key lock).
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
        }
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
