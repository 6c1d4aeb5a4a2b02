//! The HTTP contract of one node over real TCP: every status code of DESIGN §1, the exact
//! `Content-Type` of error answers, framing errors that must store nothing, and the
//! protections against slow clients.

use std::time::Duration;

use nxcache::RunningNode;
use nxcache_tests::{
    PATIENCE, RO_TOKEN, RW_TOKEN, metric, metrics_page, random_bytes, test_config,
};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Node {
    node: Option<RunningNode>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut nxcache_config::ServeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let node = nxcache::start(config).await.unwrap();
        let url = node.base_url();
        Node {
            node: Some(node),
            url,
            _dir: dir,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.node.as_ref().unwrap().http_addr()
    }

    fn cache(&self, hash: &str) -> String {
        format!("{}/v1/cache/{hash}", self.url)
    }

    async fn put(
        &self,
        hash: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, String, String) {
        let mut req = nxcache_tests::http_client()
            .put(self.cache(hash))
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        answer(req.send().await.unwrap()).await
    }

    async fn get(&self, hash: &str, token: Option<&str>) -> (StatusCode, String, Vec<u8>) {
        let mut req = nxcache_tests::http_client().get(self.cache(hash));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let ctype = content_type(&resp);
        (status, ctype, resp.bytes().await.unwrap().to_vec())
    }

    async fn raw(&self, request: &[u8]) -> String {
        let mut s = TcpStream::connect(self.addr()).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn stop(mut self) {
        self.node.take().unwrap().shutdown().await.unwrap();
    }
}

fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn answer(resp: reqwest::Response) -> (StatusCode, String, String) {
    let status = resp.status();
    let ctype = content_type(&resp);
    (status, ctype, resp.text().await.unwrap())
}

#[tokio::test]
async fn put_then_get_returns_the_same_bytes_and_head_is_cheap() {
    let node = Node::start().await;
    let body = random_bytes(3 * 1024 * 1024 + 5);
    let (status, _, _) = node
        .put("13661868522198395722", Some(RW_TOKEN), body.clone())
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the Nx CLI counts only 200 as stored"
    );
    let (status, ctype, got) = node.get("13661868522198395722", Some(RO_TOKEN)).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::OK, "application/octet-stream")
    );
    assert!(got == body, "bytes differ");

    let head = nxcache_tests::http_client()
        .head(node.cache("13661868522198395722"))
        .bearer_auth(RO_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        body.len().to_string().as_str()
    );
    let head_missing = nxcache_tests::http_client()
        .head(node.cache("404"))
        .bearer_auth(RO_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(head_missing.status(), StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn entries_are_never_overwritten() {
    let node = Node::start().await;
    assert_eq!(
        node.put("1", Some(RW_TOKEN), b"first".to_vec()).await.0,
        StatusCode::OK
    );
    let (status, ctype, message) = node.put("1", Some(RW_TOKEN), b"second".to_vec()).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::CONFLICT, "text/plain")
    );
    assert!(message.contains("already stored"), "{message}");
    assert_eq!(node.get("1", Some(RW_TOKEN)).await.2, b"first");
    node.stop().await;
}

#[tokio::test]
async fn a_missing_artifact_is_404() {
    let node = Node::start().await;
    let (status, ctype, _) = node.get("42", Some(RW_TOKEN)).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::NOT_FOUND, "text/plain")
    );
    node.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_with_actionable_plain_text_messages() {
    let node = Node::start().await;
    node.put("7", Some(RW_TOKEN), b"x".to_vec()).await;

    // No token, on both routes.
    let (status, ctype, msg) = node.put("8", None, b"x".to_vec()).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::UNAUTHORIZED, "text/plain")
    );
    assert!(
        msg.contains("NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN"),
        "{msg}"
    );
    let (status, ctype, _) = node.get("7", None).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::UNAUTHORIZED, "text/plain")
    );

    // A wrong token.
    let (status, ctype, msg) = node.put("8", Some("not-a-token"), b"x".to_vec()).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::UNAUTHORIZED, "text/plain")
    );
    assert!(msg.contains("not valid"), "{msg}");
    assert_eq!(
        node.get("7", Some("not-a-token")).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Not a bearer header.
    let resp = nxcache_tests::http_client()
        .get(node.cache("7"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(content_type(&resp), "text/plain");

    // A read-only token may read but not write; nothing is stored.
    let (status, ctype, msg) = node.put("9", Some(RO_TOKEN), b"x".to_vec()).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::FORBIDDEN, "text/plain")
    );
    assert!(msg.contains("read-write token"), "{msg}");
    assert_eq!(node.get("9", Some(RW_TOKEN)).await.0, StatusCode::NOT_FOUND);
    assert_eq!(node.get("7", Some(RO_TOKEN)).await.0, StatusCode::OK);
    node.stop().await;
}

