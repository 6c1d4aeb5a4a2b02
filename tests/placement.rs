//! Where copies go and when a write is acknowledged, with whole nodes in this test
//! process: `--zone` spreads each artifact's copies over zones; `--write-quorum` 1 and 3
//! under both `--on-degraded` policies.

use std::collections::BTreeSet;

use nxcache_store::BlobKey;
use nxcache_tests::{
    InProcessCluster, PATIENCE, RW_TOKEN, get, http_client, metric_sum, metrics_page, put,
    random_bytes, wait_until,
};

/// Which running nodes hold `hash` in their own store.
fn holders(cluster: &InProcessCluster, hash: &str) -> Vec<usize> {
    let key = BlobKey::parse(hash).unwrap();
    (0..cluster.nodes.len())
        .filter(|i| {
            cluster.nodes[*i]
                .as_ref()
                .is_some_and(|n| n.data().store().contains(&key).unwrap())
        })
        .collect()
}

async fn writes(cluster: &InProcessCluster, node: usize, outcome: &str) -> f64 {
    metric_sum(
        &metrics_page(&cluster.url(node)).await,
        "nxcache_replication_writes_total",
        &[&format!(r#"outcome="{outcome}""#)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_each_artifact_go_to_distinct_zones() {
    // Six nodes in three zones, three copies of each artifact. Placement ignoring zones
    // would put two copies in one zone for most keys.
    let zones = ["a", "b", "c", "a", "b", "c"];
    let mut cluster = InProcessCluster::start(1, &["--zone", zones[0]]).await;
    for zone in &zones[1..] {
        cluster.add_node(&["--zone", zone]).await;
    }
    let members = cluster.node(0).meta().members();
    assert_eq!(members.len(), 6);
    for (id, member) in &members {
        assert_eq!(member.zone, zones[*id as usize], "node {id}'s zone");
    }
    let client = http_client();
    let hashes: Vec<String> = (0..40).map(|n| (640_000 + n).to_string()).collect();
    for (n, hash) in hashes.iter().enumerate() {
        assert_eq!(
            put(&client, &cluster.url(n % 6), hash, random_bytes(2_000)).await,
            200
        );
    }
    wait_until(PATIENCE, "three copies of every artifact", || {
        let placed = hashes.iter().all(|h| holders(&cluster, h).len() == 3);
        async move { placed }
    })
    .await;
    for hash in &hashes {
        let held = holders(&cluster, hash);
        let spread: BTreeSet<&str> = held.iter().map(|i| zones[*i]).collect();
        assert_eq!(spread.len(), 3, "{hash} is held by nodes {held:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_quorum_1_answers_with_one_copy_and_the_others_follow() {
    // Strict, so that a write below its quorum would be refused: W=1 is the only reason
    // the write below is accepted.
    let mut cluster =
        InProcessCluster::start(3, &["--write-quorum", "1", "--on-degraded", "strict"]).await;
    let client = http_client();
    let url = cluster.url(0);
    cluster.stop(1).await;
    cluster.stop(2).await;
    let body = random_bytes(100_000);
    assert_eq!(put(&client, &url, "5150", body.clone()).await, 200);
    assert_eq!(holders(&cluster, "5150"), vec![0]);
    assert_eq!(writes(&cluster, 0, "quorum").await, 1.0);
    assert_eq!(writes(&cluster, 0, "degraded").await, 0.0);
    assert!(cluster.node(0).data().pending_hints() >= 1);
    // The other owners get their copies once they are back.
    cluster.restart(1).await;
    cluster.restart(2).await;
    cluster.wait_members(3).await;
    wait_until(
        PATIENCE,
        "the other two owners given their copies, no hint left",
        || {
            let done =
                holders(&cluster, "5150").len() == 3 && cluster.node(0).data().pending_hints() == 0;
            async move { done }
        },
    )
    .await;
    for i in 1..3 {
        assert_eq!(
            get(&client, &cluster.url(i), "5150").await,
            (200, body.clone())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_quorum_3_strict_refuses_a_write_one_owner_short() {
    let mut cluster =
        InProcessCluster::start(3, &["--write-quorum", "3", "--on-degraded", "strict"]).await;
    let client = http_client();
    let url = cluster.url(0);
    // All up: answered only once all three hold it.
    assert_eq!(put(&client, &url, "3001", random_bytes(50_000)).await, 200);
    assert_eq!(holders(&cluster, "3001"), vec![0, 1, 2]);
    cluster.stop(2).await;
    for attempt in 0..2 {
        let response = client
            .put(format!("{url}/v1/cache/3002"))
            .bearer_auth(RW_TOKEN)
            .body(random_bytes(50_000))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "attempt {attempt}");
        let text = response.text().await.unwrap();
        assert!(text.contains("--on-degraded strict"), "{text}");
        assert!(
            holders(&cluster, "3002").is_empty(),
            "a refused write left a copy"
        );
    }
    assert!(writes(&cluster, 0, "refused").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_quorum_3_serve_degrades_a_write_one_owner_short_and_repairs_it() {
    let mut cluster = InProcessCluster::start(3, &["--write-quorum", "3"]).await;
    let client = http_client();
    let url = cluster.url(0);
    cluster.stop(2).await;
    let body = random_bytes(50_000);
    assert_eq!(put(&client, &url, "3003", body.clone()).await, 200);
    assert_eq!(holders(&cluster, "3003"), vec![0, 1]);
    assert_eq!(writes(&cluster, 0, "degraded").await, 1.0);
    assert_eq!(writes(&cluster, 0, "quorum").await, 0.0);
    assert!(cluster.node(0).data().pending_hints() >= 1);
    cluster.restart(2).await;
    cluster.wait_members(3).await;
    wait_until(
        PATIENCE,
        "the third owner given its copy, no hint left",
        || {
            let done =
                holders(&cluster, "3003").len() == 3 && cluster.node(0).data().pending_hints() == 0;
            async move { done }
        },
    )
    .await;
    assert_eq!(get(&client, &cluster.url(2), "3003").await, (200, body));
}
