use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use tracing::Instrument;

use crate::ApiState;
use crate::protocols::Protocol;

/// HTTP metrics. Labels are bounded: a route name, never a hash or a token.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGauge,
    received_bytes: IntCounter,
    pub(crate) sent_bytes: IntCounter,
    pub(crate) hits: IntCounter,
    pub(crate) misses: IntCounter,
    pub(crate) read_errors: IntCounter,
    pub(crate) remote_hits: IntCounter,
    pub(crate) uploads_in_progress: IntGauge,
    pub(crate) uploads_cut: IntCounterVec,
    pub(crate) uploads_refused: IntCounterVec,
    /// Failed authentication per client address, and its metrics.
    pub(crate) auth_throttle: crate::AuthThrottle,
    /// The same four, by protocol (`nx`, `bazel`, `gradle`, `ccache`, `turbo`).
    protocol_hits: IntCounterVec,
    protocol_misses: IntCounterVec,
    protocol_received_bytes: IntCounterVec,
    protocol_sent_bytes: IntCounterVec,
}

impl HttpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "nxcache_http_requests_total",
                "HTTP requests answered, by route, method and status code.",
            ),
            &["route", "method", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nxcache_http_request_duration_seconds",
                "Time from request to the end of the response handler, by route and method.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            &["route", "method"],
        )?;
        let in_flight = IntGauge::new(
            "nxcache_http_requests_in_flight",
            "HTTP requests being handled.",
        )?;
        let received_bytes = IntCounter::new(
            "nxcache_http_received_bytes_total",
            "Artifact bytes received in upload bodies.",
        )?;
        let sent_bytes = IntCounter::new(
            "nxcache_http_sent_bytes_total",
            "Artifact bytes sent in download bodies.",
        )?;
        let hits = IntCounter::new(
            "nxcache_cache_hits_total",
            "GET and HEAD requests that found their artifact.",
        )?;
        let misses = IntCounter::new(
            "nxcache_cache_misses_total",
            "GET and HEAD requests that did not find their artifact.",
        )?;
        let read_errors = IntCounter::new(
            "nxcache_http_read_errors_total",
            "Reads that failed in the store and were answered as a miss.",
        )?;
        registry.register(Box::new(read_errors.clone()))?;
        let remote_hits = IntCounter::new(
            "nxcache_cache_remote_hits_total",
            "Hits served from another member after a local miss (also counted as hits).",
        )?;
        registry.register(Box::new(remote_hits.clone()))?;
        let uploads_in_progress = IntGauge::new(
            "nxcache_http_uploads_in_progress",
            "Uploads holding a slot: from the slot taken to the answer.",
        )?;
        registry.register(Box::new(uploads_in_progress.clone()))?;
        let uploads_cut = IntCounterVec::new(
            Opts::new(
                "nxcache_http_uploads_cut_total",
                "Uploads cut with 408 before their body was complete, by reason: stalled (no data for --body-idle-timeout), too_slow (under --upload-min-rate after the grace), deadline (--upload-deadline).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(uploads_cut.clone()))?;
        let uploads_refused = IntCounterVec::new(
            Opts::new(
                "nxcache_http_uploads_refused_total",
                "Uploads refused a slot, by reason: node_limit (--max-concurrent-uploads, 503) or token_limit (--max-uploads-per-token, 429).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(uploads_refused.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(received_bytes.clone()))?;
        registry.register(Box::new(sent_bytes.clone()))?;
        registry.register(Box::new(hits.clone()))?;
        registry.register(Box::new(misses.clone()))?;
        let by_protocol = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let family = IntCounterVec::new(Opts::new(name, help), &["protocol"])?;
            registry.register(Box::new(family.clone()))?;
            // Every protocol's series exists from the start (rates need a zero).
            for protocol in Protocol::ALL {
                family.with_label_values(&[protocol.label()]);
            }
            Ok(family)
        };
        let protocol_hits = by_protocol(
            "nxcache_protocol_hits_total",
            "GET and HEAD requests that found their artifact, by client protocol.",
        )?;
        let protocol_misses = by_protocol(
            "nxcache_protocol_misses_total",
            "GET and HEAD requests that did not find their artifact, by client protocol.",
        )?;
        let protocol_received_bytes = by_protocol(
            "nxcache_protocol_received_bytes_total",
            "Artifact bytes received in upload bodies, by client protocol.",
        )?;
        let protocol_sent_bytes = by_protocol(
            "nxcache_protocol_sent_bytes_total",
            "Artifact bytes sent in download bodies, by client protocol.",
        )?;
        Ok(HttpMetrics {
            requests,
            duration,
            in_flight,
            received_bytes,
            sent_bytes,
            hits,
            misses,
            read_errors,
            remote_hits,
            uploads_in_progress,
            uploads_cut,
            uploads_refused,
            auth_throttle: crate::AuthThrottle::register(registry)?,
            protocol_hits,
            protocol_misses,
            protocol_received_bytes,
            protocol_sent_bytes,
        })
    }

    /// A hit; `remote`: answered from another member's store.
    pub(crate) fn hit(&self, protocol: Protocol, remote: bool) {
        self.hits.inc();
        if remote {
            self.remote_hits.inc();
        }
        self.protocol_hits
            .with_label_values(&[protocol.label()])
            .inc();
    }

    pub(crate) fn miss(&self, protocol: Protocol) {
        self.misses.inc();
        self.protocol_misses
            .with_label_values(&[protocol.label()])
            .inc();
    }

    pub(crate) fn received(&self, protocol: Protocol, bytes: u64) {
        self.received_bytes.inc_by(bytes);
        self.protocol_received_bytes
            .with_label_values(&[protocol.label()])
            .inc_by(bytes);
    }

    pub(crate) fn sent(&self, protocol: Protocol, bytes: u64) {
        self.sent_bytes.inc_by(bytes);
        self.protocol_sent_bytes
            .with_label_values(&[protocol.label()])
            .inc_by(bytes);
    }
}

fn route_label(path: Option<&MatchedPath>) -> &'static str {
    match path.map(|p| p.as_str()) {
        Some(p) if p.ends_with("/v1/cache/{hash}") => "cache",
        Some(p) if p.contains("/v8/artifacts") => "turbo",
        Some(p) if p.ends_with(Protocol::Bazel.capture()) => "bazel",
        Some(p) if p.ends_with(Protocol::Gradle.capture()) => "gradle",
        Some(p) if p.ends_with(Protocol::Ccache.capture()) => "ccache",
        Some(p) if p.contains("/admin/v1/") => "admin",
        Some("/healthz") => "healthz",
        Some("/readyz") => "readyz",
        Some("/metrics") => "metrics",
        _ => "unmatched",
    }
}

fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// Counts and times every request, inside a span that carries route and status.
pub(crate) async fn track(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "http_request",
        http.route = route,
        http.method = method,
        http.status = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    // Part of the caller's trace when it sent a W3C `traceparent`; the id goes into
    // every log line of the request.
    if let Some(trace_id) = nxcache_telemetry::continue_trace(&span, request.headers()) {
        span.record("trace_id", trace_id);
    }
    let metrics = &state.metrics;
    metrics.in_flight.inc();
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    metrics.in_flight.dec();
    let status = response.status();
    span.record("http.status", status.as_u16());
    metrics
        .requests
        .with_label_values(&[route, method, status.as_str()])
        .inc();
    metrics
        .duration
        .with_label_values(&[route, method])
        .observe(elapsed.as_secs_f64());
    // The access log: one line per request, with the trace id when there is one.
    tracing::info!(parent: &span, elapsed_ms = elapsed.as_millis() as u64, "request handled");
    response
}
