//! Anti-entropy: every node compares, with every other member, the copies of the keys
//! they both own, and repairs what differs: copies one side lacks (pushed or pulled),
//! copies of different bodies (settled by the rule in `agreement.rs`), and copies one side
//! evicted (dropped on the other, so an eviction is not undone).
//!
//! The work is proportional to what differs, not to the store: the store keeps range
//! digests up to date as copies come and go (XOR of a content digest per copy, per
//! bucket of ring positions), so comparing the shared ring costs one digest per range.
//! Ranges are compared coarse first (256 cells of the ring), and only those that differ
//! are narrowed to the store's buckets (65,536) before their keys are listed, in pages,
//! and merged. Every message is bounded: at most 1024 ranges per digest call, 1000 keys
//! per page.

use std::collections::VecDeque;

use futures_util::StreamExt;
use nxcache_placement::{NodeId, Segment};
use nxcache_store::{BlobKey, DIGEST_BUCKET_BITS, DeleteReason, RangeDigest, RingEntry};
use tracing::Instrument;

use crate::BlobClient;
use crate::client::{MAX_BATCH, MAX_PAGE};
use crate::copies::Copied;
use crate::pages::RingPages;
use crate::plane::{DataPlane, within_rpc};
use crate::rebalance::merge;
use crate::topology::ClusterView;

/// The first comparison cuts the shared ring into cells of this many top bits.
const COARSE_BITS: u32 = 8;
/// A differing range with at most this many copies on either side is listed at once
/// rather than narrowed further.
const LIST_AT_MOST: u64 = 256;
/// Repairs of one page running at once.
const REPAIRS_IN_FLIGHT: usize = 8;

/// What one pass did, for the report and the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AntiEntropyTotals {
    /// Ring ranges whose digests were compared.
    pub ranges_compared: u64,
    /// Of those, ranges whose digests differed.
    pub ranges_differing: u64,
    /// Keys listed (both sides) to find what differs.
    pub keys_listed: u64,
    /// Keys repaired: copies made, conflicts settled, evictions passed on.
    pub keys_repaired: u64,
}

/// Ring ranges owned by both `me` and `peer`, merged.
pub(crate) fn shared_ranges(segments: &[Segment], me: NodeId, peer: NodeId) -> Vec<(u64, u64)> {
    merge(
        segments
            .iter()
            .filter(|s| s.owners.contains(&me) && s.owners.contains(&peer))
            .map(|s| (s.first, s.last)),
    )
}

/// `ranges` cut at every multiple of 2^(64 - bits): at most one cell of that size each.
pub(crate) fn split(ranges: &[(u64, u64)], bits: u32) -> Vec<(u64, u64)> {
    let shift = 64 - bits;
    let mut out = Vec::new();
    for &(mut first, last) in ranges {
        loop {
            let cell_last = first | ((1u64 << shift) - 1);
            let piece_last = cell_last.min(last);
            out.push((first, piece_last));
            if piece_last == last {
                break;
            }
            first = piece_last + 1;
        }
    }
    out
}

/// What differs for one key.
enum Fix {
    /// The peer lacks this node's copy.
    PeerLacks(RingEntry),
    /// This node lacks the peer's copy.
    Lacking(RingEntry),
    /// Different bodies.
    Conflict(String),
}

/// The peer's side of a listing: a page at a time, in ring order.
struct Listing {
    buf: VecDeque<RingEntry>,
    cursor: Option<(u64, String)>,
    done: bool,
}

impl Listing {
    fn new() -> Self {
        Listing {
            buf: VecDeque::new(),
            cursor: None,
            done: false,
        }
    }

    fn take(&mut self, page: Vec<RingEntry>, more: bool) {
        if let Some(last) = page.last() {
            self.cursor = Some((last.position, last.key.clone()));
        }
        self.done = !more || page.is_empty();
        self.buf.extend(page);
    }
}

fn order(e: &RingEntry) -> (u64, &str) {
    (e.position, e.key.as_str())
}

