//! The admin API's view of the cluster, over the metadata log.

use nxcache_auth::{Digest, generate_token};
use nxcache_http::{
    AdminError, BoxFuture, ClusterControl, MemberView, SettingsUpdate, SettingsView, StatusView,
    TokenSpec, TokenView,
};
use nxcache_meta::{
    ClusterSettings, MemberState, MetaCommand, MetaError, MetaNode, MetaResponse, SettingsChange,
    TokenRecord,
};

pub(crate) struct MetaControl(pub MetaNode);

fn admin_error(err: MetaError) -> AdminError {
    match err {
        MetaError::NoLeader | MetaError::Unreachable(_) | MetaError::Unavailable(_) => {
            AdminError::Unavailable(err.to_string())
        }
        MetaError::NotAMember(_) => AdminError::NotFound(err.to_string()),
        MetaError::TooLarge(_) => AdminError::Invalid(err.to_string()),
        MetaError::Storage(_) | MetaError::Raft(_) | MetaError::Config(_) => {
            AdminError::Internal(err.to_string())
        }
    }
}

pub(crate) fn settings_view(settings: &ClusterSettings) -> SettingsView {
    SettingsView {
        replication_factor: settings.replication_factor,
        write_quorum: settings.write_quorum,
        on_degraded: settings.on_degraded.clone(),
        max_voters: settings.max_voters,
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ClusterControl for MetaControl {
    fn readiness(&self) -> Result<(), String> {
        self.0.readiness()
    }

    fn liveness(&self) -> Result<(), String> {
        match self.0.core_failure() {
            None => Ok(()),
            Some(why) => Err(format!("the metadata log (Raft) has stopped: {why}")),
        }
    }

    fn status(&self) -> BoxFuture<'_, StatusView> {
        Box::pin(async move {
            let status = self.0.status();
            let reachable = self.0.reachable().await;
            StatusView {
                node_id: status.node_id,
                cluster_id: status.cluster_id,
                leader_id: status.leader_id,
                leaderless_ms: status.leaderless_ms,
                tokens: status.tokens as u64,
                snapshot_bytes: status.snapshot_bytes,
                settings: Some(settings_view(&self.0.state().cluster.settings)),
                ring: None,
                previous_ring: None,
                term: status.term,
                last_log_index: status.last_log_index,
                applied_index: status.applied_index,
                commit_index: status.applied_index,
                ring_epoch: status.ring_epoch,
                data: None,
                members: status
                    .members
                    .into_iter()
                    .map(|m| MemberView {
                        reachable: reachable.get(&m.id).copied().unwrap_or(false),
                        id: m.id,
                        grpc_addr: m.grpc_addr,
                        http_addr: m.http_addr,
                        zone: m.zone,
                        role: if m.voter { "voter" } else { "learner" }.into(),
                        state: match m.state {
                            MemberState::Active => "active",
                            MemberState::Draining => "draining",
                        }
                        .into(),
                    })
                    .collect(),
            }
        })
    }

    fn tokens(&self) -> BoxFuture<'_, Result<Vec<TokenView>, AdminError>> {
        Box::pin(async move {
            let meta = self.0.clone();
            // Reads the whole table: off the runtime's threads.
            let tokens = tokio::task::spawn_blocking(move || meta.tokens())
                .await
                .map_err(|e| AdminError::Internal(e.to_string()))?
                .map_err(admin_error)?;
            Ok(tokens
                .into_iter()
                .map(|(name, t)| TokenView {
                    name,
                    scope: t.scope,
                    created_ms: t.created_ms,
                    namespace: t.namespace,
                    read_from: t.read_from,
                })
                .collect())
        })
    }

    fn settings(&self) -> SettingsView {
        settings_view(&self.0.state().cluster.settings)
    }

    fn update_settings(
        &self,
        update: SettingsUpdate,
    ) -> BoxFuture<'_, Result<SettingsView, AdminError>> {
        Box::pin(async move {
            let change = SettingsChange {
                replication_factor: update.replication_factor,
                write_quorum: update.write_quorum,
                on_degraded: update.on_degraded,
                max_voters: update.max_voters,
            };
            match self.0.write(MetaCommand::UpdateSettings { change }).await {
                Ok(MetaResponse::Settings { settings, .. }) => Ok(settings_view(&settings)),
                Ok(MetaResponse::Invalid { reason }) => Err(AdminError::Invalid(format!(
                    "Refused: {reason}. Nothing was changed."
                ))),
                Ok(other) => Err(AdminError::Internal(format!("unexpected answer {other:?}"))),
                Err(err) => Err(admin_error(err)),
            }
        })
    }

    fn create_token(&self, spec: TokenSpec) -> BoxFuture<'_, Result<String, AdminError>> {
        Box::pin(async move {
            let secret = generate_token();
            let name = spec.name;
            let token = TokenRecord {
                digest: Digest::of(&secret).to_hex(),
                scope: spec.scope.as_str().into(),
                created_ms: now_ms(),
                namespace: spec.namespace,
                read_from: spec.read_from,
            };
            match self
                .0
                .write(MetaCommand::CreateToken {
                    name: name.clone(),
                    token,
                })
                .await
            {
                Ok(MetaResponse::Done) => Ok(secret),
                Ok(MetaResponse::AlreadyExists) => Err(AdminError::Conflict(format!(
                    "A token named {name} exists already; revoke it first or pick another name."
                ))),
                Ok(other) => Err(AdminError::Internal(format!("unexpected answer {other:?}"))),
                Err(err) => Err(admin_error(err)),
            }
        })
    }

    fn revoke_token(&self, name: String) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async move {
            match self
                .0
                .write(MetaCommand::RevokeToken { name: name.clone() })
                .await
            {
                Ok(MetaResponse::Done) => Ok(()),
                Ok(MetaResponse::NotFound) => Err(AdminError::NotFound(format!(
                    "There is no token named {name}."
                ))),
                Ok(other) => Err(AdminError::Internal(format!("unexpected answer {other:?}"))),
                Err(err) => Err(admin_error(err)),
            }
        })
    }

    fn drain_node(&self, id: u64) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async move {
            if !self.0.status().members.iter().any(|m| m.id == id) {
                return Err(AdminError::NotFound(format!(
                    "Node {id} is not a member of the cluster."
                )));
            }
            self.0
                .write(MetaCommand::SetMemberState {
                    id,
                    state: MemberState::Draining,
                })
                .await
                .map(|_| ())
                .map_err(admin_error)
        })
    }

    fn remove_node(&self, id: u64) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async move { self.0.remove(id).await.map_err(admin_error) })
    }
}
