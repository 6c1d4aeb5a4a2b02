//! The space kept free for the metadata log on the data dir's file system
//! ([`nxcache_sled::SpaceReserve`]): watched every [`CHECK_EVERY`], with its metrics.

use std::sync::Arc;
use std::time::Duration;

use nxcache_sled::{ReserveChange, SpaceReserve};
use prometheus::{IntGauge, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the free space is looked at: how long a disk filled by someone else can
/// leave the metadata log without room before the ballast is deleted.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Opens the reserve in `data_dir` (off the async threads: the first start writes the
/// ballast).
pub(crate) async fn open(data_dir: &std::path::Path) -> anyhow::Result<Arc<SpaceReserve>> {
    let dir = data_dir.to_path_buf();
    let reserve = tokio::task::spawn_blocking(move || SpaceReserve::open(&dir))
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot keep space for the metadata log in {}: {e}",
                data_dir.display()
            )
        })?;
    tracing::info!(
        reserve_bytes = reserve.bytes(),
        held = !reserve.is_released(),
        "space kept free for the metadata log"
    );
    Ok(Arc::new(reserve))
}

/// Looks at the free space every [`CHECK_EVERY`] until `stop`, deleting or remaking the
/// ballast, and keeps the gauges in step.
pub(crate) fn spawn_watch(
    reserve: Arc<SpaceReserve>,
    registry: &Registry,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let gauge = |name: &str, help: &str| -> anyhow::Result<IntGauge> {
        let g = IntGauge::new(name, help)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let size = gauge(
        "nxcache_disk_reserve_bytes",
        "Space kept free for the metadata log on the data dir's file system: uploads that would leave less free answer 507.",
    )?;
    let released = gauge(
        "nxcache_disk_reserve_released",
        "1 while the data dir's file system is full and the reserve's ballast file is deleted (its room handed to the metadata log); uploads answer 507 until there is room again.",
    )?;
    size.set(reserve.bytes() as i64);
    released.set(i64::from(reserve.is_released()));
    Ok(tokio::spawn(async move {
        let mut failing = false;
        loop {
            let r = reserve.clone();
            let checked = tokio::task::spawn_blocking(move || r.check()).await;
            match checked {
                Ok(Ok(ReserveChange::Released)) => tracing::warn!(
                    available_bytes = reserve.available(),
                    reserve_bytes = reserve.bytes(),
                    "the data dir's file system is full: deleted the space reserve's ballast so the metadata log can still write; uploads answer 507 until there is room"
                ),
                Ok(Ok(ReserveChange::Restored)) => tracing::info!(
                    available_bytes = reserve.available(),
                    "room on the data dir's file system again: the space reserve is held, uploads are accepted"
                ),
                Ok(Ok(ReserveChange::None)) => failing = false,
                Ok(Err(err)) if !failing => {
                    failing = true;
                    tracing::warn!(%err, "cannot check the space kept for the metadata log");
                }
                Ok(Err(_)) | Err(_) => {}
            }
            released.set(i64::from(reserve.is_released()));
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
    }))
}
