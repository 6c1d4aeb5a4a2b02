//! What an operator does to a cluster of real `nxcache serve` processes, end to end:
//! draining and removing a node, replacing a dead node that lost its disk, the generated
//! cluster secret, and `nxcache probe` as a health check.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

use nxcache_tests::{
    ADMIN_TOKEN, NodeProcess, PATIENCE, ProcessCluster, RO_TOKEN, RW_TOKEN, admin, admin_status,
    get, holds_on_disk, http_client, metrics_page, nxcache_bin, put, random_bytes, wait_until,
};

/// A leader, `members` members, every one reachable and active.
fn settled(status: &serde_json::Value, members: usize) -> bool {
    let list = status["members"].as_array().cloned().unwrap_or_default();
    status["leader_id"].as_u64().is_some()
        && list.len() == members
        && list
            .iter()
            .all(|m| m["reachable"] == true && m["state"] == "active")
}

fn member_ids(status: &serde_json::Value, role: Option<&str>) -> Vec<u64> {
    status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| role.is_none_or(|r| m["role"] == r))
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

async fn wait_settled(url: &str, members: usize) {
    let what = format!("{members} reachable active members and a leader, seen from {url}");
    wait_until(PATIENCE, &what, || {
        let url = url.to_owned();
        async move { admin_status(&url).is_some_and(|s| settled(&s, members)) }
    })
    .await;
}

/// The data-plane part of a node's status: (objects held, hints pending).
fn objects_and_hints(url: &str) -> Option<(u64, u64)> {
    let status = admin_status(url)?;
    Some((
        status["data"]["objects"].as_u64()?,
        status["data"]["pending_hints"].as_u64()?,
    ))
}

/// Writes `n` artifacts through the nodes in turn; returns hash -> bytes.
async fn write_artifacts(urls: &[String], first: u64, n: u64) -> BTreeMap<String, Vec<u8>> {
    let client = http_client();
    let mut written = BTreeMap::new();
    for i in 0..n {
        let hash = (first + i).to_string();
        let body = random_bytes(1_000 + (i as usize * 997) % 40_000);
        let url = &urls[i as usize % urls.len()];
        assert_eq!(
            put(&client, url, &hash, body.clone()).await,
            200,
            "PUT {hash} through {url}"
        );
        written.insert(hash, body);
    }
    written
}

/// Which of `nodes` hold `hash` on disk.
fn disk_holders(nodes: &[&NodeProcess], hash: &str) -> Vec<usize> {
    (0..nodes.len())
        .filter(|i| holds_on_disk(&nodes[*i].data_dir, hash))
        .collect()
}

