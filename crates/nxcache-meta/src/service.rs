//! The gRPC servers of a node: Raft RPCs in, and membership/forwarded writes.

use nxcache_rpc::pb::{
    JoinRequest, JoinResponse, PingRequest, PingResponse, RaftMessage, RemoveRequest,
    RemoveResponse, SnapshotChunk, WriteRequest, WriteResponse, membership_server, raft_server,
};
use std::sync::Arc;

use nxcache_rpc::{RejectHook, TARGET_INCARNATION_HEADER};
use openraft::raft::InstallSnapshotRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::network::SnapshotChunkHeader;
use crate::node::MetaNode;
use crate::types::{MemberNode, MetaCommand, NodeId, Raft};

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { payload }))
}

pub(crate) struct RaftService {
    pub raft: Raft,
    pub node_id: NodeId,
    /// This node's data dir incarnation.
    pub incarnation: u64,
    /// Metrics and the audit log of refused calls.
    pub on_reject: Arc<RejectHook>,
}

impl RaftService {
    /// Refuses a call addressed to another incarnation of this node: its sender's
    /// membership names the data dir this node had before its disk was replaced. Answering
    /// it (a vote with a log that is gone) could undo committed entries.
    fn check_addressee<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(addressed) = request
            .metadata()
            .get(TARGET_INCARNATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return Ok(());
        };
        if addressed == 0 || addressed == self.incarnation {
            return Ok(());
        }
        (self.on_reject)("incarnation", request.remote_addr());
        Err(Status::failed_precondition(format!(
            "this Raft call is addressed to incarnation {addressed} of node {}, but its data \
             dir is incarnation {} (it came back empty): it takes part again once the leader \
             has re-admitted it",
            self.node_id, self.incarnation
        )))
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check_addressee(&request)?;
        let rpc = decode(&request.into_inner().payload)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_addressee(&request)?;
        let rpc = decode(&request.into_inner().payload)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<SnapshotChunk>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check_addressee(&request)?;
        let chunk = request.into_inner();
        let header: SnapshotChunkHeader = decode(&chunk.header)?;
        let rpc = InstallSnapshotRequest {
            vote: header.vote,
            meta: header.meta,
            offset: header.offset,
            data: chunk.data,
            done: header.done,
        };
        encode(&self.raft.install_snapshot(rpc).await)
    }
}

pub(crate) struct MembershipService {
    pub node: MetaNode,
}

#[tonic::async_trait]
impl membership_server::Membership for MembershipService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let info = request
            .into_inner()
            .node
            .ok_or_else(|| Status::invalid_argument("join without node info"))?;
        if info.grpc_addr.is_empty() {
            return Err(Status::invalid_argument("join without a gRPC address"));
        }
        let node = MemberNode {
            grpc_addr: info.grpc_addr,
            http_addr: info.http_addr,
            zone: info.zone,
            incarnation: info.incarnation,
        };
        let (leader_id, voters) = self.node.join(info.id, node).await.map_err(Status::from)?;
        Ok(Response::new(JoinResponse {
            leader_id,
            voters,
            cluster_id: self.node.cluster_id().unwrap_or_default(),
        }))
    }

    async fn forward_write(
        &self,
        request: Request<WriteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let command: MetaCommand = decode(&request.into_inner().command)?;
        let response = self.node.write(command).await.map_err(Status::from)?;
        let result = serde_json::to_vec(&response).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(WriteResponse { result }))
    }

    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            node_id: self.node.id(),
            members: self.node.member_count() as u64,
            cluster_id: self.node.cluster_id().unwrap_or_default(),
            incarnation: self.node.incarnation(),
        }))
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        self.node
            .remove(request.into_inner().id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(RemoveResponse {}))
    }
}
