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
mod throttle;

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
pub use ops::{READINESS_CHECK_EVERY, check_disk, run_readiness_checks};
pub use protocols::ProtocolMounts;
pub use throttle::{AuthThrottle, ClientAddr};

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
    /// The pace an upload must keep (trickling uploads cannot hold slots or space).
    pub upload_pace: UploadPace,
    /// When set, `/metrics` answers only a request bearing this token.
    pub metrics_token: Option<nxcache_auth::Digest>,
    /// Where the Bazel, Gradle, ccache and Turborepo APIs are served (below `base_path`).
    pub protocols: ProtocolMounts,
}

/// Minimum pace of an upload: after `grace`, at least `min_rate` bytes per second on
/// average since it began; and done within `deadline` whatever its pace.
#[derive(Debug, Clone, Copy)]
pub struct UploadPace {
    /// Bytes per second; 0: no minimum.
    pub min_rate: u64,
    pub grace: Duration,
    pub deadline: Duration,
}

/// Whether the node should receive traffic: false while it shuts down, or while the
/// background check finds the data directory refusing writes. Reading it costs nothing:
/// probes never touch the disk.
#[derive(Clone)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
    /// Why the data directory is not usable, per the last background check.
    disk: Arc<std::sync::RwLock<Option<String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            draining: Arc::default(),
            disk: Arc::new(std::sync::RwLock::new(None)),
        }
    }
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Records the outcome of a check of the data directory.
    pub fn set_disk(&self, outcome: Result<(), String>) {
        *self.disk.write().unwrap_or_else(|e| e.into_inner()) = outcome.err();
    }

    /// The problem the last check of the data directory found, if any.
    pub fn disk_problem(&self) -> Option<String> {
        self.disk.read().unwrap_or_else(|e| e.into_inner()).clone()
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
/// streams, so their number is what bounds its memory and descriptors under a burst. One
/// token may hold only some of them, so that one client (a pull request's job, a leaked
/// token) cannot take every slot.
#[derive(Clone)]
pub struct UploadSlots {
    slots: Arc<tokio::sync::Semaphore>,
    limit: usize,
    per_token: usize,
    by_token: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Why an upload was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotRefusal {
    /// Every slot of the node is taken.
    Node,
    /// The token already has its share in progress.
    Token,
}

/// A slot held by an upload in progress; given back when dropped.
pub(crate) struct UploadSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    token: String,
    by_token: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut by_token = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_token.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                by_token.remove(&self.token);
            }
        }
    }
}

impl UploadSlots {
    /// `limit` uploads at once, at most `per_token` of them with one token.
    pub fn new(limit: usize, per_token: usize) -> Self {
        UploadSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
            per_token,
            by_token: Arc::default(),
        }
    }

    pub(crate) fn try_take(&self, token: &str) -> Result<UploadSlot, SlotRefusal> {
        let mut by_token = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
        let held = by_token.get(token).copied().unwrap_or(0);
        if held >= self.per_token {
            return Err(SlotRefusal::Token);
        }
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| SlotRefusal::Node)?;
        by_token.insert(token.to_owned(), held + 1);
        Ok(UploadSlot {
            _permit: permit,
            token: token.to_owned(),
            by_token: self.by_token.clone(),
        })
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn per_token(&self) -> usize {
        self.per_token
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
            throttle::guard,
        ))
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
