use std::path::Path;

use crate::index::{BlobMeta, Index, IndexError, lru_row, split_lru_row};

/// The production [`Index`]: two sled trees, `blobs` (key -> meta) and `lru`
/// (sequence ++ key -> nothing, iterated oldest first).
pub struct SledIndex {
    db: sled::Db,
    blobs: sled::Tree,
    lru: sled::Tree,
}

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
        Ok(SledIndex { db, blobs, lru })
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
        // LRU row first: a crash in between leaves a harmless stale row, never a blob
        // that eviction cannot see.
        self.lru
            .insert(lru_row(meta.access_seq, key), &[])
            .map_err(backend)?;
        self.blobs
            .insert(key, &meta.encode()[..])
            .map_err(backend)?;
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
    use crate::index::contract_tests::{check_all, meta};

    #[test]
    fn behaves_like_an_index() {
        let dir = tempfile::tempdir().unwrap();
        check_all(&SledIndex::open(dir.path()).unwrap());
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
