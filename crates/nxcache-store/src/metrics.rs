use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The store's own metrics, registered in the node's registry.
#[derive(Clone)]
pub(crate) struct StoreMetrics {
    pub stored_bytes: IntGauge,
    pub objects: IntGauge,
    pub budget_bytes: IntGauge,
    pub reserved_bytes: IntGauge,
    pub evictions: IntCounterVec,
    pub evicted_bytes: IntCounterVec,
    pub dropped: IntCounterVec,
    pub write_failures: IntCounterVec,
    pub eviction_marks: IntGauge,
    pub eviction_marks_skipped: IntCounter,
}

impl StoreMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        // `known`: the label values the store counts, exposed at 0 from the start so that
        // an alert or a panel on the family sees it (and its first increase) before the
        // first event.
        let counter = |name: &str,
                       help: &str,
                       label: &str,
                       known: &[&str]|
         -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            for value in known {
                c.with_label_values(&[value]);
            }
            Ok(c)
        };
        const EVICTIONS: &[&str] = &["budget", "ttl"];
        Ok(StoreMetrics {
            stored_bytes: gauge(
                "nxcache_store_stored_bytes",
                "Bytes of committed artifacts held by this node.",
            )?,
            objects: gauge(
                "nxcache_store_objects",
                "Committed artifacts held by this node.",
            )?,
            budget_bytes: gauge(
                "nxcache_store_budget_bytes",
                "The configured disk budget (--max-disk-usage).",
            )?,
            reserved_bytes: gauge(
                "nxcache_store_reserved_bytes",
                "Bytes reserved by uploads in progress.",
            )?,
            evictions: counter(
                "nxcache_store_evictions_total",
                "Artifacts evicted, by reason (budget: least recently used; ttl: idle too long).",
                "reason",
                EVICTIONS,
            )?,
            evicted_bytes: counter(
                "nxcache_store_evicted_bytes_total",
                "Bytes evicted, by reason.",
                "reason",
                EVICTIONS,
            )?,
            dropped: counter(
                "nxcache_store_dropped_total",
                "Copies removed other than by eviction, by reason: corrupt or missing file; withdrawn (a refused or losing write), handed_off (to its owners), evicted_elsewhere (another owner evicted it), replaced (lost a conflict), deleted (by hand).",
                "reason",
                &[
                    "corrupt",
                    "missing",
                    "withdrawn",
                    "handed_off",
                    "evicted_elsewhere",
                    "replaced",
                    "deleted",
                ],
            )?,
            write_failures: counter(
                "nxcache_store_write_failures_total",
                "Uploads that stored nothing, by reason.",
                "reason",
                &["disk_full", "length", "exists", "checksum", "io"],
            )?,
            eviction_marks: gauge(
                "nxcache_store_eviction_marks",
                "Recent evictions remembered so that repair does not bring them back.",
            )?,
            eviction_marks_skipped: {
                let c = IntCounter::new(
                    "nxcache_store_eviction_marks_skipped_total",
                    "Evictions not remembered because the limit of eviction marks was reached.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
        })
    }
}
