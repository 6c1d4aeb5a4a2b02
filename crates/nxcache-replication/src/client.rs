use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use nxcache_rpc::pb::blobs_client::BlobsClient;
use nxcache_rpc::pb::{
    self, CopyRef, DeleteRequest, GetRequest, HeadRequest, PutChunk, PutHeader, PutResult,
    PutTrailer, RangeDigestsRequest, RangeKeysRequest, RingRange, TouchRequest, get_chunk,
    put_chunk,
};
use nxcache_rpc::{ClientSecret, ClusterSecret, GrpcClientMetrics, PeerChannel};
use nxcache_store::{Checksum, CopyIdentity, DeleteReason, RangeDigest, RingEntry, Version};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ClientTlsConfig;
use tonic::{Code, Status};
use tracing::Instrument;

/// Chunks in flight per upload: with 256 KiB chunks, at most about 1 MiB is buffered for
/// a replica before its sender waits (back-pressure from a slow replica).
const UPLOAD_QUEUE: usize = 4;

/// Most entries in one message of a list that grows with the data (deletes, touches,
/// ranges): every such message stays small, whatever the store holds.
pub const MAX_BATCH: usize = 1024;

/// Most entries in one page of a key listing.
pub const MAX_PAGE: usize = 1000;

/// A peer's blob service.
#[derive(Clone)]
pub struct BlobClient {
    client: BlobsClient<InterceptedService<PeerChannel, ClientSecret>>,
}

/// Why a copy is being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A client's write.
    Write,
    /// Repair, hand-off, rebalancing: refused by a node that evicted the artifact.
    Repair,
}

/// A peer's answer to a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutAnswer {
    /// Stored now.
    Stored,
    /// The key is held by this copy (None from a node that does not say which).
    Held(Option<CopyIdentity>),
    /// A repair copy refused: the peer evicted this artifact recently.
    Evicted,
}

fn checksum_of(raw: &[u8]) -> Result<Checksum, Status> {
    raw.try_into()
        .map_err(|_| Status::data_loss("a peer sent a malformed checksum"))
}

/// A copy's identity from the wire; a peer that sends no version has a copy from before
/// versions, whose version is derived from its bytes.
pub(crate) fn identity_of(
    size: u64,
    checksum: &[u8],
    version: &[u8],
) -> Result<CopyIdentity, Status> {
    let checksum = checksum_of(checksum)?;
    let version = if version.is_empty() {
        Version::legacy(&checksum)
    } else {
        Version::from_slice(version)
            .ok_or_else(|| Status::data_loss("a peer sent a malformed version"))?
    };
    Ok(CopyIdentity {
        size,
        checksum,
        version,
    })
}

pub(crate) fn identity_to_pb(copy: &CopyIdentity) -> pb::CopyIdentity {
    pb::CopyIdentity {
        size: copy.size,
        checksum: copy.checksum.to_vec(),
        version: copy.version.to_bytes().to_vec(),
    }
}

pub(crate) fn reason_to_pb(reason: DeleteReason) -> pb::DeleteReason {
    match reason {
        DeleteReason::Withdrawn => pb::DeleteReason::Withdrawn,
        DeleteReason::HandedOff => pb::DeleteReason::HandedOff,
        DeleteReason::Evicted => pb::DeleteReason::Evicted,
    }
}

fn ranges_to_pb(ranges: &[(u64, u64)]) -> Vec<RingRange> {
    ranges
        .iter()
        .map(|(first, last)| RingRange {
            first: *first,
            last: *last,
        })
        .collect()
}

impl BlobClient {
    /// A client for node `peer` at `grpc_addr`, its calls counted in `metrics`.
    pub fn new(
        grpc_addr: &str,
        secret: &ClusterSecret,
        tls: Option<&ClientTlsConfig>,
        metrics: &GrpcClientMetrics,
        peer: u64,
    ) -> Result<Self, Status> {
        let channel =
            nxcache_rpc::channel(grpc_addr, tls).map_err(|e| Status::unavailable(e.to_string()))?;
        let channel = metrics.instrument(peer, channel);
        Ok(BlobClient {
            client: BlobsClient::with_interceptor(channel, secret.client_interceptor())
                .max_decoding_message_size(crate::MAX_BLOB_MESSAGE_BYTES)
                .max_encoding_message_size(crate::MAX_BLOB_MESSAGE_BYTES),
        })
    }

