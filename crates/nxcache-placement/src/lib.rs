//! Placement: which nodes own an artifact.
//!
//! A ring of virtual nodes built from the cluster's active members at one ring epoch.
//! Every node that builds the ring from the same members gets the same owners for every
//! key, with no coordination per artifact. A key's owners are the first R distinct
//! members clockwise from the key's hash; when members carry zones, distinct zones are
//! preferred, so losing a zone loses at most the replicas in it.

use std::collections::{BTreeMap, BTreeSet};

use xxhash_rust::xxh3::xxh3_64;

pub type NodeId = u64;

/// Virtual nodes per member: enough that each member's share of keys stays within a few
/// percent of the mean for small clusters.
pub const DEFAULT_VNODES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    /// Failure domain; empty when unknown.
    pub zone: String,
}

/// The ring of one epoch.
#[derive(Debug, Clone)]
pub struct Ring {
    epoch: u64,
    /// Hash of everything the ring is built from (see [`Ring::digest`]).
    digest: u64,
    replication_factor: usize,
    /// (position, member), sorted by position.
    points: Vec<(u64, NodeId)>,
    zones: BTreeMap<NodeId, String>,
}

fn vnode_position(id: NodeId, vnode: usize) -> u64 {
    xxh3_64(format!("nxcache-node-{id}-vnode-{vnode}").as_bytes())
}

/// Where a key sits on the ring (XXH3-64 of the key; the store orders its index by the
/// same position).
pub fn key_position(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// A stretch of the ring, positions `first..=last`, whose keys all have the same owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first: u64,
    pub last: u64,
    /// The owners, ascending (as a set: their preference order may differ inside).
    pub owners: Vec<NodeId>,
}

impl Ring {
    /// Builds the ring. Duplicate member ids are counted once; the order of `members`
    /// does not matter.
    pub fn new(epoch: u64, members: &[Member], replication_factor: usize, vnodes: usize) -> Ring {
        let zones: BTreeMap<NodeId, String> =
            members.iter().map(|m| (m.id, m.zone.clone())).collect();
        let mut points: Vec<(u64, NodeId)> = zones
            .keys()
            .flat_map(|id| (0..vnodes.max(1)).map(move |v| (vnode_position(*id, v), *id)))
            .collect();
        // Ties (same position) broken by id, so every node sorts the same way.
        points.sort_unstable();
        let replication_factor = replication_factor.max(1);
        let mut inputs = b"nxcache-ring-v1".to_vec();
        for n in [epoch, replication_factor as u64, vnodes.max(1) as u64] {
            inputs.extend_from_slice(&n.to_le_bytes());
        }
        for (id, zone) in &zones {
            inputs.extend_from_slice(&id.to_le_bytes());
            inputs.extend_from_slice(&(zone.len() as u64).to_le_bytes());
            inputs.extend_from_slice(zone.as_bytes());
        }
        Ring {
            epoch,
            digest: xxh3_64(&inputs),
            replication_factor,
            points,
            zones,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A hash of exactly what the ring is built from (epoch, replication factor, virtual
    /// nodes, members and their zones): two nodes with the same digest place every key
    /// the same way. Operators compare it across nodes (`nxcache admin status`).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// [`Ring::digest`] as 16 hex digits.
    pub fn digest_hex(&self) -> String {
        format!("{:016x}", self.digest)
    }

    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.zones.keys().copied()
    }

    /// Copies kept of each key: the configured factor, capped by the member count.
    pub fn replicas(&self) -> usize {
        self.replication_factor.min(self.zones.len())
    }

    /// Owners that must hold a write before it is acknowledged: a majority of the copies.
    pub fn write_quorum(&self) -> usize {
        self.replicas() / 2 + 1
    }

    /// Every member once, in ring order from the key's position: the first `replicas()`
    /// (zone-aware) are the owners, the rest are the stand-ins in preference order.
    pub fn preference_list(&self, key: &str) -> Vec<NodeId> {
        if self.points.is_empty() {
            return Vec::new();
        }
        let start = self
            .points
            .partition_point(|(pos, _)| *pos < key_position(key));
        self.preference_from(start)
    }

    /// The whole ring (`0..=u64::MAX`) as segments of constant owners, in position order,
    /// neighbours with the same set of owners merged. A key's owners depend only on the first
    /// virtual node at or after its position, so every position between two virtual
    /// nodes has the same owners: one segment.
    pub fn segments(&self) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        let push = |first: u64, last: u64, start: usize, out: &mut Vec<Segment>| {
            let mut owners = self.preference_from(start);
            owners.truncate(self.replicas());
            owners.sort_unstable();
            match out.last_mut() {
                Some(prev) if prev.owners == owners && prev.last.checked_add(1) == Some(first) => {
                    prev.last = last
                }
                _ => out.push(Segment {
                    first,
                    last,
                    owners,
                }),
            }
        };
        let Some(&(first_pos, _)) = self.points.first() else {
            return out;
        };
        // Up to the first virtual node, and past the last one, keys wrap to the first.
        push(0, first_pos, 0, &mut out);
        for i in 1..self.points.len() {
            let (prev, here) = (self.points[i - 1].0, self.points[i].0);
            if here > prev {
                push(prev + 1, here, i, &mut out);
            }
        }
        let last_pos = self.points[self.points.len() - 1].0;
        if last_pos < u64::MAX {
            push(last_pos + 1, u64::MAX, 0, &mut out);
        }
        out
    }

    fn preference_from(&self, start: usize) -> Vec<NodeId> {
        let mut seen = BTreeSet::new();
        let mut clockwise = Vec::with_capacity(self.zones.len());
        for i in 0..self.points.len() {
            let (_, id) = self.points[(start + i) % self.points.len()];
            if seen.insert(id) {
                clockwise.push(id);
                if clockwise.len() == self.zones.len() {
                    break;
                }
            }
        }
        // Owners: walk clockwise taking members from zones not used yet; if there are
        // fewer zones than replicas, fill up with the next members clockwise.
        let want = self.replicas();
        let mut owners: Vec<NodeId> = Vec::with_capacity(want);
        let mut used_zones = BTreeSet::new();
        for id in &clockwise {
            if owners.len() == want {
                break;
            }
            let zone = &self.zones[id];
            if zone.is_empty() || used_zones.insert(zone.clone()) {
                owners.push(*id);
            }
        }
        for id in &clockwise {
            if owners.len() == want {
                break;
            }
            if !owners.contains(id) {
                owners.push(*id);
            }
        }
        let rest: Vec<NodeId> = clockwise
            .into_iter()
            .filter(|id| !owners.contains(id))
            .collect();
        owners.extend(rest);
        owners
    }

    /// The key's owners: `replicas()` distinct members.
    pub fn owners(&self, key: &str) -> Vec<NodeId> {
        let mut list = self.preference_list(key);
        list.truncate(self.replicas());
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[u64]) -> Vec<Member> {
        ids.iter()
            .map(|id| Member {
                id: *id,
                zone: String::new(),
            })
            .collect()
    }

    fn keys(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| {
            format!(
                "{}",
                13_661_868_522_198_395_722u64.wrapping_add(i as u64 * 7919)
            )
        })
    }

