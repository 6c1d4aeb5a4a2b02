//! How a node without Raft state becomes a member: it founds a cluster (alone, or with
//! the other seeds once all of them are up and empty) or asks a seed's cluster to admit
//! it; and the environment's tokens, seeded once a leader takes writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use nxcache_rpc::pb::membership_client::MembershipClient;
use nxcache_rpc::pb::{JoinRequest, NodeInfo, PingRequest, PingResponse};

use crate::membership::JOIN_CALL_TIMEOUT;
use crate::network::{MAX_COMMAND_BYTES, channel};
use crate::node::{MetaError, MetaNode};
use crate::types::{MemberNode, MetaCommand, MetaResponse, NodeId, TokenRecord};

/// How a node without Raft state becomes a member of a cluster. A node with state just
/// resumes, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formation {
    /// Founds a cluster of one at once: a lone node, or the first node of a cluster whose
    /// others are started with [`Formation::Join`].
    Found,
    /// Asks the seeds to admit it, for as long as it takes; never founds a cluster.
    Join,
    /// Founds a cluster together with the other seeds, but only once every seed answers,
    /// none of them belongs to a cluster, and they are at least `expect` nodes (this one
    /// included): then `founder` (by default the lowest node id among them) initialises it
    /// and the others join. As soon as any seed belongs to a cluster, joins that one. So a
    /// node with an empty disk never founds a cluster while a seed may hold one.
    Expect {
        expect: usize,
        founder: Option<NodeId>,
    },
}

/// How often a node without a cluster asks its seeds again.
const ASK_EVERY: Duration = Duration::from_millis(500);
/// How often it says in the log what it is waiting for.
const REPORT_EVERY: Duration = Duration::from_secs(10);

