//! The public HTTP API of a node: the Nx "custom remote cache" contract
//! (`PUT`/`GET`/`HEAD /v1/cache/{hash}`), the Bazel, Gradle, ccache and Turborepo cache
//! protocols ([`protocols`]) and the admin API (`/admin/v1/...`) under a configurable
//! base path, plus the operator endpoints `/healthz`, `/readyz`, `/metrics`.
//!
//! Handlers are thin: they check the token, the hash and the framing, then hand the body
//! to the store as a stream. Every error becomes one [`ApiError`]: a status code and a
//! `text/plain` message (exactly that content type: the Nx CLI shows the message to the
//! user only then).

mod admin;
mod cache;
mod error;
mod metrics;
mod ops;
mod protocols;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use http::StatusCode;
use nxcache_auth::Authenticator;
use nxcache_replication::DataPlane;

pub use admin::{
    AdminError, BoxFuture, ClusterControl, DataStatus, MemberView, NewToken, RingView,
    SettingsUpdate, SettingsView, StatusView, TokenSpec, TokenView, WorkerView,
};
pub use error::ApiError;
pub use metrics::HttpMetrics;
pub use protocols::ProtocolMounts;

/// How the contract behaves; set from the server configuration.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Path prefix of the cache API, `""` or like `/nx` (no trailing slash).
    pub base_path: String,
    pub max_artifact_size: u64,
    /// 200 (what the Nx CLI needs) or 202 (what the OpenAPI text says).
    pub put_success_status: StatusCode,
    /// An upload that sends nothing for this long is cut off (slow or stalled clients).
    pub body_idle_timeout: Duration,
    /// Where the Bazel, Gradle, ccache and Turborepo APIs are served (below `base_path`).
    pub protocols: ProtocolMounts,
}

/// Whether the node should receive traffic: false while it shuts down.
#[derive(Clone, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Every artifact request goes through the data plane (this node's store and its
    /// peers').
    pub data: DataPlane,
    pub auth: Arc<dyn Authenticator>,
    pub cluster: Arc<dyn ClusterControl>,
    pub config: Arc<ApiConfig>,
    pub metrics: HttpMetrics,
    pub registry: prometheus::Registry,
    pub readiness: Readiness,
    /// Uploads taken at once; beyond them a PUT gets 503 with Retry-After.
    pub uploads: UploadSlots,
}

/// The uploads a node takes at once: each holds a body stream, a file and replica
/// streams, so their number is what bounds its memory and descriptors under a burst.
#[derive(Clone)]
pub struct UploadSlots {
    slots: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl UploadSlots {
    pub fn new(limit: usize) -> Self {
        UploadSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        }
    }

    pub(crate) fn try_take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// The node's whole HTTP surface.
pub fn router(state: ApiState) -> Router {
    let cache_api = Router::new()
        .route(
            "/v1/cache/{hash}",
            get(cache::get_artifact)
                .head(cache::head_artifact)
                .put(cache::put_artifact)
                .fallback(cache::method_not_allowed),
        )
        .route("/admin/v1/status", get(admin::status))
        .route("/admin/v1/nodes", get(admin::nodes))
        .route(
            "/admin/v1/settings",
            get(admin::settings).put(admin::update_settings),
        )
        .route(
            "/admin/v1/nodes/{id}",
            axum::routing::delete(admin::remove_node),
        )
        .route(
            "/admin/v1/nodes/{id}/drain",
            axum::routing::post(admin::drain_node),
        )
        .route(
            "/admin/v1/tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route(
            "/admin/v1/tokens/{name}",
            axum::routing::delete(admin::revoke_token),
        )
        .merge(protocols::routes(&state.config.protocols));
    let base = state.config.base_path.clone();
    let app = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics));
    let app = if base.is_empty() {
        app.merge(cache_api)
    } else {
        app.nest(&base, cache_api)
    };
    let app = app
        .fallback(ops::not_found)
        // Uploads are bounded by --max-artifact-size against Content-Length, before
        // anything is read; the framework's generic limit would only get in the way.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state);
    // Runs before routing: Nx joins a base URL ending in '/' to '/v1/...' as '//v1/...'
    // when the URL has a path, so repeated slashes are collapsed first.
    Router::new()
        .fallback_service(app)
        .layer(axum::middleware::map_request(collapse_slashes))
}

async fn collapse_slashes(mut request: axum::extract::Request) -> axum::extract::Request {
    let uri = request.uri();
    if !uri.path().contains("//") {
        return request;
    }
    let mut path = String::with_capacity(uri.path().len());
    for c in uri.path().chars() {
        if !(c == '/' && path.ends_with('/')) {
            path.push(c);
        }
    }
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new_uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = new_uri;
        }
    }
    request
}

#[cfg(test)]
mod tests;
