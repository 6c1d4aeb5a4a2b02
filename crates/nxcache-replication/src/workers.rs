//! Background workers of the data plane: hinted hand-off, rebalancing, anti-entropy,
//! scrub, and keeping owners' LRU order and evictions in step.

use std::collections::HashMap;
use std::time::Duration;

use nxcache_placement::NodeId;
use nxcache_store::{BlobKey, ScrubOutcome};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::digests::{digests_of, shared_by_range};
use crate::plane::{DataPlane, WorkerReport, lock, within_rpc};
use crate::topology::ClusterView;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Time between anti-entropy passes (and rebalancing retries).
    pub anti_entropy_every: Duration,
    /// Bytes per second the scrub may read.
    pub scrub_bytes_per_sec: u64,
    /// Pause between two complete scrub passes.
    pub scrub_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            anti_entropy_every: Duration::from_secs(60),
            scrub_bytes_per_sec: 16 * 1024 * 1024,
            scrub_every: Duration::from_secs(3600),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits for `d`, or returns true when the node is stopping.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopping = tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(d) => false,
    };
    stopping || *stop.borrow()
}

impl DataPlane {
    fn report(&self, name: &'static str, update: impl FnOnce(&mut WorkerReport)) {
        let mut workers = lock(&self.inner.workers);
        let r = workers.entry(name).or_insert_with(|| WorkerReport {
            name,
            ..Default::default()
        });
        update(r);
    }

    fn pass_done(&self, name: &'static str, pending: u64, done: u64) {
        let now = now_ms();
        self.report(name, |r| {
            r.passes += 1;
            r.last_pass_ms = Some(now);
            r.pending = pending;
            r.done += done;
        });
        let m = &self.inner.metrics;
        m.worker_passes.with_label_values(&[name]).inc();
        m.worker_last_pass
            .with_label_values(&[name])
            .set((now / 1000) as i64);
    }