async fn assert_served_everywhere(urls: &[String], written: &BTreeMap<String, Vec<u8>>) {
    let client = http_client();
    for (hash, body) in written {
        for url in urls {
            let (status, got) = get(&client, url, hash).await;
            assert_eq!(status, 200, "GET {hash} through {url}");
            assert!(got == *body, "GET {hash} through {url}: other bytes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_then_remove_moves_the_data_off_and_keeps_the_cluster_whole() {
    drain_then_remove(Victim::VoterNotLeading).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_node_that_leads_keeps_the_cluster_whole() {
    drain_then_remove(Victim::Leader).await;
}

/// Which voter is drained and removed.
enum Victim {
    /// The highest-id voter that does not lead when the test looks.
    VoterNotLeading,
    /// The one that leads when the test looks (leadership moves on its removal).
    Leader,
}

async fn drain_then_remove(pick: Victim) {
    // Four nodes (three voters, one learner), three copies of each artifact.
    let mut cluster = ProcessCluster::start_with(4, &["--anti-entropy-interval", "2s"]);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_settled(&urls[0], 4).await;
    let written = write_artifacts(&urls, 70_000, 60).await;
    wait_until(PATIENCE, "every artifact on exactly three disks", || {
        let nodes: Vec<&NodeProcess> = cluster.nodes.iter().collect();
        let placed = written.keys().all(|h| disk_holders(&nodes, h).len() == 3);
        async move { placed }
    })
    .await;

    let before = admin_status(&urls[0]).unwrap();
    let voters = member_ids(&before, Some("voter"));
    assert_eq!(voters.len(), 3, "{before}");
    let leader = before["leader_id"].as_u64().unwrap();
    let victim_id = match pick {
        Victim::VoterNotLeading => voters.iter().copied().filter(|v| *v != leader).max(),
        Victim::Leader => Some(leader),
    }
    .unwrap();
    let victim = (victim_id - 1) as usize;
    assert!(
        written
            .keys()
            .any(|h| holds_on_disk(&cluster.nodes[victim].data_dir, h)),
        "node {victim_id} holds nothing to drain"
    );
    let survivors: Vec<usize> = (0..4).filter(|i| *i != victim).collect();
    let survivor_urls: Vec<String> = survivors.iter().map(|i| urls[*i].clone()).collect();
    let via = survivor_urls[0].clone();

    let (ok, text) = admin(&via, &["nodes", "drain", &victim_id.to_string()]);
    assert!(ok, "nodes drain {victim_id}: {text}");
    wait_until(
        Duration::from_secs(120),
        "the drained node empty, every artifact on the three other disks",
        || {
            let drained_url = urls[victim].clone();
            let nodes: Vec<&NodeProcess> = survivors.iter().map(|i| &cluster.nodes[*i]).collect();
            let moved = written.keys().all(|h| {
                !holds_on_disk(&cluster.nodes[victim].data_dir, h)
                    && disk_holders(&nodes, h).len() == 3
            });
            async move { moved && objects_and_hints(&drained_url).is_some_and(|(o, _)| o == 0) }
        },
    )
    .await;
    let status = admin_status(&via).unwrap();
    let drained = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == victim_id)
        .cloned()
        .unwrap();
    assert_eq!(drained["state"], "draining", "{status}");

    let (ok, text) = admin(&via, &["nodes", "remove", &victim_id.to_string()]);
    assert!(ok, "nodes remove {victim_id}: {text}");
    // Gone from every remaining node's member list; the other voters are still voters
    // (a learner may be promoted beside them) and all agree on one leader.
    let remaining_voters: Vec<u64> = voters.iter().copied().filter(|v| *v != victim_id).collect();
    wait_until(
        PATIENCE,
        "three members on every remaining node, the other voters intact, one leader",
        || {
            let urls = survivor_urls.clone();
            let remaining_voters = remaining_voters.clone();
            async move {
                let statuses: Vec<_> = urls.iter().map(|u| admin_status(u)).collect();
                statuses.iter().all(|s| {
                    s.as_ref().is_some_and(|s| {
                        settled(s, 3)
                            && !member_ids(s, None).contains(&victim_id)
                            && remaining_voters
                                .iter()
                                .all(|v| member_ids(s, Some("voter")).contains(v))
                            && s["leader_id"] == statuses[0].as_ref().unwrap()["leader_id"]
                    })
                })
            }
        },
    )
    .await;
    cluster.nodes[victim].kill9();

    // Raft still commits: a token created through one survivor works on the others.
    let (ok, created) = admin(
        &survivor_urls[1],
        &[
            "tokens",
            "create",
            "--scope",
            "read-write",
            "--name",
            "after-remove",
            "--json",
        ],
    );
    assert!(ok, "token create after the removal: {created}");
    let token = serde_json::from_str::<serde_json::Value>(created.trim()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = http_client();
    for url in &survivor_urls {
        wait_until(
            PATIENCE,
            &format!("the new token accepted by {url}"),
            || {
                let (client, url, token) = (client.clone(), url.clone(), token.clone());
                async move {
                    client
                        .head(format!("{url}/v1/cache/1"))
                        .bearer_auth(token)
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 404)
                }
            },
        )
        .await;
    }
    // Writes and reads go on; everything written before is served through every node.
    let later = write_artifacts(&survivor_urls, 79_000, 6).await;
    assert_served_everywhere(&survivor_urls, &written).await;
    assert_served_everywhere(&survivor_urls, &later).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_with_an_empty_disk_is_refilled_by_anti_entropy_alone() {
    let mut cluster = ProcessCluster::start_with(4, &["--anti-entropy-interval", "1s"]);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    wait_settled(&urls[0], 4).await;
    let written = write_artifacts(&urls, 90_000, 60).await;
    // Settled: three copies of each, no hint anywhere.
    wait_until(
        PATIENCE,
        "every artifact on exactly three disks and no hint pending",
        || {
            let nodes: Vec<&NodeProcess> = cluster.nodes.iter().collect();
            let placed = written.keys().all(|h| disk_holders(&nodes, h).len() == 3);
            let urls = urls.clone();
            async move {
                placed
                    && urls
                        .iter()
                        .all(|u| objects_and_hints(u).is_some_and(|(_, h)| h == 0))
            }
        },
    )
    .await;

    // Node 3 (not the founder) dies and its disk is replaced by an empty one.
    let victim = 2;
    let owned: Vec<String> = written
        .keys()
        .filter(|h| holds_on_disk(&cluster.nodes[victim].data_dir, h))
        .cloned()
        .collect();
    assert!(!owned.is_empty(), "node 3 owns none of the artifacts");
    cluster.nodes[victim].kill9();
    std::fs::remove_dir_all(&cluster.nodes[victim].data_dir).unwrap();
    // Nothing was written while it was gone: no hint can bring its keys back.
    for (i, url) in urls.iter().enumerate().filter(|(i, _)| *i != victim) {
        let (_, hints) = objects_and_hints(url).expect("a survivor answers");
        assert_eq!(hints, 0, "node {} holds hints", i + 1);
    }

    cluster.nodes[victim].restart();
    // Nothing reads through it (read repair would refill it): only anti-entropy can.
    wait_until(
        Duration::from_secs(180),
        "every artifact node 3 owned back on its new disk",
        || {
            let back = owned
                .iter()
                .all(|h| holds_on_disk(&cluster.nodes[victim].data_dir, h));
            async move { back }
        },
    )
    .await;
    wait_settled(&urls[0], 4).await;
    assert_served_everywhere(&urls, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_cluster_secret_is_private_kept_and_lets_a_joiner_in() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = [
        ("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN),
        ("NXCACHE_READ_ONLY_TOKENS", RO_TOKEN),
        ("NXCACHE_ADMIN_TOKENS", ADMIN_TOKEN),
    ];
    let node_args = |id: &str, grpc: &str| -> Vec<String> {
        [
            "--node-id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            grpc,
            "--advertise",
            grpc,
        ]
        .map(String::from)
        .to_vec()
    };
    let founder_grpc = format!("127.0.0.1:{}", nxcache_tests::free_port());
    let mut args = node_args("1", &founder_grpc);
    args.push("--bootstrap".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // No NXCACHE_CLUSTER_SECRET: the founder makes one.
    let mut founder = NodeProcess::start(&dir.path().join("founder"), &args, &tokens);
    let file = founder.data_dir.join("cluster-secret");
    let secret = std::fs::read_to_string(&file).expect("the generated cluster-secret file");
    let secret = secret.trim().to_owned();
    assert!(secret.len() >= 16, "a short secret: {secret:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o600,
            "cluster-secret is readable by others: {mode:o}"
        );
    }
    let log = std::fs::read_to_string(&founder.log).unwrap();
    assert!(!log.contains(&secret), "the secret is in the log");

    // A joiner given nothing is refused at start, with the variable to set.
    let joiner_grpc = format!("127.0.0.1:{}", nxcache_tests::free_port());
    let mut joiner_args = node_args("2", &joiner_grpc);
    joiner_args.extend(["--join".into(), founder_grpc.clone()]);
    let joiner_args: Vec<&str> = joiner_args.iter().map(String::as_str).collect();
    let refused = run_bounded(
        Command::new(nxcache_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("no-secret"))
            .args(&joiner_args)
            .env_remove("NXCACHE_CLUSTER_SECRET"),
    );
    assert!(!refused.status.success(), "a joiner without the secret ran");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("NXCACHE_CLUSTER_SECRET"), "{message}");

    // A joiner given the generated value joins.
    let mut joiner_env = tokens.to_vec();
    joiner_env.push(("NXCACHE_CLUSTER_SECRET", &secret));
    let joiner = NodeProcess::start(&dir.path().join("joiner"), &joiner_args, &joiner_env);
    wait_settled(&founder.url, 2).await;
    assert!(
        !joiner.data_dir.join("cluster-secret").exists(),
        "a node given the secret generated another"
    );

    // Restarted, the founder keeps its secret: the joiner still talks to it, and with two
    // voters a Raft entry commits only if both do.
    let stopped = founder.terminate_within(Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    founder.restart();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), secret);
    wait_settled(&joiner.url, 2).await;
    let (ok, text) = admin(
        &joiner.url,
        &[
            "tokens",
            "create",
            "--scope",
            "read",
            "--name",
            "after-restart",
        ],
    );
    assert!(ok, "a Raft entry after the founder's restart: {text}");
}

/// Runs a command that should end by itself; fails the test if it runs for a minute.
fn run_bounded(command: &mut Command) -> Output {
    nxcache_tests::output_within(command, Duration::from_secs(60))
}

fn probe(url: &str) -> Output {
    run_bounded(Command::new(nxcache_bin()).args(["probe", url]))
}

/// A one-request HTTP server answering `status_line`; returns its URL.
fn answer_once(status_line: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let body = "not ready: no leader\n";
            let _ = write!(
                stream,
                "HTTP/1.1 {status_line}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_0_on_200_and_explains_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &["--listen", "127.0.0.1:0"],
        &[("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN)],
    );
    let healthy = probe(&format!("{}/healthz", node.url));
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    // It asked the node itself.
    let page = metrics_page(&node.url).await;
    assert!(
        page.contains(
            r#"nxcache_http_requests_total{method="GET",route="healthz",status="200"} 1"#
        ),
        "the probe's request is not counted by the node"
    );

    let unavailable = answer_once("503 Service Unavailable");
    let out = probe(&unavailable);
    assert!(!out.status.success(), "a 503 probed as healthy");
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message.contains("503") && message.contains(&unavailable),
        "{message}"
    );

    let closed = format!("http://127.0.0.1:{}/readyz", nxcache_tests::free_port());
    let out = probe(&closed);
    assert!(!out.status.success(), "a closed port probed as healthy");
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains(&closed), "{message}");
}

/// What a node shows once its Raft core has stopped on an error (a storage failure, a
/// panic; here the core is stopped under the running node): admin writes answer 503
/// text/plain saying what to do, never 500; `/healthz` and `/readyz` answer 503;
/// `nxcache_raft_core_up` is 0; its status names no leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_metadata_log_answers_503_and_reports_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let node = nxcache::start(nxcache_tests::test_config(dir.path()))
        .await
        .unwrap();
    let url = node.base_url();
    let http = http_client();
    let create = |name: &'static str| {
        http.post(format!("{url}/admin/v1/tokens"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "name": name, "scope": "read-write" }))
            .send()
    };
    assert_eq!(create("before").await.unwrap().status(), 201);
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    node.meta().raft().shutdown().await.unwrap();

    let answer = create("after").await.unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["content-type"], "text/plain");
    let text = answer.text().await.unwrap();
    assert!(
        text.contains("metadata log has stopped") && text.contains("restarted"),
        "{text}"
    );
    for probe in ["healthz", "readyz"] {
        let answer = http.get(format!("{url}/{probe}")).send().await.unwrap();
        assert_eq!(answer.status(), 503, "/{probe}");
        let text = answer.text().await.unwrap();
        assert!(text.contains("restart this node"), "/{probe}: {text}");
    }
    let page = metrics_page(&url).await;
    assert_eq!(
        nxcache_tests::metric(&page, "nxcache_raft_core_up"),
        Some(0.0)
    );
    let status = http
        .get(format!("{url}/admin/v1/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert!(status["leader_id"].is_null(), "{status}");
    node.shutdown().await.unwrap();
}
