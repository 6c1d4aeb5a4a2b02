//! The data plane's view of the cluster, computed from the metadata log.

use std::sync::{Arc, Mutex, OnceLock};

use nxcache_meta::{ClusterSettings, MemberNode, MemberState, MetaNode};
use nxcache_placement::{DEFAULT_VNODES, Member, Ring};
use nxcache_replication::{ClusterView, DegradedPolicy, Topology};

/// Placement from the replicated membership and settings. Until the metadata node is
/// running the node sees itself alone.
pub(crate) struct MetaTopology {
    me: u64,
    meta: OnceLock<MetaNode>,
    cached: Mutex<Option<Cached>>,
}

/// What the view was built from, and the view.
struct Cached {
    epoch: u64,
    settings: ClusterSettings,
    members: Vec<(u64, MemberNode)>,
    view: Arc<ClusterView>,
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

/// The view for a membership: draining members own nothing (but are still read from
/// and still reachable); a majority of the replicas is the default write quorum.
pub(crate) fn build_view(
    me: u64,
    epoch: u64,
    settings: &ClusterSettings,
    members: &[(u64, MemberNode)],
    states: &std::collections::BTreeMap<u64, MemberState>,
    previous: Option<Ring>,
) -> ClusterView {
    let to_member = |(id, n): &(u64, MemberNode)| Member {
        id: *id,
        zone: n.zone.clone(),
    };
    let mut active: Vec<Member> = members
        .iter()
        .filter(|(id, _)| states.get(id).copied().unwrap_or_default() == MemberState::Active)
        .map(to_member)
        .collect();
    if active.is_empty() {
        active = members.iter().map(to_member).collect();
    }
    let ring = Ring::new(
        epoch,
        &active,
        settings.replication_factor.max(1) as usize,
        DEFAULT_VNODES,
    );
    let write_quorum = match settings.write_quorum {
        0 => ring.write_quorum(),
        w => w as usize,
    };
    ClusterView {
        me,
        ring,
        previous,
        addrs: members
            .iter()
            .map(|(id, n)| (*id, n.grpc_addr.clone()))
            .collect(),
        write_quorum,
        policy: DegradedPolicy::parse(&settings.on_degraded).unwrap_or(DegradedPolicy::Serve),
    }
}

impl Topology for MetaTopology {
    fn view(&self) -> Arc<ClusterView> {
        let Some(meta) = self.meta.get() else {
            return Arc::new(ClusterView::lone(self.me));
        };
        let (epoch, settings, states) = meta.placement_inputs();
        let members = meta.members();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*cached
            && c.epoch == epoch
            && c.settings == settings
            && c.members == members
        {
            return c.view.clone();
        }
        // Reads fall back to the ring before the last change while data moves.
        let previous = cached.as_ref().and_then(|c| {
            if c.epoch == epoch {
                c.view.previous.clone()
            } else {
                Some(c.view.ring.clone())
            }
        });
        let view = Arc::new(build_view(
            self.me, epoch, &settings, &members, &states, previous,
        ));
        *cached = Some(Cached {
            epoch,
            settings,
            members,
            view: view.clone(),
        });
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(zone: &str) -> MemberNode {
        MemberNode {
            grpc_addr: "127.0.0.1:1".into(),
            http_addr: String::new(),
            zone: zone.into(),
            ..MemberNode::default()
        }
    }

    #[test]
    fn draining_members_own_nothing_and_quorum_defaults_to_a_majority() {
        let members: Vec<(u64, MemberNode)> = (0..4).map(|i| (i, member(""))).collect();
        let states = [(3, MemberState::Draining)].into();
        let view = build_view(0, 5, &ClusterSettings::default(), &members, &states, None);
        assert_eq!(view.ring.replicas(), 3);
        assert_eq!(view.quorum(), 2);
        assert_eq!(view.addrs.len(), 4, "a draining member is still reachable");
        for k in 0..200 {
            assert!(!view.owners(&k.to_string()).contains(&3));
        }
        let strict = ClusterSettings {
            write_quorum: 3,
            on_degraded: "strict".into(),
            ..ClusterSettings::default()
        };
        let view = build_view(0, 5, &strict, &members, &states, None);
        assert_eq!(view.quorum(), 3);
        assert_eq!(view.policy, DegradedPolicy::Strict);
    }
}
