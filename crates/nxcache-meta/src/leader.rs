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
            Err(RaftError::Fatal(fatal)) => Err(self.core_stopped(&fatal)),
            Err(err) => Err(MetaError::Raft(err.to_string())),
        }
    }

    /// Why this node's Raft core stopped, when it stopped on an error (a storage failure,
    /// a panic) rather than by a shutdown: such a node takes no part in the control plane
    /// until it is restarted.
    pub fn core_failure(&self) -> Option<String> {
        if *self.inner.stop.borrow() {
            return None;
        }
        let watch = self.inner.raft.metrics();
        let running = watch.borrow().running_state.clone();
        match running {
            // The metrics' sender gone while the last state says "running": the core's
            // task ended without saying why (a panic).
            Ok(()) if watch.has_changed().is_err() => Some("the Raft core panicked".into()),
            Ok(()) => None,
            Err(openraft::error::Fatal::Stopped) => {
                Some("the Raft core stopped while the node runs".into())
            }
            Err(fatal) => Some(fatal.to_string()),
        }
    }

    /// Resolves once this node's Raft core has stopped on an error (see
    /// [`MetaNode::core_failure`]), with why; never while it runs or after a shutdown.
    pub async fn core_failed(&self) -> String {
        let mut watch = self.inner.raft.metrics();
        loop {
            if let Some(why) = self.core_failure() {
                return why;
            }
            if watch.changed().await.is_err() {
                match self.core_failure() {
                    Some(why) => return why,
                    // Shut down: nothing failed.
                    None => std::future::pending::<()>().await,
                }
            }
        }
    }

    /// The answer to a call that reached a stopped Raft core: unavailable here, with what
    /// to do about it.
    pub(crate) fn core_stopped(&self, fatal: &openraft::error::Fatal<NodeId>) -> MetaError {
        MetaError::Unavailable(format!(
            "node {}'s metadata log has stopped ({fatal}): it cannot take part in cluster \
             changes until it is restarted (it reports itself unhealthy on /healthz). Retry \
             through another node, and check its log and free disk space",
            self.inner.id
        ))
    }
}
