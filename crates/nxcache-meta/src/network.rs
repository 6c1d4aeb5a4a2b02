//! openraft's network over tonic: one lazily connected gRPC channel per peer.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use nxcache_rpc::pb::RaftMessage;
use nxcache_rpc::pb::raft_client::RaftClient;
use nxcache_rpc::{
    ClientSecret, ClusterSecret, GrpcClientMetrics, PeerChannel, TARGET_INCARNATION_HEADER,
};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ClientTlsConfig;

use crate::metrics::MetaMetrics;
use crate::types::{MemberNode, NodeId, TypeConfig};

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
    /// Sends one openraft message; the answer is the remote `Result` of the call.
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Result<Resp, E>, RPCError<NodeId, MemberNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let unreachable = |why: &dyn std::fmt::Display| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why.to_string())))
        };
        if self.faults.is_cut(self.target) {
            return Err(unreachable(&"link cut (fault injection)"));
        }
        let mut client = match &self.client {
            Ok(client) => client.clone(),
            Err(e) => return Err(unreachable(e)),
        };
        let payload =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut message = tonic::Request::new(RaftMessage { payload });
        if self.target_incarnation != 0 {
            // Addressed to the data dir the membership names: a node back with an empty
            // disk refuses it instead of voting with a log it has lost.
            message.metadata_mut().insert(
                TARGET_INCARNATION_HEADER,
                tonic::metadata::MetadataValue::from(self.target_incarnation),
            );
        }
        let started = Instant::now();
        let call = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(message).await,
                Rpc::Vote => client.vote(message).await,
                Rpc::InstallSnapshot => client.install_snapshot(message).await,
            }
        };
        let outcome = tokio::time::timeout(option.hard_ttl(), call).await;
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
        self.call(Rpc::AppendEntries, &rpc, &option)
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
        self.call(Rpc::InstallSnapshot, &rpc, &option)
            .await?
            .map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option)
            .await?
            .map_err(|e| self.remote(e))
    }
}
