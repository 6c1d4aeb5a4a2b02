//! How a node without Raft state becomes a member: it starts a new cluster or asks the
//! seeds to admit it; and the environment's tokens, seeded once a leader takes writes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nxcache_rpc::pb::membership_client::MembershipClient;
use nxcache_rpc::pb::{JoinRequest, NodeInfo, PingRequest};

use crate::network::{MAX_COMMAND_BYTES, channel};
use crate::node::{MetaError, MetaNode};
use crate::types::{MemberNode, MetaCommand, MetaResponse, TokenRecord};

/// How long a bootstrapping node with seeds waits for them to say whether a cluster
/// exists already.
const BOOTSTRAP_GRACE: Duration = Duration::from_secs(10);

impl MetaNode {
    /// A node without Raft state: starts a new cluster (`bootstrap`) or asks the seeds
    /// (`join`) for admission.
    pub(crate) async fn bootstrap_or_join(
        &self,
        bootstrap: bool,
        join: &[String],
        advertise: &MemberNode,
    ) -> Result<(), MetaError> {
        let found = if bootstrap && !join.is_empty() {
            self.seeds_in_a_cluster(join, BOOTSTRAP_GRACE).await
        } else {
            false
        };
        if bootstrap && !found {
            let members = BTreeMap::from([(self.inner.id, advertise.clone())]);
            self.inner
                .raft
                .initialize(members)
                .await
                .map_err(|e| MetaError::Raft(e.to_string()))?;
            tracing::info!(node_id = self.inner.id, "bootstrapped a new cluster");
        } else if !join.is_empty() {
            if found {
                tracing::info!(
                    "a seed is already in a cluster: joining it instead of bootstrapping"
                );
            }
            self.spawn_join(join.to_vec(), advertise.clone());
        }
        Ok(())
    }

    /// Whether any seed (other than this node) belongs to a cluster. Waits until every
    /// seed has answered that it does not, or `grace` has passed (seeds that never answer
    /// cannot hold a cluster this node could join now).
    pub(crate) async fn seeds_in_a_cluster(&self, seeds: &[String], grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let asks = seeds.iter().map(|seed| async move {
                let ch = channel(seed, self.inner.client_tls.as_ref()).ok()?;
                let mut client =
                    MembershipClient::with_interceptor(ch, self.inner.secret.client_interceptor());
                let answer =
                    tokio::time::timeout(Duration::from_secs(1), client.ping(PingRequest {}))
                        .await
                        .ok()?
                        .ok()?
                        .into_inner();
                Some(answer)
            });
            let answers = futures_util::future::join_all(asks).await;
            let others: Vec<_> = answers
                .iter()
                .map(|a| a.as_ref().filter(|a| a.node_id != self.inner.id))
                .collect();
            if others.iter().flatten().any(|a| a.members > 0) {
                return true;
            }
            // Answered by every seed (itself included) and none in a cluster.
            if answers.iter().all(Option::is_some) {
                return false;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    unanswered = answers.iter().filter(|a| a.is_none()).count(),
                    "not every seed answered within {grace:?}; none that did is in a cluster, bootstrapping"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Asks the seeds for admission until one accepts.
    pub(crate) fn spawn_join(&self, seeds: Vec<String>, me: MemberNode) {
        let (id, secret) = (self.inner.id, self.inner.secret.clone());
        let tls = self.inner.client_tls.clone();
        let stopped = self.stopped();
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            let request = JoinRequest {
                node: Some(NodeInfo {
                    id,
                    grpc_addr: me.grpc_addr,
                    http_addr: me.http_addr,
                    zone: me.zone,
                }),
            };
            loop {
                for seed in &seeds {
                    let Ok(ch) = channel(seed, tls.as_ref()) else { continue };
                    let mut client = MembershipClient::with_interceptor(ch, secret.client_interceptor());
                    // A join waits for the leader to commit; a node told to stop
                    // does not wait for that (the leader may have lost its quorum).
                    let answer = tokio::select! {
                        _ = &mut stopped => return,
                        answer = client.join(request.clone()) => answer,
                    };
                    match answer {
                        Ok(answer) => {
                            tracing::info!(node_id = id, via = %seed, leader = answer.get_ref().leader_id, "joined the cluster");
                            return;
                        }
                        Err(status) => tracing::info!(via = %seed, %status, "join not accepted yet; will retry"),
                    }
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }));
    }

    /// Adds the environment's tokens once a leader can take the write (in commands small
    /// enough for one log entry each).
    pub(crate) fn spawn_seed(&self, tokens: BTreeMap<String, TokenRecord>) {
        let node = self.clone();
        let stopped = self.stopped();
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            for tokens in seed_batches(tokens) {
                let command = MetaCommand::SeedTokens { tokens };
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
                        Ok(other) => {
                            tracing::warn!(?other, "unexpected answer to token seeding");
                            return;
                        }
                        Err(err) => tracing::debug!(%err, "token seeding waits for a leader"),
                    }
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    }
                }
            }
            node.inner.seeded.store(true, Ordering::SeqCst);
        }));
    }
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
