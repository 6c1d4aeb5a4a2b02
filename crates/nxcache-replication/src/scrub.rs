//! Scrub: every local copy re-read at a bounded rate against its checksum, walking the
//! store in ring order a page at a time; a damaged copy is dropped and fetched back from
//! another owner.

use std::time::Duration;

use nxcache_store::{BlobKey, ScrubOutcome};
use tokio::sync::watch;

use crate::pages::{PAGE, RingPages};
use crate::plane::DataPlane;
use crate::workers::{WorkerConfig, pause};

impl DataPlane {
    /// One scrub pass. Returns true when the node is stopping.
    pub(crate) async fn scrub_pass(
        &self,
        config: &WorkerConfig,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let rate = config.scrub_bytes_per_sec.max(1);
        let mut checked = 0;
        let mut pages = RingPages::new(self.inner.store.clone(), vec![(0, u64::MAX)]);
        while let Some(page) = pages.next(PAGE).await {
            for entry in page {
                let Ok(key) = BlobKey::parse(&entry.key) else {
                    continue;
                };
                let (store, k) = (self.inner.store.clone(), key.clone());
                let outcome = tokio::task::spawn_blocking(move || store.scrub(&k)).await;
                checked += 1;
                self.inner.metrics.scrubbed.inc();
                if let Ok(Ok(ScrubOutcome::Dropped)) = outcome {
                    self.inner.metrics.scrub_corrupt.inc();
                    self.refetch(&key).await;
                }
                let budget = Duration::from_secs_f64(entry.copy.size as f64 / rate as f64);
                if pause(stop, budget).await {
                    return true;
                }
            }
        }
        self.pass_done("scrub", 0, checked);
        false
    }

    /// Gets a key this node owns back from another owner (after a scrub dropped it).
    async fn refetch(&self, key: &BlobKey) {
        let view = self.view();
        let owners = view.owners(key.as_str());
        if view.is_lone() || !owners.contains(&view.me) {
            return;
        }
        for o in owners.into_iter().filter(|o| *o != view.me) {
            if self
                .copy_counted(&view, key, o, view.me, "read_repair")
                .await
            {
                return;
            }
        }
    }
}
