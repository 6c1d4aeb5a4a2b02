use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The data plane's metrics, registered in the node's registry.
#[derive(Clone)]
pub struct ReplicationMetrics {
    /// Acknowledged or refused writes by outcome: quorum, degraded (fewer than W
    /// holders, accepted under `serve`), refused (`strict`), failed, exists.
    pub writes: IntCounterVec,
    /// Copies made by a background path: handoff, rebalance, anti_entropy, read_repair.
    pub copies: IntCounterVec,
    pub copy_failures: IntCounterVec,
    pub hints: IntGauge,
    pub peer_failures: IntCounterVec,
    /// Owners that had not confirmed a write when it was answered (given a hint).
    pub stragglers: IntCounter,
    pub rebalance_pending: IntGauge,
    pub handed_off_deleted: IntCounter,
    pub handed_off_bytes: IntCounter,
    pub rebalance_pending_bytes: IntGauge,
    pub scrubbed: IntCounter,
    pub scrub_corrupt: IntCounter,
    pub evictions_propagated: IntCounter,
    pub worker_passes: IntCounterVec,
    pub worker_last_pass: IntGaugeVec,
}

impl ReplicationMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            c: C,
        ) -> prometheus::Result<C> {
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter_vec = |name: &str, help: &str, label: &str| {
            reg(
                registry,
                IntCounterVec::new(Opts::new(name, help), &[label])?,
            )
        };
        Ok(ReplicationMetrics {
            writes: counter_vec(
                "nxcache_replication_writes_total",
                "Writes through this node as coordinator, by outcome (quorum, degraded, refused, failed, exists).",
                "outcome",
            )?,
            copies: counter_vec(
                "nxcache_replication_copies_total",
                "Blob copies made between nodes in the background, by reason (handoff, rebalance, anti_entropy, read_repair).",
                "reason",
            )?,
            copy_failures: counter_vec(
                "nxcache_replication_copy_failures_total",
                "Background blob copies that failed (retried on a later pass), by reason.",
                "reason",
            )?,
            hints: reg(
                registry,
                IntGauge::new(
                    "nxcache_replication_hints",
                    "Hinted writes waiting for their owner (under-replicated keys known to this node).",
                )?,
            )?,
            peer_failures: counter_vec(
                "nxcache_replication_peer_failures_total",
                "Calls to a peer's blob service that failed, by peer node id.",
                "peer",
            )?,
            stragglers: reg(
                registry,
                IntCounter::new(
                    "nxcache_replication_stragglers_total",
                    "Owners still uploading when a write with its quorum was answered; they got a hint.",
                )?,
            )?,
            rebalance_pending: reg(
                registry,
                IntGauge::new(
                    "nxcache_rebalance_pending_keys",
                    "Keys this node holds but no longer owns, still to be handed to their owners.",
                )?,
            )?,
            handed_off_bytes: reg(
                registry,
                IntCounter::new(
                    "nxcache_rebalance_moved_bytes_total",
                    "Bytes of the keys handed to their owners and then deleted here.",
                )?,
            )?,
            rebalance_pending_bytes: reg(
                registry,
                IntGauge::new(
                    "nxcache_rebalance_pending_bytes",
                    "Bytes of the keys this node holds but no longer owns.",
                )?,
            )?,
            handed_off_deleted: reg(
                registry,
                IntCounter::new(
                    "nxcache_rebalance_moved_total",
                    "Keys handed to their owners and then deleted here.",
                )?,
            )?,
            scrubbed: reg(
                registry,
                IntCounter::new(
                    "nxcache_scrub_checked_total",
                    "Blobs re-verified by the scrub.",
                )?,
            )?,
            scrub_corrupt: reg(
                registry,
                IntCounter::new(
                    "nxcache_scrub_corrupt_total",
                    "Blobs the scrub found damaged (dropped and repaired from a replica).",
                )?,
            )?,
            evictions_propagated: reg(
                registry,
                IntCounter::new(
                    "nxcache_replication_evictions_propagated_total",
                    "Evictions here passed on to the key's other owners.",
                )?,
            )?,
            worker_passes: counter_vec(
                "nxcache_worker_passes_total",
                "Completed passes of each background worker.",
                "worker",
            )?,
            worker_last_pass: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "nxcache_worker_last_pass_timestamp_seconds",
                        "When each background worker last completed a pass (Unix time).",
                    ),
                    &["worker"],
                )?,
            )?,
        })
    }
}
