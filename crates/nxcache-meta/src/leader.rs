//! Reaching the Raft leader: metadata writes from any node, forwarded when this node
//! does not lead.

use nxcache_rpc::pb::WriteRequest;
use nxcache_rpc::pb::membership_client::MembershipClient;
use openraft::error::{ClientWriteError, RaftError};

use crate::membership::{ACTION_TIMEOUT, FORWARD_TIMEOUT, forwarded, no_answer, no_quorum};
use crate::network::{MAX_COMMAND_BYTES, channel};
use crate::node::{MetaError, MetaNode};
use crate::types::{MetaCommand, MetaResponse, NodeId};

impl MetaNode {
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.grpc_addr.clone())
    }

    pub(crate) fn membership_client(
        &self,
        leader: NodeId,
    ) -> Result<
        MembershipClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                nxcache_rpc::ClientSecret,
            >,
        >,
        MetaError,
    > {
        if self.inner.faults.is_cut(leader) {
            return Err(MetaError::Unreachable("link cut (fault injection)".into()));
        }
        let addr = self.leader_addr(leader).ok_or(MetaError::NoLeader)?;
        let ch = channel(&addr, self.inner.client_tls.as_ref())
            .map_err(|e| MetaError::Unreachable(e.to_string()))?;
        Ok(MembershipClient::with_interceptor(
            ch,
            self.inner.secret.client_interceptor(),
        ))
    }

    /// Applies a metadata change through the leader (forwarded when this node is not it)
    /// and returns once it is committed and applied on the leader, or with "unavailable"
    /// after about [`ACTION_TIMEOUT`] (a leader that lost its quorum keeps the write
    /// pending; it may still apply later).
    pub async fn write(&self, command: MetaCommand) -> Result<MetaResponse, MetaError> {
        // Every entry must fit in one AppendEntries message.
        let size = serde_json::to_vec(&command)
            .map_err(|e| MetaError::Raft(e.to_string()))?
            .len();
        if size > MAX_COMMAND_BYTES {
            return Err(MetaError::TooLarge(size));
        }
        let written = tokio::time::timeout(
            ACTION_TIMEOUT,
            self.inner.raft.client_write(command.clone()),
        )
        .await
        .map_err(|_| no_quorum())?;
        match written {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let leader = forward.leader_id.ok_or(MetaError::NoLeader)?;
                let mut client = self.membership_client(leader)?;
                let request = WriteRequest {
                    command: serde_json::to_vec(&command)
                        .map_err(|e| MetaError::Raft(e.to_string()))?,
                };
                let answer = tokio::time::timeout(FORWARD_TIMEOUT, client.forward_write(request))
                    .await
                    .map_err(|_| no_answer(leader, FORWARD_TIMEOUT))?
                    .map_err(|status| forwarded(leader, &status))?;
                serde_json::from_slice(&answer.into_inner().result)
                    .map_err(|e| MetaError::Raft(e.to_string()))
            }
            Err(err) => Err(MetaError::Raft(err.to_string())),
        }
    }
}
