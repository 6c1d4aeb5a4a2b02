//! What every inter-node call gets on the serving side: a span (continuing the caller's
//! trace from its `traceparent`) and per-method counts and latencies.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tracing::Instrument;

/// Every method of `proto/`, as `Service/Method`: the only values of the `method` label
/// (anything else is `other`), so a caller cannot grow the label set.
pub const METHODS: &[&str] = &[
    "Raft/AppendEntries",
    "Raft/Vote",
    "Raft/InstallSnapshot",
    "Membership/Join",
    "Membership/ForwardWrite",
    "Membership/Ping",
    "Membership/Remove",
    "Blobs/Put",
    "Blobs/Get",
    "Blobs/Head",
    "Blobs/Delete",
    "Blobs/Touch",
    "Blobs/RangeDigests",
    "Blobs/RangeKeys",
];

/// `/nxcache.cluster.v1.Blobs/Put` -> `Blobs/Put`.
pub fn method_label(path: &str) -> &'static str {
    let short = path.rsplit_once('.').map_or(path, |(_, m)| m);
    METHODS
        .iter()
        .find(|m| **m == short)
        .copied()
        .unwrap_or("other")
}

#[derive(Clone)]
pub struct GrpcServerMetrics {
    calls: IntCounterVec,
    duration: HistogramVec,
}

impl GrpcServerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let calls = IntCounterVec::new(
            Opts::new(
                "nxcache_grpc_server_calls_total",
                "Inter-node calls served, by method and the gRPC status the response started with.",
            ),
            &["method", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nxcache_grpc_server_call_duration_seconds",
                "Time to the start of the response of inter-node calls served, by method.",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["method"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(GrpcServerMetrics { calls, duration })
    }
}

/// The tower layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct GrpcServerLayer {
    metrics: GrpcServerMetrics,
}

impl GrpcServerLayer {
    pub fn new(metrics: GrpcServerMetrics) -> Self {
        GrpcServerLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcServerLayer {
    type Service = GrpcServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcServerService<S> {
    inner: S,
    metrics: GrpcServerMetrics,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcServerService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let span = tracing::info_span!(
            "grpc_server",
            rpc.method = method,
            rpc.code = tracing::field::Empty,
            trace_id = tracing::field::Empty
        );
        if let Some(trace_id) = nxcache_telemetry::continue_trace(&span, request.headers()) {
            span.record("trace_id", trace_id);
        }
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let response = call.await;
                let code = response_code(&response);
                tracing::Span::current().record("rpc.code", code);
                metrics.calls.with_label_values(&[method, code]).inc();
                metrics
                    .duration
                    .with_label_values(&[method])
                    .observe(started.elapsed().as_secs_f64());
                response
            }
            .instrument(span),
        )
    }
}

/// The gRPC status a call's response started with. Errors before the first message come
/// as "trailers only", the status in the headers; otherwise the call started fine (0).
pub(crate) fn response_code<RB, E>(response: &Result<http::Response<RB>, E>) -> &'static str {
    match response {
        Ok(r) => r
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map_or("0", code_label),
        Err(_) => "transport",
    }
}

/// Latency buckets of inter-node calls, in seconds.
pub(crate) const CALL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// gRPC status codes are 0..=16; anything else is not one.
fn code_label(raw: &str) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    CODES
        .iter()
        .find(|c| **c == raw)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_list_is_exactly_the_protos() {
        let proto = include_str!("../../../proto/nxcache/cluster/v1/cluster.proto");
        let mut service = "";
        let mut found = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap();
            }
            if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                found.push(format!("{service}/{name}"));
            }
        }
        let listed: Vec<String> = METHODS.iter().map(|m| m.to_string()).collect();
        assert_eq!(found, listed);
    }

    #[test]
    fn labels_stay_within_known_values() {
        assert_eq!(method_label("/nxcache.cluster.v1.Blobs/Put"), "Blobs/Put");
        assert_eq!(
            method_label("/nxcache.cluster.v1.Blobs/Exfiltrate"),
            "other"
        );
        assert_eq!(method_label("/x/../../etc"), "other");
        assert_eq!(code_label("14"), "14");
        assert_eq!(code_label("99"), "other");
    }
}
