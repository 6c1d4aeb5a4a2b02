//! Membership changes, decided on the leader one at a time: admitting a node (learner,
//! caught up, then voter) and removing one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nxcache_rpc::pb::{JoinRequest, NodeInfo, RemoveRequest};
use openraft::ChangeMembers;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};

use crate::node::{MetaError, MetaNode};
use crate::types::{MemberNode, NodeId};

impl MetaNode {
    /// Members in this node's membership; 0 before it belongs to a cluster.
    pub fn member_count(&self) -> usize {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().nodes().count()
    }

    pub(crate) fn voters(&self) -> BTreeSet<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Members and how to reach them, from the current membership (cheap: no copy of
    /// the applied state).
    pub fn members(&self) -> Vec<(NodeId, MemberNode)> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    /// Admits a node: as a learner (waiting until it caught up), then as a voter while
    /// there are fewer voters than the `max_voters` setting. Idempotent; forwarded to the
    /// leader when needed. Returns the leader and the voters.
    pub async fn join(
        &self,
        id: NodeId,
        node: MemberNode,
    ) -> Result<(NodeId, Vec<NodeId>), MetaError> {
        let leader = self.leader().ok_or(MetaError::NoLeader)?;
        if leader != self.inner.id {
            let mut client = self.membership_client(leader)?;
            let answer = client
                .join(JoinRequest {
                    node: Some(NodeInfo {
                        id,
                        grpc_addr: node.grpc_addr,
                        http_addr: node.http_addr,
                        zone: node.zone,
                    }),
                })
                .await
                .map_err(|status| MetaError::Unreachable(status.message().to_owned()))?
                .into_inner();
            return Ok((answer.leader_id, answer.voters));
        }
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        let raft = &self.inner.raft;
        let known = {
            let m = raft.metrics().borrow().membership_config.clone();
            m.membership()
                .nodes()
                .any(|(nid, n)| *nid == id && *n == node)
        };
        if !known {
            self.change_membership(ChangeMembers::AddNodes(BTreeMap::from([(id, node)])))
                .await?;
            // Caught up before it may vote: a lagging voter would slow every commit.
            let target = raft.metrics().borrow().last_log_index;
            raft.wait(Some(Duration::from_secs(30)))
                .metrics(
                    |m| {
                        m.replication
                            .as_ref()
                            .and_then(|r| r.get(&id).copied().flatten())
                            .map(|l| l.index)
                            >= target
                    },
                    "the new member catches up",
                )
                .await
                .map_err(|e| MetaError::Raft(e.to_string()))?;
        }
        let max_voters = self.state().cluster.settings.max_voters as usize;
        let voters = self.voters();
        if !voters.contains(&id) && voters.len() < max_voters {
            self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
                .await?;
        }
        Ok((self.inner.id, self.voters().into_iter().collect()))
    }

    /// Removes a member from the cluster for good; forwarded to the leader when needed.
    pub async fn remove(&self, id: NodeId) -> Result<(), MetaError> {
        let leader = self.leader().ok_or(MetaError::NoLeader)?;
        if leader != self.inner.id {
            let mut client = self.membership_client(leader)?;
            client
                .remove(RemoveRequest { id })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::NotFound => MetaError::NotAMember(id),
                    _ => MetaError::Unreachable(status.message().to_owned()),
                })?;
            return Ok(());
        }
        let known = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .any(|(n, _)| *n == id);
        if !known {
            return Err(MetaError::NotAMember(id));
        }
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        let voters = self.voters();
        if voters.contains(&id) {
            self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                .await?;
        }
        self.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
            .await
    }

    /// One membership change at a time: waits (bounded) while another is in progress.
    pub(crate) async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, MemberNode>,
    ) -> Result<(), MetaError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .inner
                .raft
                .change_membership(change.clone(), false)
                .await
            {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(MetaError::Raft(err.to_string())),
            }
        }
    }
}
