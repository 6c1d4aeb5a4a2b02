//! Hinted hand-off: writes an owner missed, kept on disk until it has them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nxcache_placement::NodeId;
use nxcache_store::BlobKey;

/// Hints kept at most. Past it a new hint is dropped (counted in
/// `nxcache_replication_hints_dropped_total`): the owner still gets the key from
/// anti-entropy, only later. It bounds the disk and the hand-off work a long outage of
/// one owner can pile up.
pub const MAX_HINTS: u64 = 1_000_000;

/// "Owner X should hold key K; these nodes have it." In a sled tree keyed
/// `<owner as 8 bytes BE><key>`, so one owner's hints are one range scan, and the owners
/// with hints are found by seeking, not by walking every hint.
#[derive(Clone)]
pub struct HintLog {
    tree: sled::Tree,
    /// Hints held: counted as they come and go (sled's `len` walks the whole tree).
    count: Arc<AtomicU64>,
    limit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub owner: NodeId,
    pub key: BlobKey,
    pub holders: Vec<NodeId>,
}

fn row(owner: NodeId, key: &BlobKey) -> Vec<u8> {
    let mut row = owner.to_be_bytes().to_vec();
    row.extend_from_slice(key.as_str().as_bytes());
    row
}

fn encode(holders: &[NodeId]) -> Vec<u8> {
    holders.iter().flat_map(|h| h.to_be_bytes()).collect()
}