#[tokio::test]
async fn malformed_hashes_are_rejected_before_any_file_access() {
    let node = Node::start().await;
    let too_long = "1".repeat(129);
    for hash in [
        too_long.as_str(),
        "abc.def",
        "a%2Fb",
        "a%00b",
        "a%5Cb",
        "caf%C3%A9",
    ] {
        let (status, ctype, msg) = node.put(hash, Some(RW_TOKEN), b"x".to_vec()).await;
        assert_eq!(
            (status, ctype.as_str()),
            (StatusCode::BAD_REQUEST, "text/plain"),
            "{hash}"
        );
        assert!(msg.contains("hash"), "{msg}");
        assert_eq!(
            node.get(hash, Some(RW_TOKEN)).await.0,
            StatusCode::BAD_REQUEST,
            "{hash}"
        );
    }
    // Dot segments, which HTTP client libraries would normalise away.
    for hash in ["..", "%2E%2E", ".%2e"] {
        let answer = node
            .raw(format!("GET /v1/cache/{hash} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{hash}: {answer}");
    }
    // A hash of exactly 128 characters is fine.
    let longest = "a".repeat(128);
    assert_eq!(
        node.put(&longest, Some(RW_TOKEN), b"x".to_vec()).await.0,
        StatusCode::OK
    );
    node.stop().await;
}

#[tokio::test]
async fn an_upload_without_content_length_is_411() {
    let node = Node::start().await;
    let answer = node
        .raw(format!(
            "PUT /v1/cache/5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ).as_bytes())
        .await;
    assert!(answer.starts_with("HTTP/1.1 411"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: text/plain\r\n"),
        "{answer}"
    );
    assert_eq!(node.get("5", Some(RW_TOKEN)).await.0, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn an_oversized_upload_is_413_before_its_body_is_read() {
    let node = Node::start_with(|c| c.max_artifact_size = 1000).await;
    // Only the headers are sent: the answer must not wait for 10 GB of body.
    let answer = node
        .raw(format!(
            "PUT /v1/cache/6 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: 10000000000\r\n\r\n"
        ).as_bytes())
        .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("at most 1000 bytes"), "{answer}");
    assert_eq!(
        node.put("6", Some(RW_TOKEN), vec![0; 1001]).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        node.put("6", Some(RW_TOKEN), vec![0; 1000]).await.0,
        StatusCode::OK
    );
    node.stop().await;
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_stores_nothing() {
    let node = Node::start().await;
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    s.write_all(format!(
        "PUT /v1/cache/77 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: 100\r\n\r\n"
    ).as_bytes()).await.unwrap();
    s.write_all(&[7u8; 60]).await.unwrap();
    s.shutdown().await.unwrap(); // the client gives up: 40 bytes never come
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    nxcache_tests::wait_until(PATIENCE, "the aborted upload is cleaned up", || async {
        metric(
            &metrics_page(&node.url).await,
            "nxcache_store_reserved_bytes",
        ) == Some(0.0)
    })
    .await;
    assert_eq!(
        node.get("77", Some(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );
    let page = metrics_page(&node.url).await;
    assert_eq!(metric(&page, "nxcache_store_objects"), Some(0.0));
    node.stop().await;
}

#[tokio::test]
async fn bytes_beyond_content_length_are_not_part_of_the_artifact() {
    // In HTTP/1.1, bytes after Content-Length are the next request on the connection:
    // the artifact holds exactly what was announced, and the rest is refused as a
    // malformed request.
    let node = Node::start().await;
    let answer = node
        .raw(format!(
            "PUT /v1/cache/78 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: 5\r\n\r\nhelloEXTRA-BYTES-THAT-ARE-NO-REQUEST\r\n\r\n"
        ).as_bytes())
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("HTTP/1.1 400"),
        "the trailing bytes must be refused: {answer}"
    );
    assert_eq!(node.get("78", Some(RW_TOKEN)).await.2, b"hello");
    node.stop().await;
}

#[tokio::test]
async fn a_stalled_upload_times_out_and_stores_nothing() {
    let node = Node::start_with(|c| c.body_idle_timeout = Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    s.write_all(format!(
        "PUT /v1/cache/79 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: 100\r\n\r\n"
    ).as_bytes()).await.unwrap();
    s.write_all(&[1u8; 10]).await.unwrap();
    // Keep the connection open and silent: the server must answer on its own.
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut out))
        .await
        .expect("the server must time the upload out")
        .unwrap();
    let out = String::from_utf8_lossy(&out[..n]);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(
        node.get("79", Some(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );
    node.stop().await;
}

#[tokio::test]
async fn a_client_dribbling_headers_is_disconnected() {
    let node = Node::start_with(|c| c.header_timeout = Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(node.addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection must be closed by the server");
    // Normal clients are unaffected.
    assert_eq!(
        nxcache_tests::http_client()
            .get(format!("{}/healthz", node.url))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    node.stop().await;
}

#[tokio::test]
async fn an_artifact_larger_than_the_whole_budget_is_413() {
    let node = Node::start_with(|c| {
        c.max_disk_usage = 1000;
        c.max_artifact_size = 5000;
    })
    .await;
    // It can never fit: refused on its Content-Length, like one over --max-artifact-size.
    let (status, ctype, msg) = node.put("1", Some(RW_TOKEN), vec![0; 2000]).await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "text/plain")
    );
    assert!(msg.contains("--max-disk-usage"), "{msg}");
    assert_eq!(node.get("1", Some(RW_TOKEN)).await.0, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn concurrent_puts_of_one_hash_have_one_winner_and_no_mixed_bytes() {
    let node = Node::start().await;
    let bodies: Vec<Vec<u8>> = (0..8).map(|_| random_bytes(512 * 1024)).collect();
    let client = nxcache_tests::http_client();
    let tasks: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|body| {
            let req = client
                .put(node.cache("31337"))
                .bearer_auth(RW_TOKEN)
                .body(body);
            tokio::spawn(async move { req.send().await.unwrap().status() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        7,
        "{statuses:?}"
    );
    let stored = node.get("31337", Some(RW_TOKEN)).await.2;
    assert!(
        bodies.contains(&stored),
        "stored bytes are not one of the uploads"
    );
    node.stop().await;
}

#[tokio::test]
async fn put_success_status_can_be_202_for_strict_spec_clients() {
    let node = Node::start_with(|c| c.put_success_status = 202).await;
    assert_eq!(
        node.put("1", Some(RW_TOKEN), b"x".to_vec()).await.0,
        StatusCode::ACCEPTED
    );
    node.stop().await;
}

#[tokio::test]
async fn the_api_can_live_under_a_base_path() {
    let node = Node::start_with(|c| c.base_path = "/nx".into()).await;
    assert!(node.url.ends_with("/nx"), "{}", node.url);
    assert_eq!(
        node.put("1", Some(RW_TOKEN), b"x".to_vec()).await.0,
        StatusCode::OK
    );
    let root = node.url.trim_end_matches("/nx");
    let resp = nxcache_tests::http_client()
        .get(format!("{root}/v1/cache/1"))
        .bearer_auth(RW_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn metrics_report_traffic_hits_misses_and_storage() {
    let node = Node::start().await;
    node.put("1", Some(RW_TOKEN), vec![1; 1000]).await;
    node.get("1", Some(RW_TOKEN)).await;
    node.get("2", Some(RW_TOKEN)).await;
    let page = metrics_page(&node.url).await;
    let m = |s: &str| metric(&page, s).unwrap_or_else(|| panic!("{s} missing in\n{page}"));
    assert_eq!(
        m(r#"nxcache_http_requests_total{method="PUT",route="cache",status="200"}"#),
        1.0
    );
    assert_eq!(
        m(r#"nxcache_http_requests_total{method="GET",route="cache",status="404"}"#),
        1.0
    );
    assert_eq!(m("nxcache_cache_hits_total"), 1.0);
    assert_eq!(m("nxcache_cache_misses_total"), 1.0);
    assert_eq!(m("nxcache_http_received_bytes_total"), 1000.0);
    assert_eq!(m("nxcache_http_sent_bytes_total"), 1000.0);
    assert_eq!(m("nxcache_store_stored_bytes"), 1000.0);
    assert_eq!(m("nxcache_store_objects"), 1.0);
    assert!(m(r#"nxcache_http_request_duration_seconds_count{method="PUT",route="cache"}"#) >= 1.0);
    assert!(page.contains("process_resident_memory_bytes"));
    node.stop().await;
}

#[tokio::test]
async fn health_endpoints_answer_plain_text() {
    let node = Node::start().await;
    for path in ["/healthz", "/readyz"] {
        let resp = nxcache_tests::http_client()
            .get(format!("{}{path}", node.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(content_type(&resp), "text/plain");
    }
    node.stop().await;
}

/// One admin API request to `node_url`; `body`, if any, is sent as JSON.
async fn admin_request(
    node_url: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> reqwest::Response {
    let mut request = nxcache_tests::http_client()
        .request(method, format!("{node_url}/admin/v1/{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_admin_api_manages_tokens_and_reports_status() {
    use reqwest::Method;
    let node = Node::start().await;
    let admin = nxcache_tests::ADMIN_TOKEN;
    let call = |method: Method, path: &'static str, token: &'static str| {
        admin_request(&node.url, method, path, token, None)
    };
    let create = |name: &'static str, scope: &'static str| {
        admin_request(
            &node.url,
            Method::POST,
            "tokens",
            admin,
            Some(serde_json::json!({"name": name, "scope": scope})),
        )
    };

    let status: serde_json::Value = call(Method::GET, "status", admin)
        .await
        .json()
        .await
        .unwrap();
    assert!(status["leader_id"].is_u64(), "{status}");
    assert!(status["ring_epoch"].as_u64().unwrap() >= 1);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["state"], "active");
    assert_eq!(members[0]["reachable"], true);

    // Create: 201 with the secret once; the secret works on the cache API.
    let created = create("laptop", "read").await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let secret = created.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(node.get("1", Some(&secret)).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        node.put("1", Some(&secret), b"x".to_vec()).await.0,
        StatusCode::FORBIDDEN
    );

    // A duplicate name, a bad scope, a bad name.
    assert_eq!(
        create("laptop", "read").await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(create("x", "root").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        create("a/b", "read").await.status(),
        StatusCode::BAD_REQUEST
    );

    // Listed by name and scope, never with a secret.
    let list = call(Method::GET, "tokens", admin)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        list.contains("\"laptop\"")
            && list.contains(&format!(
                "\"{}\"",
                nxcache_auth::env_token_name(
                    nxcache_auth::Scope::ReadWrite,
                    &nxcache_auth::Digest::of(RW_TOKEN)
                )
            )),
        "{list}"
    );
    assert!(!list.contains(&secret) && !list.contains(RW_TOKEN));

    // Revoked: refused at once on this node.
    let revoked = call(Method::DELETE, "tokens/laptop", admin).await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        node.get("1", Some(&secret)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let again = call(Method::DELETE, "tokens/laptop", admin).await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    // Non-admin tokens are refused.
    let denied = call(Method::GET, "status", RW_TOKEN).await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    node.stop().await;
}

#[tokio::test]
async fn uploads_beyond_the_limit_get_503_with_retry_after_and_store_nothing() {
    let node = Node::start_with(|c| c.max_concurrent_uploads = 1).await;
    // One upload in progress: headers and part of its body, then silence.
    let mut slow = TcpStream::connect(node.addr()).await.unwrap();
    slow.write_all(format!(
        "PUT /v1/cache/811 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: 20\r\n\r\n0123456789"
    ).as_bytes()).await.unwrap();

    // Once the server is inside that upload (in flight: it and the metrics request
    // asking), another upload is refused.
    let url = node.url.clone();
    nxcache_tests::wait_until(PATIENCE, "the slow upload in flight", || {
        let url = url.clone();
        async move {
            let page = nxcache_tests::metrics_page(&url).await;
            nxcache_tests::metric(&page, "nxcache_http_requests_in_flight") == Some(2.0)
        }
    })
    .await;
    let refused = nxcache_tests::http_client()
        .put(node.cache("812"))
        .bearer_auth(RW_TOKEN)
        .body(&b"other"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    let (status, ctype, message) = answer(refused).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ctype, "text/plain");
    assert!(message.contains("--max-concurrent-uploads"), "{message}");

    // The slow upload completes; then uploads are taken again.
    slow.write_all(b"abcdefghij").await.unwrap();
    let mut out = vec![0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, slow.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        node.get("812", Some(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.put("812", Some(RW_TOKEN), b"other".to_vec()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        node.get("811", Some(RW_TOKEN)).await.2,
        b"0123456789abcdefghij"
    );
    node.stop().await;
}

/// `n` sequential PUT+GET round trips of 4 KiB, each answered in full; panics on any
/// failure (every request gives up after the shared client's timeout).
async fn round_trips(node: &Node, prefix: u64, n: u64) {
    let client = nxcache_tests::http_client();
    for i in 0..n {
        let hash = (prefix + i).to_string();
        let put = client
            .put(node.cache(&hash))
            .bearer_auth(RW_TOKEN)
            .body(vec![7u8; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK);
        let get = client
            .get(node.cache(&hash))
            .bearer_auth(RW_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::OK);
        assert_eq!(get.bytes().await.unwrap().len(), 4096);
    }
}

/// The behaviour only: with 500 connections held open, every normal request is still
/// answered (no connection slot or worker is taken by them). What they cost in latency is
/// measured by tests/bench/idle-connections.sh, not asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_idle_or_trickling_connections_do_not_block_normal_requests() {
    let node = Node::start().await;
    round_trips(&node, 9_100_000, 20).await;

    // 250 connections that send nothing, 250 that trickle a request's headers a byte at
    // a time (slowloris).
    let mut held = Vec::new();
    for i in 0..500 {
        let mut s = TcpStream::connect(node.addr()).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /v1/cache/1 HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        held.push(s);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            for s in held.iter_mut().skip(1).step_by(2) {
                let _ = s.write_all(b"s").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        held
    });
    round_trips(&node, 9_200_000, 100).await;
    // Held until the node stops: every round trip above ran beside all 500.
    let held = trickle.await.unwrap();
    drop(held);
    node.stop().await;
}
