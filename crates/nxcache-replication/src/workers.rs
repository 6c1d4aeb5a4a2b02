//! Background workers of the data plane, each its own task with its own schedule and
//! report: hinted hand-off (`handoff.rs`), rebalancing (`rebalance.rs`), anti-entropy
//! (`anti_entropy.rs`), scrub (`scrub.rs`), and keeping owners' LRU order and evictions
//! in step (`owner_sync.rs`).

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::plane::{DataPlane, lock};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Time between anti-entropy passes (and rebalancing retries).
    pub anti_entropy_every: Duration,
    /// Bytes per second the scrub may read.
    pub scrub_bytes_per_sec: u64,
    /// Pause between two complete scrub passes.
    pub scrub_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            anti_entropy_every: Duration::from_secs(60),
            scrub_bytes_per_sec: 16 * 1024 * 1024,
            scrub_every: Duration::from_secs(3600),
        }
    }
}

/// State of a background worker, for `admin status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub name: &'static str,
    pub passes: u64,
    /// Unix milliseconds of the last completed pass.
    pub last_pass_ms: Option<u64>,
    /// Work known to be left (keys to move, hints to deliver...).
    pub pending: u64,
    /// Work done since start (copies, moves, checks).
    pub done: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits for `d`, or returns true when the node is stopping.
pub(crate) async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopping = tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(d) => false,
    };
    stopping || *stop.borrow()
}

impl DataPlane {
    pub(crate) fn report(&self, name: &'static str, update: impl FnOnce(&mut WorkerReport)) {
        let mut workers = lock(&self.inner.workers);
        let r = workers.entry(name).or_insert_with(|| WorkerReport {
            name,
            ..Default::default()
        });
        update(r);
    }

    pub(crate) fn pass_done(&self, name: &'static str, pending: u64, done: u64) {
        let now = now_ms();
        self.report(name, |r| {
            r.passes += 1;
            r.last_pass_ms = Some(now);
            r.pending = pending;
            r.done += done;
        });
        let m = &self.inner.metrics;
        m.worker_passes.with_label_values(&[name]).inc();
        m.worker_last_pass
            .with_label_values(&[name])
            .set((now / 1000) as i64);
    }

    /// Starts the workers; they stop when `stop` turns true.
    pub fn spawn_workers(
        &self,
        config: WorkerConfig,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        for name in [
            "handoff",
            "rebalance",
            "anti_entropy",
            "scrub",
            "owner_sync",
        ] {
            self.report(name, |_| {});
        }
        let mut handles = Vec::new();
        {
            let (plane, mut stop) = (self.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                loop {
                    plane
                        .deliver_hints()
                        .instrument(tracing::info_span!("handoff"))
                        .await;
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = plane.inner.handoff_wake.notified() => {}
                    }
                }
            }));
        }
        {
            // Rebalancing: a pass right after each ring change, then one per period; a
            // pass that left keys behind (an owner down) is retried sooner.
            let (plane, mut stop, every) = (self.clone(), stop.clone(), config.anti_entropy_every);
            handles.push(tokio::spawn(async move {
                let mut last_epoch = None;
                let mut since = tokio::time::Instant::now();
                let mut retry = false;
                loop {
                    let epoch = plane.view().epoch();
                    let due = since.elapsed() >= every
                        || last_epoch != Some(epoch)
                        || (retry && since.elapsed() >= Duration::from_secs(2));
                    if due {
                        last_epoch = Some(epoch);
                        since = tokio::time::Instant::now();
                        let left = plane
                            .rebalance_pass()
                            .instrument(tracing::info_span!("rebalance", epoch))
                            .await;
                        retry = left > 0;
                    }
                    if pause(&mut stop, Duration::from_millis(500)).await {
                        return;
                    }
                }
            }));
        }
        {
            // Anti-entropy: on its own schedule, so a long rebalance never delays it (and
            // the reverse); a pass right after each ring change, then one per period.
            let (plane, mut stop, every) = (self.clone(), stop.clone(), config.anti_entropy_every);
            handles.push(tokio::spawn(async move {
                let mut last_epoch = None;
                let mut since = tokio::time::Instant::now();
                loop {
                    let epoch = plane.view().epoch();
                    if since.elapsed() >= every || last_epoch != Some(epoch) {
                        last_epoch = Some(epoch);
                        since = tokio::time::Instant::now();
                        plane
                            .anti_entropy_pass()
                            .instrument(tracing::info_span!("anti_entropy", epoch))
                            .await;
                    }
                    if pause(&mut stop, Duration::from_millis(500)).await {
                        return;
                    }
                }
            }));
        }
        {
            let (plane, mut stop) = (self.clone(), stop.clone());
            let config = config.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    if plane.scrub_pass(&config, &mut stop).await {
                        return;
                    }
                    if pause(&mut stop, config.scrub_every).await {
                        return;
                    }
                }
            }));
        }
        {
            let (plane, mut stop) = (self.clone(), stop);
            handles.push(tokio::spawn(async move {
                loop {
                    let stopping = pause(&mut stop, Duration::from_secs(1)).await;
                    plane
                        .sync_owners()
                        .instrument(tracing::info_span!("owner_sync"))
                        .await;
                    if stopping {
                        return;
                    }
                }
            }));
        }
        handles
    }
}
