//! What the data plane needs to know of the cluster: who owns a key, how to reach
//! members, and the write rules. The binary builds it from the metadata log.

use std::collections::HashMap;
use std::sync::Arc;

use nxcache_placement::{Member, NodeId, Ring};

/// What a write does when fewer than the write quorum of nodes can take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradedPolicy {
    /// Accept once one node holds the complete bytes; repair later (a miss costs Nx a
    /// rebuild, an error fails its whole run).
    Serve,
    /// Refuse with 503; nothing stays visible anywhere.
    Strict,
}

impl DegradedPolicy {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "serve" => Some(DegradedPolicy::Serve),
            "strict" => Some(DegradedPolicy::Strict),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DegradedPolicy::Serve => "serve",
            DegradedPolicy::Strict => "strict",
        }
    }
}

/// The cluster as this node sees it at one ring epoch.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub me: NodeId,
    /// Built from the active members (draining ones own nothing).
    pub ring: Ring,
    /// The ring before the last change: read from while data moves.
    pub previous: Option<Ring>,
    /// gRPC address of every member, draining ones included.
    pub addrs: HashMap<NodeId, String>,
    pub write_quorum: usize,
    pub policy: DegradedPolicy,
}

impl ClusterView {
    /// A node alone: it owns everything.
    pub fn lone(me: NodeId) -> Self {
        let ring = Ring::new(
            0,
            &[Member {
                id: me,
                zone: String::new(),
            }],
            1,
            1,
        );
        ClusterView {
            me,
            ring,
            previous: None,
            addrs: HashMap::new(),
            write_quorum: 1,
            policy: DegradedPolicy::Serve,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.ring.epoch()
    }

    /// No other member to talk to.
    pub fn is_lone(&self) -> bool {
        self.addrs.keys().all(|id| *id == self.me)
    }

    pub fn owners(&self, key: &str) -> Vec<NodeId> {
        self.ring.owners(key)
    }

    /// The write quorum as it applies to this ring (never more than the replicas).
    pub fn quorum(&self) -> usize {
        self.write_quorum.clamp(1, self.ring.replicas().max(1))
    }
}

/// Source of the current [`ClusterView`]; asked on every request, so it must be cheap.
pub trait Topology: Send + Sync + 'static {
    fn view(&self) -> Arc<ClusterView>;
}

/// A view that never changes: a lone node, or tests.
pub struct FixedTopology(pub Arc<ClusterView>);

impl Topology for FixedTopology {
    fn view(&self) -> Arc<ClusterView> {
        self.0.clone()
    }
}
