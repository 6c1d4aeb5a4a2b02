use std::path::Path;

use crate::copy::EvictionMark;
use crate::index::{
    BlobMeta, Index, IndexError, RingCursor, decode_copy, encode_copy, lru_row, ring_row,
    split_lru_row, split_ring_row,
};
use crate::{CopyIdentity, ring_position};

/// The production [`Index`]: sled trees `blobs` (key -> meta), `lru` (sequence ++ key ->
/// nothing, iterated oldest first), `ring` (ring position ++ key -> copy identity,
/// iterated in ring order) and `evicted` (key -> eviction mark).
pub struct SledIndex {
    db: sled::Db,
    blobs: sled::Tree,
    lru: sled::Tree,
    ring: sled::Tree,
    evicted: sled::Tree,
}

/// Set (in the default tree) once the `ring` tree matches `blobs`.
const RING_BUILT: &[u8] = b"ring-order-built";

fn backend(err: sled::Error) -> IndexError {
    IndexError::Backend(err.to_string())
}

impl SledIndex {
    /// Opens (or creates) the index. sled takes an exclusive lock on the directory, so a
    /// second process pointed at the same data dir fails here instead of corrupting it.
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        let config = sled::Config::new().mode(sled::Mode::HighThroughput);
        let db =
            nxcache_sled::open(config, dir).map_err(|err| IndexError::Backend(err.to_string()))?;
        let blobs = db.open_tree("blobs").map_err(backend)?;
        let lru = db.open_tree("lru").map_err(backend)?;
        let ring = db.open_tree("ring").map_err(backend)?;
        let evicted = db.open_tree("evicted").map_err(backend)?;
        let index = SledIndex {
            db,
            blobs,
            lru,
            ring,
            evicted,
        };
        // A new index keeps its ring order from the first insert.
        if index.blobs.is_empty() && index.ring.is_empty() {
            index.db.insert(RING_BUILT, &[]).map_err(backend)?;
        }
        Ok(index)
    }
}

impl Index for SledIndex {
    fn get(&self, key: &str) -> Result<Option<BlobMeta>, IndexError> {
        self.blobs
            .get(key)
            .map_err(backend)?
            .map(|raw| BlobMeta::decode(&raw))
            .transpose()
    }

    fn insert(&self, key: &str, meta: &BlobMeta) -> Result<(), IndexError> {
        // Order rows first: a crash in between leaves a harmless stale row, never a blob
        // that eviction or anti-entropy cannot see.
        self.lru
            .insert(lru_row(meta.access_seq, key), &[])
            .map_err(backend)?;
        self.ring
            .insert(
                ring_row(ring_position(key), key),
                &encode_copy(&meta.identity())[..],
            )
            .map_err(backend)?;
        let previous = self
            .blobs
            .insert(key, &meta.encode()[..])
            .map_err(backend)?;
        if let Some(previous) = previous {
            let previous = BlobMeta::decode(&previous)?;
            if previous.access_seq != meta.access_seq {
                self.lru
                    .remove(lru_row(previous.access_seq, key))
                    .map_err(backend)?;
            }
        }
        Ok(())
    }

    fn touch(&self, key: &str, old: &BlobMeta, new: &BlobMeta) -> Result<bool, IndexError> {
        let swapped = self
            .blobs
            .compare_and_swap(key, Some(&old.encode()[..]), Some(&new.encode()[..]))
            .map_err(backend)?;
        if swapped.is_err() {
            return Ok(false);
        }
        self.lru
            .insert(lru_row(new.access_seq, key), &[])
            .map_err(backend)?;
        self.lru
            .remove(lru_row(old.access_seq, key))
            .map_err(backend)?;
        Ok(true)
    }

    fn remove(&self, key: &str) -> Result<Option<BlobMeta>, IndexError> {
        let Some(raw) = self.blobs.remove(key).map_err(backend)? else {
            return Ok(None);
        };
        let meta = BlobMeta::decode(&raw)?;
        self.lru
            .remove(lru_row(meta.access_seq, key))
            .map_err(backend)?;
        self.ring
            .remove(ring_row(ring_position(key), key))
            .map_err(backend)?;
        Ok(Some(meta))
    }

