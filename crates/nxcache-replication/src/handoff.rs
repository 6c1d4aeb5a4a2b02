//! Hinted hand-off: gives each owner the writes it missed, once it answers. Fair across
//! owners: every pass takes at most a page of each owner's hints, resuming where the last
//! pass left off, so one owner that stays down (or one huge backlog) never holds back the
//! others' hand-back.

use nxcache_placement::NodeId;

use crate::agreement::Settled;
use crate::copies::Copied;
use crate::hints::Hint;
use crate::plane::{DataPlane, lock};
use crate::topology::ClusterView;

/// Hints handed over per owner and pass.
const HINTS_PER_OWNER_PER_PASS: usize = 64;

impl DataPlane {
    /// One round over the owners that have hints: a page of each live owner's.
    pub async fn deliver_hints(&self) {
        let view = self.view();
        let mut delivered = 0u64;
        let hints = self.inner.hints.clone();
        for owner in hints.owners() {
            let gone = owner != view.me && !view.addrs.contains_key(&owner);
            if !gone && owner != view.me && self.inner.peers.is_down(owner) {
                continue;
            }
            let cursor = lock(&self.inner.hint_cursors).get(&owner).cloned();
            let page = hints.for_owner(owner, cursor.as_ref(), HINTS_PER_OWNER_PER_PASS);
            // Next time: after this page, or from the start once the end was reached.
            {
                let mut cursors = lock(&self.inner.hint_cursors);
                match page.last() {
                    Some(last) if page.len() == HINTS_PER_OWNER_PER_PASS => {
                        cursors.insert(owner, last.key.clone());
                    }
                    _ => {
                        cursors.remove(&owner);
                    }
                }
            }
            for hint in page {
                // No longer a member: its share has new owners, nothing to deliver.
                let done = gone || self.deliver_one(&view, &hint).await;
                if done {
                    let _ = hints.remove(&hint);
                    delivered += u64::from(!gone);
                }
                if owner != view.me && self.inner.peers.is_down(owner) {
                    break;
                }
            }
        }
        let left = hints.len();
        self.inner.metrics.hints.set(left as i64);
        self.pass_done("handoff", left, delivered);
    }

    /// Gives `hint.owner` the key from one of its holders. True when the hint is done:
    /// the owner holds the bytes now (or settled a conflict by the rule), evicted the
    /// artifact, or no holder has it any more.
    async fn deliver_one(&self, view: &ClusterView, hint: &Hint) -> bool {
        let mut sources: Vec<NodeId> = hint.holders.clone();
        // Prefer this node's own copy: no extra hop.
        sources.sort_by_key(|h| *h != view.me);
        let mut without = 0;
        for holder in &sources {
            if *holder != view.me && self.inner.peers.is_down(*holder) {
                continue;
            }
            match self.copy(view, &hint.key, *holder, hint.owner, None).await {
                Ok(Copied::Stored) => {
                    self.inner
                        .metrics
                        .copies
                        .with_label_values(&["handoff"])
                        .inc();
                    return true;
                }
                Ok(Copied::AlreadyThere | Copied::Evicted) => return true,
                // The owner holds other bytes: the rule decides which body stays.
                Ok(Copied::Differs(_)) => {
                    return self.settle(view, &hint.key, "handoff").await == Settled::Agreed;
                }
                // That holder lost it (evicted, or lost a conflict): another may have it.
                Ok(Copied::NoSource) => without += 1,
                Err(err) => {
                    tracing::debug!(%err, owner = hint.owner, "hand-off failed; retrying later");
                }
            }
        }
        // No holder has it any more (evicted everywhere): nothing to hand off.
        without == sources.len()
    }
}