impl DataPlane {
    /// Compares this node's copies with every other member's and repairs what differs.
    pub async fn anti_entropy_pass(&self) -> AntiEntropyTotals {
        let view = self.view();
        let mut totals = AntiEntropyTotals::default();
        if !view.is_lone() {
            let segments = view.ring.segments();
            let peers: Vec<NodeId> = view.ring.members().filter(|p| *p != view.me).collect();
            for peer in peers {
                self.anti_entropy_with(&view, &segments, peer, &mut totals)
                    .instrument(tracing::info_span!("anti_entropy_peer", peer))
                    .await;
            }
        }
        self.pass_done("anti_entropy", 0, totals.keys_repaired);
        totals
    }

    async fn anti_entropy_with(
        &self,
        view: &ClusterView,
        segments: &[Segment],
        peer: NodeId,
        totals: &mut AntiEntropyTotals,
    ) {
        if self.inner.peers.is_down(peer) {
            return;
        }
        let Some(client) = self.client(view, peer) else {
            return;
        };
        let shared = shared_ranges(segments, view.me, peer);
        if shared.is_empty() {
            return;
        }
        let Some(differing) = self
            .compare(view, &client, peer, &split(&shared, COARSE_BITS), totals)
            .await
        else {
            return;
        };
        let (mut listed, narrow): (Vec<_>, Vec<_>) = differing
            .into_iter()
            .partition(|(_, mine, theirs)| mine.count.max(theirs.count) <= LIST_AT_MOST);
        if !narrow.is_empty() {
            let ranges: Vec<(u64, u64)> = narrow.iter().map(|(r, _, _)| *r).collect();
            let Some(finer) = self
                .compare(
                    view,
                    &client,
                    peer,
                    &split(&ranges, DIGEST_BUCKET_BITS),
                    totals,
                )
                .await
            else {
                return;
            };
            listed.extend(finer);
        }
        let mut to_list: Vec<(u64, u64)> = listed.into_iter().map(|(r, _, _)| r).collect();
        to_list.sort_unstable();
        for group in to_list.chunks(MAX_BATCH) {
            if !self.reconcile(view, &client, peer, group, totals).await {
                return;
            }
        }
    }

