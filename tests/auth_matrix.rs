//! Every way in, and the exact answer each gets, against a real node process: no token,
//! a malformed header, a wrong token, a read-only token on PUT, a revoked token, the
//! admin API without the admin scope, and inter-node gRPC calls without or with a wrong
//! cluster secret. Refusals of inter-node calls and every admin action are in the audit
//! log.

use std::time::Duration;

use nxcache_rpc::ClusterSecret;
use nxcache_rpc::pb::PingRequest;
use nxcache_rpc::pb::membership_client::MembershipClient;
use nxcache_tests::{
    ADMIN_TOKEN, CLUSTER_SECRET, PATIENCE, ProcessCluster, RO_TOKEN, RW_TOKEN, admin, metric,
    metrics_page, wait_until,
};

/// Status and `Content-Type` of a request to `url` with `authorization` (raw header).
async fn call(method: &str, url: &str, authorization: Option<&str>) -> (u16, String) {
    let client = nxcache_tests::http_client();
    let mut request = match method {
        "PUT" => client.put(url).body(vec![1u8; 100]),
        "POST" => client
            .post(url)
            .header("content-type", "application/json")
            .body(r#"{"name":"x","scope":"read"}"#),
        _ => client.get(url),
    };
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let ctype = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ctype)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_gets_exactly_its_documented_answer() {
    let cluster = ProcessCluster::start(1);
    let node = &cluster.nodes[0];
    let url = node.url.clone();
    let stored = format!("{url}/v1/cache/5550001");
    let absent = format!("{url}/v1/cache/5550002");
    let tokens = format!("{url}/admin/v1/tokens");
    let bearer = |t: &str| format!("Bearer {t}");
    assert_eq!(call("PUT", &stored, Some(&bearer(RW_TOKEN))).await.0, 200);

    let rw = bearer(RW_TOKEN);
    let ro = bearer(RO_TOKEN);
    let adm = bearer(ADMIN_TOKEN);
    let matrix: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("GET", &stored, None, 401),
        ("GET", &stored, Some("Basic dXNlcjpwYXNz"), 401),
        ("GET", &stored, Some("Bearer"), 401),
        ("GET", &stored, Some("bearer   "), 401),
        ("GET", &stored, Some("Bearer not-a-token"), 401),
        ("GET", &stored, Some(&ro), 200),
        ("GET", &absent, Some(&ro), 404),
        ("GET", &stored, Some(&rw), 200),
        ("PUT", &absent, None, 401),
        ("PUT", &absent, Some("Bearer not-a-token"), 401),
        ("PUT", &absent, Some(&ro), 403),
        ("PUT", &stored, Some(&rw), 409),
        ("GET", &tokens, None, 401),
        ("GET", &tokens, Some(&ro), 403),
        ("GET", &tokens, Some(&rw), 403),
        ("POST", &tokens, Some(&rw), 403),
        ("GET", &tokens, Some(&adm), 200),
    ];
    for (method, target, authorization, expected) in &matrix {
        let (status, ctype) = call(method, target, *authorization).await;
        assert_eq!(
            status, *expected,
            "{method} {target} with {authorization:?}"
        );
        if status >= 400 {
            assert_eq!(
                ctype, "text/plain",
                "{method} {target} with {authorization:?}"
            );
        }
    }
    // The read-only PUT stored nothing.
    assert_eq!(call("GET", &absent, Some(&rw)).await.0, 404);

    // A revoked token stops working on the node (through Raft, within a second).
    let (ok, out) = admin(
        &url,
        &[
            "tokens",
            "create",
            "--scope",
            "read-write",
            "--name",
            "temp",
            "--json",
        ],
    );
    assert!(ok, "{out}");
    let temp: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let temp = bearer(temp["token"].as_str().unwrap());
    assert_eq!(call("GET", &stored, Some(&temp)).await.0, 200);
    let (ok, out) = admin(&url, &["tokens", "revoke", "temp"]);
    assert!(ok, "{out}");
    let check = stored.clone();
    wait_until(PATIENCE, "the revoked token refused", || {
        let (check, temp) = (check.clone(), temp.clone());
        async move { call("GET", &check, Some(&temp)).await.0 == 401 }
    })
    .await;

    // Inter-node calls: without the secret, with a wrong one, with the right one.
    let channel =
        nxcache_tests::grpc_channel(&format!("127.0.0.1:{}", cluster.grpc_ports[0])).await;
    let refused = MembershipClient::new(channel.clone())
        .ping(PingRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("NXCACHE_CLUSTER_SECRET"));
    let wrong = ClusterSecret::new("a-wrong-cluster-secret-0000").unwrap();
    let refused = MembershipClient::with_interceptor(channel.clone(), wrong.client_interceptor())
        .ping(PingRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let right = ClusterSecret::new(CLUSTER_SECRET).unwrap();
    let answer = MembershipClient::with_interceptor(channel, right.client_interceptor())
        .ping(PingRequest {})
        .await
        .unwrap();
    assert_eq!(answer.get_ref().node_id, 1);
    let page = metrics_page(&url).await;
    for reason in ["missing", "wrong"] {
        assert_eq!(
            metric(
                &page,
                &format!("nxcache_cluster_rejected_calls_total{{reason=\"{reason}\"}}")
            ),
            Some(1.0),
            "{reason}"
        );
    }

    // The audit trail: both refusals and both admin actions, as structured lines.
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(&node.log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "audit")
        .collect();
    let actions: Vec<&str> = audit.iter().filter_map(|l| l["action"].as_str()).collect();
    for expected in ["token.create", "token.revoke"] {
        assert!(actions.contains(&expected), "{actions:?}");
    }
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "inter_node.refused")
            .count(),
        2,
        "{actions:?}"
    );
    assert!(
        audit
            .iter()
            .filter(|l| l["action"] == "inter_node.refused")
            .all(|l| l["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")))
    );
}

