//! Anti-entropy digests: per key range, a summary of the keys two owners share.

use nxcache_placement::{KEY_RANGES, NodeId, key_digest, key_range};
use nxcache_store::{BlobKey, BlobStore, StoreError};

use crate::topology::ClusterView;

/// XOR of the keys' digests and their count, for each of the [`KEY_RANGES`] ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDigests {
    pub digests: Vec<u64>,
    pub counts: Vec<u32>,
}

impl RangeDigests {
    pub fn from_parts(digests: Vec<u64>, counts: Vec<u32>) -> Option<Self> {
        (digests.len() == KEY_RANGES && counts.len() == KEY_RANGES)
            .then_some(RangeDigests { digests, counts })
    }

    /// The ranges where `self` and `other` differ.
    pub fn differing(&self, other: &RangeDigests) -> Vec<usize> {
        (0..KEY_RANGES)
            .filter(|r| {
                self.digests[*r] != other.digests[*r] || self.counts[*r] != other.counts[*r]
            })
            .collect()
    }
}

/// Keys held here that `view` says both this node and `peer` own, by key range. One
/// pass over the index serves a whole comparison with a peer.
pub(crate) fn shared_by_range(
    store: &BlobStore,
    view: &ClusterView,
    peer: NodeId,
) -> Result<Vec<Vec<BlobKey>>, StoreError> {
    let mut ranges = vec![Vec::new(); KEY_RANGES];
    for (key, _) in store.list()? {
        let owners = view.owners(key.as_str());
        if owners.contains(&view.me) && owners.contains(&peer) {
            ranges[key_range(key.as_str())].push(key);
        }
    }
    Ok(ranges)
}

/// The digests of keys grouped by [`shared_by_range`].
pub(crate) fn digests_of(ranges: &[Vec<BlobKey>]) -> RangeDigests {
    RangeDigests {
        digests: ranges
            .iter()
            .map(|keys| keys.iter().fold(0, |d, k| d ^ key_digest(k.as_str())))
            .collect(),
        counts: ranges.iter().map(|keys| keys.len() as u32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grouped(keys: &[&str]) -> Vec<Vec<BlobKey>> {
        let mut ranges = vec![Vec::new(); KEY_RANGES];
        for k in keys {
            ranges[key_range(k)].push(BlobKey::parse(k).unwrap());
        }
        ranges
    }

    #[test]
    fn digests_ignore_order_and_point_at_the_range_that_differs() {
        let all: Vec<String> = (0..500).map(|n| n.to_string()).collect();
        let keys: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        let mut reversed = keys.clone();
        reversed.reverse();
        assert_eq!(digests_of(&grouped(&keys)), digests_of(&grouped(&reversed)));
        let missing_one: Vec<&str> = keys.iter().copied().filter(|k| *k != "123").collect();
        let differing = digests_of(&grouped(&keys)).differing(&digests_of(&grouped(&missing_one)));
        assert_eq!(differing, vec![key_range("123")]);
    }
}