    /// Starts the workers; they stop when `stop` turns true.
    pub fn spawn_workers(
        &self,
        config: WorkerConfig,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        for name in [
            "handoff",
            "rebalance",
            "anti_entropy",
            "scrub",
            "owner_sync",
        ] {
            self.report(name, |_| {});
        }
        let mut handles = Vec::new();
        {
            let (plane, mut stop) = (self.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                loop {
                    plane.deliver_hints().await;
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = plane.inner.handoff_wake.notified() => {}
                    }
                }
            }));
        }
        {
            let (plane, mut stop, every) = (self.clone(), stop.clone(), config.anti_entropy_every);
            handles.push(tokio::spawn(async move {
                // A pass right after each ring change, then one per period; a pass that
                // left keys behind (an owner down) is retried sooner.
                let mut last_epoch = None;
                let mut since = tokio::time::Instant::now();
                let mut retry = false;
                loop {
                    let epoch = plane.view().epoch();
                    let due = since.elapsed() >= every
                        || last_epoch != Some(epoch)
                        || (retry && since.elapsed() >= Duration::from_secs(2));
                    if due {
                        last_epoch = Some(epoch);
                        since = tokio::time::Instant::now();
                        let left = plane
                            .rebalance_pass()
                            .instrument(tracing::info_span!("rebalance", epoch))
                            .await;
                        retry = left > 0;
                        plane
                            .anti_entropy_pass()
                            .instrument(tracing::info_span!("anti_entropy", epoch))
                            .await;
                    }
                    if pause(&mut stop, Duration::from_millis(500)).await {
                        return;
                    }
                }
            }));
        }
        {
            let (plane, mut stop) = (self.clone(), stop.clone());
            let config = config.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    if plane.scrub_pass(&config, &mut stop).await {
                        return;
                    }
                    if pause(&mut stop, config.scrub_every).await {
                        return;
                    }
                }
            }));
        }
        {
            let (plane, mut stop) = (self.clone(), stop);
            handles.push(tokio::spawn(async move {
                loop {
                    let stopping = pause(&mut stop, Duration::from_secs(1)).await;
                    plane.sync_owners().await;
                    if stopping {
                        return;
                    }
                }
            }));
        }
        handles
    }

    /// Hands hinted writes to their owners once they answer.
    pub async fn deliver_hints(&self) {
        let view = self.view();
        let mut delivered = 0u64;
        for hint in self.inner.hints.pending(256) {
            if self.inner.peers.is_down(hint.owner) {
                continue;
            }
            if !view.addrs.contains_key(&hint.owner) && hint.owner != view.me {
                // No longer a member: its share has new owners, nothing to deliver.
                let _ = self.inner.hints.remove(&hint);
                continue;
            }
            let mut sources: Vec<NodeId> = hint.holders.clone();
            // Prefer this node's own copy: no extra hop.
            sources.sort_by_key(|h| *h != view.me);
            let mut done = false;
            for holder in sources {
                if holder != view.me && self.inner.peers.is_down(holder) {
                    continue;
                }
                match self.copy(&view, &hint.key, holder, hint.owner).await {
                    Ok(true) => {
                        done = true;
                        break;
                    }
                    // That holder lost it (evicted): another may still have it.
                    Ok(false) => {}
                    Err(err) => {
                        tracing::debug!(%err, owner = hint.owner, "hand-off failed; retrying later");
                    }
                }
            }
            let all_gone = !done && {
                // No holder has it any more (evicted everywhere): nothing to hand off.
                let mut any = false;
                for h in &hint.holders {
                    any |= self.holds(&view, *h, &hint.key).await != Some(false);
                }
                !any
            };
            if done || all_gone {
                let _ = self.inner.hints.remove(&hint);
                if done {
                    delivered += 1;
                    self.inner
                        .metrics
                        .copies
                        .with_label_values(&["handoff"])
                        .inc();
                }
            }
        }
        let left = self.inner.hints.len() as u64;
        self.inner.metrics.hints.set(left as i64);
        self.pass_done("handoff", left, delivered);
    }

    /// Whether `node` holds `key`: None when it cannot be asked.
    async fn holds(&self, view: &ClusterView, node: NodeId, key: &BlobKey) -> Option<bool> {
        if node == view.me {
            return self.inner.store.contains(key).ok();
        }
        if self.inner.peers.is_down(node) {
            return None;
        }
        let client = self.client(view, node)?;
        match within_rpc(client.head(key.as_str())).await {
            Ok(found) => {
                self.inner.peers.answered(node);
                Some(found.is_some())
            }
            Err(status) => {
                tracing::debug!(%status, node, "head failed");
                self.inner.peers.failed(node);
                None
            }
        }
    }

    /// Moves the keys this node holds but no longer owns to their owners, deleting each
    /// local copy once every owner confirms it has the key. Returns the keys left.
    pub async fn rebalance_pass(&self) -> u64 {
        let view = self.view();
        if view.is_lone() {
            self.inner.metrics.rebalance_pending.set(0);
            self.inner.metrics.rebalance_pending_bytes.set(0);
            self.pass_done("rebalance", 0, 0);
            return 0;
        }
        let store = self.inner.store.clone();
        let misplaced: Vec<(BlobKey, u64)> =
            match tokio::task::spawn_blocking(move || store.list()).await {
                Ok(Ok(all)) => all
                    .into_iter()
                    .filter(|(k, _)| !view.owners(k.as_str()).contains(&view.me))
                    .map(|(k, meta)| (k, meta.size))
                    .collect(),
                _ => return 0,
            };
        let mut left = misplaced.len() as u64;
        let mut left_bytes: u64 = misplaced.iter().map(|(_, size)| size).sum();
        self.inner.metrics.rebalance_pending.set(left as i64);
        self.inner
            .metrics
            .rebalance_pending_bytes
            .set(left_bytes as i64);
        self.report("rebalance", |r| r.pending = left);
        let mut moved = 0;
        for (key, size) in misplaced {
            if self.view().epoch() != view.epoch() {
                // The ring changed again: the next pass starts over from the new one.
                break;
            }
            let mut everywhere = true;
            for owner in view.owners(key.as_str()) {
                match self.holds(&view, owner, &key).await {
                    Some(true) => {}
                    Some(false) => {
                        everywhere &= self
                            .copy_counted(&view, &key, view.me, owner, "rebalance")
                            .await;
                    }
                    None => everywhere = false,
                }
            }
            if everywhere {
                let store = self.inner.store.clone();
                let k = key.clone();
                if matches!(
                    tokio::task::spawn_blocking(move || store.delete(&k)).await,
                    Ok(Ok(_))
                ) {
                    moved += 1;
                    left -= 1;
                    left_bytes = left_bytes.saturating_sub(size);
                    self.inner.metrics.handed_off_deleted.inc();
                    self.inner.metrics.handed_off_bytes.inc_by(size);
                    self.inner.metrics.rebalance_pending.set(left as i64);
                    self.inner
                        .metrics
                        .rebalance_pending_bytes
                        .set(left_bytes as i64);
                    self.report("rebalance", |r| r.pending = left);
                }
            }
        }
        self.pass_done("rebalance", left, moved);
        left
    }

    /// Compares per-range digests of shared keys with each other owner and sends it the
    /// keys it lacks (each side sends what it has, so both directions close).
    pub async fn anti_entropy_pass(&self) {
        let view = self.view();
        let mut copied = 0;
        if !view.is_lone() {
            for peer in view.ring.members().filter(|p| *p != view.me) {
                copied += self.anti_entropy_with(&view, peer).await;
            }
        }
        self.pass_done("anti_entropy", 0, copied);
    }

    async fn anti_entropy_with(&self, view: &std::sync::Arc<ClusterView>, peer: NodeId) -> u64 {
        if self.inner.peers.is_down(peer) {
            return 0;
        }
        let Some(client) = self.client(view, peer) else {
            return 0;
        };
        let theirs = match within_rpc(client.range_digests(view.me, view.epoch())).await {
            Ok(d) => d,
            Err(status) => {
                // Another epoch there (membership still spreading) or down: next pass.
                tracing::debug!(%status, peer, "anti-entropy: no digests");
                if status.code() != tonic::Code::FailedPrecondition {
                    self.peer_failed(peer, &status);
                }
                return 0;
            }
        };
        // This side's shared keys are listed once for the whole comparison.
        let (store, v) = (self.inner.store.clone(), view.clone());
        let Ok(Ok(mine)) =
            tokio::task::spawn_blocking(move || shared_by_range(&store, &v, peer)).await
        else {
            return 0;
        };
        let mut copied = 0;
        for range in digests_of(&mine).differing(&theirs) {
            let Ok(their_keys) = within_rpc(client.range_keys(view.me, view.epoch(), range)).await
            else {
                return copied;
            };
            let their_keys: std::collections::HashSet<String> = their_keys.into_iter().collect();
            for key in &mine[range] {
                if !their_keys.contains(key.as_str())
                    && self
                        .copy_counted(view, key, view.me, peer, "anti_entropy")
                        .await
                {
                    copied += 1;
                }
            }
        }
        copied
    }

    /// Re-verifies every local blob at a bounded rate; a damaged one is dropped and
    /// fetched again from another owner. Returns true when the node is stopping.
    async fn scrub_pass(&self, config: &WorkerConfig, stop: &mut watch::Receiver<bool>) -> bool {
        let store = self.inner.store.clone();
        let Ok(Ok(all)) = tokio::task::spawn_blocking(move || store.list()).await else {
            return false;
        };
        let rate = config.scrub_bytes_per_sec.max(1);
        let mut checked = 0;
        for (key, meta) in all {
            let (store, k) = (self.inner.store.clone(), key.clone());
            let outcome = tokio::task::spawn_blocking(move || store.scrub(&k)).await;
            checked += 1;
            self.inner.metrics.scrubbed.inc();
            if let Ok(Ok(ScrubOutcome::Dropped)) = outcome {
                self.inner.metrics.scrub_corrupt.inc();
                self.refetch(&key).await;
            }
            let budget = Duration::from_secs_f64(meta.size as f64 / rate as f64);
            if pause(stop, budget).await {
                return true;
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

    /// Passes on reads (LRU order) and evictions to the keys' other owners.
    pub async fn sync_owners(&self) {
        let view = self.view();
        let touches: HashMap<NodeId, std::collections::HashSet<String>> =
            std::mem::take(&mut *lock(&self.inner.touches));
        let evicted: Vec<BlobKey> = std::mem::take(&mut *lock(&self.inner.evicted));
        if view.is_lone() {
            return;
        }
        for (peer, keys) in touches {
            if let Some(client) = self.client(&view, peer)
                && !self.inner.peers.is_down(peer)
                && let Err(status) = within_rpc(client.touch(keys.into_iter().collect())).await
            {
                tracing::debug!(%status, peer, "could not pass on reads");
            }
        }
        // An evicted key is dropped by all its owners, so replicas never diverge for
        // long and anti-entropy does not bring it back. Copies held only as a stand-in
        // or before a hand-off are not owned: their eviction is this node's business.
        let mut deletes: HashMap<NodeId, Vec<String>> = HashMap::new();
        for key in evicted {
            let owners = view.owners(key.as_str());
            if !owners.contains(&view.me) {
                continue;
            }
            self.inner.metrics.evictions_propagated.inc();
            for o in owners.into_iter().filter(|o| *o != view.me) {
                deletes.entry(o).or_default().push(key.as_str().to_owned());
            }
        }
        let mut done = 0;
        for (peer, keys) in deletes {
            let Some(client) = self.client(&view, peer) else {
                continue;
            };
            match within_rpc(client.delete(keys)).await {
                Ok(n) => done += u64::from(n),
                Err(status) => tracing::debug!(%status, peer, "could not pass on evictions"),
            }
        }
        self.pass_done("owner_sync", 0, done);
    }
}
