//! The write path: a PUT streamed to the key's owners at once, acknowledged once a quorum
//! holds *its* bytes. First write wins: an owner that already holds the key answers with
//! its copy, and a write that cannot reach its quorum while another body holds the key
//! withdraws its own copies (naming its version) and answers 409.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use nxcache_placement::NodeId;
use nxcache_store::{
    BlobKey, BlobWriter, ChecksumHasher, Committed, CopyIdentity, DeleteReason, StoreError, Version,
};
use tonic::Status;
use tracing::Instrument;

use crate::BlobUpload;
use crate::client::{Purpose, PutAnswer};
use crate::plane::{DataPlane, REPLICA_STALL_TIMEOUT, within_rpc};
use crate::topology::{ClusterView, DegradedPolicy};

/// How long a write that has its quorum waits for the remaining owners before answering;
/// those that confirm later make the hint they were given redundant, not wrong.
const STRAGGLER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a write was not acknowledged.
#[derive(Debug)]
pub enum PutError {
    /// The key holds an artifact already (entries are immutable; a writer whose bytes
    /// lost to another body's gets this too).
    Exists,
    /// This node's store refused it (full, too large...) and no other node could take it.
    Store(StoreError),
    /// Not enough nodes could take it under the `strict` policy, or none at all.
    Unavailable(String),
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
    /// The version every copy of this write carries.
    version: Version,
    written: u64,
    /// Checksum of what was sent to peers (None: no peers, the store checks its own).
    hasher: Option<ChecksumHasher>,
    local: Option<BlobWriter>,
    local_error: Option<StoreError>,
    remotes: Vec<RemoteTarget>,
    owners: Vec<NodeId>,
    /// Every node this write was sent to (this one included when it writes locally).
    sent_to: Vec<NodeId>,
}

/// What one target did with the write.
enum Outcome {
    /// Holds this write's bytes: `fresh` when stored by it, else an identical copy
    /// that was there already (counted, and spared from its own writer's withdrawal).
    Mine { fresh: bool },
    /// Holds other bytes.
    Other(CopyIdentity),
    /// Holds the key, bytes unknown (a node from before copy identities): neither.
    Unknown,
}

fn outcome_of(answer: PutAnswer, mine: &CopyIdentity) -> Outcome {
    match answer {
        PutAnswer::Stored => Outcome::Mine { fresh: true },
        PutAnswer::Held(Some(held)) if held.same_content(mine) => Outcome::Mine { fresh: false },
        PutAnswer::Held(Some(held)) => Outcome::Other(held),
        PutAnswer::Held(None) | PutAnswer::Evicted => Outcome::Unknown,
    }
}

fn local_outcome(committed: Committed, mine: &CopyIdentity) -> Outcome {
    match committed {
        Committed::Stored(_) => Outcome::Mine { fresh: true },
        Committed::Existing(held) if held.identity().same_content(mine) => {
            Outcome::Mine { fresh: false }
        }
        Committed::Existing(held) => Outcome::Other(held.identity()),
    }
}

