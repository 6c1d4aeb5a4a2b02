//! One key, one body: the deterministic rule that settles a key whose owners hold
//! different bytes (after a partition, a degraded period, a crash mid-write), and the
//! repair that applies it.
//!
//! The rule, computed the same way by every node from the owners' copies:
//! 1. the body (size and checksum) held by the most owners wins;
//! 2. on a tie, the body whose earliest copy has the smallest version (the write that
//!    started first by its coordinator's clock);
//! 3. then the smaller (size, checksum), so that the rule is total.
//!
//! With the write quorum W a majority of the R owners, a body acknowledged while the
//! cluster was healthy is held by at least W owners, and a refused one by at most R - W
//! < W: the acknowledged body always wins (1). Repairs only replace losers with the
//! winner, so the winner's count only grows and nodes settling the same key at once
//! agree.

use std::collections::BTreeMap;

use nxcache_placement::NodeId;
use nxcache_store::{BlobKey, CopyIdentity, Version};

use tracing::Instrument;

use crate::copies::Copied;
use crate::plane::DataPlane;
use crate::topology::ClusterView;

/// The winning body among owners' copies (None when no owner holds one). The copy
/// returned is the winner's earliest.
pub fn winner(copies: &[CopyIdentity]) -> Option<CopyIdentity> {
    // (size, checksum) -> (owners holding it, its earliest copy)
    let mut bodies: BTreeMap<(u64, [u8; 16]), (usize, CopyIdentity)> = BTreeMap::new();
    for c in copies {
        let entry = bodies.entry((c.size, c.checksum)).or_insert((0, *c));
        entry.0 += 1;
        if c.version < entry.1.version {
            entry.1 = *c;
        }
    }
    bodies
        .into_iter()
        .max_by(|(body_a, (n_a, first_a)), (body_b, (n_b, first_b))| {
            n_a.cmp(n_b)
                .then(first_b.version.cmp(&first_a.version))
                .then(body_b.cmp(body_a))
        })
        .map(|(_, (_, first))| first)
}

/// What settling one key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Every owner answered and none holds other bytes than the winner (now).
    Agreed,
    /// Some owner could not be asked (or a repair failed): try again later.
    Unsettled,
}

impl DataPlane {
    /// Brings every owner of `key` to the body the rule picks: owners holding another
    /// body get the winner in place of their copy (a replacement naming the losing
    /// version), owners holding nothing get it too. Only when every owner answers, so
    /// that the count the rule uses is complete.
    pub(crate) async fn settle(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        found_by: &str,
    ) -> Settled {
        self.settle_inner(view, key, found_by)
            .instrument(tracing::info_span!("settle", key = %key, found_by))
            .await
    }

    async fn settle_inner(&self, view: &ClusterView, key: &BlobKey, found_by: &str) -> Settled {
        let owners = view.owners(key.as_str());
        let mut held: Vec<(NodeId, Option<CopyIdentity>)> = Vec::with_capacity(owners.len());
        for owner in &owners {
            match self.copy_at(view, *owner, key).await {
                Ok(copy) => held.push((*owner, copy)),
                Err(err) => {
                    tracing::debug!(key = %key, owner, %err, "settling later: an owner cannot be asked");
                    return Settled::Unsettled;
                }
            }
        }
        let copies: Vec<CopyIdentity> = held.iter().filter_map(|(_, c)| *c).collect();
        let Some(win) = winner(&copies) else {
            return Settled::Agreed;
        };
        let losers: Vec<(NodeId, Version)> = held
            .iter()
            .filter_map(|(n, c)| c.filter(|c| !c.same_content(&win)).map(|c| (*n, c.version)))
            .collect();
        if losers.is_empty() {
            return Settled::Agreed;
        }
        self.inner
            .metrics
            .conflicts
            .with_label_values(&[found_by])
            .inc();
        // A source of the winner's bytes: this node's copy when it has one (no hop).
        let mut sources: Vec<NodeId> = held
            .iter()
            .filter(|(_, c)| c.is_some_and(|c| c.same_content(&win)))
            .map(|(n, _)| *n)
            .collect();
        sources.sort_by_key(|n| *n != view.me);
        tracing::info!(
            key = %key,
            winner_version = %win.version,
            holders = sources.len(),
            losers = losers.len(),
            "settling a key whose owners hold different bodies"
        );
        let mut settled = Settled::Agreed;
        let empty: Vec<NodeId> = held
            .iter()
            .filter(|(_, c)| c.is_none())
            .map(|(n, _)| *n)
            .collect();
        let work = losers
            .iter()
            .map(|(n, v)| (*n, Some(*v)))
            .chain(empty.iter().map(|n| (*n, None)));
        for (dest, replaces) in work {
            let mut done = false;
            for source in &sources {
                match self.copy(view, key, *source, dest, replaces).await {
                    Ok(Copied::Stored) => {
                        if replaces.is_some() {
                            self.inner.metrics.conflict_repairs.inc();
                        } else {
                            self.inner
                                .metrics
                                .copies
                                .with_label_values(&["anti_entropy"])
                                .inc();
                        }
                        done = true;
                    }
                    // It changed meanwhile (another node settled it, or an eviction):
                    // the next pass looks again.
                    Ok(Copied::AlreadyThere | Copied::Differs(_) | Copied::Evicted) => done = true,
                    Ok(Copied::NoSource) => continue,
                    Err(err) => {
                        tracing::debug!(key = %key, dest, %err, "conflict repair failed");
                    }
                }
                break;
            }
            if !done {
                settled = Settled::Unsettled;
            }
        }
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(sum: u8, size: u64, ms: u64, low: u64) -> CopyIdentity {
        CopyIdentity {
            size,
            checksum: [sum; 16],
            version: Version::from_bytes(((u128::from(ms) << 64) | u128::from(low)).to_be_bytes()),
        }
    }

    #[test]
    fn the_body_most_owners_hold_wins_whatever_its_age() {
        let older = copy(1, 10, 100, 0);
        let newer = copy(2, 10, 200, 0);
        let w = winner(&[older, newer, copy(2, 10, 300, 5)]).unwrap();
        assert!(w.same_content(&newer));
        // The winner's earliest copy is returned.
        assert_eq!(w.version, newer.version);
    }

    #[test]
    fn a_tie_goes_to_the_earlier_write_then_to_the_smaller_body() {
        let first = copy(9, 10, 100, 7);
        let second = copy(1, 10, 101, 0);
        assert!(winner(&[second, first]).unwrap().same_content(&first));
        assert!(winner(&[first, second]).unwrap().same_content(&first));
        // Same version time and bits (cannot happen for two writes, but the rule is total).
        let a = copy(1, 10, 100, 7);
        let b = copy(2, 10, 100, 7);
        assert!(winner(&[b, a]).unwrap().same_content(&a));
        assert_eq!(winner(&[]), None);
    }

    #[test]
    fn every_order_of_the_same_copies_gives_the_same_winner() {
        let copies = [
            copy(3, 10, 100, 1),
            copy(4, 11, 90, 2),
            copy(3, 10, 150, 3),
            copy(5, 10, 80, 4),
            copy(4, 11, 95, 5),
        ];
        let expected = winner(&copies).unwrap();
        // Two bodies with two owners each: the earlier write (4 at 90 ms) wins.
        assert!(expected.same_content(&copies[1]));
        let mut shuffled = copies;
        for i in 0..copies.len() {
            shuffled.rotate_left(1);
            if i % 2 == 0 {
                shuffled.reverse();
            }
            assert_eq!(winner(&shuffled), Some(expected));
        }
    }
}
