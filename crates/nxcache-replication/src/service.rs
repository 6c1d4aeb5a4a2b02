use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use nxcache_rpc::pb::blobs_server::Blobs;
use nxcache_rpc::pb::{
    self, BlobInfo, DeleteRequest, DeleteResponse, GetChunk, GetRequest, HeadRequest, HeadResponse,
    PutChunk, PutResult, RangeDigestsRequest, RangeDigestsResponse, RangeKeysRequest,
    RangeKeysResponse, TouchRequest, TouchResponse, get_chunk, put_chunk,
};
use nxcache_store::{
    BlobBody, BlobKey, BlobStore, Checksum, ChecksumHasher, Committed, CopyIdentity, DeleteReason,
    StoreError, Version,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::CHUNK_SIZE;
use crate::client::{MAX_BATCH, MAX_PAGE, identity_to_pb};
use crate::topology::{ClusterView, Topology};

/// Serves this node's store to its peers.
pub struct BlobService {
    store: BlobStore,
    topology: Arc<dyn Topology>,
}

impl BlobService {
    /// `topology`: this node's view of the cluster (anti-entropy calls must come from a
    /// peer at the same ring epoch).
    pub fn new(store: BlobStore, topology: Arc<dyn Topology>) -> Self {
        BlobService { store, topology }
    }

    /// The current view, if the caller works at the same ring epoch.
    fn view_at(&self, ring_epoch: u64) -> Result<Arc<ClusterView>, Status> {
        let view = self.topology.view();
        if view.epoch() != ring_epoch {
            return Err(Status::failed_precondition(format!(
                "ring epoch {} here, {ring_epoch} at the caller",
                view.epoch()
            )));
        }
        Ok(view)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(BlobStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)
    }

    /// Whether this node evicted the artifact `copy` of `key` recently.
    fn evicted_here(&self, key: &BlobKey, copy: &CopyIdentity) -> Result<bool, Status> {
        Ok(self
            .store
            .eviction_mark(key)
            .map_err(status)?
            .is_some_and(|mark| mark.covers(copy)))
    }

    /// The key is held: read the sender's bytes to their trailer (only their checksum
    /// tells whether they are the same artifact), then answer with the copy that holds
    /// it, counted for the sender when the bytes are the same.
    async fn answer_held(
        &self,
        key: BlobKey,
        held: nxcache_store::BlobMeta,
        size: u64,
        version: Version,
        incoming: &mut Streaming<PutChunk>,
    ) -> Result<Response<PutResult>, Status> {
        if held.size != size {
            // Other bytes for sure: no need to read them.
            return Ok(Response::new(existing(&held.identity())));
        }
        let mut hasher = ChecksumHasher::new();
        let mut received = 0u64;
        let checksum = loop {
            match incoming.message().await? {
                Some(PutChunk {
                    part: Some(put_chunk::Part::Data(bytes)),
                }) => {
                    received += bytes.len() as u64;
                    hasher.update(&bytes);
                }
                Some(PutChunk {
                    part: Some(put_chunk::Part::Trailer(trailer)),
                }) => break trailer_checksum(&trailer)?,
                _ => {
                    return Err(Status::data_loss(
                        "the put ended without its trailer; nothing was stored",
                    ));
                }
            }
        };
        if received != size || hasher.finish() != checksum {
            return Err(Status::data_loss(
                "the received bytes do not match the sender's size and checksum",
            ));
        }
        let copy = CopyIdentity {
            size,
            checksum,
            version,
        };
        let current = self
            .blocking(move |store| store.claim_if_same(&key, &copy))
            .await?;
        Ok(Response::new(match current {
            Some(meta) => existing(&meta.identity()),
            // Gone meanwhile: nothing holds the key now, and nothing was stored.
            None => PutResult::default(),
        }))
    }
}

fn key(raw: &str) -> Result<BlobKey, Status> {
    BlobKey::parse(raw).map_err(|e| Status::invalid_argument(format!("bad key: {e}")))
}

fn version_of(raw: &[u8]) -> Result<Version, Status> {
    Version::from_slice(raw).ok_or_else(|| Status::invalid_argument("a version is 16 bytes"))
}

fn trailer_checksum(trailer: &pb::PutTrailer) -> Result<Checksum, Status> {
    trailer
        .checksum
        .as_slice()
        .try_into()
        .map_err(|_| Status::invalid_argument("a checksum is 16 bytes"))
}

fn existing(copy: &CopyIdentity) -> PutResult {
    PutResult {
        stored: false,
        existing: Some(identity_to_pb(copy)),
        evicted: false,
    }
}

fn status(err: StoreError) -> Status {
    match err {
        StoreError::DiskFull
        | StoreError::BudgetExhausted { .. }
        | StoreError::LargerThanBudget { .. } => Status::resource_exhausted(err.to_string()),
        StoreError::LengthMismatch { .. } | StoreError::ChecksumMismatch => {
            Status::data_loss(err.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

/// Ring ranges from a request: at most [`MAX_BATCH`], each `first <= last`, ascending and
/// disjoint (a page cursor walks them in order).
fn ranges(raw: &[pb::RingRange]) -> Result<Vec<(u64, u64)>, Status> {
    if raw.len() > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH} ranges per call"
        )));
    }
    let out: Vec<(u64, u64)> = raw.iter().map(|r| (r.first, r.last)).collect();
    let ordered = out.iter().all(|(f, l)| f <= l) && out.windows(2).all(|w| w[0].1 < w[1].0);
    if !ordered {
        return Err(Status::invalid_argument(
            "ranges must be ascending and disjoint",
        ));
    }
    Ok(out)
}