    /// The ranges whose digests differ here and at `peer`, with both digests. None when
    /// the peer cannot be asked (down, or at another ring epoch: next pass).
    async fn compare(
        &self,
        view: &ClusterView,
        client: &BlobClient,
        peer: NodeId,
        ranges: &[(u64, u64)],
        totals: &mut AntiEntropyTotals,
    ) -> Option<Vec<((u64, u64), RangeDigest, RangeDigest)>> {
        let theirs = match within_rpc(client.range_digests(view.me, view.epoch(), ranges)).await {
            Ok(d) => d,
            Err(status) => {
                tracing::debug!(%status, peer, "anti-entropy: no digests");
                if status.code() != tonic::Code::FailedPrecondition {
                    self.peer_failed(peer, &status);
                }
                return None;
            }
        };
        let (store, mine_ranges) = (self.inner.store.clone(), ranges.to_vec());
        let mine = tokio::task::spawn_blocking(move || {
            mine_ranges
                .iter()
                .map(|(f, l)| store.ring_digest(*f, *l))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .ok()?
        .ok()?;
        let differing: Vec<_> = ranges
            .iter()
            .zip(mine.into_iter().zip(theirs))
            .filter(|(_, (m, t))| m != t)
            .map(|(r, (m, t))| (*r, m, t))
            .collect();
        let m = &self.inner.metrics;
        m.anti_entropy_ranges_compared.inc_by(ranges.len() as u64);
        m.anti_entropy_ranges_differing
            .inc_by(differing.len() as u64);
        totals.ranges_compared += ranges.len() as u64;
        totals.ranges_differing += differing.len() as u64;
        Some(differing)
    }

    /// Lists both sides' copies in `ranges` (at most [`MAX_BATCH`]) page by page, merges
    /// them in ring order and repairs what differs. False when the peer stopped answering.
    async fn reconcile(
        &self,
        view: &ClusterView,
        client: &BlobClient,
        peer: NodeId,
        ranges: &[(u64, u64)],
        totals: &mut AntiEntropyTotals,
    ) -> bool {
        let (mut mine, mut theirs) = (Listing::new(), Listing::new());
        let mut my_pages = RingPages::new(self.inner.store.clone(), ranges.to_vec());
        let mut fixes: Vec<Fix> = Vec::new();
        loop {
            if mine.buf.is_empty() && !mine.done {
                match my_pages.next(MAX_PAGE).await {
                    Some(page) => {
                        totals.keys_listed += page.len() as u64;
                        mine.take(page, true);
                    }
                    None => mine.done = true,
                }
            }
            if theirs.buf.is_empty() && !theirs.done {
                let after = theirs.cursor.as_ref().map(|(p, k)| (*p, k.as_str()));
                match within_rpc(client.range_keys(view.me, view.epoch(), ranges, after, MAX_PAGE))
                    .await
                {
                    Ok((page, more)) => {
                        totals.keys_listed += page.len() as u64;
                        theirs.take(page, more);
                    }
                    Err(status) => {
                        tracing::debug!(%status, peer, "anti-entropy: no key list");
                        if status.code() != tonic::Code::FailedPrecondition {
                            self.peer_failed(peer, &status);
                        }
                        return false;
                    }
                }
            }
            let fix = match (mine.buf.front(), theirs.buf.front()) {
                (None, None) => break,
                // Nothing left on one side while the other may still have more: refill.
                (None, Some(_)) if !mine.done => continue,
                (Some(_), None) if !theirs.done => continue,
                (Some(m), Some(t)) if order(m) == order(t) => {
                    let (m, t) = (mine.buf.pop_front(), theirs.buf.pop_front());
                    match (m, t) {
                        (Some(m), Some(t)) if !m.copy.same_content(&t.copy) => {
                            Some(Fix::Conflict(m.key))
                        }
                        _ => None,
                    }
                }
                (Some(m), Some(t)) if order(m) < order(t) => {
                    mine.buf.pop_front().map(Fix::PeerLacks)
                }
                (Some(_), None) => mine.buf.pop_front().map(Fix::PeerLacks),
                _ => theirs.buf.pop_front().map(Fix::Lacking),
            };
            fixes.extend(fix);
            if fixes.len() >= MAX_PAGE {
                totals.keys_repaired += self.apply(view, peer, std::mem::take(&mut fixes)).await;
            }
        }
        totals.keys_repaired += self.apply(view, peer, fixes).await;
        true
    }

    /// Applies fixes, a few at a time. Returns the keys repaired.
    async fn apply(&self, view: &ClusterView, peer: NodeId, fixes: Vec<Fix>) -> u64 {
        let repaired: Vec<bool> = futures_util::stream::iter(fixes)
            .map(|fix| self.apply_one(view, peer, fix))
            .buffer_unordered(REPAIRS_IN_FLIGHT)
            .collect()
            .await;
        let n = repaired.into_iter().filter(|r| *r).count() as u64;
        self.inner.metrics.anti_entropy_repaired.inc_by(n);
        n
    }

    async fn apply_one(&self, view: &ClusterView, peer: NodeId, fix: Fix) -> bool {
        match fix {
            Fix::PeerLacks(entry) => {
                let Ok(key) = BlobKey::parse(&entry.key) else {
                    return false;
                };
                match self.copy(view, &key, view.me, peer, None).await {
                    Ok(Copied::Stored) => {
                        self.count_copy();
                        true
                    }
                    Ok(Copied::Differs(_)) => self.settle_counted(view, &key).await,
                    // The peer evicted this artifact: so does this node (owners keep the
                    // same keys), by naming its copy.
                    Ok(Copied::Evicted) => self.evict_here(view, &key, &entry).await,
                    Ok(Copied::AlreadyThere | Copied::NoSource) => false,
                    Err(err) => {
                        tracing::debug!(key = %key, peer, %err, "anti-entropy copy failed");
                        self.count_copy_failure();
                        false
                    }
                }
            }
            Fix::Lacking(entry) => {
                let Ok(key) = BlobKey::parse(&entry.key) else {
                    return false;
                };
                // This node evicted that artifact: the peer drops it too, instead of this
                // node taking it back.
                let evicted_here = self
                    .inner
                    .store
                    .eviction_mark(&key)
                    .ok()
                    .flatten()
                    .is_some_and(|mark| mark.covers(&entry.copy));
                if evicted_here {
                    return self
                        .delete_copies(
                            view,
                            peer,
                            &[(key, entry.copy.version)],
                            DeleteReason::Evicted,
                        )
                        .await
                        .is_ok_and(|n| n > 0);
                }
                match self.copy(view, &key, peer, view.me, None).await {
                    Ok(Copied::Stored) => {
                        self.count_copy();
                        true
                    }
                    Ok(Copied::Differs(_)) => self.settle_counted(view, &key).await,
                    Ok(_) => false,
                    Err(err) => {
                        tracing::debug!(key = %key, peer, %err, "anti-entropy copy failed");
                        self.count_copy_failure();
                        false
                    }
                }
            }
            Fix::Conflict(key) => match BlobKey::parse(&key) {
                Ok(key) => self.settle_counted(view, &key).await,
                Err(_) => false,
            },
        }
    }

    async fn settle_counted(&self, view: &ClusterView, key: &BlobKey) -> bool {
        self.settle(view, key, "anti_entropy").await == crate::agreement::Settled::Agreed
    }

    async fn evict_here(&self, view: &ClusterView, key: &BlobKey, entry: &RingEntry) -> bool {
        self.delete_copies(
            view,
            view.me,
            &[(key.clone(), entry.copy.version)],
            DeleteReason::Evicted,
        )
        .await
        .is_ok_and(|n| n > 0)
    }

    fn count_copy(&self) {
        self.inner
            .metrics
            .copies
            .with_label_values(&["anti_entropy"])
            .inc();
    }

    fn count_copy_failure(&self) {
        self.inner
            .metrics
            .copy_failures
            .with_label_values(&["anti_entropy"])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_cell_boundaries_and_cover_the_same_positions() {
        let cell = 1u64 << 56;
        assert_eq!(split(&[(0, u64::MAX)], 8).len(), 256);
        assert_eq!(
            split(&[(5, cell + 10)], 8),
            vec![(5, cell - 1), (cell, cell + 10)]
        );
        assert_eq!(split(&[(3, 9)], 8), vec![(3, 9)]);
        let ranges = [(100, 3 * cell), (5 * cell + 1, u64::MAX)];
        let pieces = split(&ranges, 16);
        let covered: u128 = pieces.iter().map(|(f, l)| u128::from(l - f) + 1).sum();
        let expected: u128 = ranges.iter().map(|(f, l)| u128::from(l - f) + 1).sum();
        assert_eq!(covered, expected);
        assert!(pieces.windows(2).all(|w| w[0].1 < w[1].0));
    }

    #[test]
    fn the_store_orders_keys_as_placement_places_them() {
        for n in 0..1000 {
            let key = format!("key-{n}");
            assert_eq!(
                nxcache_store::ring_position(&key),
                nxcache_placement::key_position(&key)
            );
        }
    }

    #[test]
    fn shared_ranges_are_where_both_nodes_own() {
        let seg = |first, last, owners: &[u64]| Segment {
            first,
            last,
            owners: owners.to_vec(),
        };
        let segments = [
            seg(0, 9, &[1, 2]),
            seg(10, 19, &[1, 2, 3]),
            seg(20, 29, &[2, 3]),
            seg(30, u64::MAX, &[1, 2]),
        ];
        assert_eq!(
            shared_ranges(&segments, 1, 2),
            vec![(0, 19), (30, u64::MAX)]
        );
        assert_eq!(shared_ranges(&segments, 1, 3), vec![(10, 19)]);
        assert_eq!(shared_ranges(&segments, 3, 4), vec![]);
    }
}
