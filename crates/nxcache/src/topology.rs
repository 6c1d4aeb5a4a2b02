//! The data plane's view of the cluster, computed from the metadata log's applied state.

use std::sync::{Arc, Mutex, OnceLock};

use nxcache_meta::{MetaNode, Placement, RingSpec};
use nxcache_placement::{DEFAULT_VNODES, Member, Ring};
use nxcache_replication::{ClusterView, DegradedPolicy, Topology};

/// Placement from the applied state: the ring, the ring before it and the settings all
/// come from the state machine, so one ring epoch is one ring on every node, and a
/// member whose admission is not committed yet is never an owner. Until the metadata
/// node is running the node sees itself alone.
pub(crate) struct MetaTopology {
    me: u64,
    meta: OnceLock<MetaNode>,
    /// The view and the placement version it was built from.
    cached: Mutex<Option<(u64, Arc<ClusterView>)>>,
}

impl MetaTopology {
    pub fn new(me: u64) -> Self {
        MetaTopology {
            me,
            meta: OnceLock::new(),
            cached: Mutex::new(None),
        }
    }

    pub fn attach(&self, meta: MetaNode) {
        let _ = self.meta.set(meta);
    }
}

fn ring_of(spec: &RingSpec) -> Ring {
    let members: Vec<Member> = spec
        .members
        .iter()
        .map(|(id, zone)| Member {
            id: *id,
            zone: zone.clone(),
        })
        .collect();
    Ring::new(
        spec.epoch,
        &members,
        spec.replication_factor.max(1) as usize,
        DEFAULT_VNODES,
    )
}

/// The view for an applied placement; a majority of the replicas is the default write
/// quorum.
pub(crate) fn build_view(me: u64, placement: &Placement) -> ClusterView {
    let ring = ring_of(&placement.ring);
    let settings = &placement.settings;
    let write_quorum = match settings.write_quorum {
        0 => ring.write_quorum(),
        w => w as usize,
    };
    ClusterView {
        me,
        ring,
        previous: placement.previous_ring.as_ref().map(ring_of),
        addrs: placement.addrs.iter().cloned().collect(),
        write_quorum,
        policy: DegradedPolicy::parse(&settings.on_degraded).unwrap_or(DegradedPolicy::Serve),
    }
}

impl Topology for MetaTopology {
    fn view(&self) -> Arc<ClusterView> {
        let Some(meta) = self.meta.get() else {
            return Arc::new(ClusterView::lone(self.me));
        };
        let version = meta.placement_version();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_from, view)) = &*cached
            && *built_from == version
        {
            return view.clone();
        }
        let placement = meta.placement();
        let view = Arc::new(build_view(self.me, &placement));
        *cached = Some((placement.version, view.clone()));
        view
    }
}

#[cfg(test)]
mod tests {
    use nxcache_meta::ClusterSettings;

    use super::*;

    fn spec(epoch: u64, ids: &[u64]) -> RingSpec {
        RingSpec {
            epoch,
            replication_factor: 3,
            members: ids.iter().map(|id| (*id, String::new())).collect(),
        }
    }

    #[test]
    fn the_view_is_the_applied_ring_and_its_predecessor() {
        let placement = Placement {
            version: 1,
            ring: spec(5, &[0, 1, 2]),
            previous_ring: Some(spec(4, &[0, 1, 2, 3])),
            settings: ClusterSettings::default(),
            addrs: (0..4).map(|i| (i, "127.0.0.1:1".to_owned())).collect(),
        };
        let view = build_view(0, &placement);
        assert_eq!(view.epoch(), 5);
        assert_eq!(view.ring.replicas(), 3);
        assert_eq!(view.quorum(), 2);
        assert_eq!(view.addrs.len(), 4, "a draining member is still reachable");
        assert_eq!(view.previous.as_ref().map(Ring::epoch), Some(4));
        for k in 0..200 {
            assert!(!view.owners(&k.to_string()).contains(&3));
        }
        // Built twice from the same applied state: the same ring.
        assert_eq!(build_view(1, &placement).ring.digest(), view.ring.digest());
        let strict = Placement {
            settings: ClusterSettings {
                write_quorum: 3,
                on_degraded: "strict".into(),
                ..ClusterSettings::default()
            },
            ..placement
        };
        let view = build_view(0, &strict);
        assert_eq!(view.quorum(), 3);
        assert_eq!(view.policy, DegradedPolicy::Strict);
    }
}
