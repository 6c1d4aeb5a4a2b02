//! openraft's network over tonic: one lazily connected gRPC channel per peer.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nxcache_rpc::pb::raft_client::RaftClient;
use nxcache_rpc::pb::{RaftMessage, SnapshotChunk};
use nxcache_rpc::{
    ClientSecret, ClusterSecret, GrpcClientMetrics, PeerChannel, TARGET_INCARNATION_HEADER,
};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ClientTlsConfig;

use crate::metrics::MetaMetrics;
use crate::types::{MemberNode, NodeId, TypeConfig};

/// Largest gRPC message between nodes, set on both ends (tonic's default is 4 MiB). What
/// keeps Raft below it: snapshot chunks of [`SNAPSHOT_CHUNK_BYTES`], and AppendEntries
/// batches of at most [`APPEND_BUDGET`] bytes of entries, each entry a command of at most
/// [`MAX_COMMAND_BYTES`].
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Bytes of snapshot data per InstallSnapshot message.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 4 << 20;
/// Largest metadata change (a command, JSON-encoded); larger ones are refused before
/// they reach the log, so every log entry fits in an AppendEntries batch.
pub const MAX_COMMAND_BYTES: usize = 256 << 10;
/// Bytes of entries per AppendEntries message. openraft gives each AppendEntries one
/// heartbeat interval to be sent, stored and answered, so a batch stays small; openraft
/// sends fewer entries at once when told (`PayloadTooLarge`).
const APPEND_BUDGET: usize = 1 << 20;
/// Time to send one snapshot chunk, and to install the snapshot after the last one.
pub(crate) const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// The JSON part of a snapshot chunk: everything of openraft's request but the data.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunkHeader {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, MemberNode>,
    pub offset: u64,
    pub done: bool,
}

/// How many of `request`'s entries fit in [`APPEND_BUDGET`] (at least 1).
fn entries_that_fit(request: &AppendEntriesRequest<TypeConfig>) -> u64 {
    let envelope = AppendEntriesRequest::<TypeConfig> {
        vote: request.vote,
        prev_log_id: request.prev_log_id,
        leader_commit: request.leader_commit,
        entries: Vec::new(),
    };
    let mut used = serde_json::to_vec(&envelope).map_or(0, |v| v.len());
    let mut fit = 0;
    for entry in &request.entries {
        used += serde_json::to_vec(entry).map_or(usize::MAX / 2, |v| v.len()) + 1;
        if used > APPEND_BUDGET {
            break;
        }
        fit += 1;
    }
    fit.max(1)
}

pub(crate) type PeerClient = RaftClient<InterceptedService<PeerChannel, ClientSecret>>;

/// Peers this node cannot reach: empty in production; tests cut links with it to make
/// partitions inside one process.
#[derive(Clone, Default)]
pub struct Faults {
    unreachable: Arc<RwLock<HashSet<NodeId>>>,
}

impl Faults {
    pub fn cut(&self, peers: impl IntoIterator<Item = NodeId>) {
        self.unreachable
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(peers);
    }

    pub fn heal(&self) {
        self.unreachable
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub(crate) fn is_cut(&self, peer: NodeId) -> bool {
        self.unreachable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer)
    }
}

pub(crate) use nxcache_rpc::channel;