/// `nxcache serve` in `data_dir` with only `env` for its secrets (a lone node, fixed
/// ports so that a restart is the same member).
fn lone_node(
    data_dir: &std::path::Path,
    ports: (u16, u16),
    env: &[(&str, &str)],
) -> nxcache_tests::NodeProcess {
    let listen = format!("127.0.0.1:{}", ports.0);
    let grpc = format!("127.0.0.1:{}", ports.1);
    nxcache_tests::NodeProcess::start(
        data_dir,
        &[
            "--listen",
            &listen,
            "--grpc-listen",
            &grpc,
            "--advertise",
            &grpc,
        ],
        env,
    )
}

/// Waits until `token` gets `accepted` (a 404 for an absent key) or not (401).
async fn wait_token(url: &str, token: &str, accepted: bool, what: &str) {
    let target = format!("{url}/v1/cache/5550009");
    let bearer = format!("Bearer {token}");
    let expected = if accepted { 404 } else { 401 };
    wait_until(PATIENCE, what, || {
        let (target, bearer) = (target.clone(), bearer.clone());
        async move { call("GET", &target, Some(&bearer)).await.0 == expected }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_the_source_of_truth_for_environment_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let ports = (nxcache_tests::free_port(), nxcache_tests::free_port());

    // First start without tokens: a generated read-write token works.
    let mut node = lone_node(&data, ports, &[]);
    let generated = std::fs::read_to_string(data.join("generated-token")).unwrap();
    let generated = generated.trim().to_owned();
    wait_token(&node.url, &generated, true, "the generated token accepted").await;
    node.terminate();

    // Tokens configured: the generated token is revoked, the configured ones work.
    let (a, b) = (
        "env-token-a-0123456789abcdef",
        "env-token-b-0123456789abcdef",
    );
    let both = format!("{a},{b}");
    let start = |rw: &str| {
        let env = [
            ("NXCACHE_READ_WRITE_TOKENS", rw),
            ("NXCACHE_ADMIN_TOKENS", ADMIN_TOKEN),
        ];
        lone_node(&data, ports, &env)
    };
    let mut node = start(&both);
    wait_token(&node.url, a, true, "token a accepted").await;
    wait_token(&node.url, b, true, "token b accepted").await;
    wait_token(&node.url, &generated, false, "the generated token revoked").await;
    node.terminate();

    // b removed and a replaced by another value under the first position: both old
    // values are refused at the next start, the new one works.
    let c = "env-token-c-0123456789abcdef";
    let mut node = start(c);
    wait_token(&node.url, c, true, "token c accepted").await;
    wait_token(&node.url, a, false, "token a revoked").await;
    wait_token(&node.url, b, false, "token b revoked").await;
    wait_token(&node.url, ADMIN_TOKEN, true, "the admin token kept").await;
    // A token made through the admin API is not the environment's: it stays.
    let (ok, out) = admin(
        &node.url,
        &[
            "tokens", "create", "--scope", "read", "--name", "laptop", "--json",
        ],
    );
    assert!(ok, "{out}");
    let laptop: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let laptop = laptop["token"].as_str().unwrap().to_owned();
    // Names of the environment's form are kept for it.
    let (ok, out) = admin(
        &node.url,
        &[
            "tokens",
            "create",
            "--scope",
            "read",
            "--name",
            "read-write-7",
        ],
    );
    assert!(!ok && out.contains("choose another name"), "{out}");
    // Names say which list and which value, never the value.
    let (ok, list) = admin(&node.url, &["tokens", "list", "--json"]);
    assert!(ok, "{list}");
    let expected =
        nxcache_auth::env_token_name(nxcache_auth::Scope::ReadWrite, &nxcache_auth::Digest::of(c));
    assert!(list.contains(&expected), "{list}");
    assert!(!list.contains("generated") && !list.contains(c), "{list}");
    node.terminate();

    // Restarted with the same environment: everything stays as it was.
    let node = start(c);
    wait_token(&node.url, &laptop, true, "the admin-made token kept").await;
    wait_token(&node.url, c, true, "token c still accepted").await;
    wait_token(&node.url, a, false, "token a still revoked").await;
}

#[test]
fn a_node_refuses_the_shipped_placeholders_and_short_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for (variable, value) in [
        ("NXCACHE_READ_WRITE_TOKENS", "change-me-read-write-token"),
        ("NXCACHE_ADMIN_TOKENS", "short-token"),
        (
            "NXCACHE_CLUSTER_SECRET",
            "change-me-to-a-long-random-cluster-secret",
        ),
    ] {
        let out = std::process::Command::new(nxcache_tests::nxcache_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("NXCACHE_READ_WRITE_TOKENS")
            .env_remove("NXCACHE_ADMIN_TOKENS")
            .env_remove("NXCACHE_CLUSTER_SECRET")
            .env(variable, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{variable}: started");
        assert!(
            stderr.contains(variable) && stderr.contains("openssl rand -hex 32"),
            "{variable}: {stderr}"
        );
        assert!(!stderr.contains(value), "the value is not echoed: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_address_without_holding_back_valid_tokens() {
    let cluster = ProcessCluster::start(1);
    let node = &cluster.nodes[0];
    let url = format!("{}/v1/cache/5550020", node.url);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let wrong = "Bearer a-guessed-token-0000000000";
    // The first failures are answered 401; then the address gets 429 with Retry-After.
    let mut answers = Vec::new();
    for _ in 0..60 {
        let response = client
            .get(&url)
            .header("authorization", wrong)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 429 {
            let retry: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
            assert_eq!(response.headers()["content-type"], "text/plain");
            let text = response.text().await.unwrap();
            assert!(text.contains("valid token"), "{text}");
        }
        answers.push(status);
        // A valid token from the same address is answered as usual all along.
        let valid = client
            .get(&url)
            .header("authorization", format!("Bearer {RW_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(valid.status().as_u16(), 404);
    }
    let failed = answers.iter().filter(|s| **s == 401).count();
    let throttled = answers.iter().filter(|s| **s == 429).count();
    assert_eq!(failed + throttled, 60, "{answers:?}");
    assert!(
        (20..=30).contains(&failed) && answers[..20].iter().all(|s| *s == 401),
        "{answers:?}"
    );
    // A request without any token is throttled too.
    let bare = client.get(&url).send().await.unwrap();
    assert_eq!(bare.status().as_u16(), 429);

    let page = metrics_page(&node.url).await;
    assert_eq!(
        metric(&page, "nxcache_http_auth_failures_total"),
        Some(failed as f64)
    );
    assert_eq!(
        metric(&page, "nxcache_http_auth_throttled_total"),
        Some(throttled as f64 + 1.0)
    );
    // The audit lines of the failures: the first 20 at once, then 5 a second; the ones
    // left out are counted, so lines written and lines left out add up to the failures.
    let audit = log_lines_of(&node.log, "auth.failed");
    let written = audit.len() as f64;
    let left_out = metric(
        &page,
        "nxcache_audit_lines_suppressed_total{source=\"http_auth\"}",
    )
    .unwrap_or(0.0);
    assert!(written >= 20.0, "{written}");
    assert_eq!(written + left_out, failed as f64);
    assert!(
        audit.iter().all(|l| l["client"] == "127.0.0.1"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_inter_node_calls_writes_few_audit_lines() {
    let cluster = ProcessCluster::start(1);
    let node = &cluster.nodes[0];
    let grpc = format!("http://127.0.0.1:{}", cluster.grpc_ports[0]);
    let channel = tonic::transport::Endpoint::from_shared(grpc)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    for _ in 0..200 {
        let refused = MembershipClient::new(channel.clone())
            .ping(PingRequest {})
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    let page = metrics_page(&node.url).await;
    let left_out = metric(
        &page,
        "nxcache_audit_lines_suppressed_total{source=\"inter_node\"}",
    )
    .unwrap();
    let lines = log_lines_of(&node.log, "inter_node.refused");
    assert_eq!(lines.len() as f64 + left_out, 200.0);
    assert!(left_out > 0.0, "a flood is cut down");
    // The lines written after some were left out say how many.
    let reported: u64 = lines.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
    assert!(reported <= left_out as u64);
}

/// The JSON log lines of `log` with `action`.
fn log_lines_of(log: &std::path::Path, action: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["action"] == action)
        .collect()
}
