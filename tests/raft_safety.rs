//! Raft's assumptions under real faults, with real processes: a disk that comes back
//! empty, a cluster restarted around an empty node, membership changes without quorum.

use std::time::Duration;

use nxcache_tests::{
    ProcessCluster, admin, admin_status, metric, metrics_page, signal, wait_until,
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

/// Waits until every node in `urls` is settled with the others and names the same leader.
async fn wait_whole(urls: &[String], what: &str) {
    wait_until(Duration::from_secs(120), what, || {
        let urls = urls.to_vec();
        async move {
            let statuses: Vec<_> = urls.iter().map(|u| admin_status(u)).collect();
            statuses
                .iter()
                .all(|s| s.as_ref().is_some_and(|s| settled(s, urls.len())))
                && statuses.iter().all(|s| {
                    leader_of(s.as_ref().unwrap()) == leader_of(statuses[0].as_ref().unwrap())
                })
        }
    })
    .await;
}

/// Whether `url` accepts `token` (a GET of a key nobody wrote: 404 when the token is
/// known, 401 when not); None when the node does not answer.
async fn token_accepted(url: &str, token: &str) -> Option<bool> {
    let response = reqwest::Client::new()
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
    let response = reqwest::Client::new()
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
    wait_until(
        Duration::from_secs(10),
        "the up-to-date follower has the token",
        || {
            let (url, token) = (urls[fresh].clone(), token.clone());
            async move { token_accepted(&url, &token).await == Some(true) }
        },
    )
    .await;

    // It loses its disk and comes back empty under the same id; then the leader dies.
    cluster.nodes[fresh].kill9();
    std::fs::remove_dir_all(&cluster.nodes[fresh].data_dir).unwrap();
    cluster.nodes[fresh].restart();
    cluster.nodes[leader].kill9();
    signal(cluster.nodes[lagging].pid(), "CONT");

    // The lagging node campaigns; the empty node is the only voter it can reach. Either
    // it wins (the empty node voted) or it keeps trying, term after term.
    wait_until(
        Duration::from_secs(60),
        "the lagging node campaigned",
        || {
            let url = urls[lagging].clone();
            async move {
                raft_term(&url)
                    .await
                    .is_some_and(|(term, leads)| leads || term >= term_before + 3.0)
            }
        },
    )
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
    let mut leaders = 0;
    for url in &urls {
        let page = metrics_page(url).await;
        if metric(&page, "nxcache_raft_is_leader") == Some(1.0) {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1, "exactly one node leads");
}
