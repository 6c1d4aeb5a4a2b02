use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use nxcache_auth::{Digest, bearer_token};
use prometheus::{Encoder, TextEncoder};
use tracing::Instrument;

use crate::ApiState;
use crate::error::{ApiError, plain};

/// Liveness: the process answers and its control plane runs.
pub(crate) async fn healthz(State(state): State<ApiState>) -> Response {
    match state.cluster.liveness() {
        Ok(()) => plain(StatusCode::OK, "ok"),
        Err(why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}; restart this node"),
        )
        .into_response(),
    }
}

/// Readiness: not shutting down, a cluster member, and the data directory took writes at
/// the last background check. Answered from memory: a probe never touches the disk.
pub(crate) async fn readyz(State(state): State<ApiState>) -> Response {
    if state.readiness.is_draining() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if let Err(why) = state
        .cluster
        .liveness()
        .map_err(|why| format!("{why}; restart this node"))
        .and_then(|()| state.cluster.readiness())
    {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"))
            .into_response();
    }
    match state.readiness.disk_problem() {
        None => plain(StatusCode::OK, "ready"),
        Some(err) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the data directory does not accept writes ({err})"),
        )
        .into_response(),
    }
}

/// Prometheus text exposition of every metric of the node.
pub(crate) async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.config.metrics_token {
        let given = bearer_token(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()));
        if !given.is_ok_and(|t| Digest::of(t) == *expected) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "/metrics needs 'Authorization: Bearer <token>' with the token the server was given in --metrics-token (NXCACHE_METRICS_TOKEN); set it as the scrape job's bearer token.",
            )
            .into_response();
        }
    }
    let encoder = TextEncoder::new();
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(err) = encoder.encode(&state.registry.gather(), &mut out) {
        return ApiError::internal(err).into_response();
    }
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    response
}

pub(crate) async fn not_found(State(state): State<ApiState>) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "No such endpoint. The Nx cache API is at {}/v1/cache/{{hash}}; operators have /healthz, /readyz and /metrics.",
            state.config.base_path
        ),
    )
    .into_response()
}

/// How often the background check writes, syncs and removes a probe file.
pub const READINESS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks that the data directory takes writes, now and every `every` until `stop`
/// resolves, and keeps the outcome in `readiness` (what `/readyz` answers from) and in
/// the `nxcache_data_dir_writable` gauge. One check at a time, whatever the probe rate.
pub async fn run_readiness_checks(
    store: nxcache_store::BlobStore,
    readiness: crate::Readiness,
    writable: prometheus::IntGauge,
    every: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        check_disk(&store, &readiness, &writable).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return,
        }
    }
}

/// One check of the data directory, recorded in `readiness` and `writable`.
pub async fn check_disk(
    store: &nxcache_store::BlobStore,
    readiness: &crate::Readiness,
    writable: &prometheus::IntGauge,
) {
    let outcome = store
        .probe_writable()
        .instrument(tracing::debug_span!("readiness_check"))
        .await;
    if let Err(err) = &outcome
        && readiness.disk_problem().is_none()
    {
        tracing::warn!(%err, "the data directory does not accept writes: /readyz answers 503");
    }
    writable.set(i64::from(outcome.is_ok()));
    readiness.set_disk(outcome.map_err(|e| e.to_string()));
}
