//! Rebalancing: a node hands the copies it holds but no longer owns (after a ring change,
//! or held as a stand-in) to their owners, then deletes its own copy by naming it. Only
//! the ring ranges this node does not own are scanned, a page at a time.

use nxcache_store::{DeleteReason, RingEntry};

use crate::copies::Copied;
use crate::pages::{PAGE, RingPages};
use crate::plane::DataPlane;
use crate::topology::ClusterView;

/// Ring ranges whose owners do not include this node, merged.
pub(crate) fn ranges_not_owned(view: &ClusterView) -> Vec<(u64, u64)> {
    merge(
        view.ring
            .segments()
            .into_iter()
            .filter(|s| !s.owners.contains(&view.me))
            .map(|s| (s.first, s.last)),
    )
}

/// Adjacent ranges joined (input in ring order).
pub(crate) fn merge(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (first, last) in ranges {
        match out.last_mut() {
            Some(prev) if prev.1.checked_add(1) == Some(first) => prev.1 = last,
            _ => out.push((first, last)),
        }
    }
    out
}

impl DataPlane {
    /// Moves the keys this node holds but no longer owns to their owners, deleting each
    /// local copy once every owner holds a copy of the key. Returns the keys left.
    pub async fn rebalance_pass(&self) -> u64 {
        let view = self.view();
        let ranges = if view.is_lone() {
            Vec::new()
        } else {
            ranges_not_owned(&view)
        };
        // What there is to move (a walk of the misplaced copies only).
        let (mut left, mut left_bytes) = (0u64, 0u64);
        let mut pages = RingPages::new(self.inner.store.clone(), ranges.clone());
        while let Some(page) = pages.next(PAGE).await {
            left += page.len() as u64;
            left_bytes += page.iter().map(|e| e.copy.size).sum::<u64>();
        }
        let metrics = &self.inner.metrics;
        metrics.rebalance_pending.set(left as i64);
        metrics.rebalance_pending_bytes.set(left_bytes as i64);
        self.report("rebalance", |r| r.pending = left);
        let mut moved = 0;
        let mut pages = RingPages::new(self.inner.store.clone(), ranges);
        'pages: while let Some(page) = pages.next(PAGE).await {
            for entry in page {
                if self.view().epoch() != view.epoch() {
                    // The ring changed again: the next pass starts over from the new one.
                    break 'pages;
                }
                if self.hand_over(&view, &entry).await {
                    moved += 1;
                    left = left.saturating_sub(1);
                    left_bytes = left_bytes.saturating_sub(entry.copy.size);
                    metrics.handed_off_deleted.inc();
                    metrics.handed_off_bytes.inc_by(entry.copy.size);
                    metrics.rebalance_pending.set(left as i64);
                    metrics.rebalance_pending_bytes.set(left_bytes as i64);
                    self.report("rebalance", |r| r.pending = left);
                }
            }
        }
        self.pass_done("rebalance", left, moved);
        left
    }

    /// Makes sure every owner holds a copy of the entry's key (copying this node's over
    /// where one lacks it), then deletes this node's copy by naming it. True when deleted.
    async fn hand_over(&self, view: &ClusterView, entry: &RingEntry) -> bool {
        let Ok(key) = nxcache_store::BlobKey::parse(&entry.key) else {
            return false;
        };
        for owner in view.owners(&entry.key) {
            let satisfied = match self.copy_at(view, owner, &key).await {
                // Any copy: which body stays is the owners' business (the rule).
                Ok(Some(_)) => true,
                Ok(None) => match self.copy(view, &key, view.me, owner, None).await {
                    Ok(Copied::Stored) => {
                        self.inner
                            .metrics
                            .copies
                            .with_label_values(&["rebalance"])
                            .inc();
                        true
                    }
                    // The owner evicted it: the artifact leaves with this copy too.
                    Ok(Copied::AlreadyThere | Copied::Differs(_) | Copied::Evicted) => true,
                    Ok(Copied::NoSource) => return false,
                    Err(err) => {
                        tracing::debug!(key = %key, owner, %err, "hand-over failed; retrying later");
                        false
                    }
                },
                Err(_) => false,
            };
            if !satisfied {
                return false;
            }
        }
        matches!(
            self.delete_copies(
                view,
                view.me,
                &[(key, entry.copy.version)],
                DeleteReason::HandedOff
            )
            .await,
            Ok(1)
        )
    }
}
