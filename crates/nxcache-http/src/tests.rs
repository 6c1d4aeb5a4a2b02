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
    app_with(dir, base_path, readiness, |_, _| {})
}

fn app_with(
    dir: &std::path::Path,
    base_path: &str,
    readiness: Readiness,
    adjust: impl FnOnce(&mut ApiConfig, &mut crate::UploadSlots),
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
    tokens.add("rw2", "rw2-token", Scope::ReadWrite);
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
    let mut config = ApiConfig {
        base_path: base_path.into(),
        max_artifact_size: 1000,
        put_success_status: StatusCode::OK,
        body_idle_timeout: Duration::from_secs(5),
        upload_pace: crate::UploadPace {
            min_rate: 1024,
            grace: Duration::from_secs(10),
            deadline: Duration::from_secs(600),
        },
        metrics_token: None,
        protocols: crate::ProtocolMounts::default(),
    };
    let mut uploads = crate::UploadSlots::new(64, 32);
    adjust(&mut config, &mut uploads);
    router(ApiState {
        data,
        auth: Arc::new(tokens),
        cluster: Arc::new(NoCluster),
        config: Arc::new(config),
        metrics: HttpMetrics::register(&registry).unwrap(),
        registry,
        readiness,
        uploads,
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
async fn readiness_answers_from_the_last_disk_check_without_touching_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let readiness = Readiness::default();
    let app = app_with_readiness(dir.path(), "", readiness.clone());
    readiness.set_disk(Err("Read-only file system (os error 30)".into()));
    let (s, ctype, body) = call(&app, req("GET", "/readyz", None, b"")).await;
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "text/plain")
    );
    assert!(body.contains("Read-only file system"), "{body}");
    readiness.set_disk(Ok(()));
    // Concurrent probes all see the same state (they used to race on one probe file).
    let probes = (0..64).map(|_| call(&app, req("GET", "/readyz", None, b"")));
    for (s, _, body) in futures_util::future::join_all(probes).await {
        assert_eq!((s, body.trim()), (StatusCode::OK, "ready"));
    }
    // No probe file was written by any of them.
    let tmp = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    assert_eq!(tmp, 0);
}

#[tokio::test]
async fn metrics_can_require_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(dir.path(), "", Readiness::default(), |c, _| {
        c.metrics_token = Some(nxcache_auth::Digest::of("scrape-token-of-the-test"));
    });
    let (s, ctype, body) = call(&app, req("GET", "/metrics", None, b"")).await;
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::UNAUTHORIZED, "text/plain")
    );
    assert!(body.contains("--metrics-token"), "{body}");
    let (s, _, _) = call(&app, req("GET", "/metrics", Some("rw-token"), b"")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, body) = call(
        &app,
        req("GET", "/metrics", Some("scrape-token-of-the-test"), b""),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("nxcache_http_requests_total"), "{body}");
    // Open when no token is configured.
    let other = tempfile::tempdir().unwrap();
    let open = self::app(other.path(), "");
    assert_eq!(
        call(&open, req("GET", "/metrics", None, b"")).await.0,
        StatusCode::OK
    );
}

