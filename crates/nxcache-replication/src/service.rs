use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use nxcache_rpc::pb::blobs_server::Blobs;
use nxcache_rpc::pb::{
    BlobInfo, DeleteRequest, DeleteResponse, GetChunk, GetRequest, HeadRequest, HeadResponse,
    PutChunk, PutResult, RangeDigestsRequest, RangeDigestsResponse, RangeKeysRequest,
    RangeKeysResponse, TouchRequest, TouchResponse, get_chunk, put_chunk,
};
use nxcache_store::{BlobBody, BlobKey, BlobStore, Checksum, StoreError};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use std::sync::Arc;

use crate::CHUNK_SIZE;
use crate::digests::{digests_of, shared_by_range};
use crate::topology::{ClusterView, Topology};

/// Serves this node's store to its peers.
pub struct BlobService {
    store: BlobStore,
    topology: Arc<dyn Topology>,
}

impl BlobService {
    /// `topology`: this node's view of the cluster, for the anti-entropy digests.
    pub fn new(store: BlobStore, topology: Arc<dyn Topology>) -> Self {
        BlobService { store, topology }
    }

    /// The current view, if the caller computed its digests at the same ring epoch.
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
}

fn key(raw: &str) -> Result<BlobKey, Status> {
    BlobKey::parse(raw).map_err(|e| Status::invalid_argument(format!("bad key: {e}")))
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
        let mut writer = match self.store.begin_write(key, header.size).await {
            Ok(writer) => writer,
            Err(StoreError::Exists) => return Ok(Response::new(PutResult { stored: false })),
            Err(err) => return Err(status(err)),
        };
        loop {
            match incoming.message().await? {
                Some(PutChunk {
                    part: Some(put_chunk::Part::Data(bytes)),
                }) => writer.write(bytes).await.map_err(status)?,
                Some(PutChunk {
                    part: Some(put_chunk::Part::Trailer(trailer)),
                }) => {
                    let checksum: Checksum = trailer
                        .checksum
                        .as_slice()
                        .try_into()
                        .map_err(|_| Status::invalid_argument("a checksum is 16 bytes"))?;
                    let committed = writer
                        .commit_verified(checksum)
                        .instrument(tracing::info_span!("store_commit"))
                        .await;
                    return match committed {
                        Ok(_) => Ok(Response::new(PutResult { stored: true })),
                        Err(StoreError::Exists) => Ok(Response::new(PutResult { stored: false })),
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
            },
            None => HeadResponse::default(),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let keys = request
            .into_inner()
            .keys
            .iter()
            .map(|k| key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let deleted = self
            .blocking(move |store| {
                let mut n = 0;
                for k in &keys {
                    n += u32::from(store.delete(k)?);
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
        for raw in request.into_inner().keys {
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
        let view = self.view_at(request.ring_epoch)?;
        let d = self
            .blocking(move |store| {
                Ok(digests_of(&shared_by_range(
                    &store,
                    &view,
                    request.peer_id,
                )?))
            })
            .await?;
        Ok(Response::new(RangeDigestsResponse {
            digests: d.digests,
            counts: d.counts,
        }))
    }

    async fn range_keys(
        &self,
        request: Request<RangeKeysRequest>,
    ) -> Result<Response<RangeKeysResponse>, Status> {
        let request = request.into_inner();
        let view = self.view_at(request.ring_epoch)?;
        let range = request.range as usize;
        if range >= nxcache_placement::KEY_RANGES {
            return Err(Status::invalid_argument("no such key range"));
        }
        let keys = self
            .blocking(move |store| {
                Ok(std::mem::take(
                    &mut shared_by_range(&store, &view, request.peer_id)?[range],
                ))
            })
            .await?;
        Ok(Response::new(RangeKeysResponse {
            keys: keys.into_iter().map(|k| k.as_str().to_owned()).collect(),
        }))
    }
}
