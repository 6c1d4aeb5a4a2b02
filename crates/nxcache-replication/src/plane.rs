//! The data plane of one node: every artifact request goes through here. The node that
//! receives a request coordinates it: a write is streamed to the key's owners in
//! parallel and acknowledged once a quorum holds it; a read is served from the best
//! replica, and a replica found lacking is repaired in the background.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use nxcache_placement::NodeId;
use nxcache_store::{
    BlobBody, BlobKey, BlobStore, BlobWriter, ByteStream, Checksum, ChecksumHasher, StoreError,
};
use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::hints::HintLog;
use crate::metrics::ReplicationMetrics;
use crate::peers::Peers;
use crate::topology::{ClusterView, DegradedPolicy, Topology};
use crate::{BlobUpload, CHUNK_SIZE};

/// A replica that accepts no chunk for this long is dropped from the write.
const REPLICA_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to start answering a read before the next one is asked.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Background copies (read repair) running at once.
const REPAIR_CONCURRENCY: usize = 4;
/// How long a write that has its quorum waits for the remaining owners before answering;
/// those that confirm later make the hint they were given redundant, not wrong.
const STRAGGLER_GRACE: Duration = Duration::from_secs(1);

/// Why a write was not acknowledged.
#[derive(Debug)]
pub enum PutError {
    /// An owner holds the key already (entries are immutable).
    Exists,
    /// This node's store refused it (full, too large...) and no other node could take it.
    Store(StoreError),
    /// Not enough nodes could take it under the `strict` policy, or none at all.
    Unavailable(String),
}

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
    repairs: Semaphore,
    repairing: Mutex<HashSet<BlobKey>>,
    /// Keys read here, to pass on to their other owners (LRU kept in step).
    pub touches: Mutex<HashMap<NodeId, HashSet<String>>>,
    /// Keys evicted here, to pass on to their other owners.
    pub evicted: Mutex<Vec<BlobKey>>,
    pub workers: Mutex<BTreeMap<&'static str, WorkerReport>>,
    pub handoff_wake: tokio::sync::Notify,
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

fn stream_of(body: BlobBody) -> ByteStream {
    match body {
        BlobBody::Verified(bytes) => {
            let chunks: Vec<std::io::Result<Bytes>> = (0..bytes.len())
                .step_by(CHUNK_SIZE)
                .map(|at| Ok(bytes.slice(at..(at + CHUNK_SIZE).min(bytes.len()))))
                .collect();
            Box::pin(futures_util::stream::iter(chunks))
        }
        BlobBody::Stream(stream) => stream,
    }
}