    #[test]
    fn the_digest_changes_with_every_input_and_only_with_them() {
        let zoned = |zone: &str| {
            vec![
                Member {
                    id: 1,
                    zone: zone.into(),
                },
                Member {
                    id: 2,
                    zone: String::new(),
                },
            ]
        };
        let base = Ring::new(4, &zoned("a"), 3, 16).digest();
        let reversed: Vec<Member> = zoned("a").into_iter().rev().collect();
        assert_eq!(Ring::new(4, &reversed, 3, 16).digest(), base);
        for other in [
            Ring::new(5, &zoned("a"), 3, 16),
            Ring::new(4, &zoned("b"), 3, 16),
            Ring::new(4, &zoned("a"), 2, 16),
            Ring::new(4, &zoned("a"), 3, 17),
            Ring::new(4, &members(&[1, 2, 3]), 3, 16),
        ] {
            assert_ne!(other.digest(), base);
        }
        assert_eq!(Ring::new(4, &zoned("a"), 3, 16).digest_hex().len(), 16);
    }

    #[test]
    fn every_node_computes_the_same_owners_whatever_the_member_order() {
        let a = Ring::new(1, &members(&[1, 2, 3, 4]), 3, DEFAULT_VNODES);
        let b = Ring::new(1, &members(&[4, 2, 1, 3, 2]), 3, DEFAULT_VNODES);
        for key in keys(1000) {
            assert_eq!(a.owners(&key), b.owners(&key));
        }
    }

    #[test]
    fn owners_are_distinct_and_capped_by_the_member_count() {
        let ring = Ring::new(1, &members(&[1, 2, 3, 4, 5]), 3, DEFAULT_VNODES);
        for key in keys(1000) {
            let owners = ring.owners(&key);
            assert_eq!(owners.len(), 3);
            assert_eq!(owners.iter().collect::<BTreeSet<_>>().len(), 3);
            let prefs = ring.preference_list(&key);
            assert_eq!(prefs.len(), 5);
            assert_eq!(&prefs[..3], &owners[..]);
        }
        let small = Ring::new(1, &members(&[7, 8]), 3, DEFAULT_VNODES);
        assert_eq!(small.replicas(), 2);
        assert_eq!(small.write_quorum(), 2);
        assert_eq!(small.owners("1").len(), 2);
        let one = Ring::new(1, &members(&[7]), 3, DEFAULT_VNODES);
        assert_eq!((one.replicas(), one.write_quorum()), (1, 1));
        assert!(Ring::new(1, &[], 3, DEFAULT_VNODES).owners("1").is_empty());
        assert_eq!(Ring::new(1, &members(&[1, 2, 3]), 3, 8).write_quorum(), 2);
    }