type GetStream = Pin<Box<dyn Stream<Item = Result<GetChunk, Status>> + Send>>;

fn data(bytes: Bytes) -> GetChunk {
    GetChunk {
        part: Some(get_chunk::Part::Data(bytes)),
    }
}

#[tonic::async_trait]
impl Blobs for BlobService {
    async fn put(
        &self,
        request: Request<Streaming<PutChunk>>,
    ) -> Result<Response<PutResult>, Status> {
        let mut incoming = request.into_inner();
        let header = match incoming.message().await? {
            Some(PutChunk {
                part: Some(put_chunk::Part::Header(header)),
            }) => header,
            _ => return Err(Status::invalid_argument("a put starts with its header")),
        };
        let key = key(&header.key)?;
        // A node that predates versions sends none: this copy gets one of its own.
        let version = match header.version.as_slice() {
            [] => Version::new(),
            raw => version_of(raw)?,
        };
        let replaces = match header.replaces.as_slice() {
            [] => None,
            raw => Some(version_of(raw)?),
        };
        let repair = header.purpose == pb::PutPurpose::Repair as i32;
        if repair {
            let mark = self.store.eviction_mark(&key).map_err(status)?;
            if mark.is_some_and(|m| m.copy.version == version) {
                return Ok(Response::new(PutResult {
                    evicted: true,
                    ..PutResult::default()
                }));
            }
        }
        let mut writer = loop {
            match self
                .store
                .begin_copy(key.clone(), header.size, version, replaces)
                .await
            {
                Ok(writer) => break writer,
                Err(StoreError::Exists) => match self.store.head(&key).map_err(status)? {
                    Some(held) => {
                        return self
                            .answer_held(key, held, header.size, version, &mut incoming)
                            .await;
                    }
                    // Removed since: try again.
                    None => continue,
                },
                Err(err) => return Err(status(err)),
            }
        };
        loop {
            match incoming.message().await? {
                Some(PutChunk {
                    part: Some(put_chunk::Part::Data(bytes)),
                }) => writer.write(bytes).await.map_err(status)?,
                Some(PutChunk {
                    part: Some(put_chunk::Part::Trailer(trailer)),
                }) => {
                    let checksum = trailer_checksum(&trailer)?;
                    let copy = CopyIdentity {
                        size: header.size,
                        checksum,
                        version,
                    };
                    // Identical bytes written before this node evicted them: the evicted
                    // artifact, not to be brought back by repair.
                    if repair && self.evicted_here(&key, &copy)? {
                        return Ok(Response::new(PutResult {
                            evicted: true,
                            ..PutResult::default()
                        }));
                    }
                    let committed = writer
                        .finish(Some(checksum))
                        .instrument(tracing::info_span!("store_commit"))
                        .await;
                    return match committed {
                        Ok(Committed::Stored(_)) => Ok(Response::new(PutResult {
                            stored: true,
                            ..PutResult::default()
                        })),
                        Ok(Committed::Existing(held)) => {
                            Ok(Response::new(existing(&held.identity())))
                        }
                        Err(err) => Err(status(err)),
                    };
                }
                // Dropping the writer removes what was received: nothing half-stored.
                _ => {
                    return Err(Status::data_loss(
                        "the put ended without its trailer; nothing was stored",
                    ));
                }
            }
        }
    }

