//! What the leader keeps in order in the background, every few seconds: voters topped up
//! to `max_voters`, a joint configuration left behind settled, the cluster id recorded in
//! the log, incarnations filled into records from before they existed. And what every
//! node takes from the log: the cluster id, when it has none.

use std::collections::BTreeMap;
use std::time::Duration;

use nxcache_rpc::pb::PingRequest;
use nxcache_rpc::pb::membership_client::MembershipClient;
use openraft::ChangeMembers;
use tokio::time::Instant;

use crate::bootstrap::new_cluster_id;
use crate::membership::ACTION_TIMEOUT;
use crate::network::channel;
use crate::node::{MetaError, MetaNode};
use crate::types::{MemberNode, MetaCommand};

/// Time between two rounds of upkeep.
const UPKEEP_EVERY: Duration = Duration::from_secs(2);

impl MetaNode {
    pub(crate) fn spawn_upkeep(&self) {
        let node = self.clone();
        let stopped = self.stopped();
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(UPKEEP_EVERY) => {}
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = node.upkeep() => {}
                }
            }
        }));
    }

    async fn upkeep(&self) {
        if let Err(err) = self.adopt_recorded_cluster_id().await {
            tracing::warn!(%err, "cannot adopt the cluster id recorded in the log");
        }
        if self.leader() != Some(self.inner.id) {
            return;
        }
        if let Err(err) = self.record_cluster_id().await {
            tracing::debug!(%err, "the cluster id is not recorded in the log yet");
        }
        // Membership upkeep waits for nobody: an operator's change or a join goes first.
        let Ok(_one_at_a_time) = self.inner.membership_lock.try_lock() else {
            return;
        };
        let deadline = Instant::now() + ACTION_TIMEOUT;
        let done = async {
            self.settle_joint_config(deadline).await?;
            self.fill_in_incarnations(deadline).await?;
            self.top_up_voters(deadline, Duration::ZERO).await
        };
        if let Err(err) = done.await {
            tracing::debug!(%err, "membership upkeep did not finish; next round");
        }
    }

    /// Takes the cluster id recorded in the log when this node has none (a cluster formed
    /// before ids existed); warns if it has another.
    async fn adopt_recorded_cluster_id(&self) -> Result<(), MetaError> {
        let recorded = self
            .inner
            .store
            .with_header(|state| state.cluster.cluster_id.clone());
        if recorded.is_empty() {
            return Ok(());
        }
        match self.cluster_id() {
            None => {
                self.adopt_cluster_id(&recorded).await?;
                tracing::info!(cluster_id = %recorded, "adopted the cluster id recorded in the log");
            }
            Some(mine) if mine != recorded => tracing::error!(
                mine = %mine,
                recorded = %recorded,
                "this node's cluster id differs from the one in its log; check that its data \
                 dir belongs to this cluster"
            ),
            Some(_) => {}
        }
        Ok(())
    }

    /// On the leader: records the cluster id in the log if it is not there. A cluster from
    /// before ids existed gets a new one, but only once every member runs a version that
    /// knows incarnations (and so this command).
    async fn record_cluster_id(&self) -> Result<(), MetaError> {
        let recorded_already = !self.state().cluster.cluster_id.is_empty();
        if recorded_already {
            return Ok(());
        }
        let id = match self.cluster_id() {
            Some(id) => id,
            None if self.members().iter().all(|(_, n)| n.incarnation != 0) => new_cluster_id(),
            None => return Ok(()),
        };
        self.write(MetaCommand::SetClusterId { id })
            .await
            .map(|_| ())
    }

    /// On the leader: fills in the incarnation of members recorded before incarnations
    /// existed, as each reports it, so that calls to them are checked from then on. A
    /// member without Raft state is left alone: it joins again, as a new disk.
    async fn fill_in_incarnations(&self, deadline: Instant) -> Result<(), MetaError> {
        let mut filled = BTreeMap::new();
        for (id, node) in self.members() {
            if node.incarnation != 0 {
                continue;
            }
            let incarnation = if id == self.inner.id {
                self.inner.incarnation
            } else {
                self.reported_incarnation(id, &node).await.unwrap_or(0)
            };
            if incarnation != 0 {
                filled.insert(
                    id,
                    MemberNode {
                        incarnation,
                        ..node
                    },
                );
            }
        }
        if filled.is_empty() {
            return Ok(());
        }
        tracing::info!(members = ?filled.keys().collect::<Vec<_>>(), "recording the incarnation of members from an older version");
        self.change_membership(ChangeMembers::SetNodes(filled), deadline)
            .await
    }

    /// The incarnation a member with Raft state reports; None if it does not answer, has
    /// no state, or predates incarnations.
    pub(crate) async fn reported_incarnation(&self, id: u64, node: &MemberNode) -> Option<u64> {
        if self.inner.faults.is_cut(id) {
            return None;
        }
        let ch = channel(&node.grpc_addr, self.inner.client_tls.as_ref()).ok()?;
        let mut client =
            MembershipClient::with_interceptor(ch, self.inner.secret.client_interceptor());
        let answer = tokio::time::timeout(Duration::from_secs(1), client.ping(PingRequest {}))
            .await
            .ok()?
            .ok()?
            .into_inner();
        (answer.node_id == id && answer.members > 0 && answer.incarnation != 0)
            .then_some(answer.incarnation)
    }
}
