//! Every way in, and the exact answer each gets, against a real node process: no token,
//! a malformed header, a wrong token, a read-only token on PUT, a revoked token, the
//! admin API without the admin scope, and inter-node gRPC calls without or with a wrong
//! cluster secret. Refusals of inter-node calls and every admin action are in the audit
//! log.

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
