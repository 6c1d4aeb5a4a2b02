//! `/admin/v1/`: cluster status, tokens and nodes, for the admin scope only. The work is
//! done by a [`ClusterControl`], which the binary implements over the metadata log.

use std::future::Future;
use std::pin::Pin;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use nxcache_auth::{Access, Scope};
use serde::{Deserialize, Serialize};

use crate::ApiState;
use crate::cache::authorize;
use crate::error::ApiError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub node_id: u64,
    /// The cluster this node belongs to; None while it belongs to none (forming, joining).
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub leader_id: Option<u64>,
    /// Milliseconds this node has known no leader; absent while it knows one. Such a
    /// node serves from its own tokens and data; revocations reach it when it reconnects.
    #[serde(default)]
    pub leaderless_ms: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Raft commit index as far as this node knows (its applied index).
    pub commit_index: u64,
    pub ring_epoch: u64,
    pub members: Vec<MemberView>,
    /// Tokens in this node's applied table.
    #[serde(default)]
    pub tokens: u64,
    /// Size of this node's metadata snapshot.
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// The cluster settings this node applied.
    #[serde(default)]
    pub settings: Option<SettingsView>,
    /// The ring this node places artifacts by (filled in by the handler).
    #[serde(default)]
    pub ring: Option<RingView>,
    /// The ring before the last change, which reads fall back to while data moves.
    #[serde(default)]
    pub previous_ring: Option<RingView>,
    /// The data plane as this node sees it (filled in by the handler).
    #[serde(default)]
    pub data: Option<DataStatus>,
}

/// One ring epoch as a node uses it. Nodes that show the same epoch show the same
/// digest: it hashes exactly what the ring is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingView {
    pub epoch: u64,
    pub digest: String,
    /// Copies of each key on this ring (the setting, capped by the member count).
    pub replicas: usize,
    /// The members that own data on it.
    pub members: Vec<u64>,
}

impl RingView {
    pub fn of(ring: &nxcache_placement::Ring) -> Self {
        RingView {
            epoch: ring.epoch(),
            digest: ring.digest_hex(),
            replicas: ring.replicas(),
            members: ring.members().collect(),
        }
    }
}

/// The cluster settings (`nxcache admin settings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsView {
    /// Copies kept of each artifact (capped by the member count).
    pub replication_factor: u32,
    /// Copies stored before a PUT is acknowledged; 0: a majority of the copies.
    pub write_quorum: u32,
    /// `serve` or `strict`.
    pub on_degraded: String,
    pub max_voters: u32,
}

/// A change of cluster settings: the fields given change, the others stay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_quorum: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_degraded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_voters: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataStatus {
    pub replication_factor: usize,
    pub write_quorum: usize,
    pub on_degraded: String,
    /// Artifacts and bytes held by this node.
    pub objects: u64,
    pub stored_bytes: u64,
    /// Hinted writes this node still has to hand to their owners.
    pub pending_hints: u64,
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerView {
    pub name: String,
    pub passes: u64,
    /// Unix milliseconds of the last completed pass.
    pub last_pass_ms: Option<u64>,
    /// Work known to be left: keys to move (rebalance), hints to deliver (handoff).
    pub pending: u64,
    /// Work done since start: copies, moves, checks.
    pub done: u64,
}

pub(crate) fn data_status(data: &nxcache_replication::DataPlane) -> DataStatus {
    let view = data.view();
    let stats = data.store().stats();
    DataStatus {
        replication_factor: view.ring.replicas(),
        write_quorum: view.quorum(),
        on_degraded: view.policy.as_str().into(),
        objects: stats.objects,
        stored_bytes: stats.stored_bytes,
        pending_hints: data.pending_hints() as u64,
        workers: data
            .workers()
            .into_iter()
            .map(|w| WorkerView {
                name: w.name.into(),
                passes: w.passes,
                last_pass_ms: w.last_pass_ms,
                pending: w.pending,
                done: w.done,
            })
            .collect(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u64,
    pub grpc_addr: String,
    pub http_addr: String,
    pub zone: String,
    /// `voter` or `learner`.
    pub role: String,
    /// `active` or `draining`.
    pub state: String,
    pub reachable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub scope: String,
    pub created_ms: u64,
    /// Where its uploads go (empty: the default namespace).
    #[serde(default)]
    pub namespace: String,
    /// Where its reads fall back to, in order.
    #[serde(default)]
    pub read_from: Vec<String>,
}

/// A token to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub name: String,
    pub scope: Scope,
    pub namespace: String,
    pub read_from: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub scope: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub read_from: Vec<String>,
    /// The secret: shown once, never stored.
    pub token: String,
}

#[derive(Debug)]
pub enum AdminError {
    /// The request asks for something the cluster refuses (validation): 400.
    Invalid(String),
    NotFound(String),
    Conflict(String),
    Unavailable(String),
    Internal(String),
}

impl From<AdminError> for ApiError {
    fn from(err: AdminError) -> Self {
        match err {
            AdminError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            AdminError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            AdminError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            AdminError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m).retry_after(1)
            }
            AdminError::Internal(m) => ApiError::internal(m),
        }
    }
}

