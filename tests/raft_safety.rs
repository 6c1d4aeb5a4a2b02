//! Raft's assumptions under real faults, with real processes: a disk that comes back
//! empty, a cluster restarted around an empty node, membership changes without quorum.

use std::time::Duration;

use nxcache_tests::{
    PATIENCE, ProcessCluster, admin, admin_status, metric, metrics_page, signal, wait_until,
};

/// How the nodes of a shared configuration form their cluster.
const FORMATION: &[&str] = &["--bootstrap-expect", "3"];

fn leader_of(status: &serde_json::Value) -> Option<u64> {
    status["leader_id"].as_u64()
}

/// One leader known, `members` members, all reachable, min(members, 3) voters.
fn settled(status: &serde_json::Value, members: usize) -> bool {
    let list = status["members"].as_array().cloned().unwrap_or_default();
    leader_of(status).is_some()
        && list.len() == members
        && list.iter().all(|m| m["reachable"] == true)
        && list.iter().filter(|m| m["role"] == "voter").count() == members.min(3)
}

/// Waits until every node in `urls` is settled with the others and names the same leader;
/// on timeout, the panic shows what each node last said.
async fn wait_whole(urls: &[String], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let statuses: Vec<_> = urls.iter().map(|u| admin_status(u)).collect();
        let whole = statuses
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| settled(s, urls.len())))
            && statuses.iter().all(|s| {
                leader_of(s.as_ref().unwrap()) == leader_of(statuses[0].as_ref().unwrap())
            });
        if whole {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}; the nodes said: {statuses:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `url` accepts `token` (a GET of a key nobody wrote: 404 when the token is
/// known, 401 when not); None when the node does not answer.
async fn token_accepted(url: &str, token: &str) -> Option<bool> {
    let response = nxcache_tests::http_client()
        .get(format!("{url}/v1/cache/never-written"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    match response.status().as_u16() {
        404 => Some(true),
        401 => Some(false),
        _ => None,
    }
}

/// A node's Raft term and whether it leads, from its metrics; None when it does not answer.
async fn raft_term(url: &str) -> Option<(f64, bool)> {
    let response = nxcache_tests::http_client()
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let page = response.text().await.ok()?;
    Some((
        metric(&page, "nxcache_raft_term")?,
        metric(&page, "nxcache_raft_is_leader")? == 1.0,
    ))
}

fn create_token(url: &str, name: &str) -> String {
    let (ok, created) = admin(
        url,
        &[
            "tokens",
            "create",
            "--scope",
            "read-write",
            "--name",
            name,
            "--json",
        ],
    );
    assert!(ok, "{created}");
    serde_json::from_str::<serde_json::Value>(created.trim()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The only follower that holds a committed entry loses its disk while the other follower
/// lags, then the leader dies. The empty node must not vote under its old identity: if it
/// did, the lagging node would win an election and the committed entry would be gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_back_with_an_empty_disk_cannot_elect_a_node_missing_committed_entries() {
    let mut cluster = ProcessCluster::start_shared(3, FORMATION);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_whole(&urls, "three voters, one leader").await;
    let leader = leader_of(&admin_status(&urls[0]).unwrap()).unwrap() as usize - 1;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (fresh, lagging) = (others[0], others[1]);

    // The lagging follower misses the token: it is committed by the leader and `fresh`.
    let (term_before, _) = raft_term(&urls[lagging]).await.unwrap();
    signal(cluster.nodes[lagging].pid(), "STOP");
    let token = create_token(&urls[leader], "before-the-faults");
    wait_until(PATIENCE, "the up-to-date follower has the token", || {
        let (url, token) = (urls[fresh].clone(), token.clone());
        async move { token_accepted(&url, &token).await == Some(true) }
    })
    .await;

    // It loses its disk and comes back empty under the same id; then the leader dies.
    cluster.nodes[fresh].kill9();
    std::fs::remove_dir_all(&cluster.nodes[fresh].data_dir).unwrap();
    cluster.nodes[fresh].restart();
    cluster.nodes[leader].kill9();
    signal(cluster.nodes[lagging].pid(), "CONT");

    // The lagging node campaigns; the empty node is the only voter it can reach. Either
    // it wins (the empty node voted) or it keeps trying, term after term.
    wait_until(PATIENCE, "the lagging node campaigned", || {
        let url = urls[lagging].clone();
        async move {
            raft_term(&url)
                .await
                .is_some_and(|(term, leads)| leads || term >= term_before + 3.0)
        }
    })
    .await;

    cluster.nodes[leader].restart();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_whole(&urls, "the cluster whole again").await;
    for url in &urls {
        assert_eq!(
            token_accepted(url, &token).await,
            Some(true),
            "{url} refuses a token committed before the faults: a committed entry was lost"
        );
    }
    // One leader in the end (whichever node): a moment with none or with a deposed one
    // not yet stepped down is an election in progress, not a fault, so it is waited out.
    wait_until(PATIENCE, "exactly one node reporting that it leads", || {
        let urls = urls.clone();
        async move {
            let mut leaders = 0;
            for url in &urls {
                let page = metrics_page(url).await;
                if metric(&page, "nxcache_raft_is_leader") == Some(1.0) {
                    leaders += 1;
                }
            }
            leaders == 1
        }
    })
    .await;
}

/// How long the other nodes stay down while node 1 is back with an empty disk.
const OUTAGE: Duration = Duration::from_secs(60);

/// A full restart in which node 1 (the one that founded the cluster) comes back first,
/// with an empty disk, and the others only a minute later: node 1 must not found a new
/// cluster meanwhile, and in the end every earlier token and artifact is served through
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_empty_while_its_peers_are_down_waits_for_them_and_rejoins() {
    let mut cluster = ProcessCluster::start_shared(3, FORMATION);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_whole(&urls, "three voters, one leader").await;
    let token = create_token(&urls[1], "made-before-the-restart");
    let client = nxcache_tests::http_client();
    let mut artifacts = Vec::new();
    for n in 0..12u64 {
        let body = nxcache_tests::random_bytes(20_000 + n as usize * 5_000);
        let hash = (90_000 + n).to_string();
        let via = &urls[n as usize % 3];
        assert_eq!(
            nxcache_tests::put(&client, via, &hash, body.clone()).await,
            200
        );
        artifacts.push((hash, body));
    }

    for node in &mut cluster.nodes {
        node.kill9();
    }
    std::fs::remove_dir_all(&cluster.nodes[0].data_dir).unwrap();
    cluster.nodes[0].restart();
    let first = cluster.nodes[0].url.clone();
    // The fault itself: the other two stay down this long, whatever node 1 does.
    tokio::time::sleep(OUTAGE).await;
    let page = metrics_page(&first).await;
    assert_eq!(
        metric(&page, "nxcache_raft_members"),
        Some(0.0),
        "node 1 founded a cluster of its own while its seeds were down"
    );

    cluster.nodes[1].restart();
    cluster.nodes[2].restart();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_whole(&urls, "one cluster of three again").await;
    let ids: Vec<serde_json::Value> = urls
        .iter()
        .map(|u| admin_status(u).unwrap()["cluster_id"].clone())
        .collect();
    assert!(ids[0].is_string(), "{ids:?}");
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one cluster id: {ids:?}"
    );
    assert_eq!(token_accepted(&first, &token).await, Some(true));
    for (hash, body) in &artifacts {
        let (status, got) = nxcache_tests::get(&client, &first, hash).await;
        assert_eq!(status, 200, "{hash} through node 1");
        assert!(got == *body, "{hash} through node 1: other bytes");
    }
}

/// An admin request to the node whose answer is awaited (a client timeout far above the
/// server's own bound): the status and the body.
async fn admin_call(method: reqwest::Method, url: &str, path: &str) -> (u16, String, String) {
    let response = nxcache_tests::http_client()
        .request(method, format!("{url}/admin/v1/{path}"))
        .bearer_auth(nxcache_tests::ADMIN_TOKEN)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the admin API answered within 60 s");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// With both followers down, the leader cannot commit: draining or removing a node is
/// answered 503 with a message saying why, and holds nothing that stops the same request
/// from succeeding once the followers are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_on_a_leader_without_quorum_fail_with_503_and_then_succeed() {
    let mut cluster = ProcessCluster::start_shared(3, FORMATION);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_whole(&urls, "three voters, one leader").await;
    let leader = leader_of(&admin_status(&urls[0]).unwrap()).unwrap() as usize - 1;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        cluster.nodes[f].kill9();
    }
    let target = followers[0] + 1;
    let actions = [
        (reqwest::Method::POST, format!("nodes/{target}/drain")),
        (reqwest::Method::DELETE, format!("nodes/{target}")),
    ];
    for (method, path) in &actions {
        let (status, content_type, body) = admin_call(method.clone(), &urls[leader], path).await;
        assert_eq!(status, 503, "{method} {path}: {body}");
        assert_eq!(content_type, "text/plain", "{method} {path}");
        assert!(
            body.contains("majority of the voters"),
            "{method} {path}: {body}"
        );
    }

    for &f in &followers {
        cluster.nodes[f].restart();
    }
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_whole(&urls, "the followers back").await;
    for (method, path) in &actions {
        wait_until(PATIENCE, &format!("{method} {path} accepted"), || {
            let (method, url, path) = (method.clone(), urls[leader].clone(), path.clone());
            async move { admin_call(method, &url, &path).await.0 == 204 }
        })
        .await;
    }
    let status = admin_status(&urls[leader]).unwrap();
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{status}");
    assert!(members.iter().all(|m| m["id"] != target as u64), "{status}");
}

/// A node of another cluster (same secret, another cluster id) is refused on every
/// inter-node service, and each refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_another_cluster_are_refused_on_every_service_and_counted() {
    let cluster = ProcessCluster::start(1);
    let url = cluster.nodes[0].url.clone();
    wait_until(PATIENCE, "the node has a cluster id", || {
        let url = url.clone();
        async move { admin_status(&url).is_some_and(|s| s["cluster_id"].is_string()) }
    })
    .await;
    let channel =
        nxcache_tests::grpc_channel(&format!("127.0.0.1:{}", cluster.grpc_ports[0])).await;
    let other = nxcache_rpc::ClusterSecret::new(nxcache_tests::CLUSTER_SECRET).unwrap();
    other
        .cluster_id()
        .set("0123456789abcdef0123456789abcdef")
        .unwrap();
    use nxcache_rpc::pb;
    let refusals = [
        pb::raft_client::RaftClient::with_interceptor(channel.clone(), other.client_interceptor())
            .vote(pb::RaftMessage {
                payload: b"{}".to_vec(),
            })
            .await
            .unwrap_err(),
        pb::membership_client::MembershipClient::with_interceptor(
            channel.clone(),
            other.client_interceptor(),
        )
        .ping(pb::PingRequest {})
        .await
        .unwrap_err(),
        pb::blobs_client::BlobsClient::with_interceptor(channel, other.client_interceptor())
            .head(pb::HeadRequest { key: "1".into() })
            .await
            .unwrap_err(),
    ];
    for refused in &refusals {
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("another cluster"), "{refused:?}");
    }
    let page = metrics_page(&url).await;
    assert_eq!(
        metric(
            &page,
            r#"nxcache_cluster_rejected_calls_total{reason="other_cluster"}"#
        ),
        Some(3.0)
    );
}
