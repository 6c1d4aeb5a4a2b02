//! Copies between nodes for repair (hand-off, read repair, anti-entropy, rebalancing,
//! conflict repair). A copy keeps the version of the write it came from, and a node that
//! evicted the artifact recently refuses it.

use bytes::Bytes;
use futures_util::StreamExt;
use nxcache_placement::NodeId;
use nxcache_store::{BlobBody, BlobKey, ByteStream, Committed, CopyIdentity, StoreError, Version};

use crate::CHUNK_SIZE;
use crate::client::{Purpose, PutAnswer};
use crate::get::io_stream;
use crate::plane::{DataPlane, within, within_rpc};
use crate::topology::ClusterView;

/// What a copy to a node achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copied {
    /// The destination stored it now.
    Stored,
    /// The destination held the same bytes already.
    AlreadyThere,
    /// The destination holds the key with other bytes (None: it does not say which): a
    /// conflict, left for the rule to settle.
    Differs(Option<CopyIdentity>),
    /// The destination evicted this artifact recently and refused it.
    Evicted,
    /// The source does not hold the key (any more).
    NoSource,
}

fn held(held: Option<CopyIdentity>, source: &CopyIdentity) -> Copied {
    match held {
        Some(h) if h.same_content(source) => Copied::AlreadyThere,
        other => Copied::Differs(other),
    }
}

pub(crate) fn stream_of(body: BlobBody) -> ByteStream {
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

impl DataPlane {
    /// The copy of `key` that `holder` has, and its verified bytes.
    async fn open(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        holder: NodeId,
    ) -> Result<Option<(CopyIdentity, ByteStream)>, String> {
        if holder == view.me {
            return match self.inner.store.read(key).await {
                Ok(Some(read)) => Ok(Some((read.meta.identity(), stream_of(read.body)))),
                Ok(None) => Ok(None),
                Err(err) => Err(err.to_string()),
            };
        }
        let client = self
            .client(view, holder)
            .ok_or_else(|| format!("node {holder} cannot be reached"))?;
        match client.get_verified(key.as_str()).await {
            Ok(Some((copy, stream))) => Ok(Some((copy, io_stream(stream)))),
            Ok(None) => Ok(None),
            Err(status) => {
                self.peer_failed(holder, &status);
                Err(status.to_string())
            }
        }
    }

    /// The identity of `node`'s copy of `key` (None: it holds none); an error when it
    /// cannot be asked.
    pub(crate) async fn copy_at(
        &self,
        view: &ClusterView,
        node: NodeId,
        key: &BlobKey,
    ) -> Result<Option<CopyIdentity>, String> {
        if node == view.me {
            return self
                .inner
                .store
                .head(key)
                .map(|m| m.map(|m| m.identity()))
                .map_err(|e| e.to_string());
        }
        if self.inner.peers.is_down(node) {
            return Err(format!("node {node} is down"));
        }
        let client = self
            .client(view, node)
            .ok_or_else(|| format!("node {node} cannot be reached"))?;
        match within_rpc(client.head(key.as_str())).await {
            Ok(found) => {
                self.inner.peers.answered(node);
                Ok(found)
            }
            Err(status) => {
                self.peer_failed(node, &status);
                Err(status.to_string())
            }
        }
    }

    /// Copies `from`'s copy of `key` to `to`, keeping its version. With `replaces`, it
    /// replaces `to`'s copy of that version (a conflict repair); any other copy there is
    /// left alone and reported.
    pub(crate) async fn copy(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        from: NodeId,
        to: NodeId,
        replaces: Option<Version>,
    ) -> Result<Copied, String> {
        // Every step is bounded: a peer that stops answering fails the copy (it is
        // retried by a later pass) instead of holding a worker, or shutdown, forever.
        let Some((copy, mut stream)) = within(self.open(view, key, from)).await?? else {
            return Ok(Copied::NoSource);
        };
        if to == view.me {
            let evicted = self
                .inner
                .store
                .eviction_mark(key)
                .map_err(|e| e.to_string())?
                .is_some_and(|mark| mark.covers(&copy));
            if evicted {
                return Ok(Copied::Evicted);
            }
            let begun = self
                .inner
                .store
                .begin_copy(key.clone(), copy.size, copy.version, replaces)
                .await;
            let mut writer = match begun {
                Ok(w) => w,
                Err(StoreError::Exists) => {
                    let now = self.inner.store.head(key).map_err(|e| e.to_string())?;
                    return Ok(held(now.map(|m| m.identity()), &copy));
                }
                Err(err) => return Err(err.to_string()),
            };
            while let Some(chunk) = within(stream.next()).await? {
                writer
                    .write(chunk.map_err(|e| e.to_string())?)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return match writer.finish(Some(copy.checksum)).await {
                Ok(Committed::Stored(_)) => Ok(Copied::Stored),
                Ok(Committed::Existing(now)) => Ok(held(Some(now.identity()), &copy)),
                Err(err) => Err(err.to_string()),
            };
        }
        let client = self
            .client(view, to)
            .ok_or_else(|| format!("node {to} cannot be reached"))?;
        let mut upload = within(client.start_put(
            key.as_str(),
            copy.size,
            copy.version,
            Purpose::Repair,
            replaces,
        ))
        .await?
        .map_err(|s| s.to_string())?;
        // On any failure `upload` is dropped: the peer sees its stream end without a
        // trailer and stores nothing.
        while let Some(chunk) = within(stream.next()).await? {
            if !within(upload.send(chunk.map_err(|e| e.to_string())?)).await? {
                break;
            }
        }
        match within(upload.finish(copy.checksum)).await? {
            Ok(PutAnswer::Stored) => Ok(Copied::Stored),
            Ok(PutAnswer::Held(now)) => Ok(held(now, &copy)),
            Ok(PutAnswer::Evicted) => Ok(Copied::Evicted),
            Err(status) => {
                self.peer_failed(to, &status);
                Err(status.to_string())
            }
        }
    }

    /// [`DataPlane::copy`] without replacing, counted under `reason` in the metrics when
    /// it stored something. True when `to` holds a copy of the key now (a copy of other
    /// bytes is a conflict, for the rule in `agreement.rs` to settle).
    pub(crate) async fn copy_counted(
        &self,
        view: &ClusterView,
        key: &BlobKey,
        from: NodeId,
        to: NodeId,
        reason: &str,
    ) -> bool {
        match self.copy(view, key, from, to, None).await {
            Ok(Copied::Stored) => {
                self.inner.metrics.copies.with_label_values(&[reason]).inc();
                true
            }
            Ok(Copied::AlreadyThere | Copied::Differs(_)) => true,
            Ok(Copied::Evicted | Copied::NoSource) => false,
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