    type GetStream = GetStream;

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetStream>, Status> {
        let key = key(&request.into_inner().key)?;
        let read = self
            .store
            .read(&key)
            .instrument(tracing::info_span!("store_read"))
            .await
            .map_err(status)?
            .ok_or_else(|| Status::not_found("no such blob"))?;
        let info = GetChunk {
            part: Some(get_chunk::Part::Info(BlobInfo {
                size: read.meta.size,
                checksum: read.meta.checksum.to_vec(),
                version: read.meta.version.to_bytes().to_vec(),
            })),
        };
        let body: GetStream = match read.body {
            BlobBody::Verified(bytes) => {
                let chunks: Vec<Result<GetChunk, Status>> = (0..bytes.len())
                    .step_by(CHUNK_SIZE)
                    .map(|at| Ok(data(bytes.slice(at..(at + CHUNK_SIZE).min(bytes.len())))))
                    .collect();
                Box::pin(futures_util::stream::iter(chunks))
            }
            BlobBody::Stream(stream) => Box::pin(stream.map(|chunk| {
                chunk
                    .map(data)
                    .map_err(|e| Status::data_loss(format!("stored blob failed verification: {e}")))
            })),
        };
        let all = futures_util::stream::once(async move { Ok(info) }).chain(body);
        Ok(Response::new(Box::pin(all)))
    }

    async fn head(&self, request: Request<HeadRequest>) -> Result<Response<HeadResponse>, Status> {
        let key = key(&request.into_inner().key)?;
        let meta = self.store.head(&key).map_err(status)?;
        Ok(Response::new(match meta {
            Some(m) => HeadResponse {
                found: true,
                size: m.size,
                checksum: m.checksum.to_vec(),
                version: m.version.to_bytes().to_vec(),
            },
            None => HeadResponse::default(),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let request = request.into_inner();
        if request.copies.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} copies per delete"
            )));
        }
        let reason = match pb::DeleteReason::try_from(request.reason) {
            Ok(pb::DeleteReason::Withdrawn) => DeleteReason::Withdrawn,
            Ok(pb::DeleteReason::HandedOff) => DeleteReason::HandedOff,
            Ok(pb::DeleteReason::Evicted) => DeleteReason::Evicted,
            _ => return Err(Status::invalid_argument("a delete must say why")),
        };
        let copies = request
            .copies
            .iter()
            .map(|c| Ok((key(&c.key)?, version_of(&c.version)?)))
            .collect::<Result<Vec<_>, Status>>()?;
        let deleted = self
            .blocking(move |store| {
                let mut n = 0;
                for (k, v) in &copies {
                    n += u32::from(store.delete_copy(k, *v, reason)?);
                }
                Ok(n)
            })
            .await?;
        Ok(Response::new(DeleteResponse { deleted }))
    }

    async fn touch(
        &self,
        request: Request<TouchRequest>,
    ) -> Result<Response<TouchResponse>, Status> {
        let keys = request.into_inner().keys;
        if keys.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} keys per touch"
            )));
        }
        for raw in keys {
            if let Ok(k) = BlobKey::parse(&raw) {
                self.store.touch(&k).map_err(status)?;
            }
        }
        Ok(Response::new(TouchResponse {}))
    }

    async fn range_digests(
        &self,
        request: Request<RangeDigestsRequest>,
    ) -> Result<Response<RangeDigestsResponse>, Status> {
        let request = request.into_inner();
        self.view_at(request.ring_epoch)?;
        let ranges = ranges(&request.ranges)?;
        let digests = self
            .blocking(move |store| {
                ranges
                    .iter()
                    .map(|(first, last)| store.ring_digest(*first, *last))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(Response::new(RangeDigestsResponse {
            digests: digests
                .into_iter()
                .map(|d| pb::RangeDigest {
                    xor: d.xor,
                    count: d.count,
                })
                .collect(),
        }))
    }

    async fn range_keys(
        &self,
        request: Request<RangeKeysRequest>,
    ) -> Result<Response<RangeKeysResponse>, Status> {
        let request = request.into_inner();
        self.view_at(request.ring_epoch)?;
        let ranges = ranges(&request.ranges)?;
        let limit = (request.limit as usize).clamp(1, MAX_PAGE);
        let after = request.after.map(|c| (c.position, c.key));
        let mut entries = self
            .blocking(move |store| {
                store.ring_entries(
                    &ranges,
                    after.as_ref().map(|(p, k)| (*p, k.as_str())),
                    limit + 1,
                )
            })
            .await?;
        let more = entries.len() > limit;
        entries.truncate(limit);
        Ok(Response::new(RangeKeysResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::RangeEntry {
                    copy: Some(identity_to_pb(&e.copy)),
                    key: e.key,
                })
                .collect(),
            more,
        }))
    }
}