pub struct GrpcNetworkFactory {
    pub(crate) secret: ClusterSecret,
    pub(crate) tls: Option<ClientTlsConfig>,
    pub(crate) faults: Faults,
    pub(crate) metrics: MetaMetrics,
    pub(crate) grpc: GrpcClientMetrics,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> GrpcNetwork {
        let client = channel(&node.grpc_addr, self.tls.as_ref())
            .map(|ch| {
                RaftClient::with_interceptor(
                    self.grpc.instrument(target, ch),
                    self.secret.client_interceptor(),
                )
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
            })
            .map_err(|e| e.to_string());
        GrpcNetwork {
            target,
            target_incarnation: node.incarnation,
            client,
            faults: self.faults.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

pub struct GrpcNetwork {
    target: NodeId,
    /// The target's incarnation as this node's membership records it (0: not recorded).
    target_incarnation: u64,
    client: Result<PeerClient, String>,
    faults: Faults,
    metrics: MetaMetrics,
}

/// The incarnation the membership names for a call's target (0: not known yet).
#[derive(Clone, Copy)]
struct AddressedTo(u64);

impl AddressedTo {
    /// The message as a request addressed to that incarnation: a node back with an empty
    /// disk refuses it instead of voting or acknowledging with a log it has lost.
    fn request<T>(self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if self.0 != 0 {
            request.metadata_mut().insert(
                TARGET_INCARNATION_HEADER,
                tonic::metadata::MetadataValue::from(self.0),
            );
        }
        request
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append_entries",
            Rpc::Vote => "vote",
            Rpc::InstallSnapshot => "install_snapshot",
        }
    }
}

impl GrpcNetwork {
    /// Sends one openraft message with `send`; the answer is the remote `Result` of the
    /// call.
    async fn call<Resp, E, F, Fut>(
        &mut self,
        rpc: Rpc,
        option: &RPCOption,
        send: F,
    ) -> Result<Result<Resp, E>, RPCError<NodeId, MemberNode, E>>
    where
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
        F: FnOnce(PeerClient, AddressedTo) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let unreachable = |why: &dyn std::fmt::Display| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why.to_string())))
        };
        if self.faults.is_cut(self.target) {
            return Err(unreachable(&"link cut (fault injection)"));
        }
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(e) => return Err(unreachable(e)),
        };
        let started = Instant::now();
        let addressee = AddressedTo(self.target_incarnation);
        let outcome = tokio::time::timeout(option.hard_ttl(), send(client, addressee)).await;
        let elapsed = started.elapsed();
        let result = match outcome {
            Err(_) => Err(unreachable(&format!(
                "no answer within {:?}",
                option.hard_ttl()
            ))),
            Ok(Err(status)) => Err(unreachable(&status)),
            Ok(Ok(response)) => {
                serde_json::from_slice::<Result<Resp, E>>(&response.into_inner().payload)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))
            }
        };
        self.metrics
            .observe_rpc(rpc.name(), result.is_ok(), elapsed);
        result
    }

    fn remote<E: std::error::Error>(&self, err: E) -> RPCError<NodeId, MemberNode, E> {
        RPCError::RemoteError(RemoteError::new(self.target, err))
    }
}

impl RaftNetwork<TypeConfig> for GrpcNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        let payload =
            serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if payload.len() > APPEND_BUDGET {
            // openraft sends fewer entries at once; a single entry always fits (commands
            // are capped at MAX_COMMAND_BYTES, a quarter of the budget).
            let fit = entries_that_fit(&rpc);
            tracing::debug!(
                entries = rpc.entries.len(),
                fit,
                bytes = payload.len(),
                "AppendEntries too large for one message; splitting"
            );
            return Err(PayloadTooLarge::new_entries_hint(fit).into());
        }
        let message = RaftMessage { payload };
        self.call(Rpc::AppendEntries, &option, |mut client, to| async move {
            client.append_entries(to.request(message)).await
        })
        .await?
        .map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let header = SnapshotChunkHeader {
            vote: rpc.vote,
            meta: rpc.meta,
            offset: rpc.offset,
            done: rpc.done,
        };
        let chunk = SnapshotChunk {
            header: serde_json::to_vec(&header)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?,
            // The data as it is: bytes on the wire, not a JSON array of numbers.
            data: rpc.data,
        };
        self.call(Rpc::InstallSnapshot, &option, |mut client, to| async move {
            client.install_snapshot(to.request(chunk)).await
        })
        .await?
        .map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        let payload =
            serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let message = RaftMessage { payload };
        self.call(Rpc::Vote, &option, |mut client, to| async move {
            client.vote(to.request(message)).await
        })
        .await?
        .map_err(|e| self.remote(e))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use super::*;
    use crate::types::MetaCommand;

    fn entry(index: u64, bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(MetaCommand::RevokeToken {
                name: "x".repeat(bytes),
            }),
        }
    }

    #[test]
    fn an_append_entries_too_large_for_its_budget_names_how_many_entries_fit() {
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=20).map(|i| entry(i, 200 << 10)).collect(),
        };
        assert!(serde_json::to_vec(&request).unwrap().len() > APPEND_BUDGET);
        let fit = entries_that_fit(&request) as usize;
        assert_eq!(fit, APPEND_BUDGET / (200 << 10));
        let smaller = AppendEntriesRequest {
            entries: request.entries[..fit].to_vec(),
            ..request
        };
        assert!(serde_json::to_vec(&smaller).unwrap().len() <= APPEND_BUDGET);
        // A single entry always goes, whatever its size.
        let one = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![entry(1, 2 << 20)],
        };
        assert_eq!(entries_that_fit(&one), 1);
    }
}