/// What the admin API and readiness need from the cluster layer.
pub trait ClusterControl: Send + Sync + 'static {
    /// Ok when this node can serve: it holds the cluster's state and its tokens (a leader
    /// is not needed).
    fn readiness(&self) -> Result<(), String>;
    /// Ok while this node's part of the control plane runs; the error (a metadata log that
    /// stopped on a storage failure) means only a restart helps: `/healthz` then answers
    /// 503 so that a supervisor restarts the node.
    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }
    fn status(&self) -> BoxFuture<'_, StatusView>;
    fn tokens(&self) -> BoxFuture<'_, Result<Vec<TokenView>, AdminError>>;
    fn settings(&self) -> SettingsView;
    /// Changes cluster settings through the log; the answer is the settings afterwards.
    fn update_settings(
        &self,
        update: SettingsUpdate,
    ) -> BoxFuture<'_, Result<SettingsView, AdminError>>;
    /// Creates a token and returns its secret.
    fn create_token(&self, spec: TokenSpec) -> BoxFuture<'_, Result<String, AdminError>>;
    fn revoke_token(&self, name: String) -> BoxFuture<'_, Result<(), AdminError>>;
    fn drain_node(&self, id: u64) -> BoxFuture<'_, Result<(), AdminError>>;
    fn remove_node(&self, id: u64) -> BoxFuture<'_, Result<(), AdminError>>;
}

fn admin(state: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    authorize(state, headers, Access::Admin).map(|p| p.name)
}

pub(crate) async fn status(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let mut status = state.cluster.status().await;
    let view = state.data.view();
    status.ring = Some(RingView::of(&view.ring));
    status.previous_ring = view.previous.as_ref().map(RingView::of);
    status.data = Some(data_status(&state.data));
    Ok(Json(status).into_response())
}

pub(crate) async fn nodes(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    Ok(Json(state.cluster.status().await.members).into_response())
}

pub(crate) async fn list_tokens(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    Ok(Json(state.cluster.tokens().await?).into_response())
}

pub(crate) async fn settings(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    Ok(Json(state.cluster.settings()).into_response())
}

pub(crate) async fn update_settings(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<SettingsUpdate>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let actor = admin(&state, &headers)?;
    let Json(update) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Expected a JSON body with any of replication_factor, write_quorum (0: a majority), on_degraded (serve|strict), max_voters: {e}"
            ),
        )
    })?;
    if update == SettingsUpdate::default() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Nothing to change: give replication_factor, write_quorum, on_degraded or max_voters.",
        ));
    }
    let before = state.cluster.settings();
    let after = state.cluster.update_settings(update).await?;
    tracing::info!(target: "audit", action = "settings.set", actor = %actor, ?before, ?after, "admin action");
    Ok(Json(after).into_response())
}

#[derive(Deserialize)]
pub(crate) struct CreateToken {
    name: String,
    scope: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    read_from: Vec<String>,
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

pub(crate) async fn create_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let actor = admin(&state, &headers)?;
    let Json(request) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("Expected a JSON body {{\"name\": \"...\", \"scope\": \"read|read-write|admin\"}}: {e}"),
        )
    })?;
    if !valid_name(&request.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "A token name is 1 to 64 characters from A-Z, a-z, 0-9, '-', '_' and '.'.",
        ));
    }
    if nxcache_auth::is_env_token_name(&request.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "The name {:?} is of the form the server gives the environment's tokens (read-write-N, read-only-N, admin-N, generated), which follow NXCACHE_*_TOKENS and are removed when they leave it: choose another name.",
                request.name
            ),
        ));
    }
    let scope = Scope::parse(&request.scope).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Unknown scope {:?}: use read, read-write or admin.",
                request.scope
            ),
        )
    })?;
    for ns in std::iter::once(&request.namespace)
        .filter(|ns| !ns.is_empty())
        .chain(&request.read_from)
    {
        if !nxcache_auth::valid_namespace(ns) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "Namespace {ns:?} is not valid: 1 to {} characters from a-z, 0-9 and '-'.",
                    nxcache_auth::MAX_NAMESPACE_LEN
                ),
            ));
        }
    }
    let spec = TokenSpec {
        name: request.name.clone(),
        scope,
        namespace: request.namespace.clone(),
        read_from: request.read_from.clone(),
    };
    let token = state.cluster.create_token(spec).await?;
    tracing::info!(target: "audit", action = "token.create", actor = %actor, token_name = %request.name, scope = scope.as_str(), namespace = %request.namespace, read_from = ?request.read_from, "admin action");
    let body = NewToken {
        name: request.name,
        scope: scope.as_str().to_owned(),
        namespace: request.namespace,
        read_from: request.read_from,
        token,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(crate) async fn revoke_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let actor = admin(&state, &headers)?;
    state.cluster.revoke_token(name.clone()).await?;
    tracing::info!(target: "audit", action = "token.revoke", actor = %actor, token_name = %name, "admin action");
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn node_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{raw:?} is not a node id (a whole number)."),
        )
    })
}

pub(crate) async fn drain_node(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = admin(&state, &headers)?;
    let id = node_id(&id)?;
    state.cluster.drain_node(id).await?;
    tracing::info!(target: "audit", action = "node.drain", actor = %actor, node_id = id, "admin action");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn remove_node(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = admin(&state, &headers)?;
    let id = node_id(&id)?;
    state.cluster.remove_node(id).await?;
    tracing::info!(target: "audit", action = "node.remove", actor = %actor, node_id = id, "admin action");
    Ok(StatusCode::NO_CONTENT.into_response())
}
