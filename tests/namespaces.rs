//! Namespaces close the cache-poisoning hole (CVE-2025-36852, "CREEP"): a pull-request
//! token writes only into its own namespace and reads its own, then `main`; what it
//! uploads is never what a `main` build restores. On a three-node cluster, so namespaced
//! keys also travel between nodes.

use nxcache_tests::{InProcessCluster, RW_TOKEN, admin, create_token as create};

async fn put(url: &str, token: &str, hash: &str, body: &[u8]) -> u16 {
    nxcache_tests::http_client()
        .put(format!("{url}/v1/cache/{hash}"))
        .bearer_auth(token)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn get(url: &str, token: &str, hash: &str) -> (u16, Vec<u8>) {
    let response = nxcache_tests::http_client()
        .get(format!("{url}/v1/cache/{hash}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_token_can_never_poison_what_main_restores() {
    let cluster = InProcessCluster::start(3, &[]).await;
    cluster.wait_members(3).await;
    let (a, c) = (cluster.url(0), cluster.url(2));
    let main = create(
        &a,
        &[
            "--scope",
            "read-write",
            "--name",
            "ci-main",
            "--namespace",
            "main",
        ],
    );
    let pr = create(
        &a,
        &[
            "--scope",
            "read-write",
            "--name",
            "ci-pr-42",
            "--namespace",
            "pr-42",
            "--read-from",
            "main",
        ],
    );

    // main builds and uploads; the pull request restores it (through another node).
    assert_eq!(put(&a, &main, "1001", b"built by main").await, 200);
    assert_eq!(get(&c, &pr, "1001").await, (200, b"built by main".to_vec()));

    // The pull request uploads under a hash main will ask for, and under one main has.
    assert_eq!(put(&c, &pr, "1002", b"poison").await, 200);
    assert_eq!(put(&c, &pr, "1001", b"poison").await, 200);
    // main never sees either: its artifact is intact, the other is a miss.
    assert_eq!(
        get(&a, &main, "1001").await,
        (200, b"built by main".to_vec())
    );
    assert_eq!(get(&c, &main, "1002").await.0, 404);
    // The pull request reads its own namespace first.
    assert_eq!(get(&a, &pr, "1001").await, (200, b"poison".to_vec()));
    // main's namespace stays immutable: a second upload there is a conflict.
    assert_eq!(put(&a, &main, "1001", b"again").await, 409);

    // Tokens without a namespace (the environment's) live in the default namespace.
    assert_eq!(get(&a, RW_TOKEN, "1001").await.0, 404);
    assert_eq!(put(&a, RW_TOKEN, "1001", b"default").await, 200);
    assert_eq!(
        get(&a, &main, "1001").await,
        (200, b"built by main".to_vec())
    );

    // No client can name another namespace's key directly.
    for path in ["main.1001", "pr-42.1002", "main%2E1001"] {
        assert_eq!(get(&a, &pr, path).await.0, 400, "{path}");
        assert_eq!(put(&a, &pr, path, b"x").await, 400, "{path}");
    }

    // A bad namespace is refused when the token is made.
    let (ok, out) = admin(
        &a,
        &[
            "tokens",
            "create",
            "--scope",
            "read",
            "--name",
            "bad",
            "--namespace",
            "Main/../x",
        ],
    );
    assert!(!ok && out.contains("Namespace"), "{out}");
    let (ok, out) = admin(&a, &["tokens", "list", "--json"]);
    assert!(ok);
    let tokens: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap();
    let pr_view = tokens.iter().find(|t| t["name"] == "ci-pr-42").unwrap();
    assert_eq!(pr_view["namespace"], "pr-42");
    assert_eq!(pr_view["read_from"], serde_json::json!(["main"]));
}