/// A PUT of `len` bytes whose body is what `rx` yields, ending when its sender is dropped.
fn put_streamed(
    hash: &str,
    token: &str,
    len: usize,
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> Request<Body> {
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Request::builder()
        .method("PUT")
        .uri(format!("/v1/cache/{hash}"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(body))
        .unwrap()
}

fn metric_value(app_registry_page: &str, series: &str) -> f64 {
    app_registry_page
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_trickling_upload_is_cut_with_408_and_gives_back_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(dir.path(), "", Readiness::default(), |c, slots| {
        c.upload_pace = crate::UploadPace {
            min_rate: 1000,
            grace: Duration::from_millis(300),
            deadline: Duration::from_secs(600),
        };
        *slots = crate::UploadSlots::new(1, 1);
    });
    // 10 bytes, then one byte now and then: under 1000 bytes/s once the grace is over,
    // though never idle for the body idle timeout.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let trickle = tokio::spawn(async move {
        let _ = tx.send(bytes::Bytes::from_static(&[1; 10])).await;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send(bytes::Bytes::from_static(&[1])).await.is_err() {
                break;
            }
        }
    });
    let (s, ctype, body) = tokio::time::timeout(
        Duration::from_secs(30),
        call(&app, put_streamed("11", "rw-token", 900, rx)),
    )
    .await
    .expect("the trickling upload was never cut");
    trickle.abort();
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::REQUEST_TIMEOUT, "text/plain")
    );
    assert!(body.contains("--upload-min-rate"), "{body}");
    let (_, _, page) = call(&app, req("GET", "/metrics", None, b"")).await;
    assert_eq!(
        metric_value(
            &page,
            r#"nxcache_http_uploads_cut_total{reason="too_slow"}"#
        ),
        1.0
    );
    assert_eq!(metric_value(&page, "nxcache_http_uploads_in_progress"), 0.0);
    assert_eq!(metric_value(&page, "nxcache_store_reserved_bytes"), 0.0);
    // Its slot (the only one) is free again, and nothing was stored.
    assert_eq!(
        call(&app, req("PUT", "/v1/cache/12", Some("rw-token"), b"abc"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, req("GET", "/v1/cache/11", Some("rw-token"), b""))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn an_upload_past_its_deadline_is_cut_with_408() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(dir.path(), "", Readiness::default(), |c, _| {
        c.upload_pace = crate::UploadPace {
            min_rate: 0,
            grace: Duration::ZERO,
            deadline: Duration::from_millis(300),
        };
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bytes::Bytes::from_static(&[1; 10])).await.unwrap();
    let (s, _, body) = tokio::time::timeout(
        Duration::from_secs(30),
        call(&app, put_streamed("13", "rw-token", 900, rx)),
    )
    .await
    .expect("the upload was never cut at its deadline");
    drop(tx);
    assert_eq!(s, StatusCode::REQUEST_TIMEOUT);
    assert!(body.contains("--upload-deadline"), "{body}");
}

#[tokio::test]
async fn one_token_cannot_take_every_upload_slot() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(dir.path(), "", Readiness::default(), |_, slots| {
        *slots = crate::UploadSlots::new(3, 2);
    });
    // Two uploads in progress with one token: its share.
    let mut held = Vec::new();
    for hash in ["21", "22"] {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(bytes::Bytes::from_static(&[1; 10])).await.unwrap();
        let app = app.clone();
        held.push((
            tx,
            tokio::spawn(async move { call(&app, put_streamed(hash, "rw-token", 20, rx)).await }),
        ));
    }
    let page = || async { call(&app, req("GET", "/metrics", None, b"")).await.2 };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric_value(&page().await, "nxcache_http_uploads_in_progress") < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two uploads never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, ctype, body) = call(&app, req("PUT", "/v1/cache/23", Some("rw-token"), b"abc")).await;
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "text/plain")
    );
    assert!(body.contains("--max-uploads-per-token"), "{body}");
    // Another token still gets the slot left.
    let (s, _, _) = call(&app, req("PUT", "/v1/cache/24", Some("rw2-token"), b"abc")).await;
    assert_eq!(s, StatusCode::OK);
    let page = page().await;
    assert_eq!(
        metric_value(
            &page,
            r#"nxcache_http_uploads_refused_total{reason="token_limit"}"#
        ),
        1.0
    );
    // Once they finish, the token may upload again.
    for (tx, upload) in held {
        tx.send(bytes::Bytes::from_static(&[2; 10])).await.unwrap();
        drop(tx);
        assert_eq!(upload.await.unwrap().0, StatusCode::OK);
    }
    let (s, _, _) = call(&app, req("PUT", "/v1/cache/23", Some("rw-token"), b"abc")).await;
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
