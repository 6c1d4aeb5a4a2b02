//! Router-level checks, in process (no sockets). The full contract over real TCP lives
//! in the workspace's `tests/contract.rs`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use nxcache_auth::{Scope, TokenSet};
use nxcache_store::{BlobStore, StoreConfig};
use tower::ServiceExt;

use crate::{
    AdminError, ApiConfig, ApiState, BoxFuture, ClusterControl, HttpMetrics, Readiness,
    SettingsUpdate, SettingsView, StatusView, TokenView, router,
};

/// A cluster of one that is always ready and keeps no tokens.
struct NoCluster;

impl ClusterControl for NoCluster {
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    fn status(&self) -> BoxFuture<'_, StatusView> {
        Box::pin(async {
            StatusView {
                node_id: 0,
                cluster_id: None,
                leader_id: Some(0),
                term: 1,
                last_log_index: 1,
                applied_index: 1,
                commit_index: 1,
                ring_epoch: 1,
                members: vec![],
                leaderless_ms: None,
                tokens: 0,
                snapshot_bytes: 0,
                settings: None,
                ring: None,
                previous_ring: None,
                data: None,
            }
        })
    }
    fn tokens(&self) -> BoxFuture<'_, Result<Vec<TokenView>, AdminError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn settings(&self) -> SettingsView {
        SettingsView {
            replication_factor: 1,
            write_quorum: 0,
            on_degraded: "serve".into(),
            max_voters: 1,
        }
    }
    fn update_settings(
        &self,
        update: SettingsUpdate,
    ) -> BoxFuture<'_, Result<SettingsView, AdminError>> {
        Box::pin(async move {
            match update.replication_factor {
                Some(0) => Err(AdminError::Invalid(
                    "the replication factor must be 1 to 7, not 0".into(),
                )),
                _ => Ok(self.settings()),
            }
        })
    }
    fn create_token(&self, _: crate::TokenSpec) -> BoxFuture<'_, Result<String, AdminError>> {
        Box::pin(async { Err(AdminError::Unavailable("test".into())) })
    }
    fn revoke_token(&self, name: String) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async move { Err(AdminError::NotFound(format!("no token {name}"))) })
    }
    fn drain_node(&self, _: u64) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async { Ok(()) })
    }
    fn remove_node(&self, _: u64) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async { Ok(()) })
    }
}

fn app(dir: &std::path::Path, base_path: &str) -> axum::Router {
    app_with_readiness(dir, base_path, Readiness::default())
}

fn app_with_readiness(
    dir: &std::path::Path,
    base_path: &str,
    readiness: Readiness,
) -> axum::Router {
    let registry = prometheus::Registry::new();
    let store = BlobStore::open(
        StoreConfig {
            data_dir: dir.to_path_buf(),
            max_bytes: 1 << 20,
            ttl: None,
            fsync: false,
        },
        &registry,
    )
    .unwrap();
    let mut tokens = TokenSet::new();
    tokens.add("rw", "rw-token", Scope::ReadWrite);
    tokens.add("ro", "ro-token", Scope::Read);
    tokens.add("admin", "admin-token", Scope::Admin);
    let data = nxcache_replication::DataPlane::new(
        store,
        Arc::new(nxcache_replication::FixedTopology(Arc::new(
            nxcache_replication::ClusterView::lone(0),
        ))),
        nxcache_replication::Peers::new(
            nxcache_rpc::ClusterSecret::new("a-test-cluster-secret").unwrap(),
            None,
            nxcache_rpc::GrpcClientMetrics::unregistered(),
        ),
        nxcache_replication::HintLog::temporary().unwrap(),
        nxcache_replication::ReplicationMetrics::register(&registry).unwrap(),
    );
    router(ApiState {
        data,
        auth: Arc::new(tokens),
        cluster: Arc::new(NoCluster),
        config: Arc::new(ApiConfig {
            base_path: base_path.into(),
            max_artifact_size: 1000,
            put_success_status: StatusCode::OK,
            body_idle_timeout: Duration::from_secs(5),
            protocols: crate::ProtocolMounts::default(),
        }),
        metrics: HttpMetrics::register(&registry).unwrap(),
        registry,
        readiness,
        uploads: crate::UploadSlots::new(64),
    })
}

fn req(method: &str, uri: &str, token: Option<&str>, body: &'static [u8]) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if method == "PUT" {
        b = b.header(header::CONTENT_LENGTH, body.len());
    }
    b.body(Body::from(body)).unwrap()
}