fn decode(row: &[u8], value: &[u8]) -> Option<Hint> {
    let owner = NodeId::from_be_bytes(row.get(..8)?.try_into().ok()?);
    let key = BlobKey::parse(std::str::from_utf8(row.get(8..)?).ok()?).ok()?;
    let holders = value
        .chunks_exact(8)
        .map(|c| NodeId::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Some(Hint {
        owner,
        key,
        holders,
    })
}

impl HintLog {
    /// Opens (or creates) the hint log in its own sled database at `dir`. Blocking (it
    /// counts the hints once).
    pub fn open(dir: &std::path::Path) -> Result<Self, nxcache_sled::OpenError> {
        let db = nxcache_sled::open(sled::Config::new().cache_capacity(2 * 1024 * 1024), dir)?;
        let tree = db
            .open_tree("hints")
            .map_err(|source| nxcache_sled::OpenError::Sled {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self::over(tree))
    }

    /// An in-memory log (tests, and a node without a data dir).
    pub fn temporary() -> Result<Self, sled::Error> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(Self::over(db.open_tree("hints")?))
    }

    fn over(tree: sled::Tree) -> Self {
        let count = tree.len() as u64;
        HintLog {
            tree,
            count: Arc::new(AtomicU64::new(count)),
            limit: MAX_HINTS,
        }
    }

    /// The same log with another bound on its size (tests).
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// Records (or widens) one hint per owner in `owners`, flushed once for all of them
    /// before returning, so an acknowledged write's hints survive a crash. A new hint past
    /// the limit is dropped; returns how many were. Blocks on the disk: async callers run
    /// it on the blocking pool.
    pub fn add_for_all(
        &self,
        owners: &[NodeId],
        key: &BlobKey,
        holders: &[NodeId],
    ) -> Result<u64, sled::Error> {
        let mut dropped = 0;
        for owner in owners {
            let row = row(*owner, key);
            let existing = self.tree.get(&row)?;
            if existing.is_none() && self.count.load(Ordering::Relaxed) >= self.limit {
                dropped += 1;
                continue;
            }
            let mut all: Vec<NodeId> = existing
                .and_then(|v| decode(&row, &v))
                .map(|h| h.holders)
                .unwrap_or_default();
            for h in holders {
                if !all.contains(h) {
                    all.push(*h);
                }
            }
            if self.tree.insert(row, encode(&all))?.is_none() {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.tree.flush()?;
        Ok(dropped)
    }

    pub fn remove(&self, hint: &Hint) -> Result<(), sled::Error> {
        if self.tree.remove(row(hint.owner, &hint.key))?.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The owners that have hints, ascending: one seek per owner, not a walk of the log.
    pub fn owners(&self) -> Vec<NodeId> {
        let mut owners = Vec::new();
        let mut from: Option<NodeId> = Some(0);
        while let Some(start) = from {
            let Some(Ok((row, _))) = self.tree.range(start.to_be_bytes()..).next() else {
                break;
            };
            let Some(owner) = row
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(NodeId::from_be_bytes)
            else {
                break;
            };
            owners.push(owner);
            from = owner.checked_add(1);
        }
        owners
    }

    /// Up to `limit` of `owner`'s hints, in key order, after `after`.
    pub fn for_owner(&self, owner: NodeId, after: Option<&BlobKey>, limit: usize) -> Vec<Hint> {
        use std::ops::Bound;
        let start = match after {
            Some(key) => Bound::Excluded(row(owner, key)),
            None => Bound::Included(owner.to_be_bytes().to_vec()),
        };
        let end = match owner.checked_add(1) {
            Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        self.tree
            .range::<Vec<u8>, _>((start, end))
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| decode(&k, &v))
            .take(limit)
            .collect()
    }

    /// Hints held (a counter: cheap anywhere).
    pub fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> BlobKey {
        BlobKey::parse(k).unwrap()
    }

    #[test]
    fn hints_survive_a_reopen_and_merge_holders() {
        let dir = tempfile::tempdir().unwrap();
        let key = key("1234");
        {
            let log = HintLog::open(dir.path()).unwrap();
            log.add_for_all(&[7], &key, &[1]).unwrap();
            log.add_for_all(&[7], &key, &[2, 1]).unwrap();
            log.add_for_all(&[3], &key, &[1]).unwrap();
            assert_eq!(log.len(), 2);
        }
        let log = HintLog::open(dir.path()).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log.owners(), vec![3, 7]);
        let hints = log.for_owner(7, None, 10);
        assert_eq!(hints.len(), 1);
        assert_eq!(hints[0].holders, vec![1, 2]);
        log.remove(&hints[0]).unwrap();
        log.remove(&hints[0]).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log.owners(), vec![3]);
    }

    #[test]
    fn one_call_records_a_hint_for_every_missing_owner() {
        let dir = tempfile::tempdir().unwrap();
        let key = key("abcd");
        {
            let log = HintLog::open(dir.path()).unwrap();
            log.add_for_all(&[4, 9], &key, &[1, 2]).unwrap();
        }
        let log = HintLog::open(dir.path()).unwrap();
        assert_eq!(log.owners(), vec![4, 9]);
        for owner in [4, 9] {
            let hints = log.for_owner(owner, None, 10);
            assert_eq!(hints.len(), 1);
            assert_eq!(hints[0].holders, vec![1, 2]);
        }
    }

    #[test]
    fn an_owners_hints_page_by_key_and_stay_apart_from_other_owners() {
        let log = HintLog::temporary().unwrap();
        for n in 0..25 {
            log.add_for_all(&[1, u64::MAX], &key(&format!("k{n:02}")), &[2])
                .unwrap();
        }
        log.add_for_all(&[2], &key("other"), &[3]).unwrap();
        assert_eq!(log.owners(), vec![1, 2, u64::MAX]);
        let first = log.for_owner(1, None, 10);
        assert_eq!(first.len(), 10);
        let next = log.for_owner(1, Some(&first[9].key), 100);
        assert_eq!(next.len(), 15);
        assert!(next.iter().all(|h| h.owner == 1));
        assert_eq!(log.for_owner(u64::MAX, None, 100).len(), 25);
    }

    #[test]
    fn past_the_limit_new_hints_are_dropped_and_counted() {
        let log = HintLog::temporary().unwrap().with_limit(3);
        assert_eq!(log.add_for_all(&[1, 2], &key("a"), &[9]).unwrap(), 0);
        // One more fits, the next does not; widening an existing hint always does.
        assert_eq!(log.add_for_all(&[3, 4], &key("a"), &[9]).unwrap(), 1);
        assert_eq!(log.add_for_all(&[1], &key("a"), &[8]).unwrap(), 0);
        assert_eq!(log.len(), 3);
        assert_eq!(log.for_owner(1, None, 10)[0].holders, vec![9, 8]);
        assert!(log.for_owner(4, None, 10).is_empty());
    }
}
