//! The data plane of one node: every artifact request goes through here. The node that
//! receives a request coordinates it: a write is streamed to the key's owners in
//! parallel and acknowledged once a quorum holds its bytes (`put.rs`); a read is served
//! from the best replica, and a replica found lacking is repaired in the background
//! (`get.rs`); copies move between nodes by `copies.rs`, and replicas that hold different
//! bodies are brought to one by `agreement.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nxcache_placement::NodeId;
use nxcache_store::{BlobKey, BlobMeta, BlobStore};
use tokio::sync::Semaphore;
use tonic::{Code, Status};

use crate::hints::HintLog;
use crate::metrics::ReplicationMetrics;
use crate::peers::Peers;
use crate::topology::{ClusterView, Topology};
use crate::workers::WorkerReport;

/// A replica that accepts no chunk for this long is dropped from the write.
pub(crate) const REPLICA_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Read repairs in flight at most; a repair found while they are all busy is dropped
/// (counted) and left to anti-entropy.
pub(crate) const READ_REPAIRS_IN_FLIGHT: usize = 4;
/// Evictions and reads waiting to be passed on to the other owners, at most (they are
/// passed on every second; beyond this a backlog is dropped and anti-entropy, guided by
/// eviction marks, converges instead).
pub(crate) const OWNER_SYNC_BACKLOG: usize = 100_000;

#[derive(Clone)]
pub struct DataPlane {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub store: BlobStore,
    pub topology: Arc<dyn Topology>,
    pub peers: Peers,
    pub hints: HintLog,
    pub metrics: ReplicationMetrics,
    pub repairs: Arc<Semaphore>,
    pub repairing: Mutex<HashSet<BlobKey>>,
    /// Keys read here, to pass on to their other owners (LRU kept in step).
    pub touches: Mutex<HashMap<NodeId, HashSet<String>>>,
    /// Copies evicted here, to pass on to their other owners.
    pub evicted: Mutex<Vec<(BlobKey, BlobMeta)>>,
    pub workers: Mutex<BTreeMap<&'static str, WorkerReport>>,
    pub handoff_wake: tokio::sync::Notify,
    /// Where hand-off resumes in each owner's hints (round robin within an owner too).
    pub hint_cursors: Mutex<HashMap<NodeId, BlobKey>>,
    /// Keys this node coordinates a write of whose outcome is not known yet, with how
    /// many: its local copy may still be withdrawn, so reads here do not serve it.
    pub undecided: Mutex<HashMap<BlobKey, usize>>,
}

/// `step`, or an error when it takes longer than [`REPLICA_STALL_TIMEOUT`].
pub(crate) async fn within<T>(step: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(REPLICA_STALL_TIMEOUT, step)
        .await
        .map_err(|_| "a peer stopped answering".to_owned())
}

/// A call to a peer, failed with DEADLINE_EXCEEDED past [`REPLICA_STALL_TIMEOUT`].
pub(crate) async fn within_rpc<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(REPLICA_STALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("a peer stopped answering")))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DataPlane {
    pub fn new(
        store: BlobStore,
        topology: Arc<dyn Topology>,
        peers: Peers,
        hints: HintLog,
        metrics: ReplicationMetrics,
    ) -> Self {
        metrics.hints.set(hints.len() as i64);
        let plane = DataPlane {
            inner: Arc::new(Inner {
                store: store.clone(),
                topology,
                peers,
                hints,
                metrics,
                repairs: Arc::new(Semaphore::new(READ_REPAIRS_IN_FLIGHT)),
                repairing: Mutex::new(HashSet::new()),
                touches: Mutex::new(HashMap::new()),
                evicted: Mutex::new(Vec::new()),
                workers: Mutex::new(BTreeMap::new()),
                handoff_wake: tokio::sync::Notify::new(),
                hint_cursors: Mutex::new(HashMap::new()),
                undecided: Mutex::new(HashMap::new()),
            }),
        };
        // Evictions are passed on to the other owners (see `owner_sync.rs`); the
        // listener runs under the store's key lock, so it only queues the copy.
        let weak = Arc::downgrade(&plane.inner);
        store.set_eviction_listener(Arc::new(move |key: &BlobKey, meta: &BlobMeta| {
            if let Some(inner) = weak.upgrade() {
                let mut evicted = lock(&inner.evicted);
                if evicted.len() < OWNER_SYNC_BACKLOG {
                    evicted.push((key.clone(), *meta));
                }
            }
        }));
        plane
    }

    pub fn store(&self) -> &BlobStore {
        &self.inner.store
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.topology.view()
    }

    /// The background workers' state.
    pub fn workers(&self) -> Vec<WorkerReport> {
        lock(&self.inner.workers).values().cloned().collect()
    }

    /// Hinted writes waiting for their owner (a counter: no walk of the hint log).
    pub fn pending_hints(&self) -> usize {
        self.inner.hints.len() as usize
    }

    /// Test hook: this node's data-plane calls to `peers` fail from now on, as in a
    /// partition (cut both ends for a symmetric one). Raft traffic is not affected.
    pub fn cut_peers(&self, peers: impl IntoIterator<Item = NodeId>) {
        self.inner.peers.cut(peers);
    }

    /// Test hook: undoes every [`DataPlane::cut_peers`].
    pub fn heal_peers(&self) {
        self.inner.peers.heal();
    }

    pub(crate) fn peer_failed(&self, id: NodeId, status: &Status) {
        tracing::debug!(peer = id, %status, "peer call failed");
        self.inner
            .metrics
            .peer_failures
            .with_label_values(&[&id.to_string()])
            .inc();
        if matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ) {
            self.inner.peers.failed(id);
        }
    }

    pub(crate) fn client(&self, view: &ClusterView, id: NodeId) -> Option<crate::BlobClient> {
        let addr = view.addrs.get(&id)?;
        self.inner.peers.client(id, addr)
    }
}