impl DataPlane {
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
            version: Version::new(),
            written: 0,
            hasher: None,
            local: None,
            local_error: None,
            remotes: Vec::new(),
            owners: owners.clone(),
            sent_to: Vec::new(),
        };
        if view.is_lone() || owners == [view.me] && view.ring.replicas() == 1 {
            let writer = self.local_writer(key, len, upload.version).await?;
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
                match self.local_writer(key.clone(), len, upload.version).await {
                    Ok(writer) => {
                        upload.local = Some(writer);
                        upload.sent_to.push(target);
                    }
                    // This node holds the key: it is taken, whatever the other owners say.
                    Err(PutError::Exists) => {
                        self.inner
                            .metrics
                            .writes
                            .with_label_values(&["exists"])
                            .inc();
                        return Err(PutError::Exists);
                    }
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
                .start_put(key.as_str(), len, upload.version, Purpose::Write, None)
                .instrument(span.clone())
                .await
            {
                Ok(stream) => {
                    upload.sent_to.push(target);
                    upload.remotes.push(RemoteTarget {
                        id: target,
                        upload: stream,
                        stopped: false,
                        span,
                    });
                }
                Err(status) => self.peer_failed(target, &status),
            }
        }
        if upload.local.is_none() && upload.remotes.is_empty() {
            return Err(upload.nobody_took_it());
        }
        Ok(upload)
    }

    async fn local_writer(
        &self,
        key: BlobKey,
        len: u64,
        version: Version,
    ) -> Result<BlobWriter, PutError> {
        let begun = self
            .inner
            .store
            .begin_copy(key, len, version, None)
            .instrument(tracing::info_span!("store_begin_write"))
            .await;
        match begun {
            Ok(writer) => Ok(writer),
            Err(StoreError::Exists) => Err(PutError::Exists),
            Err(err) => Err(PutError::Store(err)),
        }
    }

    /// Removes this write's copies from `holders` (a refused or losing write). Each delete
    /// names the write's version, so a copy of another write is never touched, and an
    /// identical copy another writer counted is spared by its holder.
    async fn withdraw(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        version: Version,
        holders: &[NodeId],
    ) {
        for holder in holders {
            if *holder != view.me && self.inner.peers.is_down(*holder) {
                continue;
            }
            let removed = self
                .delete_copies(
                    view,
                    *holder,
                    &[(key.clone(), version)],
                    DeleteReason::Withdrawn,
                )
                .instrument(tracing::info_span!("withdraw", key = %key, holder))
                .await;
            if let Err(err) = removed {
                tracing::warn!(%err, holder, key = %key, "could not withdraw a copy; anti-entropy will settle the key");
            }
        }
    }
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
        // (remotes that stopped early may have answered "held").
        if self.targets_left() == 0 && self.remotes.is_empty() {
            return Err(self.nobody_took_it());
        }
        Ok(())
    }

    /// Completes the write on every replica and decides: acknowledged once the quorum
    /// holds the verified bytes (or, under `serve`, once any node does and no other body
    /// was seen).
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
        let mine = CopyIdentity {
            size: self.len,
            checksum: hasher.finish(),
            version: self.version,
        };
        let local_writer = self.local.take();
        let local = async move {
            match local_writer {
                Some(writer) => Some(
                    writer
                        .finish(None)
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
                        tokio::time::timeout(REPLICA_STALL_TIMEOUT, r.upload.finish(mine.checksum))
                            .await
                            .unwrap_or_else(|_| Err(Status::deadline_exceeded("replica stalled")));
                    (r.id, answer)
                }
                .instrument(span)
            })
            .collect();
        // The local copy always completes (it is this node's disk). Remote answers are
        // awaited until the quorum holds these bytes, then for a short grace only: an
        // owner cut off without a reset (a partition) must not hold every write for the
        // stall timeout. Owners that have not confirmed by then get a hint, like down
        // ones. Local and remote commits run together (a FuturesUnordered only progresses
        // while polled, so both are polled in one loop).
        let mut local = std::pin::pin!(local);
        let mut local_done: Option<Option<Result<Committed, StoreError>>> = None;
        let mut outcomes: Vec<(NodeId, Outcome)> = Vec::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let held = outcomes
                .iter()
                .filter(|(_, o)| matches!(o, Outcome::Mine { .. }))
                .count();
            if grace.is_none() && local_done.is_some() && held >= self.quorum {
                grace = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
            }
            if local_done.is_some() && pending.is_empty() {
                break;
            }
            let deadline =
                grace.unwrap_or_else(|| tokio::time::Instant::now() + REPLICA_STALL_TIMEOUT);
            tokio::select! {
                done = &mut local, if local_done.is_none() => {
                    match &done {
                        Some(Ok(committed)) => outcomes.push((me, local_outcome(*committed, &mine))),
                        Some(Err(err)) => tracing::warn!(%err, key = %self.key, "local replica failed at commit"),
                        None => {}
                    }
                    local_done = Some(done);
                }
                Some((id, answer)) = pending.next(), if !pending.is_empty() => match answer {
                    Ok(answer) => {
                        plane.inner.peers.answered(id);
                        outcomes.push((id, outcome_of(answer, &mine)));
                    }
                    Err(status) => plane.peer_failed(id, &status),
                },
                _ = tokio::time::sleep_until(deadline), if grace.is_some() => break,
            }
        }
        if let Some(Some(Err(err))) = local_done {
            self.local_error = Some(err);
        }
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
        let holders: Vec<NodeId> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Mine { .. }))
            .map(|(id, _)| *id)
            .collect();
        let fresh: Vec<NodeId> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Mine { fresh: true }))
            .map(|(id, _)| *id)
            .collect();
        // Every target is asked to withdraw (a delete naming this version touches nothing
        // else): one that never answered may still have stored this write, and one that
        // answered with another body may have received this write's copy since, from
        // anti-entropy or a read while this write was still waiting for a slow owner
        // (found by the nemesis suite, seed 501: a refused body then outnumbered the
        // acknowledged one and won after the heal).
        let withdraw_from: Vec<NodeId> = self.sent_to.clone();
        let others: Vec<(NodeId, CopyIdentity)> = outcomes
            .iter()
            .filter_map(|(id, o)| match o {
                Outcome::Other(copy) => Some((*id, *copy)),
                _ => None,
            })
            .collect();
        if fresh.is_empty() {
            // Nothing stored by this write: the key was taken already (by these bytes,
            // or by others), or nobody could take it.
            if holders.is_empty() && others.is_empty() {
                return Err(self.nobody_took_it());
            }
            metrics.writes.with_label_values(&["exists"]).inc();
            return Err(PutError::Exists);
        }
        if !others.is_empty() {
            metrics.conflicts.with_label_values(&["write"]).inc();
            tracing::info!(
                key = %self.key,
                mine = holders.len(),
                other_bodies = others.len(),
                quorum = self.quorum,
                "another body holds this key on some owners"
            );
        }
        if holders.len() < self.quorum && !others.is_empty() {
            // First write wins: another body got there first on the owners this write
            // needed. With the quorum a majority, that body cannot be short of it too;
            // this write steps back.
            plane
                .withdraw(&self.view, &self.key, self.version, &withdraw_from)
                .await;
            metrics.writes.with_label_values(&["conflict"]).inc();
            return Err(PutError::Exists);
        }
        if holders.len() < self.quorum && self.view.policy == DegradedPolicy::Strict {
            // Nothing half-visible: the copies this write made are removed again.
            plane
                .withdraw(&self.view, &self.key, self.version, &withdraw_from)
                .await;
            metrics.writes.with_label_values(&["refused"]).inc();
            return Err(PutError::Unavailable(format!(
                "only {} of the {} nodes this artifact needs took it, and the cluster's policy (--on-degraded strict) refuses writes it cannot replicate; nothing was stored",
                holders.len(),
                self.quorum
            )));
        }
        // Owners without these bytes get them through a hint, delivered when they answer
        // (an owner holding another body is settled by the rule on delivery).
        let missing: Vec<NodeId> = self
            .owners
            .iter()
            .copied()
            .filter(|o| !holders.contains(o))
            .collect();
        if !missing.is_empty() {
            plane.record_hints(&missing, &self.key, &holders).await;
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
    /// Records that `owners` lack `key` (held by `holders`), flushed to disk before the
    /// write is acknowledged: on the blocking pool, not on a runtime thread.
    pub(crate) async fn record_hints(&self, owners: &[NodeId], key: &BlobKey, holders: &[NodeId]) {
        let (hints, owners, key, holders) = (
            self.inner.hints.clone(),
            owners.to_vec(),
            key.clone(),
            holders.to_vec(),
        );
        let recorded =
            tokio::task::spawn_blocking(move || hints.add_for_all(&owners, &key, &holders)).await;
        let metrics = &self.inner.metrics;
        match recorded {
            Ok(Ok(dropped)) => {
                if dropped > 0 {
                    metrics.hints_dropped.inc_by(dropped);
                }
            }
            Ok(Err(err)) => {
                tracing::error!(%err, "could not record a hint; anti-entropy will repair the key")
            }
            Err(err) => {
                tracing::error!(%err, "hint recording failed; anti-entropy will repair the key")
            }
        }
        metrics.hints.set(self.inner.hints.len() as i64);
        self.inner.handoff_wake.notify_one();
    }

    /// Deletes the named copies on `node` (this node's store, or a peer's in batches).
    /// Returns how many were removed.
    pub(crate) async fn delete_copies(
        &self,
        view: &ClusterView,
        node: NodeId,
        copies: &[(BlobKey, Version)],
        reason: DeleteReason,
    ) -> Result<u32, String> {
        if node == view.me {
            let (store, copies) = (self.inner.store.clone(), copies.to_vec());
            return tokio::task::spawn_blocking(move || {
                let mut n = 0;
                for (key, version) in &copies {
                    n += u32::from(store.delete_copy(key, *version, reason)?);
                }
                Ok::<_, StoreError>(n)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string());
        }
        let client = self
            .client(view, node)
            .ok_or_else(|| format!("node {node} cannot be reached"))?;
        let named: Vec<(String, Version)> = copies
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), *v))
            .collect();
        within_rpc(client.delete(&named, reason))
            .await
            .map_err(|status| {
                self.peer_failed(node, &status);
                status.to_string()
            })
    }
}
