//! The read path: a GET served from this node's copy, else from the best replica
//! (verified in transit), with owners found lacking repaired in the background, a bounded
//! number at a time.

use bytes::Bytes;
use futures_util::StreamExt;
use nxcache_placement::NodeId;
use nxcache_store::{BlobBody, BlobKey, ByteStream, StoreError};
use tonic::Status;
use tracing::Instrument;

use crate::plane::{DataPlane, OWNER_SYNC_BACKLOG, REPLICA_STALL_TIMEOUT, lock};
use crate::topology::{ClusterView, DegradedPolicy};

/// How long a peer may take to start answering a read before the next one is asked.
const PEER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a read failed (a plain miss is `Ok(None)`).
#[derive(Debug)]
pub enum GetError {
    /// A lone node could not read its own store.
    Store(StoreError),
    /// No replica could be reached, under the `strict` policy.
    Unavailable(String),
}

pub enum ArtifactBody {
    /// The whole artifact, already verified.
    Verified(Bytes),
    /// Verified in transit: ends in an error instead of its last chunk if damaged.
    Stream(ByteStream),
}

pub struct Artifact {
    pub size: u64,
    pub body: ArtifactBody,
    /// Served by another member.
    pub remote: bool,
}

/// A peer's blob stream as I/O results; a peer that sends nothing for
/// [`REPLICA_STALL_TIMEOUT`] ends it in an error (the client sees a cut transfer instead
/// of a response that never finishes).
pub(crate) fn io_stream(
    stream: impl futures_util::Stream<Item = Result<Bytes, Status>> + Send + 'static,
) -> ByteStream {
    let stream = Box::pin(stream);
    Box::pin(futures_util::stream::unfold(
        Some(stream),
        |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout(REPLICA_STALL_TIMEOUT, stream.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
                Ok(Some(Err(status))) => Some((
                    Err(std::io::Error::other(status.message().to_owned())),
                    None,
                )),
                Ok(None) => None,
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "a peer stopped sending the artifact",
                    )),
                    None,
                )),
            }
        },
    ))
}

impl DataPlane {
    /// The artifact from this node when it holds it, otherwise from the best replica.
    pub async fn get(&self, key: &BlobKey) -> Result<Option<Artifact>, GetError> {
        let view = self.view();
        // A copy that a write in progress here may still withdraw is not served: the
        // other owners answer (with the body that wins, or nothing yet).
        let undecided = !view.is_lone() && self.is_undecided(key);
        let local = if undecided {
            Ok(None)
        } else {
            self.inner
                .store
                .read(key)
                .instrument(tracing::info_span!("store_read"))
                .await
        };
        match local {
            Ok(Some(read)) => {
                if !view.is_lone() {
                    self.note_read(&view, key, view.me);
                }
                let body = match read.body {
                    BlobBody::Verified(bytes) => ArtifactBody::Verified(bytes),
                    BlobBody::Stream(stream) => ArtifactBody::Stream(stream),
                };
                return Ok(Some(Artifact {
                    size: read.meta.size,
                    body,
                    remote: false,
                }));
            }
            Ok(None) => {}
            Err(err) if view.is_lone() => return Err(GetError::Store(err)),
            Err(err) => tracing::error!(%err, key = %key, "local read failed; asking the replicas"),
        }
        if view.is_lone() {
            return Ok(None);
        }
        let owners = view.owners(key.as_str());
        // Owners that should have had it (this node included) get it back afterwards.
        let mut lacking: Vec<NodeId> = owners
            .iter()
            .copied()
            .filter(|o| *o == view.me && !undecided)
            .collect();
        let mut order: Vec<NodeId> = owners.iter().copied().filter(|o| *o != view.me).collect();
        if let Some(previous) = &view.previous {
            for o in previous.owners(key.as_str()) {
                if o != view.me && !order.contains(&o) {
                    order.push(o);
                }
            }
        }
        let mut answered = 0;
        let mut unreachable = 0;
        let mut stand_ins_added = false;
        let mut i = 0;
        while i < order.len() {
            let peer = order[i];
            i += 1;
            let is_owner = owners.contains(&peer);
            if self.inner.peers.is_down(peer) {
                unreachable += 1;
            } else if let Some(client) = self.client(&view, peer) {
                let fetch = client
                    .get_verified(key.as_str())
                    .instrument(tracing::info_span!("replica_get", peer));
                match tokio::time::timeout(PEER_READ_TIMEOUT, fetch).await {
                    Ok(Ok(Some((info, stream)))) => {
                        self.inner.peers.answered(peer);
                        if !lacking.is_empty() {
                            self.repair(key.clone(), peer, lacking);
                        }
                        self.note_read(&view, key, peer);
                        return Ok(Some(Artifact {
                            size: info.size,
                            body: ArtifactBody::Stream(io_stream(stream)),
                            remote: true,
                        }));
                    }
                    Ok(Ok(None)) => {
                        answered += 1;
                        if is_owner {
                            lacking.push(peer);
                        }
                    }
                    Ok(Err(status)) => {
                        self.peer_failed(peer, &status);
                        unreachable += 1;
                    }
                    Err(_) => {
                        self.inner.peers.failed(peer);
                        unreachable += 1;
                    }
                }
            } else {
                unreachable += 1;
            }
            // Owners out of reach: a stand-in may hold the write they missed.
            if i == order.len() && unreachable > 0 && !stand_ins_added {
                stand_ins_added = true;
                for s in view
                    .ring
                    .preference_list(key.as_str())
                    .into_iter()
                    .skip(owners.len())
                    .take(view.ring.replicas())
                {
                    if s != view.me && !order.contains(&s) {
                        order.push(s);
                    }
                }
            }
        }
        if answered == 0 && unreachable > 0 && view.policy == DegradedPolicy::Strict {
            return Err(GetError::Unavailable(format!(
                "none of the {unreachable} nodes that may hold this artifact can be reached"
            )));
        }
        Ok(None)
    }

