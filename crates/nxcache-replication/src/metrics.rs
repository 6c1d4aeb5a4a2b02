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
    /// Keys found with different bodies on their owners, by what found them: write (a
    /// coordinator saw another body), handoff, anti_entropy.
    pub conflicts: IntCounterVec,
    /// Copies replaced by the winning body of a conflict.
    pub conflict_repairs: IntCounter,
    /// Hints not recorded because the hint log was full (anti-entropy repairs those).
    pub hints_dropped: IntCounter,
    /// Read repairs not started because the most allowed were in flight.
    pub repairs_dropped: IntCounter,
    pub anti_entropy_ranges_compared: IntCounter,
    pub anti_entropy_ranges_differing: IntCounter,
    pub anti_entropy_repaired: IntCounter,
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
        // `known`: the label values the code counts, exposed at 0 from the start so that
        // an alert or a panel on the family sees it (and its first increase) before the
        // first event.
        let counter_vec = |name: &str, help: &str, label: &str, known: &[&str]| {
            let c = reg(
                registry,
                IntCounterVec::new(Opts::new(name, help), &[label])?,
            )?;
            for value in known {
                c.with_label_values(&[value]);
            }
            Ok::<_, prometheus::Error>(c)
        };
        const COPY_REASONS: &[&str] = &["handoff", "rebalance", "anti_entropy", "read_repair"];
        Ok(ReplicationMetrics {
            writes: counter_vec(
                "nxcache_replication_writes_total",
                "Writes through this node as coordinator, by outcome (quorum, degraded, refused, failed, exists, conflict: lost to another body and withdrawn).",
                "outcome",
                &[
                    "quorum", "degraded", "refused", "failed", "exists", "conflict",
                ],
            )?,
            copies: counter_vec(
                "nxcache_replication_copies_total",
                "Blob copies made between nodes in the background, by reason (handoff, rebalance, anti_entropy, read_repair).",
                "reason",
                COPY_REASONS,
            )?,
            copy_failures: counter_vec(
                "nxcache_replication_copy_failures_total",
                "Background blob copies that failed (retried on a later pass), by reason.",
                "reason",
                COPY_REASONS,
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
                &[],
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
                &[],
            )?,
            conflicts: counter_vec(
                "nxcache_replication_conflicts_total",
                "Keys found holding different bodies on their owners, by what found them (write, handoff, anti_entropy).",
                "found_by",
                &["write", "handoff", "anti_entropy"],
            )?,
            conflict_repairs: reg(
                registry,
                IntCounter::new(
                    "nxcache_replication_conflict_repairs_total",
                    "Copies replaced by the body the conflict rule picked.",
                )?,
            )?,
            hints_dropped: reg(
                registry,
                IntCounter::new(
                    "nxcache_replication_hints_dropped_total",
                    "Hints not recorded because the hint log was at its limit; anti-entropy repairs those owners instead.",
                )?,
            )?,
            repairs_dropped: reg(
                registry,
                IntCounter::new(
                    "nxcache_replication_read_repairs_dropped_total",
                    "Read repairs not started because the most allowed were already running; anti-entropy repairs those keys instead.",
                )?,
            )?,
            anti_entropy_ranges_compared: reg(
                registry,
                IntCounter::new(
                    "nxcache_anti_entropy_ranges_compared_total",
                    "Ring ranges whose digests anti-entropy compared with a peer.",
                )?,
            )?,
            anti_entropy_ranges_differing: reg(
                registry,
                IntCounter::new(
                    "nxcache_anti_entropy_ranges_differing_total",
                    "Compared ring ranges whose digests differed.",
                )?,
            )?,
            anti_entropy_repaired: reg(
                registry,
                IntCounter::new(
                    "nxcache_anti_entropy_keys_repaired_total",
                    "Keys anti-entropy repaired: copies made, conflicts settled, evictions passed on.",
                )?,
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