async fn call(app: &axum::Router, r: Request<Body>) -> (StatusCode, String, String) {
    let resp = app.clone().oneshot(r).await.unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn base_path_prefixes_the_cache_api_only() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), "/nx");
    let (s, _, _) = call(
        &app,
        req("PUT", "/nx/v1/cache/42", Some("rw-token"), b"abc"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = call(&app, req("GET", "/nx/v1/cache/42", Some("rw-token"), b"")).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "abc"));
    let (s, ctype, body) = call(&app, req("GET", "/v1/cache/42", Some("rw-token"), b"")).await;
    assert_eq!((s, ctype.as_str()), (StatusCode::NOT_FOUND, "text/plain"));
    assert!(body.contains("/nx/v1/cache/{hash}"), "{body}");
    let (s, _, _) = call(&app, req("GET", "/healthz", None, b"")).await;
    assert_eq!(s, StatusCode::OK);
    // What Nx sends for a base URL with a trailing slash.
    let (s, _, body) = call(&app, req("GET", "/nx//v1/cache/42", Some("rw-token"), b"")).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "abc"));
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_without_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), "");
    call(&app, req("GET", "/v1/cache/7777", Some("ro-token"), b"")).await;
    call(&app, req("PUT", "/v1/cache/7777", Some("ro-token"), b"x")).await;
    let (_, ctype, text) = call(&app, req("GET", "/metrics", None, b"")).await;
    assert!(ctype.starts_with("text/plain"));
    assert!(
        text.contains(r#"nxcache_http_requests_total{method="GET",route="cache",status="404"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"nxcache_http_requests_total{method="PUT",route="cache",status="403"} 1"#)
    );
    assert!(text.contains("nxcache_cache_misses_total 1"));
    assert!(text.contains("nxcache_store_budget_bytes 1048576"));
    assert!(!text.contains("7777"), "a hash leaked into a label");
}

#[tokio::test]
async fn unsupported_methods_get_405_with_allow() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), "");
    let resp = app
        .clone()
        .oneshot(req("DELETE", "/v1/cache/1", Some("rw-token"), b""))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD, PUT");
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/plain");
}

#[tokio::test]
async fn readiness_turns_off_while_draining() {
    let dir = tempfile::tempdir().unwrap();
    let readiness = Readiness::default();
    let app = app_with_readiness(dir.path(), "", readiness.clone());
    let (s, _, _) = call(&app, req("GET", "/readyz", None, b"")).await;
    assert_eq!(s, StatusCode::OK);
    readiness.start_draining();
    let (s, ctype, body) = call(&app, req("GET", "/readyz", None, b"")).await;
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "text/plain")
    );
    assert!(body.contains("shutting down"));
    // Liveness is unaffected.
    let (s, _, _) = call(&app, req("GET", "/healthz", None, b"")).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_scope() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), "/nx");
    let (s, ctype, body) = call(
        &app,
        req("GET", "/nx/admin/v1/status", Some("rw-token"), b""),
    )
    .await;
    assert_eq!((s, ctype.as_str()), (StatusCode::FORBIDDEN, "text/plain"));
    assert!(body.contains("scope 'admin'"), "{body}");
    let (s, _, _) = call(&app, req("GET", "/nx/admin/v1/status", None, b"")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, ctype, body) = call(
        &app,
        req("GET", "/nx/admin/v1/status", Some("admin-token"), b""),
    )
    .await;
    assert_eq!((s, ctype.as_str()), (StatusCode::OK, "application/json"));
    assert!(body.contains("\"leader_id\":0"), "{body}");
    let (s, _, body) = call(
        &app,
        req(
            "DELETE",
            "/nx/admin/v1/tokens/nope",
            Some("admin-token"),
            b"",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body.contains("no token nope"));
    let (s, _, _) = call(
        &app,
        req(
            "POST",
            "/nx/admin/v1/nodes/x/drain",
            Some("admin-token"),
            b"",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn settings_are_read_and_changed_by_admins_with_plain_errors() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), "");
    let json = |method: &str, token: &str, body: &'static [u8]| {
        Request::builder()
            .method(method)
            .uri("/admin/v1/settings")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let (s, _, body) = call(&app, json("GET", "admin-token", b"")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("\"replication_factor\":1"), "{body}");
    let (s, _, _) = call(
        &app,
        json("PUT", "rw-token", br#"{"replication_factor":2}"#),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = call(
        &app,
        json("PUT", "admin-token", br#"{"replication_factor":2}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // Refused by the cluster, nothing to change, unknown fields: 400 with a message.
    for (body, says) in [
        (&br#"{"replication_factor":0}"#[..], "must be 1 to 7"),
        (&b"{}"[..], "Nothing to change"),
        (&br#"{"replicas":2}"#[..], "replication_factor"),
    ] {
        let (s, ctype, text) = call(&app, json("PUT", "admin-token", body)).await;
        assert_eq!((s, ctype.as_str()), (StatusCode::BAD_REQUEST, "text/plain"));
        assert!(text.contains(says), "{text}");
    }
}
