//! Hinted hand-off: writes an owner missed, kept on disk until it has them.

use nxcache_placement::NodeId;
use nxcache_store::BlobKey;

/// "Owner X should hold key K; these nodes have it." In a sled tree keyed
/// `<owner as 8 bytes BE><key>`, so one owner's hints are one range scan.
#[derive(Clone)]
pub struct HintLog {
    tree: sled::Tree,
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
    /// Opens (or creates) the hint log in its own sled database at `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, nxcache_sled::OpenError> {
        let db = nxcache_sled::open(sled::Config::new().cache_capacity(2 * 1024 * 1024), dir)?;
        let tree = db
            .open_tree("hints")
            .map_err(|source| nxcache_sled::OpenError::Sled {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(HintLog { tree })
    }

    /// An in-memory log (tests, and a node without a data dir).
    pub fn temporary() -> Result<Self, sled::Error> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(HintLog {
            tree: db.open_tree("hints")?,
        })
    }

    /// Records (or widens) one hint per owner in `owners`, flushed once for all of them
    /// before returning, so an acknowledged write's hints survive a crash. Blocks on the
    /// disk: async callers run it on the blocking pool.
    pub fn add_for_all(
        &self,
        owners: &[NodeId],
        key: &BlobKey,
        holders: &[NodeId],
    ) -> Result<(), sled::Error> {
        for owner in owners {
            let row = row(*owner, key);
            let mut all: Vec<NodeId> = match self.tree.get(&row)? {
                Some(v) => decode(&row, &v).map(|h| h.holders).unwrap_or_default(),
                None => Vec::new(),
            };
            for h in holders {
                if !all.contains(h) {
                    all.push(*h);
                }
            }
            self.tree.insert(row, encode(&all))?;
        }
        self.tree.flush()?;
        Ok(())
    }

    pub fn remove(&self, hint: &Hint) -> Result<(), sled::Error> {
        self.tree.remove(row(hint.owner, &hint.key))?;
        Ok(())
    }

    /// Up to `limit` hints, owner by owner.
    pub fn pending(&self, limit: usize) -> Vec<Hint> {
        self.tree
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| decode(&k, &v))
            .take(limit)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_survive_a_reopen_and_merge_holders() {
        let dir = tempfile::tempdir().unwrap();
        let key = BlobKey::parse("1234").unwrap();
        {
            let log = HintLog::open(dir.path()).unwrap();
            log.add_for_all(&[7], &key, &[1]).unwrap();
            log.add_for_all(&[7], &key, &[2, 1]).unwrap();
            log.add_for_all(&[3], &key, &[1]).unwrap();
        }
        let log = HintLog::open(dir.path()).unwrap();
        let hints = log.pending(10);
        assert_eq!(hints.len(), 2);
        assert_eq!(hints[0].owner, 3);
        assert_eq!(hints[1].holders, vec![1, 2]);
        log.remove(&hints[0]).unwrap();
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn one_call_records_a_hint_for_every_missing_owner() {
        let dir = tempfile::tempdir().unwrap();
        let key = BlobKey::parse("abcd").unwrap();
        {
            let log = HintLog::open(dir.path()).unwrap();
            log.add_for_all(&[4, 9], &key, &[1, 2]).unwrap();
        }
        let log = HintLog::open(dir.path()).unwrap();
        let hints = log.pending(10);
        let owners: Vec<NodeId> = hints.iter().map(|h| h.owner).collect();
        assert_eq!(owners, vec![4, 9]);
        assert!(hints.iter().all(|h| h.holders == vec![1, 2]));
    }
}
