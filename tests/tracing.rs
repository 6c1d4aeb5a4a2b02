//! Traces and logs across nodes, with real processes: an OTLP receiver inside this test
//! (the collector's trace service over tonic) gets the spans of one PUT from the node
//! that took it and from its replicas, all in the caller's trace with the right parents;
//! the JSON log lines of the request carry the trace id; no token or secret is logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nxcache_tests::{
    ADMIN_TOKEN, CLUSTER_SECRET, PATIENCE, ProcessCluster, RO_TOKEN, RW_TOKEN, admin_status,
    random_bytes, wait_until,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

#[derive(Debug, Clone)]
struct Span {
    /// `service.instance.id` of the exporting node: its node id.
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let node = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        node: node.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn start_receiver() -> (Receiver, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (receiver, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_put_is_one_trace_across_the_coordinator_and_its_replicas() {
    let (receiver, endpoint) = start_receiver().await;
    let cluster = ProcessCluster::start_with_env(
        3,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "nxcache-test"),
        ],
    );
    let first = cluster.nodes[0].url.clone();
    wait_until(PATIENCE, "cluster formed", || {
        let url = first.clone();
        async move {
            admin_status(&url).is_some_and(|s| {
                s["leader_id"].as_u64().is_some()
                    && s["members"]
                        .as_array()
                        .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["reachable"] == true))
            })
        }
    })
    .await;

    // The caller (a CI job with its own tracing) sends its trace context.
    let trace_id = hex(&rand::random::<[u8; 16]>());
    let caller_span = hex(&rand::random::<[u8; 8]>());
    let response = nxcache_tests::http_client()
        .put(format!("{first}/v1/cache/{}", 7_000_000_123u64))
        .bearer_auth(RW_TOKEN)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .body(random_bytes(300_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The spans of that trace, from the coordinator (node 1) and at least one replica.
    let spans = receiver.spans.clone();
    let wanted = trace_id.clone();
    wait_until(PATIENCE, "spans from two nodes", || {
        let found: Vec<Span> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == wanted)
            .cloned()
            .collect();
        async move {
            // Spans arrive as they end, in batches: wait for the request span and for the
            // parent of every replica's span.
            let ids: std::collections::HashSet<&str> =
                found.iter().map(|s| s.span_id.as_str()).collect();
            let served: Vec<&Span> = found
                .iter()
                .filter(|s| s.name == "grpc_server" && s.node != "1")
                .collect();
            found.iter().any(|s| s.name == "http_request")
                && !served.is_empty()
                && served.iter().all(|s| ids.contains(s.parent_id.as_str()))
        }
    })
    .await;
    let trace: Vec<Span> = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    eprintln!("{} spans in the trace:", trace.len());
    for s in &trace {
        eprintln!(
            "  node {} {} {} <- {}",
            s.node, s.name, s.span_id, s.parent_id
        );
    }
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();

    // The request span on the coordinator is the caller's child.
    let request = trace
        .iter()
        .find(|s| s.name == "http_request")
        .expect("an http_request span");
    assert_eq!(request.node, "1");
    assert_eq!(request.parent_id, caller_span);
    for name in ["auth", "placement", "replica_put"] {
        assert!(
            trace.iter().any(|s| s.name == name && s.node == "1"),
            "no {name} span on the coordinator"
        );
    }

    // Each replica's server span hangs under one of the coordinator's replica_put spans,
    // which hangs under the request.
    let served: Vec<&Span> = trace
        .iter()
        .filter(|s| s.name == "grpc_server" && s.node != "1")
        .collect();
    assert!(!served.is_empty());
    for span in served {
        let parent = by_id
            .get(span.parent_id.as_str())
            .unwrap_or_else(|| panic!("the parent of {span:?} is not in the trace"));
        assert_eq!(
            (parent.node.as_str(), parent.name.as_str()),
            ("1", "replica_put")
        );
        let mut up = *parent;
        while up.span_id != request.span_id {
            up = by_id
                .get(up.parent_id.as_str())
                .unwrap_or_else(|| panic!("{up:?} does not lead to the request span"));
        }
    }

    // The same calls in the per-peer gRPC metrics: sent by the coordinator, served by a
    // replica.
    let has = |page: &str, family: &str, labels: &[&str]| {
        page.lines()
            .filter(|l| l.starts_with(family))
            .any(|l| labels.iter().all(|label| l.contains(label)))
    };
    let coordinator = nxcache_tests::metrics_page(&first).await;
    assert!(has(
        &coordinator,
        "nxcache_grpc_client_calls_total{",
        &["method=\"Blobs/Put\"", "code=\"0\"", "peer=\""]
    ));
    assert!(has(
        &coordinator,
        "nxcache_grpc_client_call_duration_seconds_count{",
        &["method=\"Raft/AppendEntries\""]
    ));
    let replica = served_by(&trace);
    let page = nxcache_tests::metrics_page(&cluster.nodes[replica - 1].url).await;
    assert!(has(
        &page,
        "nxcache_grpc_server_calls_total{",
        &["method=\"Blobs/Put\"", "code=\"0\""]
    ));

    // JSON log lines of the request carry the trace id; no secret is in any log.
    let coordinator_log = std::fs::read_to_string(&cluster.nodes[0].log).unwrap();
    assert!(
        coordinator_log
            .lines()
            .any(|l| l.contains(&format!("\"trace_id\":\"{trace_id}\""))),
        "no log line of the coordinator carries the trace id"
    );
    for node in &cluster.nodes {
        let log = std::fs::read_to_string(&node.log).unwrap();
        for secret in [RW_TOKEN, RO_TOKEN, ADMIN_TOKEN, CLUSTER_SECRET] {
            assert!(
                !log.contains(secret),
                "a secret is in {}",
                node.log.display()
            );
        }
    }
}

/// The node id of a replica that served part of the trace.
fn served_by(trace: &[Span]) -> usize {
    trace
        .iter()
        .find(|s| s.name == "grpc_server" && s.node != "1")
        .and_then(|s| s.node.parse().ok())
        .expect("a replica's span")
}
