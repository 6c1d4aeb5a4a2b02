use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use nxcache_rpc::pb::blobs_client::BlobsClient;
use nxcache_rpc::pb::{
    DeleteRequest, GetRequest, HeadRequest, PutChunk, PutHeader, PutResult, PutTrailer,
    RangeDigestsRequest, RangeKeysRequest, TouchRequest, get_chunk, put_chunk,
};
use nxcache_rpc::{ClientSecret, ClusterSecret, GrpcClientMetrics, PeerChannel};
use nxcache_store::Checksum;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ClientTlsConfig;
use tonic::{Code, Status};
use tracing::Instrument;

/// Chunks in flight per upload: with 256 KiB chunks, at most about 1 MiB is buffered for
/// a replica before its sender waits (back-pressure from a slow replica).
const UPLOAD_QUEUE: usize = 4;

/// A peer's blob service.
#[derive(Clone)]
pub struct BlobClient {
    client: BlobsClient<InterceptedService<PeerChannel, ClientSecret>>,
}

/// What a peer holds of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBlob {
    pub size: u64,
    pub checksum: Checksum,
}

fn checksum_of(raw: &[u8]) -> Result<Checksum, Status> {
    raw.try_into()
        .map_err(|_| Status::data_loss("a peer sent a malformed checksum"))
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
            client: BlobsClient::with_interceptor(channel, secret.client_interceptor()),
        })
    }

    /// Starts sending a blob of `size` bytes.
    pub async fn start_put(&self, key: &str, size: u64) -> Result<BlobUpload, Status> {
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let header = PutChunk {
            part: Some(put_chunk::Part::Header(PutHeader {
                key: key.to_owned(),
                size,
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

    /// The blob's info and a stream of its bytes, or `None` if the peer does not hold it.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<
        Option<(
            PeerBlob,
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
                Some(get_chunk::Part::Info(info)) => PeerBlob {
                    size: info.size,
                    checksum: checksum_of(&info.checksum)?,
                },
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

    /// Removes the keys the peer holds; returns how many it held.
    pub async fn delete(&self, keys: Vec<String>) -> Result<u32, Status> {
        Ok(self
            .client
            .clone()
            .delete(DeleteRequest { keys })
            .await?
            .into_inner()
            .deleted)
    }

    /// Tells the peer these keys were read through another owner.
    pub async fn touch(&self, keys: Vec<String>) -> Result<(), Status> {
        self.client.clone().touch(TouchRequest { keys }).await?;
        Ok(())
    }

    /// Per-range digests of the keys both this node (`me`) and the peer own.
    pub async fn range_digests(
        &self,
        me: u64,
        ring_epoch: u64,
    ) -> Result<crate::RangeDigests, Status> {
        let answer = self
            .client
            .clone()
            .range_digests(RangeDigestsRequest {
                peer_id: me,
                ring_epoch,
            })
            .await?
            .into_inner();
        crate::RangeDigests::from_parts(answer.digests, answer.counts)
            .ok_or_else(|| Status::data_loss("a peer sent digests for the wrong number of ranges"))
    }

    /// The keys of one range that both this node (`me`) and the peer own.
    pub async fn range_keys(
        &self,
        me: u64,
        ring_epoch: u64,
        range: usize,
    ) -> Result<Vec<String>, Status> {
        Ok(self
            .client
            .clone()
            .range_keys(RangeKeysRequest {
                peer_id: me,
                ring_epoch,
                range: range as u32,
            })
            .await?
            .into_inner()
            .keys)
    }

    pub async fn head(&self, key: &str) -> Result<Option<PeerBlob>, Status> {
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
        Ok(Some(PeerBlob {
            size: answer.size,
            checksum: checksum_of(&answer.checksum)?,
        }))
    }
}

/// A blob on its way to a peer.
pub struct BlobUpload {
    tx: Option<mpsc::Sender<PutChunk>>,
    response: tokio::task::JoinHandle<Result<PutResult, Status>>,
}

impl BlobUpload {
    /// Queues a chunk, waiting while the peer is behind. False when the peer stopped
    /// reading (it answered already, e.g. because it holds the key): call `finish` for
    /// its answer.
    pub async fn send(&mut self, data: Bytes) -> bool {
        let chunk = PutChunk {
            part: Some(put_chunk::Part::Data(data)),
        };
        match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        }
    }

    /// Sends the checksum of everything sent and returns the peer's answer: whether it
    /// stored the blob now (false: it held it already).
    pub async fn finish(mut self, checksum: Checksum) -> Result<bool, Status> {
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

    async fn answer(&mut self) -> Result<bool, Status> {
        (&mut self.response)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(|r| r.stored)
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
            PeerBlob,
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