    /// Starts sending a copy of write `version` of `size` bytes; with `replaces`, it
    /// replaces the peer's copy of that version (a conflict repair).
    pub async fn start_put(
        &self,
        key: &str,
        size: u64,
        version: Version,
        purpose: Purpose,
        replaces: Option<Version>,
    ) -> Result<BlobUpload, Status> {
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let header = PutChunk {
            part: Some(put_chunk::Part::Header(PutHeader {
                key: key.to_owned(),
                size,
                version: version.to_bytes().to_vec(),
                purpose: match purpose {
                    Purpose::Write => pb::PutPurpose::Write,
                    Purpose::Repair => pb::PutPurpose::Repair,
                } as i32,
                replaces: replaces.map(|v| v.to_bytes().to_vec()).unwrap_or_default(),
            })),
        };
        tx.send(header)
            .await
            .map_err(|_| Status::internal("upload queue closed"))?;
        let mut client = self.client.clone();
        // In the caller's span, so the peer's side of the call joins its trace.
        let response = tokio::spawn(
            async move {
                client
                    .put(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner())
            }
            .in_current_span(),
        );
        Ok(BlobUpload {
            tx: Some(tx),
            response,
        })
    }

    /// The copy's identity and a stream of its bytes, or `None` if the peer does not
    /// hold the key.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<
        Option<(
            CopyIdentity,
            impl Stream<Item = Result<Bytes, Status>> + Send + use<>,
        )>,
        Status,
    > {
        let mut stream = match self
            .client
            .clone()
            .get(GetRequest {
                key: key.to_owned(),
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(status),
        };
        let info = match stream.message().await? {
            Some(chunk) => match chunk.part {
                Some(get_chunk::Part::Info(info)) => {
                    identity_of(info.size, &info.checksum, &info.version)?
                }
                _ => return Err(Status::data_loss("a blob stream must start with its info")),
            },
            None => return Err(Status::data_loss("empty blob stream")),
        };
        let data = stream.map(|chunk| match chunk?.part {
            Some(get_chunk::Part::Data(bytes)) => Ok(bytes),
            _ => Err(Status::data_loss("unexpected message in a blob stream")),
        });
        Ok(Some((info, data)))
    }

    /// Removes the named copies (in batches of at most [`MAX_BATCH`]); a copy of another
    /// version is left alone. Returns how many were removed.
    pub async fn delete(
        &self,
        copies: &[(String, Version)],
        reason: DeleteReason,
    ) -> Result<u32, Status> {
        let mut deleted = 0;
        for batch in copies.chunks(MAX_BATCH) {
            deleted += self
                .client
                .clone()
                .delete(DeleteRequest {
                    copies: batch
                        .iter()
                        .map(|(key, version)| CopyRef {
                            key: key.clone(),
                            version: version.to_bytes().to_vec(),
                        })
                        .collect(),
                    reason: reason_to_pb(reason) as i32,
                })
                .await?
                .into_inner()
                .deleted;
        }
        Ok(deleted)
    }

    /// Tells the peer these keys were read through another owner (in batches).
    pub async fn touch(&self, keys: &[String]) -> Result<(), Status> {
        for batch in keys.chunks(MAX_BATCH) {
            self.client
                .clone()
                .touch(TouchRequest {
                    keys: batch.to_vec(),
                })
                .await?;
        }
        Ok(())
    }

    /// The peer's digest of each ring range (asked in batches of [`MAX_BATCH`]).
    pub async fn range_digests(
        &self,
        me: u64,
        ring_epoch: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<RangeDigest>, Status> {
        let mut out = Vec::with_capacity(ranges.len());
        for batch in ranges.chunks(MAX_BATCH) {
            let answer = self
                .client
                .clone()
                .range_digests(RangeDigestsRequest {
                    peer_id: me,
                    ring_epoch,
                    ranges: ranges_to_pb(batch),
                })
                .await?
                .into_inner();
            if answer.digests.len() != batch.len() {
                return Err(Status::data_loss(
                    "a peer sent digests for another number of ranges",
                ));
            }
            out.extend(answer.digests.into_iter().map(|d| RangeDigest {
                xor: d.xor,
                count: d.count,
            }));
        }
        Ok(out)
    }

    /// One page of the peer's copies in `ranges` (at most [`MAX_BATCH`] ranges, ascending
    /// and disjoint), after `after`; and whether more follow.
    pub async fn range_keys(
        &self,
        me: u64,
        ring_epoch: u64,
        ranges: &[(u64, u64)],
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<(Vec<RingEntry>, bool), Status> {
        let answer = self
            .client
            .clone()
            .range_keys(RangeKeysRequest {
                peer_id: me,
                ring_epoch,
                ranges: ranges_to_pb(ranges),
                after: after.map(|(position, key)| pb::RingCursor {
                    position,
                    key: key.to_owned(),
                }),
                limit: limit.min(MAX_PAGE) as u32,
            })
            .await?
            .into_inner();
        let mut entries = Vec::with_capacity(answer.entries.len());
        for e in answer.entries {
            let copy = e
                .copy
                .ok_or_else(|| Status::data_loss("a peer listed a key without its copy"))?;
            entries.push(RingEntry {
                position: nxcache_store::ring_position(&e.key),
                copy: identity_of(copy.size, &copy.checksum, &copy.version)?,
                key: e.key,
            });
        }
        Ok((entries, answer.more))
    }

    pub async fn head(&self, key: &str) -> Result<Option<CopyIdentity>, Status> {
        let answer = self
            .client
            .clone()
            .head(HeadRequest {
                key: key.to_owned(),
            })
            .await?
            .into_inner();
        if !answer.found {
            return Ok(None);
        }
        Ok(Some(identity_of(
            answer.size,
            &answer.checksum,
            &answer.version,
        )?))
    }
}

/// A blob on its way to a peer.
pub struct BlobUpload {
    tx: Option<mpsc::Sender<PutChunk>>,
    response: tokio::task::JoinHandle<Result<PutResult, Status>>,
}

impl BlobUpload {
    /// Queues a chunk, waiting while the peer is behind. False when the peer stopped
    /// reading (it answered already, e.g. because it holds other bytes): call `finish`
    /// for its answer.
    pub async fn send(&mut self, data: Bytes) -> bool {
        let chunk = PutChunk {
            part: Some(put_chunk::Part::Data(data)),
        };
        match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        }
    }

    /// Sends the checksum of everything sent and returns the peer's answer.
    pub async fn finish(mut self, checksum: Checksum) -> Result<PutAnswer, Status> {
        if let Some(tx) = self.tx.take() {
            let trailer = PutChunk {
                part: Some(put_chunk::Part::Trailer(PutTrailer {
                    checksum: checksum.to_vec(),
                })),
            };
            let _ = tx.send(trailer).await;
        }
        self.answer().await
    }

    /// Gives up: the peer sees the stream end without its trailer and stores nothing.
    pub async fn abort(mut self) {
        self.tx.take();
        let _ = self.answer().await;
    }

    async fn answer(&mut self) -> Result<PutAnswer, Status> {
        let result = (&mut self.response)
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        if result.stored {
            return Ok(PutAnswer::Stored);
        }
        if result.evicted {
            return Ok(PutAnswer::Evicted);
        }
        let held = result
            .existing
            .map(|c| identity_of(c.size, &c.checksum, &c.version))
            .transpose()?;
        Ok(PutAnswer::Held(held))
    }
}

impl BlobClient {
    /// Like [`BlobClient::get`], but checks what arrives against the peer's checksum: the
    /// last chunk is held back until everything before it matches, so a damaged transfer
    /// ends in an error and never yields all the bytes.
    pub async fn get_verified(
        &self,
        key: &str,
    ) -> Result<
        Option<(
            CopyIdentity,
            impl Stream<Item = Result<Bytes, Status>> + Send + use<>,
        )>,
        Status,
    > {
        let Some((info, stream)) = self.get(key).await? else {
            return Ok(None);
        };
        let raw =
            stream.map(|chunk| chunk.map_err(|s| std::io::Error::other(s.message().to_owned())));
        let verified = nxcache_store::verify_stream(Box::pin(raw), info.size, info.checksum)
            .map(|chunk| chunk.map_err(|e| Status::data_loss(format!("relayed blob: {e}"))));
        Ok(Some((info, verified)))
    }
}