    #[test]
    fn each_node_holds_a_share_within_25_percent_of_the_mean() {
        for n in [3u64, 4, 5, 7] {
            let ids: Vec<u64> = (1..=n).collect();
            let ring = Ring::new(1, &members(&ids), 3, DEFAULT_VNODES);
            let mut count: BTreeMap<u64, usize> = BTreeMap::new();
            let total = 30_000;
            for key in keys(total) {
                for o in ring.owners(&key) {
                    *count.entry(o).or_default() += 1;
                }
            }
            let mean = (total * ring.replicas()) as f64 / n as f64;
            for (id, c) in count {
                let off = (c as f64 - mean).abs() / mean;
                assert!(off < 0.25, "{n} nodes: node {id} holds {c}, mean {mean:.0}");
            }
        }
    }

    #[test]
    fn segments_cover_the_ring_and_give_each_key_its_owners() {
        for (ids, r) in [
            (&[1u64, 2, 3][..], 3),
            (&[1, 2, 3, 4, 5][..], 3),
            (&[7][..], 3),
        ] {
            let ring = Ring::new(1, &members(ids), r, 32);
            let segments = ring.segments();
            assert_eq!(segments[0].first, 0);
            assert_eq!(segments.last().unwrap().last, u64::MAX);
            for pair in segments.windows(2) {
                assert_eq!(pair[0].last + 1, pair[1].first);
                assert_ne!(pair[0].owners, pair[1].owners, "neighbours are merged");
            }
            for key in keys(3000) {
                let p = key_position(&key);
                let seg = segments
                    .iter()
                    .find(|s| s.first <= p && p <= s.last)
                    .unwrap();
                let mut owners = ring.owners(&key);
                owners.sort();
                assert_eq!(seg.owners, owners, "{key}");
            }
        }
        // Every member owns everything with three members and three copies: one segment.
        let ring = Ring::new(1, &members(&[1, 2, 3]), 3, DEFAULT_VNODES);
        assert_eq!(ring.segments().len(), 1);
        assert!(Ring::new(1, &[], 3, 8).segments().is_empty());
    }

    #[test]
    fn a_new_node_takes_about_its_share_and_nothing_else_moves() {
        let before = Ring::new(1, &members(&[1, 2, 3]), 1, DEFAULT_VNODES);
        let after = Ring::new(2, &members(&[1, 2, 3, 4]), 1, DEFAULT_VNODES);
        let total = 20_000;
        let mut moved = 0;
        for key in keys(total) {
            let (a, b) = (before.owners(&key)[0], after.owners(&key)[0]);
            if a != b {
                assert_eq!(b, 4, "a key moved between old nodes");
                moved += 1;
            }
        }
        let share = moved as f64 / total as f64;
        assert!((0.15..0.35).contains(&share), "moved {share}");
    }

    #[test]
    fn replicas_go_to_distinct_zones_when_there_are_enough() {
        let ms = vec![
            Member {
                id: 1,
                zone: "a".into(),
            },
            Member {
                id: 2,
                zone: "a".into(),
            },
            Member {
                id: 3,
                zone: "b".into(),
            },
            Member {
                id: 4,
                zone: "b".into(),
            },
            Member {
                id: 5,
                zone: "c".into(),
            },
            Member {
                id: 6,
                zone: "c".into(),
            },
        ];
        let zone_of = |id: u64| ms.iter().find(|m| m.id == id).unwrap().zone.clone();
        let ring = Ring::new(1, &ms, 3, DEFAULT_VNODES);
        for key in keys(2000) {
            let zones: BTreeSet<String> = ring.owners(&key).into_iter().map(zone_of).collect();
            assert_eq!(zones.len(), 3, "{key}");
        }
        // Two zones, three replicas: both zones used, the third copy anywhere else.
        let two = Ring::new(1, &ms[..4], 3, DEFAULT_VNODES);
        for key in keys(2000) {
            let owners = two.owners(&key);
            assert_eq!(owners.len(), 3);
            let zones: BTreeSet<String> = owners.into_iter().map(zone_of).collect();
            assert_eq!(zones.len(), 2);
        }
    }
}