impl MetaNode {
    /// Founds a cluster of one: a new cluster id, then this node as its only voter.
    pub(crate) async fn found(&self, advertise: &MemberNode) -> Result<(), MetaError> {
        let id = new_cluster_id();
        self.adopt_cluster_id(&id).await?;
        let members = BTreeMap::from([(self.inner.id, advertise.clone())]);
        self.inner
            .raft
            .initialize(members)
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))?;
        tracing::info!(
            target: "audit",
            action = "cluster.founded",
            node_id = self.inner.id,
            cluster_id = %id,
            "founded a new cluster"
        );
        Ok(())
    }

    /// Records the cluster this node belongs to (beside the vote) and presents it on every
    /// call from now on.
    pub(crate) async fn adopt_cluster_id(&self, id: &str) -> Result<(), MetaError> {
        if self.cluster_id().as_deref() == Some(id) {
            return Ok(());
        }
        self.inner
            .secret
            .cluster_id()
            .set(id)
            .map_err(MetaError::Config)?;
        let store = self.inner.log_store.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || store.set_cluster_id(Some(&id)))
            .await
            .map_err(|e| MetaError::Storage(e.to_string()))?
            .map_err(|e| MetaError::Storage(e.to_string()))
    }

    /// Asks the seeds until this node is admitted to a cluster, or (with
    /// [`Formation::Expect`]) founds one with them.
    pub(crate) fn spawn_formation(&self, formation: Formation, seeds: Vec<String>, me: MemberNode) {
        let node = self.clone();
        let stopped = self.stopped();
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut reported = tokio::time::Instant::now();
            loop {
                let done = tokio::select! {
                    _ = &mut stopped => return,
                    done = node.formation_step(formation, &seeds, &me, &mut reported) => done,
                };
                if done {
                    return;
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(ASK_EVERY) => {}
                }
            }
        }));
    }

    /// One round: ask every seed, then join, found or wait. True once this node is in.
    async fn formation_step(
        &self,
        formation: Formation,
        seeds: &[String],
        me: &MemberNode,
        reported: &mut tokio::time::Instant,
    ) -> bool {
        if self.member_count() > 0 {
            // Admitted meanwhile (a leader replicated to it before its join was answered).
            return true;
        }
        let answers = self.ping_seeds(seeds).await;
        let in_a_cluster: Vec<(&String, &PingResponse)> = seeds
            .iter()
            .zip(&answers)
            .filter_map(|(seed, a)| a.as_ref().map(|a| (seed, a)))
            .filter(|(_, a)| a.node_id != self.inner.id && a.members > 0)
            .collect();
        for (seed, answer) in &in_a_cluster {
            if !answer.cluster_id.is_empty()
                && let Err(err) = self.adopt_cluster_id(&answer.cluster_id).await
            {
                tracing::warn!(%err, "cannot record the cluster id");
                return false;
            }
            if self.ask_to_join(seed, me).await {
                return true;
            }
        }
        if !in_a_cluster.is_empty() {
            return false;
        }
        let Formation::Expect { expect, founder } = formation else {
            if reported.elapsed() >= REPORT_EVERY {
                *reported = tokio::time::Instant::now();
                tracing::info!(
                    answered = answers.iter().flatten().count(),
                    seeds = seeds.len(),
                    "waiting to join: no seed belongs to a cluster yet"
                );
            }
            return false;
        };
        let unanswered = answers.iter().filter(|a| a.is_none()).count();
        // A seed that knows a cluster id is being admitted to that cluster: never found
        // another beside it.
        let joining_elsewhere = answers
            .iter()
            .flatten()
            .any(|a| a.node_id != self.inner.id && !a.cluster_id.is_empty());
        let nodes: BTreeSet<NodeId> = answers
            .iter()
            .flatten()
            .map(|a| a.node_id)
            .chain([self.inner.id])
            .collect();
        if unanswered == 0 && !joining_elsewhere && nodes.len() >= expect {
            let founder = founder.unwrap_or_else(|| *nodes.first().expect("this node"));
            if founder == self.inner.id {
                return match self.found(me).await {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::warn!(%err, "could not found the cluster; trying again");
                        false
                    }
                };
            }
        }
        if reported.elapsed() >= REPORT_EVERY {
            *reported = tokio::time::Instant::now();
            tracing::info!(
                unanswered,
                empty_nodes = nodes.len(),
                expect,
                "waiting to form the cluster: it is founded once every seed answers, none \
                 belongs to a cluster and there are enough of them"
            );
        }
        false
    }

    /// Every seed's answer to a ping (None: no answer within a second).
    pub(crate) async fn ping_seeds(&self, seeds: &[String]) -> Vec<Option<PingResponse>> {
        let asks = seeds.iter().map(|seed| async move {
            let ch = channel(seed, self.inner.client_tls.as_ref()).ok()?;
            let mut client =
                MembershipClient::with_interceptor(ch, self.inner.secret.client_interceptor());
            let answer = tokio::time::timeout(Duration::from_secs(1), client.ping(PingRequest {}))
                .await
                .ok()?
                .ok()?
                .into_inner();
            Some(answer)
        });
        futures_util::future::join_all(asks).await
    }

    /// One join request through `seed`; true once admitted.
    async fn ask_to_join(&self, seed: &str, me: &MemberNode) -> bool {
        let Ok(ch) = channel(seed, self.inner.client_tls.as_ref()) else {
            return false;
        };
        let mut client =
            MembershipClient::with_interceptor(ch, self.inner.secret.client_interceptor());
        let request = JoinRequest {
            node: Some(NodeInfo {
                id: self.inner.id,
                grpc_addr: me.grpc_addr.clone(),
                http_addr: me.http_addr.clone(),
                zone: me.zone.clone(),
                incarnation: self.inner.incarnation,
            }),
        };
        match tokio::time::timeout(JOIN_CALL_TIMEOUT, client.join(request)).await {
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                if !answer.cluster_id.is_empty()
                    && let Err(err) = self.adopt_cluster_id(&answer.cluster_id).await
                {
                    tracing::warn!(%err, "cannot record the cluster id");
                    return false;
                }
                tracing::info!(
                    node_id = self.inner.id,
                    via = %seed,
                    leader = answer.leader_id,
                    "joined the cluster"
                );
                true
            }
            Ok(Err(status)) => {
                tracing::info!(via = %seed, %status, "join not accepted yet; will retry");
                false
            }
            Err(_) => {
                tracing::info!(via = %seed, "join not answered in time; will retry");
                false
            }
        }
    }

    /// Adds the environment's tokens once a leader can take the write (in commands small
    /// enough for one log entry each), then, given `prune`, removes the environment
    /// tokens not in it. The node counts as seeded (ready) once its tokens are in: the
    /// prune is retried apart, every few seconds, so that a leader of an earlier version
    /// (a rolling upgrade: it refuses the prune command) never holds readiness back.
    pub(crate) fn spawn_seed(
        &self,
        tokens: BTreeMap<String, TokenRecord>,
        prune: Option<BTreeSet<String>>,
    ) {
        let node = self.clone();
        let stopped = self.stopped();
        let mut commands: Vec<MetaCommand> = seed_batches(tokens)
            .into_iter()
            .map(|tokens| MetaCommand::SeedTokens { tokens })
            .collect();
        if let Some(keep) = prune {
            let command = MetaCommand::PruneEnvTokens { keep };
            if serde_json::to_vec(&command).map_or(0, |c| c.len()) <= MAX_COMMAND_BYTES {
                commands.push(command);
            } else {
                tracing::warn!(
                    "too many environment tokens to remove the ones left out of the environment in one change: revoke them with `nxcache admin tokens revoke`"
                );
            }
        }
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            for command in commands {
                let prune = matches!(command, MetaCommand::PruneEnvTokens { .. });
                if prune {
                    node.inner.seeded.store(true, Ordering::SeqCst);
                }
                loop {
                    let written = tokio::select! {
                        _ = &mut stopped => return,
                        written = node.write(command.clone()) => written,
                    };
                    match written {
                        Ok(MetaResponse::Seeded { added }) => {
                            if added > 0 {
                                tracing::info!(added, "seeded tokens from the environment");
                            }
                            break;
                        }
                        Ok(MetaResponse::Pruned { removed }) => {
                            if removed > 0 {
                                tracing::info!(
                                    target: "audit",
                                    action = "token.revoke_env",
                                    removed,
                                    "revoked the tokens no longer in this node's environment"
                                );
                            }
                            break;
                        }
                        Ok(other) => {
                            tracing::warn!(?other, "unexpected answer to token seeding");
                            return;
                        }
                        Err(err) if prune => tracing::debug!(%err, "removing the environment tokens left out waits for a leader that knows the command"),
                        Err(err) => tracing::debug!(%err, "token seeding waits for a leader"),
                    }
                    let pause = if prune { PRUNE_RETRY } else { Duration::from_millis(300) };
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
            node.inner.seeded.store(true, Ordering::SeqCst);
        }));
    }
}

