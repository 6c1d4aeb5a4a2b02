//! What every call to another node records on the calling side: counts by peer, method
//! and status, and round-trip latency, so one slow or failing peer stands out.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::server_layer::{CALL_BUCKETS, method_label, response_code};

#[derive(Clone)]
pub struct GrpcClientMetrics {
    calls: IntCounterVec,
    duration: HistogramVec,
}

impl GrpcClientMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let calls = IntCounterVec::new(
            Opts::new(
                "nxcache_grpc_client_calls_total",
                "Calls to other nodes, by peer node id, method and the gRPC status the response started with (transport: no response).",
            ),
            &["peer", "method", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nxcache_grpc_client_call_duration_seconds",
                "Time to the start of the response of calls to other nodes, by peer node id and method.",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["peer", "method"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(GrpcClientMetrics { calls, duration })
    }

    /// Metrics that go nowhere, for clients outside a node (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes them")
    }

    /// Wraps `inner` (a channel to node `peer`) so its calls are counted.
    pub fn instrument<S>(&self, peer: u64, inner: S) -> InstrumentedChannel<S> {
        InstrumentedChannel {
            inner,
            peer: peer.to_string(),
            metrics: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InstrumentedChannel<S> {
    inner: S,
    peer: String,
    metrics: GrpcClientMetrics,
}

impl<S, B, RB> tower::Service<http::Request<B>> for InstrumentedChannel<S>
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
        let (metrics, peer) = (self.metrics.clone(), self.peer.clone());
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            let code = response_code(&response);
            metrics
                .calls
                .with_label_values(&[&peer, method, code])
                .inc();
            metrics
                .duration
                .with_label_values(&[&peer, method])
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}
