//! Membership changes, decided on the leader one at a time and each bounded in time:
//! admitting a node (learner, caught up, then voter), re-admitting one whose disk came back
//! empty, removing one, and keeping the voters topped up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nxcache_rpc::pb::{JoinRequest, NodeInfo, RemoveRequest};
use openraft::ChangeMembers;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use tokio::time::Instant;

use crate::node::{MetaError, MetaNode};
use crate::types::{MemberNode, MemberState, NodeId};

/// How long an operator's action (a metadata write, draining or removing a node) may wait
/// on the leader, for the membership lock and for its entries to commit, before it is
/// answered "unavailable": an admin request gets an answer within about this long even
/// when the leader has lost its quorum.
pub(crate) const ACTION_TIMEOUT: Duration = Duration::from_secs(7);
/// A follower's wait for the leader's answer to a forwarded action: the leader's own
/// deadline and a margin, so the leader's explanation gets through.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(9);
/// How long a leader that removed itself waits, beyond its action's deadline, for the
/// others to elect the next leader (a few election timeouts).
const ELECTION_GRACE: Duration = Duration::from_secs(5);
/// How long the leader works on one join (adding the node, waiting until it caught up,
/// promoting it); a joiner that is not caught up by then asks again.
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The joiner's wait for the answer to a join: the leader's deadline and a margin.
pub(crate) const JOIN_CALL_TIMEOUT: Duration = Duration::from_secs(35);

