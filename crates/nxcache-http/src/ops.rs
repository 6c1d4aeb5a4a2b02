use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use prometheus::{Encoder, TextEncoder};

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

/// Readiness: not shutting down, and the data directory takes writes.
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
    match state.data.store().probe_writable().await {
        Ok(()) => plain(StatusCode::OK, "ready"),
        Err(err) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the data directory does not accept writes ({err})"),
        )
        .into_response(),
    }
}

/// Prometheus text exposition of every metric of the node.
pub(crate) async fn metrics(State(state): State<ApiState>) -> Response {
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
