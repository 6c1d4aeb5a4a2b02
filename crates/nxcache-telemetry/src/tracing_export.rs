//! OpenTelemetry traces: OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C
//! trace context read from incoming HTTP and gRPC headers and written into outgoing
//! gRPC metadata, so one request is one trace across the nodes it touches.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exporter's pipeline; flushes what is buffered when shut down.
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// An OTLP/gRPC exporter configured by the standard variables
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    /// `OTEL_TRACES_SAMPLER`, ...), or `None` when no endpoint is set. Must be called
    /// inside a Tokio runtime (the exporter is a tonic client).
    pub fn from_env(instance: &str) -> Result<Option<TraceExport>, String> {
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
        let traces_endpoint =
            std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").unwrap_or_default();
        if endpoint.trim().is_empty() && traces_endpoint.trim().is_empty() {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OTLP trace exporter: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name("nxcache");
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                instance.to_owned(),
            ))
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Some(TraceExport { provider }))
    }

    pub(crate) fn tracer(&self) -> SdkTracer {
        self.provider.tracer("nxcache")
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("nxcache: trace export did not shut down cleanly: {err}");
        }
    }
}

struct HeaderRead<'a>(&'a http::HeaderMap);

impl Extractor for HeaderRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderWrite<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderWrite<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes the W3C `traceparent` of `headers`, if any, the parent of `span`, and returns
/// the trace id the span belongs to (hex), for log lines: the exported trace's id when
/// traces are exported, else the caller's.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    let parent = TraceContextPropagator::new().extract(&HeaderRead(headers));
    let remote = parent.span().span_context().clone();
    if remote.is_valid() {
        // Without an exporter installed this does nothing, and nothing is lost.
        let _ = span.set_parent(parent);
    }
    let own = span.context().span().span_context().clone();
    if own.is_valid() {
        Some(own.trace_id().to_string())
    } else if remote.is_valid() {
        Some(remote.trace_id().to_string())
    } else {
        None
    }
}

/// Writes the trace context of `span` (a `traceparent` header) into `headers`, for a
/// call to another node. Nothing is written when the span is not exported.
pub fn inject_trace(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderWrite(headers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_trace_id_is_kept_for_the_logs_without_an_exporter() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let span = tracing::info_span!("request");
        assert_eq!(
            continue_trace(&span, &headers).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(continue_trace(&span, &http::HeaderMap::new()), None);
        // A malformed header is ignored, not an error.
        headers.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        assert_eq!(continue_trace(&span, &headers), None);
    }
}
