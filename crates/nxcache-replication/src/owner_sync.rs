//! Owners kept in step: reads served here move the key up the other owners' LRU order
//! (`Blobs.Touch`), and copies this node evicts are evicted by the other owners too
//! (`Blobs.Delete` naming the evicted copy, so a newer write's copy is never taken).

use std::collections::{HashMap, HashSet};

use nxcache_placement::NodeId;
use nxcache_store::{BlobKey, BlobMeta, DeleteReason, Version};

use crate::plane::{DataPlane, lock, within_rpc};

impl DataPlane {
    /// Passes on reads (LRU order) and evictions to the keys' other owners, in batches.
    pub async fn sync_owners(&self) {
        let view = self.view();
        let touches: HashMap<NodeId, HashSet<String>> =
            std::mem::take(&mut *lock(&self.inner.touches));
        let evicted: Vec<(BlobKey, BlobMeta)> = std::mem::take(&mut *lock(&self.inner.evicted));
        if view.is_lone() {
            return;
        }
        for (peer, keys) in touches {
            let keys: Vec<String> = keys.into_iter().collect();
            if let Some(client) = self.client(&view, peer)
                && !self.inner.peers.is_down(peer)
                && let Err(status) = within_rpc(client.touch(&keys)).await
            {
                tracing::debug!(%status, peer, "could not pass on reads");
            }
        }
        // An evicted copy is dropped by all the key's owners, so replicas never diverge
        // for long; the eviction marks keep repair from bringing it back. Copies held only
        // as a stand-in or before a hand-off are not owned: their eviction is this
        // node's business.
        let mut deletes: HashMap<NodeId, Vec<(BlobKey, Version)>> = HashMap::new();
        for (key, meta) in evicted {
            let owners = view.owners(key.as_str());
            if !owners.contains(&view.me) {
                continue;
            }
            self.inner.metrics.evictions_propagated.inc();
            for o in owners.into_iter().filter(|o| *o != view.me) {
                deletes
                    .entry(o)
                    .or_default()
                    .push((key.clone(), meta.version));
            }
        }
        let mut done = 0;
        for (peer, copies) in deletes {
            if self.inner.peers.is_down(peer) {
                // Anti-entropy passes it on when the peer is back (guided by the marks).
                continue;
            }
            match self
                .delete_copies(&view, peer, &copies, DeleteReason::Evicted)
                .await
            {
                Ok(n) => done += u64::from(n),
                Err(err) => tracing::debug!(%err, peer, "could not pass on evictions"),
            }
        }
        self.pass_done("owner_sync", 0, done);
    }
}