/// A peer's blob stream as I/O results; a peer that sends nothing for
/// [`REPLICA_STALL_TIMEOUT`] ends it in an error (the client sees a cut transfer instead
/// of a response that never finishes).
fn io_stream(
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
                repairs: Semaphore::new(REPAIR_CONCURRENCY),
                repairing: Mutex::new(HashSet::new()),
                touches: Mutex::new(HashMap::new()),
                evicted: Mutex::new(Vec::new()),
                workers: Mutex::new(BTreeMap::new()),
                handoff_wake: tokio::sync::Notify::new(),
            }),
        };
        // Evictions are passed on to the other owners (see `workers::propagate`); the
        // listener runs under the store's key lock, so it only queues the key.
        let weak = Arc::downgrade(&plane.inner);
        store.set_eviction_listener(Arc::new(
            move |key: &BlobKey, _: &nxcache_store::BlobMeta| {
                if let Some(inner) = weak.upgrade() {
                    lock(&inner.evicted).push(key.clone());
                }
            },
        ));
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

    /// Hinted writes waiting for their owner.
    pub fn pending_hints(&self) -> usize {
        self.inner.hints.len()
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

    // ---- write path ------------------------------------------------------------------

    /// Starts a write of exactly `len` bytes to the key's owners.
    pub async fn begin_put(&self, key: BlobKey, len: u64) -> Result<Upload, PutError> {
        let view = self.view();
        let owners = tracing::info_span!(
            "placement",
            epoch = view.ring.epoch(),
            owners = tracing::field::Empty
        )
        .in_scope(|| {
            let owners = view.owners(key.as_str());
            tracing::Span::current().record("owners", tracing::field::debug(&owners));
            owners
        });
        let mut upload = Upload {
            plane: self.clone(),
            quorum: view.quorum(),
            view: view.clone(),
            key: key.clone(),
            len,
            written: 0,
            hasher: None,
            local: None,
            local_error: None,
            remotes: Vec::new(),
            owners: owners.clone(),
        };
        if view.is_lone() || owners == [view.me] && view.ring.replicas() == 1 {
            let writer = self.local_writer(key, len).await?;
            upload.local = Some(writer);
            return Ok(upload);
        }
        // Owners that failed lately are replaced by the next live members on the ring
        // (sloppy quorum); they get the key back through a hint.
        let preference = view.ring.preference_list(key.as_str());
        let mut stand_ins = preference
            .iter()
            .skip(owners.len())
            .filter(|id| **id == view.me || !self.inner.peers.is_down(**id));
        let mut targets: Vec<NodeId> = Vec::new();
        for owner in &owners {
            if *owner == view.me || !self.inner.peers.is_down(*owner) {
                targets.push(*owner);
            } else if let Some(stand_in) = stand_ins.next() {
                targets.push(*stand_in);
            }
        }
        if targets.len() < upload.quorum && view.policy == DegradedPolicy::Strict {
            self.inner
                .metrics
                .writes
                .with_label_values(&["refused"])
                .inc();
            return Err(PutError::Unavailable(format!(
                "only {} of the {} nodes this artifact needs can be reached, and the cluster's policy (--on-degraded strict) refuses writes it cannot replicate; nothing was stored",
                targets.len(),
                upload.quorum
            )));
        }
        upload.hasher = Some(ChecksumHasher::new());
        for target in targets {
            if target == view.me {
                match self.local_writer(key.clone(), len).await {
                    Ok(writer) => upload.local = Some(writer),
                    Err(PutError::Exists) => return Err(PutError::Exists),
                    Err(PutError::Store(err)) => upload.local_error = Some(err),
                    Err(other) => return Err(other),
                }
                continue;
            }
            let Some(client) = self.client(&view, target) else {
                continue;
            };
            // One span per replica transfer, from its start to its answer.
            let span = tracing::info_span!("replica_put", peer = target, bytes = len);
            match client
                .start_put(key.as_str(), len)
                .instrument(span.clone())
                .await
            {
                Ok(stream) => upload.remotes.push(RemoteTarget {
                    id: target,
                    upload: stream,
                    stopped: false,
                    span,
                }),
                Err(status) => self.peer_failed(target, &status),
            }
        }
        if upload.local.is_none() && upload.remotes.is_empty() {
            return Err(upload.nobody_took_it());
        }
        Ok(upload)
    }

    async fn local_writer(&self, key: BlobKey, len: u64) -> Result<BlobWriter, PutError> {
        let begun = self
            .inner
            .store
            .begin_write(key, len)
            .instrument(tracing::info_span!("store_begin_write"))
            .await;
        match begun {
            Ok(writer) => Ok(writer),
            Err(StoreError::Exists) => Err(PutError::Exists),
            Err(err) => Err(PutError::Store(err)),
        }
    }

    // ---- read path -------------------------------------------------------------------

    /// The artifact from this node when it holds it, otherwise from the best replica.
    pub async fn get(&self, key: &BlobKey) -> Result<Option<Artifact>, GetError> {
        let view = self.view();
        let local = self
            .inner
            .store
            .read(key)
            .instrument(tracing::info_span!("store_read"))
            .await;
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
        let mut lacking: Vec<NodeId> = owners.iter().copied().filter(|o| *o == view.me).collect();
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
        match self.inner.store.head(key) {
            Ok(Some(meta)) => return Ok(Some(meta.size)),
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
                Ok(Ok(Some(blob))) => return Ok(Some(blob.size)),
                Ok(Ok(None)) => {}
                Ok(Err(status)) => self.peer_failed(peer, &status),
                Err(_) => self.inner.peers.failed(peer),
            }
        }
        Ok(None)
    }

    /// Queues the key for its other owners' LRU order (see `workers::send_touches`).
    fn note_read(&self, view: &ClusterView, key: &BlobKey, served_by: NodeId) {
        let owners = view.owners(key.as_str());
        let mut touches = lock(&self.inner.touches);
        for o in owners {
            if o != served_by && o != view.me {
                touches
                    .entry(o)
                    .or_default()
                    .insert(key.as_str().to_owned());
            }
        }
    }

    /// Copies `key` from `from` to each of `to` in the background (read repair).
    fn repair(&self, key: BlobKey, from: NodeId, to: Vec<NodeId>) {
        if !lock(&self.inner.repairing).insert(key.clone()) {
            return;
        }
        let plane = self.clone();
        let span = tracing::info_span!("read_repair", key = %key);
        tokio::spawn(
            async move {
                let _permit = plane.inner.repairs.acquire().await;
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

    // ---- copies between nodes --------------------------------------------------------

    /// The bytes of `key` as `holder` has them: size, checksum, verified stream.
    async fn open(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        holder: NodeId,
    ) -> Result<Option<(u64, Checksum, ByteStream)>, String> {
        if holder == view.me {
            return match self.inner.store.read(key).await {
                Ok(Some(read)) => Ok(Some((
                    read.meta.size,
                    read.meta.checksum,
                    stream_of(read.body),
                ))),
                Ok(None) => Ok(None),
                Err(err) => Err(err.to_string()),
            };
        }
        let client = self
            .client(view, holder)
            .ok_or_else(|| format!("node {holder} has no address"))?;
        match client.get_verified(key.as_str()).await {
            Ok(Some((info, stream))) => Ok(Some((info.size, info.checksum, io_stream(stream)))),
            Ok(None) => Ok(None),
            Err(status) => {
                self.peer_failed(holder, &status);
                Err(status.to_string())
            }
        }
    }

    /// Copies `key` from `from` to `to`. Ok(true): `to` holds it now; Ok(false): `from`
    /// does not have it.
    pub(crate) async fn copy(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        from: NodeId,
        to: NodeId,
    ) -> Result<bool, String> {
        // Every step is bounded: a peer that stops answering fails the copy (it is
        // retried by a later pass) instead of holding a worker, or shutdown, forever.
        let Some((size, checksum, mut stream)) = within(self.open(view, key, from)).await?? else {
            return Ok(false);
        };
        if to == view.me {
            let mut writer = match self.inner.store.begin_write(key.clone(), size).await {
                Ok(w) => w,
                Err(StoreError::Exists) => return Ok(true),
                Err(err) => return Err(err.to_string()),
            };
            while let Some(chunk) = within(stream.next()).await? {
                writer
                    .write(chunk.map_err(|e| e.to_string())?)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return match writer.commit_verified(checksum).await {
                Ok(_) | Err(StoreError::Exists) => Ok(true),
                Err(err) => Err(err.to_string()),
            };
        }
        let client = self
            .client(view, to)
            .ok_or_else(|| format!("node {to} has no address"))?;
        let mut upload = within(client.start_put(key.as_str(), size))
            .await?
            .map_err(|s| s.to_string())?;
        // On any failure `upload` is dropped: the peer sees its stream end without a
        // trailer and stores nothing.
        while let Some(chunk) = within(stream.next()).await? {
            if !within(upload.send(chunk.map_err(|e| e.to_string())?)).await? {
                break;
            }
        }
        match within(upload.finish(checksum)).await? {
            Ok(_) => Ok(true),
            Err(status) => {
                self.peer_failed(to, &status);
                Err(status.to_string())
            }
        }
    }

    /// [`DataPlane::copy`], counted under `reason` in the metrics.
    pub(crate) async fn copy_counted(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        from: NodeId,
        to: NodeId,
        reason: &str,
    ) -> bool {
        match self.copy(view, key, from, to).await {
            Ok(true) => {
                self.inner.metrics.copies.with_label_values(&[reason]).inc();
                true
            }
            Ok(false) => false,
            Err(err) => {
                tracing::debug!(key = %key, from, to, %err, reason, "copy failed");
                self.inner
                    .metrics
                    .copy_failures
                    .with_label_values(&[reason])
                    .inc();
                false
            }
        }
    }
}

struct RemoteTarget {
    id: NodeId,
    upload: BlobUpload,
    /// It took no more data (failed, stalled, or answered early): its answer is read
    /// at commit.
    stopped: bool,
    span: tracing::Span,
}

/// A write on its way to the key's owners (or stand-ins).
pub struct Upload {
    plane: DataPlane,
    view: Arc<ClusterView>,
    quorum: usize,
    key: BlobKey,
    len: u64,
    written: u64,
    /// Checksum of what was sent to peers (None: no peers, the store checks its own).
    hasher: Option<ChecksumHasher>,
    local: Option<BlobWriter>,
    local_error: Option<StoreError>,
    remotes: Vec<RemoteTarget>,
    owners: Vec<NodeId>,
}

impl Upload {
    pub fn written(&self) -> u64 {
        self.written
    }

    fn targets_left(&self) -> usize {
        usize::from(self.local.is_some()) + self.remotes.iter().filter(|r| !r.stopped).count()
    }

    fn nobody_took_it(&mut self) -> PutError {
        self.plane
            .inner
            .metrics
            .writes
            .with_label_values(&["failed"])
            .inc();
        match self.local_error.take() {
            Some(err) => PutError::Store(err),
            None => PutError::Unavailable(format!(
                "no node could take artifact {} ({} bytes); nothing was stored",
                self.key, self.len
            )),
        }
    }

    /// Passes a chunk to every replica still in the write, waiting for the slowest (a
    /// slow replica slows the upload; one stalled for long is dropped from it).
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), PutError> {
        self.written += chunk.len() as u64;
        if let Some(h) = &mut self.hasher {
            h.update(&chunk);
        }
        let local = async {
            match &mut self.local {
                Some(writer) => writer.write(chunk.clone()).await.err(),
                None => None,
            }
        };
        let remotes = futures_util::future::join_all(
            self.remotes.iter_mut().filter(|r| !r.stopped).map(|r| {
                let chunk = chunk.clone();
                async move {
                    let sent =
                        tokio::time::timeout(REPLICA_STALL_TIMEOUT, r.upload.send(chunk)).await;
                    if !matches!(sent, Ok(true)) {
                        r.stopped = true;
                    }
                }
            }),
        );
        let (local_error, _) = tokio::join!(local, remotes);
        if let Some(err) = local_error {
            if self.remotes.is_empty() {
                return Err(PutError::Store(err));
            }
            tracing::warn!(%err, key = %self.key, "local replica failed; continuing with the others");
            self.local = None;
            self.local_error = Some(err);
        }
        // With no replica left the rest of the body goes nowhere; commit reports why
        // (remotes that stopped early may have answered "exists").
        if self.targets_left() == 0 && self.remotes.is_empty() {
            return Err(self.nobody_took_it());
        }
        Ok(())
    }

    /// Completes the write on every replica and decides: acknowledged once the quorum
    /// holds the verified bytes (or, under `serve`, once any node does).
    pub async fn commit(mut self) -> Result<(), PutError> {
        let plane = self.plane.clone();
        let metrics = &plane.inner.metrics;
        let me = self.view.me;
        let Some(hasher) = self.hasher.take() else {
            // A lone node: the store verifies length and checksum itself.
            let writer = self
                .local
                .take()
                .expect("a lone write has its local writer");
            return match writer.commit().await {
                Ok(_) => Ok(()),
                Err(StoreError::Exists) => Err(PutError::Exists),
                Err(err) => Err(PutError::Store(err)),
            };
        };
        let checksum = hasher.finish();
        let local_writer = self.local.take();
        let local = async move {
            match local_writer {
                Some(writer) => Some(
                    writer
                        .commit()
                        .instrument(tracing::info_span!("store_commit"))
                        .await,
                ),
                None => None,
            }
        };
        let mut pending: futures_util::stream::FuturesUnordered<_> = self
            .remotes
            .drain(..)
            .map(|r| {
                let span = r.span.clone();
                async move {
                    let answer =
                        tokio::time::timeout(REPLICA_STALL_TIMEOUT, r.upload.finish(checksum))
                            .await
                            .unwrap_or_else(|_| Err(Status::deadline_exceeded("replica stalled")));
                    (r.id, answer)
                }
                .instrument(span)
            })
            .collect();
        // The local copy always completes (it is this node's disk). Remote answers are
        // awaited until the quorum holds the bytes, then for a short grace only: an owner
        // cut off without a reset (a partition) must not hold every write for the stall
        // timeout. Owners that have not confirmed by then get a hint, like down ones.
        // Local and remote commits run together (a FuturesUnordered only progresses
        // while polled, so both are polled in one loop).
        let mut local = std::pin::pin!(local);
        let mut local_done: Option<Option<Result<nxcache_store::BlobMeta, StoreError>>> = None;
        let mut remotes: Vec<(NodeId, Result<bool, Status>)> = Vec::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let local_held = matches!(
                local_done,
                Some(Some(Ok(_)) | Some(Err(StoreError::Exists)))
            );
            let held = usize::from(local_held) + remotes.iter().filter(|(_, a)| a.is_ok()).count();
            if grace.is_none() && local_done.is_some() && held >= self.quorum {
                grace = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
            }
            if local_done.is_some() && pending.is_empty() {
                break;
            }
            let deadline =
                grace.unwrap_or_else(|| tokio::time::Instant::now() + REPLICA_STALL_TIMEOUT);
            tokio::select! {
                done = &mut local, if local_done.is_none() => local_done = Some(done),
                Some(answer) = pending.next(), if !pending.is_empty() => remotes.push(answer),
                _ = tokio::time::sleep_until(deadline), if grace.is_some() => break,
            }
        }
        let local = local_done.flatten();
        if !pending.is_empty() {
            metrics.stragglers.inc_by(pending.len() as u64);
            let plane = plane.clone();
            tokio::spawn(async move {
                while let Some((id, answer)) = pending.next().await {
                    match answer {
                        Ok(_) => plane.inner.peers.answered(id),
                        Err(status) => plane.peer_failed(id, &status),
                    }
                }
            });
        }
        // A replica that "already holds" the key counts as a holder: a background copy
        // (anti-entropy, repair) may have landed while this write streamed. The write is
        // a conflict (409) only when every replica had it and none stored it now.
        let mut holders: Vec<NodeId> = Vec::new();
        let mut fresh: Vec<NodeId> = Vec::new();
        match local {
            Some(Ok(_)) => {
                holders.push(me);
                fresh.push(me);
            }
            Some(Err(StoreError::Exists)) => holders.push(me),
            Some(Err(err)) => self.local_error = Some(err),
            None => {}
        }
        for (id, answer) in remotes {
            match answer {
                Ok(stored) => {
                    holders.push(id);
                    if stored {
                        fresh.push(id);
                    }
                }
                Err(status) => plane.peer_failed(id, &status),
            }
        }
        if !holders.is_empty() && fresh.is_empty() {
            metrics.writes.with_label_values(&["exists"]).inc();
            return Err(PutError::Exists);
        }
        if holders.is_empty() {
            return Err(self.nobody_took_it());
        }
        if holders.len() < self.quorum && self.view.policy == DegradedPolicy::Strict {
            // Nothing half-visible: the copies this write made are removed again.
            for holder in &fresh {
                plane.delete_copy(&self.view, &self.key, *holder).await;
            }
            metrics.writes.with_label_values(&["refused"]).inc();
            return Err(PutError::Unavailable(format!(
                "only {} of the {} nodes this artifact needs took it, and the cluster's policy (--on-degraded strict) refuses writes it cannot replicate; nothing was stored",
                holders.len(),
                self.quorum
            )));
        }
        // Owners without a copy get it through a hint, delivered when they answer.
        let missing: Vec<NodeId> = self
            .owners
            .iter()
            .copied()
            .filter(|o| !holders.contains(o))
            .collect();
        if !missing.is_empty() {
            // The hint is flushed to disk before the write is acknowledged: off the runtime.
            let (hints, key, holders) =
                (plane.inner.hints.clone(), self.key.clone(), holders.clone());
            let recorded =
                tokio::task::spawn_blocking(move || hints.add_for_all(&missing, &key, &holders))
                    .await;
            match recorded {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(%err, "could not record a hint; anti-entropy will repair the key")
                }
                Err(err) => {
                    tracing::error!(%err, "hint recording failed; anti-entropy will repair the key")
                }
            }
            metrics.hints.set(plane.inner.hints.len() as i64);
            plane.inner.handoff_wake.notify_one();
        }
        let outcome = if holders.len() >= self.quorum {
            "quorum"
        } else {
            "degraded"
        };
        metrics.writes.with_label_values(&[outcome]).inc();
        Ok(())
    }
}

impl DataPlane {
    /// Removes one node's copy (a write rolled back).
    async fn delete_copy(&self, view: &ClusterView, key: &BlobKey, holder: NodeId) {
        if holder == view.me {
            let store = self.inner.store.clone();
            let key = key.clone();
            let _ = tokio::task::spawn_blocking(move || store.delete(&key)).await;
        } else if let Some(client) = self.client(view, holder)
            && let Err(status) = within_rpc(client.delete(vec![key.as_str().to_owned()])).await
        {
            tracing::warn!(%status, holder, "could not roll back a refused write");
        }
    }
}