/// How often the removal of environment tokens left out is retried: it is not urgent,
/// and during a rolling upgrade the leader may be of a version that refuses it.
const PRUNE_RETRY: Duration = Duration::from_secs(5);

/// A new cluster id: 128 random bits, hex.
pub(crate) fn new_cluster_id() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// Splits seed tokens into groups whose command stays well below `MAX_COMMAND_BYTES`.
fn seed_batches(tokens: BTreeMap<String, TokenRecord>) -> Vec<BTreeMap<String, TokenRecord>> {
    let mut batches = Vec::new();
    let mut batch = BTreeMap::new();
    let mut size = 0;
    for (name, token) in tokens {
        let bytes = name.len() + serde_json::to_vec(&token).map_or(0, |t| t.len()) + 8;
        if !batch.is_empty() && size + bytes > MAX_COMMAND_BYTES / 2 {
            batches.push(std::mem::take(&mut batch));
            size = 0;
        }
        size += bytes;
        batch.insert(name, token);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_environment_tokens_are_seeded_in_commands_that_fit_a_log_entry() {
        let tokens: BTreeMap<String, TokenRecord> = (0..5000)
            .map(|i| {
                let token = TokenRecord {
                    digest: format!("{i:064x}"),
                    scope: "read".into(),
                    created_ms: 1,
                    namespace: String::new(),
                    read_from: Vec::new(),
                };
                (format!("read-only-{i}"), token)
            })
            .collect();
        let batches = seed_batches(tokens.clone());
        assert!(batches.len() > 1);
        for batch in &batches {
            let command = serde_json::to_vec(&MetaCommand::SeedTokens {
                tokens: batch.clone(),
            })
            .unwrap();
            assert!(
                command.len() <= MAX_COMMAND_BYTES,
                "{} bytes",
                command.len()
            );
        }
        let rejoined: BTreeMap<_, _> = batches.into_iter().flatten().collect();
        assert_eq!(rejoined, tokens);
        assert!(seed_batches(BTreeMap::new()).is_empty());
    }
}
