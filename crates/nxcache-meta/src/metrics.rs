use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::types::NodeId;

/// Raft and inter-node RPC metrics of one node.
#[derive(Clone)]
pub struct MetaMetrics {
    term: IntGauge,
    leader: IntGauge,
    is_leader: IntGauge,
    has_leader: IntGauge,
    core_up: IntGauge,
    snapshot_bytes: IntGauge,
    last_log_index: IntGauge,
    applied_index: IntGauge,
    snapshot_index: IntGauge,
    snapshots: prometheus::IntCounter,
    last_snapshot: std::sync::Arc<std::sync::atomic::AtomicU64>,
    members: IntGauge,
    voters: IntGauge,
    ring_epoch: IntGauge,
    rpcs: IntCounterVec,
    rpc_duration: HistogramVec,
    rejected_calls: IntCounterVec,
}

impl MetaMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let rpcs = IntCounterVec::new(
            Opts::new(
                "nxcache_raft_rpcs_total",
                "Raft RPCs sent to peers, by RPC and result.",
            ),
            &["rpc", "result"],
        )?;
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "nxcache_raft_rpc_duration_seconds",
                "Round-trip time of Raft RPCs sent to peers.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            &["rpc"],
        )?;
        let rejected_calls = IntCounterVec::new(
            Opts::new(
                "nxcache_cluster_rejected_calls_total",
                "Inter-node calls refused, by reason: missing or wrong cluster secret, another cluster, a caller without a cluster, or addressed to this node's previous data dir (incarnation).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rpcs.clone()))?;
        registry.register(Box::new(rpc_duration.clone()))?;
        registry.register(Box::new(rejected_calls.clone()))?;
        // The reasons refused calls are counted by (see the help), at 0 from the start: an
        // alert or a panel sees the family, and its first increase, before the first one.
        for reason in [
            "missing",
            "wrong",
            "other_cluster",
            "no_cluster_id",
            "incarnation",
        ] {
            rejected_calls.with_label_values(&[reason]);
        }
        let snapshots = prometheus::IntCounter::new(
            "nxcache_raft_snapshots_total",
            "Snapshots this node built or installed.",
        )?;
        registry.register(Box::new(snapshots.clone()))?;
        Ok(MetaMetrics {
            term: gauge("nxcache_raft_term", "Current Raft term.")?,
            leader: gauge(
                "nxcache_raft_leader_id",
                "Node id of the current leader, -1 when none is known (a leader that lost its quorum counts as none).",
            )?,
            is_leader: gauge(
                "nxcache_raft_is_leader",
                "1 on the leader while a quorum acknowledges it, 0 elsewhere.",
            )?,
            has_leader: gauge(
                "nxcache_raft_has_leader",
                "1 while this node knows a Raft leader; 0 while it is cut off (it serves from its own tokens and data, and receives no revocation).",
            )?,
            core_up: gauge(
                "nxcache_raft_core_up",
                "1 while this node's Raft core runs; 0 once it stopped on an error (a storage failure): the node leaves the control plane and must be restarted (it exits, and /healthz answers 503).",
            )?,
            snapshot_bytes: gauge(
                "nxcache_raft_snapshot_bytes",
                "Size of this node's current metadata snapshot file.",
            )?,
            last_log_index: gauge(
                "nxcache_raft_last_log_index",
                "Index of the last entry in this node's log.",
            )?,
            applied_index: gauge(
                "nxcache_raft_applied_index",
                "Index of the last entry applied to the state machine.",
            )?,
            snapshot_index: gauge(
                "nxcache_raft_snapshot_index",
                "Last log index covered by this node's snapshot.",
            )?,
            snapshots,
            last_snapshot: Default::default(),
            members: gauge(
                "nxcache_raft_members",
                "Members of the cluster (voters and learners).",
            )?,
            voters: gauge("nxcache_raft_voters", "Voting members of the cluster.")?,
            ring_epoch: gauge("nxcache_ring_epoch", "Placement ring epoch.")?,
            rpcs,
            rpc_duration,
            rejected_calls,
        })
    }

    pub(crate) fn observe_rpc(&self, rpc: &str, ok: bool, elapsed: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.rpcs.with_label_values(&[rpc, result]).inc();
        self.rpc_duration
            .with_label_values(&[rpc])
            .observe(elapsed.as_secs_f64());
    }

    /// The core ended without saying why (its task panicked).
    pub(crate) fn core_down(&self) {
        self.core_up.set(0);
    }

    pub(crate) fn rejected(&self, reason: &str) {
        self.rejected_calls.with_label_values(&[reason]).inc();
    }

    pub(crate) fn update(
        &self,
        m: &openraft::RaftMetrics<NodeId, crate::types::MemberNode>,
        leader: Option<NodeId>,
        ring_epoch: u64,
        snapshot_bytes: u64,
    ) {
        self.term.set(m.current_term as i64);
        self.leader.set(leader.map_or(-1, |l| l as i64));
        self.is_leader.set(i64::from(leader == Some(m.id)));
        self.has_leader.set(i64::from(leader.is_some()));
        self.core_up.set(i64::from(m.running_state.is_ok()));
        self.snapshot_bytes.set(snapshot_bytes as i64);
        self.last_log_index
            .set(m.last_log_index.map_or(0, |i| i as i64));
        self.applied_index
            .set(m.last_applied.map_or(0, |l| l.index as i64));
        let snapshot = m.snapshot.map_or(0, |l| l.index);
        self.snapshot_index.set(snapshot as i64);
        let previous = self
            .last_snapshot
            .swap(snapshot, std::sync::atomic::Ordering::Relaxed);
        if snapshot > previous {
            self.snapshots.inc();
        }
        let membership = m.membership_config.membership();
        self.members.set(membership.nodes().count() as i64);
        self.voters.set(membership.voter_ids().count() as i64);
        self.ring_epoch.set(ring_epoch as i64);
    }
}