/// Holds the membership lock: changes are decided one at a time (look, then act).
pub(crate) type MembershipGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

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

    /// A member's record, if it is one.
    fn record(&self, id: NodeId) -> Option<MemberNode> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).cloned()
    }

    /// Admits a node: as a learner (waiting until it caught up), then as a voter while
    /// there are fewer voters than the `max_voters` setting. A member that asks again from
    /// another data dir (its disk came back empty) is first demoted to a learner under
    /// its new incarnation: it votes again only once it holds the log. Idempotent;
    /// forwarded to the leader when needed. Returns the leader and the voters.
    pub async fn join(
        &self,
        id: NodeId,
        node: MemberNode,
    ) -> Result<(NodeId, Vec<NodeId>), MetaError> {
        let leader = self.leader().ok_or(MetaError::NoLeader)?;
        if leader != self.inner.id {
            let mut client = self.membership_client(leader)?;
            let request = JoinRequest {
                node: Some(NodeInfo {
                    id,
                    grpc_addr: node.grpc_addr,
                    http_addr: node.http_addr,
                    zone: node.zone,
                    incarnation: node.incarnation,
                }),
            };
            let answer = tokio::time::timeout(JOIN_CALL_TIMEOUT, client.join(request))
                .await
                .map_err(|_| no_answer(leader, JOIN_CALL_TIMEOUT))?
                .map_err(|status| forwarded(leader, &status))?
                .into_inner();
            return Ok((answer.leader_id, answer.voters));
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        {
            let _one_at_a_time = self.lock_membership(deadline).await?;
            self.settle_joint_config(deadline).await?;
            match self.record(id) {
                None => {
                    self.change_membership(
                        ChangeMembers::AddNodes(BTreeMap::from([(id, node.clone())])),
                        deadline,
                    )
                    .await?;
                }
                Some(recorded) if node.same_disk_as(&recorded) => {
                    if node.incarnation != 0 && recorded != node {
                        // Same data dir, new addresses (a moved pod): update the record.
                        self.change_membership(
                            ChangeMembers::SetNodes(BTreeMap::from([(id, node.clone())])),
                            deadline,
                        )
                        .await?;
                    }
                }
                Some(recorded) => {
                    tracing::warn!(
                        target: "audit",
                        action = "member.new_disk",
                        node_id = id,
                        old_incarnation = recorded.incarnation,
                        new_incarnation = node.incarnation,
                        "a member asks to join again from a new, empty data dir: it takes part as \
                         a learner until it has caught up"
                    );
                    if self.voters().contains(&id) {
                        // First out of every quorum, then the new record: never a voter
                        // with an empty log.
                        self.change_membership(
                            ChangeMembers::RemoveVoters(BTreeSet::from([id])),
                            deadline,
                        )
                        .await?;
                    }
                    self.change_membership(
                        ChangeMembers::SetNodes(BTreeMap::from([(id, node.clone())])),
                        deadline,
                    )
                    .await?;
                }
            }
        }
        // Caught up before it may vote (a lagging voter slows every commit; an empty one
        // could elect a node that lacks committed entries). Not under the lock: catching
        // up can take a while and must not hold up other changes.
        self.wait_caught_up(id, deadline).await?;
        {
            let _one_at_a_time = self.lock_membership(deadline).await?;
            let max_voters = self.state().cluster.settings.max_voters as usize;
            let voters = self.voters();
            let still_this_disk = self
                .record(id)
                .is_some_and(|recorded| node.same_disk_as(&recorded));
            if still_this_disk && !voters.contains(&id) && voters.len() < max_voters {
                self.settle_joint_config(deadline).await?;
                self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), deadline)
                    .await?;
            }
        }
        Ok((self.inner.id, self.voters().into_iter().collect()))
    }

    /// Removes a member from the cluster for good, then promotes a caught-up learner if
    /// that leaves fewer voters than `max_voters`; forwarded to the leader when needed.
    /// Answers within about [`ACTION_TIMEOUT`] (the removal may still commit later when
    /// it timed out waiting for a quorum).
    pub async fn remove(&self, id: NodeId) -> Result<(), MetaError> {
        let leader = self.leader().ok_or(MetaError::NoLeader)?;
        if leader != self.inner.id {
            let mut client = self.membership_client(leader)?;
            tokio::time::timeout(FORWARD_TIMEOUT, client.remove(RemoveRequest { id }))
                .await
                .map_err(|_| no_answer(leader, FORWARD_TIMEOUT))?
                .map_err(|status| match status.code() {
                    tonic::Code::NotFound => MetaError::NotAMember(id),
                    _ => forwarded(leader, &status),
                })?;
            return Ok(());
        }
        if self.record(id).is_none() {
            return Err(MetaError::NotAMember(id));
        }
        let deadline = Instant::now() + ACTION_TIMEOUT;
        let _one_at_a_time = self.lock_membership(deadline).await?;
        self.settle_joint_config(deadline).await?;
        if self.voters().contains(&id) {
            self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), deadline)
                .await?;
        }
        if id == self.inner.id {
            // This leader is no voter any more: openraft lets it commit nothing else (a
            // further membership entry would break its state), so the next leader removes
            // the node record and tops the voters up.
            drop(_one_at_a_time);
            return self.hand_on_own_removal(deadline).await;
        }
        if self.record(id).is_some() {
            self.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), deadline)
                .await?;
        }
        tracing::info!(target: "audit", action = "member.removed", node_id = id, "removed a member");
        // The removal is done; topping up may finish later (the leader retries every few
        // seconds), so its failure is not this call's.
        if let Err(err) = self.top_up_voters(deadline, Duration::from_secs(2)).await {
            tracing::info!(%err, "voters not topped up yet after a removal; retrying in the background");
        }
        Ok(())
    }

    /// The rest of removing this node, once it left the voters while it led: stops its
    /// heartbeats (openraft 0.9 keeps a leader that left the voters leading, and has no
    /// leadership transfer; the voters elect another once its lease runs out), waits for
    /// the next leader, then asks it to finish the removal.
    async fn hand_on_own_removal(&self, deadline: Instant) -> Result<(), MetaError> {
        let me = self.inner.id;
        let timeout = deadline.saturating_duration_since(Instant::now()) + ELECTION_GRACE;
        self.inner.raft.runtime_config().heartbeat(false);
        let elected = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "another node leads",
            )
            .await;
        // Following now (or still leading, when no one was elected): heartbeats matter
        // only to a leader, and one that leads again needs them.
        self.inner.raft.runtime_config().heartbeat(true);
        let next = elected
            .map_err(|_| {
                MetaError::Unavailable(format!(
                    "node {me} left the voters, but no other leader was elected within {}s; \
                     retry the removal once `nxcache admin status` shows a leader",
                    timeout.as_secs()
                ))
            })?
            .current_leader
            .ok_or(MetaError::NoLeader)?;
        tracing::info!(
            next_leader = next,
            "left the voters while leading; the next leader finishes the removal"
        );
        let mut client = self.membership_client(next)?;
        tokio::time::timeout(FORWARD_TIMEOUT, client.remove(RemoveRequest { id: me }))
            .await
            .map_err(|_| no_answer(next, FORWARD_TIMEOUT))?
            .map_err(|status| match status.code() {
                // Removed meanwhile: done.
                tonic::Code::NotFound => MetaError::NotAMember(me),
                _ => forwarded(next, &status),
            })
            .map(|_| ())
            .or_else(|err| match err {
                MetaError::NotAMember(_) => Ok(()),
                err => Err(err),
            })
    }

    /// Promotes caught-up learners while there are fewer voters than min(`max_voters`,
    /// members), giving each up to `patience` to catch up: active ones first, draining
    /// ones only when no active one can (a draining member still counts until it is
    /// removed). The caller holds the membership lock.
    pub(crate) async fn top_up_voters(
        &self,
        deadline: Instant,
        patience: Duration,
    ) -> Result<(), MetaError> {
        let state = self.state();
        let max_voters = state.cluster.settings.max_voters as usize;
        let members = self.members();
        let wanted = max_voters.min(members.len());
        let mut voters = self.voters();
        let mut learners: Vec<(NodeId, MemberNode)> = members
            .into_iter()
            .filter(|(id, _)| !voters.contains(id))
            .collect();
        let draining =
            |id: &NodeId| state.cluster.member_states.get(id) == Some(&MemberState::Draining);
        // Stable: active learners first, each group by id.
        learners.sort_by_key(|(id, _)| draining(id));
        for (id, node) in learners {
            if voters.len() >= wanted {
                break;
            }
            // Only a learner that answers from the data dir its record names (not one
            // back on an empty disk, whose old progress may still look caught up)...
            let answered = self.reported_incarnation(id, &node).await;
            if !answered.is_some_and(|i| node.incarnation == 0 || i == node.incarnation) {
                continue;
            }
            // ...and holds the log.
            let quick = deadline.min(Instant::now() + patience);
            if self.wait_caught_up(id, quick).await.is_err() {
                continue;
            }
            self.settle_joint_config(deadline).await?;
            self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), deadline)
                .await?;
            tracing::info!(
                target: "audit",
                action = "member.promoted",
                node_id = id,
                "promoted a caught-up learner: fewer voters than max_voters"
            );
            voters = self.voters();
        }
        Ok(())
    }

    /// Waits (until `deadline`) until the leader has replicated its whole log, as it was
    /// when the wait began, to `id`.
    pub(crate) async fn wait_caught_up(
        &self,
        id: NodeId,
        deadline: Instant,
    ) -> Result<(), MetaError> {
        let raft = &self.inner.raft;
        let target = raft.metrics().borrow().last_log_index;
        let timeout = deadline.saturating_duration_since(Instant::now());
        raft.wait(Some(timeout))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&id).copied().flatten())
                        .map(|l| l.index)
                        >= target
                },
                "the member catches up",
            )
            .await
            .map(|_| ())
            .map_err(|_| {
                MetaError::Unavailable(format!(
                    "node {id} has not caught up with the metadata log yet; it becomes a voter \
                     once it has"
                ))
            })
    }

    /// Takes the membership lock, waiting at most until `deadline`.
    pub(crate) async fn lock_membership(
        &self,
        deadline: Instant,
    ) -> Result<MembershipGuard<'_>, MetaError> {
        tokio::time::timeout_at(deadline, self.inner.membership_lock.lock())
            .await
            .map_err(|_| {
                MetaError::Unavailable(
                    "another membership change is in progress (a join or a removal waiting for \
                     the cluster); retry in a moment"
                        .into(),
                )
            })
    }

    /// Leaves a joint configuration that an earlier change left behind (a leader that
    /// crashed or gave up between the two steps), so the next change starts from one
    /// configuration. The caller holds the membership lock.
    pub(crate) async fn settle_joint_config(&self, deadline: Instant) -> Result<(), MetaError> {
        let joint = {
            let m = self.inner.raft.metrics().borrow().membership_config.clone();
            m.membership().get_joint_config().len() > 1
        };
        if joint {
            // Adding no voter makes openraft propose the last configuration alone.
            self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::new()), deadline)
                .await?;
        }
        Ok(())
    }

    /// One membership change, committed by `deadline` or answered "unavailable"; waits
    /// while an earlier change is still uncommitted. A voter taken out of the voters stays
    /// a learner (removing its node is a change of its own).
    pub(crate) async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, MemberNode>,
        deadline: Instant,
    ) -> Result<(), MetaError> {
        loop {
            if !self.voters().contains(&self.inner.id) {
                // A leader that took itself out of the voters still leads until its
                // change commits, but openraft allows it no further membership change.
                return Err(MetaError::Unavailable(
                    "this node left the voters and is handing leadership on; retry in a moment"
                        .into(),
                ));
            }
            let attempt = tokio::time::timeout_at(
                deadline,
                self.inner.raft.change_membership(change.clone(), true),
            )
            .await;
            match attempt {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                )))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                )))) => {
                    return Err(MetaError::Unavailable(
                        "an earlier membership change is not committed yet (no quorum?); retry \
                         once a majority of the voters is reachable"
                            .into(),
                    ));
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    return Err(MetaError::Unavailable(
                        "this node stopped leading during the change; retry".into(),
                    ));
                }
                Ok(Err(RaftError::Fatal(fatal))) => return Err(self.core_stopped(&fatal)),
                Ok(Err(err)) => return Err(MetaError::Raft(err.to_string())),
                Err(_) => return Err(no_quorum()),
            }
        }
    }
}

/// The leader could not commit in time.
pub(crate) fn no_quorum() -> MetaError {
    MetaError::Unavailable(format!(
        "the change was not committed within {}s: the leader cannot reach a majority of the \
         voters (nodes down or cut off). It may still take effect once they are back; check \
         `nxcache admin status` and retry",
        ACTION_TIMEOUT.as_secs()
    ))
}

/// A forwarded call that got no answer in time.
pub(crate) fn no_answer(leader: NodeId, waited: Duration) -> MetaError {
    MetaError::Unavailable(format!(
        "the leader (node {leader}) did not answer within {}s",
        waited.as_secs()
    ))
}

/// A forwarded call that the leader refused, or that did not reach it.
pub(crate) fn forwarded(leader: NodeId, status: &tonic::Status) -> MetaError {
    MetaError::Unavailable(format!(
        "through the leader (node {leader}): {}",
        status.message()
    ))
}