    /// Size of the artifact, wherever a replica holds it.
    pub async fn head(&self, key: &BlobKey) -> Result<Option<u64>, GetError> {
        let view = self.view();
        let undecided = !view.is_lone() && self.is_undecided(key);
        match self.inner.store.head(key) {
            Ok(Some(meta)) if !undecided => return Ok(Some(meta.size)),
            Ok(Some(_)) => {}
            Ok(None) => {}
            Err(err) if view.is_lone() => return Err(GetError::Store(err)),
            Err(err) => tracing::error!(%err, "index lookup failed; asking the replicas"),
        }
        for peer in view.ring.preference_list(key.as_str()) {
            if peer == view.me || self.inner.peers.is_down(peer) {
                continue;
            }
            let Some(client) = self.client(&view, peer) else {
                continue;
            };
            match tokio::time::timeout(PEER_READ_TIMEOUT, client.head(key.as_str())).await {
                Ok(Ok(Some(copy))) => return Ok(Some(copy.size)),
                Ok(Ok(None)) => {}
                Ok(Err(status)) => self.peer_failed(peer, &status),
                Err(_) => self.inner.peers.failed(peer),
            }
        }
        Ok(None)
    }

    /// Queues the key for its other owners' LRU order (see `owner_sync.rs`).
    fn note_read(&self, view: &ClusterView, key: &BlobKey, served_by: NodeId) {
        let owners = view.owners(key.as_str());
        let mut touches = lock(&self.inner.touches);
        for o in owners {
            if o != served_by && o != view.me {
                let keys = touches.entry(o).or_default();
                // Past the backlog a read is not passed on: LRU order only drifts a little.
                if keys.len() < OWNER_SYNC_BACKLOG {
                    keys.insert(key.as_str().to_owned());
                }
            }
        }
    }

    /// Copies `key` from `from` to each of `to` in the background (read repair). At most
    /// [`crate::plane::READ_REPAIRS_IN_FLIGHT`] run at once; one found while they are all
    /// busy is dropped and counted (anti-entropy finds the gap later): a node that comes
    /// back empty must not turn every read into a queued task.
    fn repair(&self, key: BlobKey, from: NodeId, to: Vec<NodeId>) {
        if lock(&self.inner.repairing).contains(&key) {
            return;
        }
        let Ok(permit) = self.inner.repairs.clone().try_acquire_owned() else {
            self.inner.metrics.repairs_dropped.inc();
            return;
        };
        lock(&self.inner.repairing).insert(key.clone());
        let plane = self.clone();
        let span = tracing::info_span!("read_repair", key = %key);
        tokio::spawn(
            async move {
                let _permit = permit;
                let view = plane.view();
                for dest in to {
                    plane
                        .copy_counted(&view, &key, from, dest, "read_repair")
                        .await;
                }
                lock(&plane.inner.repairing).remove(&key);
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::plane::READ_REPAIRS_IN_FLIGHT;

    fn plane(dir: &std::path::Path) -> DataPlane {
        let registry = prometheus::Registry::new();
        let store = nxcache_store::BlobStore::open(
            nxcache_store::StoreConfig {
                data_dir: dir.to_path_buf(),
                max_bytes: 1 << 20,
                ttl: None,
                fsync: false,
            },
            &registry,
        )
        .unwrap();
        DataPlane::new(
            store,
            Arc::new(crate::FixedTopology(Arc::new(ClusterView::lone(1)))),
            crate::Peers::new(
                nxcache_rpc::ClusterSecret::new("0123456789abcdef").unwrap(),
                None,
                nxcache_rpc::GrpcClientMetrics::unregistered(),
            ),
            crate::HintLog::temporary().unwrap(),
            crate::ReplicationMetrics::register(&registry).unwrap(),
        )
    }

    #[tokio::test]
    async fn read_repair_past_its_limit_is_dropped_and_counted_not_queued() {
        let dir = tempfile::tempdir().unwrap();
        let plane = plane(dir.path());
        // Every repair slot busy (a node came back empty and reads pour in).
        let busy = plane
            .inner
            .repairs
            .clone()
            .try_acquire_many_owned(READ_REPAIRS_IN_FLIGHT as u32)
            .unwrap();
        for n in 0..100 {
            plane.repair(BlobKey::parse(&format!("k{n}")).unwrap(), 2, vec![1]);
        }
        // Nothing waits for a slot: every one was dropped, counted.
        assert_eq!(plane.inner.metrics.repairs_dropped.get(), 100);
        assert!(lock(&plane.inner.repairing).is_empty());
        drop(busy);
        // With a slot free, a repair starts (and ends: node 2 has no address here).
        plane.repair(BlobKey::parse("k0").unwrap(), 2, vec![1]);
        assert_eq!(plane.inner.metrics.repairs_dropped.get(), 100);
    }
}
