//! The real Nx CLI (both bundled versions) against a real `nxcache serve` process.
//!
//! Needs `node` and the bundled clients in `../shared/nx-client` (or
//! `NXCACHE_NX_CLIENT_DIR`), so these tests are `#[ignore]`d in the plain `cargo test` and
//! run by `.ci/run` with `--ignored`.

use std::path::Path;

use nxcache_tests::nx::{PROJECTS, Workspace, nx_node_modules, restored_from_remote};
use nxcache_tests::{NodeProcess, RO_TOKEN, RW_TOKEN, metric_sum, metrics_page};

fn serve(dir: &Path, extra: &[&str]) -> NodeProcess {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    NodeProcess::start(
        &dir.join("data"),
        &args,
        &[
            ("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN),
            ("NXCACHE_READ_ONLY_TOKENS", RO_TOKEN),
        ],
    )
}

/// The sum of the samples of the family `name` with `labels` (0 when none has them; a
/// failure when the family is missing, so a renamed metric cannot read as 0).
async fn count(url: &str, name: &str, labels: &[&str]) -> f64 {
    metric_sum(&metrics_page(url).await, name, labels)
}

const REQUESTS: &str = "nxcache_http_requests_total";
const PUT_200: &[&str] = &[r#"method="PUT""#, r#"route="cache""#, r#"status="200""#];
const PUT_403: &[&str] = &[r#"method="PUT""#, r#"route="cache""#, r#"status="403""#];

/// The contract as Nx sees it, against the node at `url` (its tokens: the test ones).
async fn contract_with_real_nx(version: &str, url: &str) {
    let modules = nx_node_modules(version);
    let node = Server {
        url: url.to_owned(),
    };
    let ws = Workspace::new(&modules);

    // Run 1 builds and uploads each artifact exactly once.
    let first = ws.nx(&node.url, RW_TOKEN, &[]);
    assert!(first.success, "run 1 failed");
    assert_eq!(
        count(&node.url, REQUESTS, PUT_200).await,
        PROJECTS.len() as f64
    );
    let built = ws.outputs();

    // Run 2, local cache gone: every task restored from nxcache, byte-identical.
    ws.clear_local();
    let second = ws.nx(&node.url, RW_TOKEN, &[]);
    assert!(second.success, "run 2 failed");
    assert_eq!(
        restored_from_remote(&second),
        PROJECTS.len(),
        "not all restored remotely"
    );
    assert!(
        ws.outputs() == built,
        "restored outputs differ from the built ones"
    );
    assert_eq!(
        count(&node.url, REQUESTS, PUT_200).await,
        PROJECTS.len() as f64,
        "Nx uploaded an artifact again"
    );

    // A read-only token: Nx succeeds, builds what changed, and nothing is stored.
    std::fs::write(
        ws.root().join("libs/beta/index.js"),
        "module.exports = 'beta v2';\n",
    )
    .unwrap();
    ws.clear_local();
    let objects_before = count(&node.url, "nxcache_store_objects", &[]).await;
    let read_only = ws.nx(&node.url, RO_TOKEN, &[]);
    assert!(
        read_only.success,
        "a read-only token must not fail the build"
    );
    assert_eq!(restored_from_remote(&read_only), PROJECTS.len() - 1);
    assert_eq!(count(&node.url, REQUESTS, PUT_403).await, 1.0);
    assert_eq!(
        count(&node.url, "nxcache_store_objects", &[]).await,
        objects_before
    );

    // A wrong token: Nx stops and shows the server's own message.
    ws.clear_local();
    let wrong = ws.nx(&node.url, "not-the-token", &[]);
    assert!(!wrong.success, "a wrong token must stop the run");
    assert!(
        wrong.output.contains("not valid for this nxcache server"),
        "Nx did not show the server's 401 message"
    );
}

async fn tls_and_base_path_with_real_nx(version: &str) {
    let modules = nx_node_modules(version);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = nxcache_tests::self_signed_cert(dir.path());
    let node = serve(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--base-path",
            "/nx",
        ],
    );
    assert!(
        node.url.starts_with("https://") && node.url.ends_with("/nx"),
        "{}",
        node.url
    );
    let ws = Workspace::new(&modules);
    // Nx ignores NODE_EXTRA_CA_CERTS (nrwl/nx #32234); a self-signed test certificate
    // needs verification off.
    let insecure = [("NODE_TLS_REJECT_UNAUTHORIZED", "0")];
    // A trailing slash on the base URL is normalised by Nx.
    let url = format!("{}/", node.url);
    assert!(
        ws.nx(&url, RW_TOKEN, &insecure).success,
        "run 1 over TLS failed"
    );
    let built = ws.outputs();
    ws.clear_local();
    let second = ws.nx(&url, RW_TOKEN, &insecure);
    assert!(second.success, "run 2 over TLS failed");
    assert_eq!(restored_from_remote(&second), PROJECTS.len());
    assert!(ws.outputs() == built);
}

struct Server {
    url: String,
}

#[tokio::test]
#[ignore = "needs node and the bundled Nx CLI; run by .ci/run"]
async fn nx_24_uses_nxcache_as_its_remote_cache() {
    let dir = tempfile::tempdir().unwrap();
    let node = serve(dir.path(), &[]);
    contract_with_real_nx("24.0.6", &node.url).await;
}

#[tokio::test]
#[ignore = "needs node and the bundled Nx CLI; run by .ci/run"]
async fn nx_20_uses_nxcache_as_its_remote_cache() {
    let dir = tempfile::tempdir().unwrap();
    let node = serve(dir.path(), &[]);
    contract_with_real_nx("20.8.2", &node.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node and the bundled Nx CLI; run by .ci/run"]
async fn nx_24_through_one_node_of_a_three_node_cluster() {
    let mut cluster = nxcache_tests::ProcessCluster::start(3);
    let first = cluster.nodes[0].url.clone();
    nxcache_tests::wait_until(nxcache_tests::PATIENCE, "cluster formed", || {
        let url = first.clone();
        async move {
            nxcache_tests::admin_status(&url).is_some_and(|s| {
                s["leader_id"].as_u64().is_some()
                    && s["members"].as_array().is_some_and(|m| m.len() == 3)
            })
        }
    })
    .await;
    // The contract, tokens included (replicated through Raft), holds on any node.
    contract_with_real_nx("24.0.6", &cluster.nodes[1].url).await;

    // Written through node 1, restored through node 3 (which reads from its peers).
    let ws = Workspace::new(&nx_node_modules("24.0.6"));
    assert!(
        ws.nx(&cluster.nodes[0].url, RW_TOKEN, &[]).success,
        "run 1 through node 1 failed"
    );
    let built = ws.outputs();
    ws.clear_local();
    let second = ws.nx(&cluster.nodes[2].url, RW_TOKEN, &[]);
    assert!(second.success, "run 2 through node 3 failed");
    assert_eq!(restored_from_remote(&second), PROJECTS.len());
    assert!(
        ws.outputs() == built,
        "outputs restored through node 3 differ"
    );

    // One node dies: a survivor still restores every task (each artifact has replicas).
    cluster.nodes[0].kill9();
    ws.clear_local();
    let third = ws.nx(&cluster.nodes[1].url, RW_TOKEN, &[]);
    assert!(third.success, "run 3 after a node was killed failed");
    assert_eq!(restored_from_remote(&third), PROJECTS.len());
    assert!(
        ws.outputs() == built,
        "outputs restored after the kill differ"
    );
}

#[tokio::test]
#[ignore = "needs node, openssl and the bundled Nx CLI; run by .ci/run"]
async fn nx_24_over_tls_behind_a_base_path() {
    tls_and_base_path_with_real_nx("24.0.6").await;
}

#[tokio::test]
#[ignore = "needs node, openssl and the bundled Nx CLI; run by .ci/run"]
async fn nx_20_over_tls_behind_a_base_path() {
    tls_and_base_path_with_real_nx("20.8.2").await;
}