    fn least_recent(&self, limit: usize) -> Result<Vec<(String, BlobMeta)>, IndexError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for row in self.lru.iter().keys() {
            if out.len() >= limit {
                break;
            }
            let row = row.map_err(backend)?;
            let live = match split_lru_row(&row) {
                Some((seq, key)) => match self.get(key)? {
                    Some(meta) if meta.access_seq == seq => Some((key.to_owned(), meta)),
                    _ => None,
                },
                None => None,
            };
            match live {
                Some(entry) => out.push(entry),
                // A row left by a crash or a lost race: clean it as we pass.
                None => {
                    self.lru.remove(&row).map_err(backend)?;
                }
            }
        }
        Ok(out)
    }

    fn for_each(&self, visit: &mut dyn FnMut(&str, &BlobMeta)) -> Result<(), IndexError> {
        for item in self.blobs.iter() {
            let (key, raw) = item.map_err(backend)?;
            let key = std::str::from_utf8(&key)
                .map_err(|_| IndexError::Corrupt("a key that is not UTF-8".into()))?;
            visit(key, &BlobMeta::decode(&raw)?);
        }
        Ok(())
    }

    fn visit_ring(
        &self,
        first: u64,
        last: u64,
        after: RingCursor<'_>,
        visit: &mut dyn FnMut(u64, &str, &CopyIdentity) -> bool,
    ) -> Result<(), IndexError> {
        use std::ops::Bound;
        let start = match after {
            Some((position, key)) if position >= first => Bound::Excluded(ring_row(position, key)),
            _ => Bound::Included(first.to_be_bytes().to_vec()),
        };
        // Every row of position `last` sorts before position `last + 1`.
        let end = match last.checked_add(1) {
            Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        for row in self.ring.range::<Vec<u8>, _>((start, end)) {
            let (row, value) = row.map_err(backend)?;
            let Some((position, key)) = split_ring_row(&row) else {
                continue;
            };
            if !visit(position, key, &decode_copy(&value)?) {
                break;
            }
        }
        Ok(())
    }

    fn ring_is_built(&self) -> Result<bool, IndexError> {
        self.db.contains_key(RING_BUILT).map_err(backend)
    }

    fn rebuild_ring(&self) -> Result<(), IndexError> {
        self.db.remove(RING_BUILT).map_err(backend)?;
        // Rows without a matching record (a crash between the two writes) go...
        for row in self.ring.iter() {
            let (row, value) = row.map_err(backend)?;
            let current = match split_ring_row(&row) {
                Some((position, key)) if position == ring_position(key) => self.get(key)?,
                _ => None,
            };
            let matches =
                current.is_some_and(|m| decode_copy(&value).is_ok_and(|c| c == m.identity()));
            if !matches {
                self.ring.remove(&row).map_err(backend)?;
            }
        }
        // ...and every record gets its row.
        for item in self.blobs.iter() {
            let (key, raw) = item.map_err(backend)?;
            let key = std::str::from_utf8(&key)
                .map_err(|_| IndexError::Corrupt("a key that is not UTF-8".into()))?;
            let meta = BlobMeta::decode(&raw)?;
            self.ring
                .insert(
                    ring_row(ring_position(key), key),
                    &encode_copy(&meta.identity())[..],
                )
                .map_err(backend)?;
        }
        self.db.insert(RING_BUILT, &[]).map_err(backend)?;
        Ok(())
    }

    fn mark_evicted(&self, key: &str, mark: &EvictionMark) -> Result<(), IndexError> {
        self.evicted
            .insert(key, &mark.encode()[..])
            .map_err(backend)?;
        Ok(())
    }

    fn eviction_mark(&self, key: &str) -> Result<Option<EvictionMark>, IndexError> {
        Ok(self
            .evicted
            .get(key)
            .map_err(backend)?
            .and_then(|raw| EvictionMark::decode(&raw)))
    }

    fn purge_eviction_marks(&self, before_ms: u64) -> Result<u64, IndexError> {
        let mut left = 0;
        for item in self.evicted.iter() {
            let (key, raw) = item.map_err(backend)?;
            match EvictionMark::decode(&raw) {
                Some(mark) if mark.at_ms >= before_ms => left += 1,
                _ => {
                    self.evicted.remove(&key).map_err(backend)?;
                }
            }
        }
        Ok(left)
    }

    fn next_seq(&self) -> Result<u64, IndexError> {
        self.db.generate_id().map_err(backend)
    }

    fn flush(&self) -> Result<(), IndexError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::contract_tests::{check_all, check_ring_order, meta};

    #[test]
    fn behaves_like_an_index() {
        let dir = tempfile::tempdir().unwrap();
        check_all(&SledIndex::open(dir.path()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        check_ring_order(&SledIndex::open(dir.path()).unwrap());
    }

    #[test]
    fn an_index_without_ring_order_gets_one_and_stale_rows_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = SledIndex::open(dir.path()).unwrap();
            index.insert("a", &meta(1, 1)).unwrap();
            index.insert("b", &meta(2, 2)).unwrap();
            // As an index of the previous format: records without ring rows...
            index.ring.clear().unwrap();
            index.db.remove(RING_BUILT).unwrap();
            // ...and a row left by a crash, for a record that never made it.
            index
                .ring
                .insert(ring_row(ring_position("ghost"), "ghost"), &[0u8; 40][..])
                .unwrap();
            index.flush().unwrap();
        }
        let index = SledIndex::open(dir.path()).unwrap();
        assert!(!index.ring_is_built().unwrap());
        index.rebuild_ring().unwrap();
        assert!(index.ring_is_built().unwrap());
        let mut keys = Vec::new();
        index
            .visit_ring(0, u64::MAX, None, &mut |_, k, _| {
                keys.push(k.to_owned());
                true
            })
            .unwrap();
        keys.sort();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn survives_reopen_and_keeps_sequence_increasing() {
        let dir = tempfile::tempdir().unwrap();
        let first_seq;
        {
            let index = SledIndex::open(dir.path()).unwrap();
            first_seq = index.next_seq().unwrap();
            index.insert("k", &meta(5, first_seq)).unwrap();
            index.flush().unwrap();
        }
        let index = SledIndex::open(dir.path()).unwrap();
        assert_eq!(index.get("k").unwrap().unwrap().size, 5);
        assert!(index.next_seq().unwrap() > first_seq);
    }

    #[test]
    fn stale_lru_rows_are_skipped_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let index = SledIndex::open(dir.path()).unwrap();
        index.insert("k", &meta(5, 10)).unwrap();
        index.lru.insert(lru_row(3, "k"), &[]).unwrap();
        index.lru.insert(lru_row(4, "gone"), &[]).unwrap();
        let live = index.least_recent(10).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(index.lru.len(), 1);
    }
}
