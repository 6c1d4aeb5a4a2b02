//! Real `nxcache serve` processes forming a cluster, driven through `nxcache admin`.

use nxcache_tests::{PATIENCE, ProcessCluster, RW_TOKEN, admin, admin_status, wait_until};
use reqwest::StatusCode;

fn leader_of(status: &serde_json::Value) -> Option<u64> {
    status["leader_id"].as_u64()
}

fn settled(status: &serde_json::Value, members: usize) -> bool {
    let list = status["members"].as_array().cloned().unwrap_or_default();
    leader_of(status).is_some()
        && list.len() == members
        && list
            .iter()
            .all(|m| m["reachable"] == true && m["state"] == "active")
        && list.iter().filter(|m| m["role"] == "voter").count() == members.min(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_form_a_cluster_survive_a_leader_kill_and_rejoin() {
    let mut cluster = ProcessCluster::start(3);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();

    wait_until(PATIENCE, "three members, one leader", || {
        let url = urls[0].clone();
        async move { admin_status(&url).is_some_and(|s| settled(&s, 3)) }
    })
    .await;
    let status = admin_status(&urls[2]).unwrap();
    assert_eq!(status["ring_epoch"].as_u64().map(|e| e > 0), Some(true));
    // Raft is visible in the metrics of every node.
    let page = nxcache_tests::metrics_page(&urls[2]).await;
    for series in [
        "nxcache_raft_term",
        "nxcache_raft_applied_index",
        "nxcache_raft_last_log_index",
        "nxcache_raft_snapshots_total",
        "nxcache_ring_epoch",
    ] {
        assert!(
            nxcache_tests::metric(&page, series).is_some(),
            "{series} missing"
        );
    }
    assert_eq!(
        nxcache_tests::metric(&page, "nxcache_raft_members"),
        Some(3.0)
    );
    // Node 3's leader gauge names the leader its status names, and that leader (whichever
    // node it is by then: an election may come between two reads) counts and times its
    // RPCs to its peers.
    wait_until(
        PATIENCE,
        "node 3's status and metrics naming one leader, whose metrics show it leads and replicates",
        || {
            let urls = urls.clone();
            async move {
                let Some(leader) = admin_status(&urls[2]).and_then(|s| leader_of(&s)) else {
                    return false;
                };
                let page = nxcache_tests::metrics_page(&urls[2]).await;
                let leader_page = nxcache_tests::metrics_page(&urls[(leader - 1) as usize]).await;
                nxcache_tests::metric(&page, "nxcache_raft_leader_id") == Some(leader as f64)
                    && leader_page
                        .contains(r#"nxcache_raft_rpcs_total{result="ok",rpc="append_entries"}"#)
                    && leader_page.contains("nxcache_raft_rpc_duration_seconds_bucket")
                    && nxcache_tests::metric(&leader_page, "nxcache_raft_is_leader") == Some(1.0)
            }
        },
    )
    .await;

    // A token made through node 2's admin API works on node 3's cache API.
    let (ok, created) = admin(
        &urls[1],
        &[
            "tokens",
            "create",
            "--scope",
            "read-write",
            "--name",
            "ci",
            "--json",
        ],
    );
    assert!(ok, "{created}");
    let secret = serde_json::from_str::<serde_json::Value>(created.trim()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let put = |url: String, token: String, hash: &'static str| async move {
        nxcache_tests::http_client()
            .put(format!("{url}/v1/cache/{hash}"))
            .bearer_auth(token)
            .body("bytes")
            .send()
            .await
            .unwrap()
            .status()
    };
    wait_until(PATIENCE, "new token accepted on node 3", || {
        let (url, secret) = (urls[2].clone(), secret.clone());
        async move { put(url, secret, "1").await == StatusCode::OK }
    })
    .await;
    let (ok, text) = admin(&urls[0], &["tokens", "revoke", "ci"]);
    assert!(ok, "{text}");
    wait_until(PATIENCE, "revoked token refused on node 3", || {
        let (url, secret) = (urls[2].clone(), secret.clone());
        async move { put(url, secret, "2").await == StatusCode::UNAUTHORIZED }
    })
    .await;

    // An artifact written through node 1 is read through node 3 (three nodes, three
    // copies: node 3 holds one; a read through a node holding none is tested below).
    let client = nxcache_tests::http_client();
    let body = nxcache_tests::random_bytes(300_000);
    let stored = client
        .put(format!("{}/v1/cache/777", urls[0]))
        .bearer_auth(RW_TOKEN)
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(stored, StatusCode::OK);
    let got = client
        .get(format!("{}/v1/cache/777", urls[2]))
        .bearer_auth(RW_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert!(
        got.bytes().await.unwrap()[..] == body[..],
        "bytes differ through node 3"
    );
    let head = client
        .head(format!("{}/v1/cache/777", urls[1]))
        .bearer_auth(RW_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "300000");
    let missing = client
        .get(format!("{}/v1/cache/778", urls[2]))
        .bearer_auth(RW_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // Three members, replication factor 3: everything written is held by every node.
    wait_until(PATIENCE, "the same objects on every node", || {
        let urls = urls.clone();
        async move {
            let mut counts = Vec::new();
            for url in &urls {
                let page = nxcache_tests::metrics_page(url).await;
                counts.push(nxcache_tests::metric(&page, "nxcache_store_objects"));
            }
            counts[0].is_some_and(|c| c >= 1.0) && counts.iter().all(|c| *c == counts[0])
        }
    })
    .await;

    // kill -9 the leader (as node 3 sees it now): another node leads after a while.
    let old_leader = nxcache_tests::wait_for(PATIENCE, "node 3 naming a leader", || {
        std::future::ready(admin_status(&urls[2]).and_then(|s| leader_of(&s)))
    })
    .await;
    let victim = (old_leader - 1) as usize;
    cluster.nodes[victim].kill9();
    let survivor = urls[(victim + 1) % 3].clone();
    wait_until(PATIENCE, "a new leader", || {
        let url = survivor.clone();
        async move {
            admin_status(&url).is_some_and(|s| leader_of(&s).is_some_and(|l| l != old_leader))
        }
    })
    .await;
    let status = admin_status(&survivor).unwrap();
    let victim_view = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == old_leader)
        .cloned()
        .unwrap();
    assert_eq!(victim_view["reachable"], false, "{status}");
    // Writes go on through the survivors.
    assert_eq!(
        put(survivor.clone(), RW_TOKEN.into(), "3").await,
        StatusCode::OK
    );

    // The killed node restarts from its data dir and rejoins the same cluster.
    cluster.nodes[victim].restart();
    let restarted = cluster.nodes[victim].url.clone();
    wait_until(PATIENCE, "the restarted node rejoined", || {
        let (a, b) = (restarted.clone(), survivor.clone());
        async move {
            admin_status(&a).is_some_and(|s| settled(&s, 3))
                && admin_status(&b).is_some_and(|s| settled(&s, 3))
        }
    })
    .await;
    wait_until(
        PATIENCE,
        "the restarted node and a survivor naming one leader",
        || {
            let (a, b) = (restarted.clone(), survivor.clone());
            async move {
                let a = admin_status(&a).and_then(|s| leader_of(&s));
                a.is_some() && a == admin_status(&b).and_then(|s| leader_of(&s))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cluster_secret_cannot_join() {
    let cluster = ProcessCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let grpc = format!("127.0.0.1:{}", nxcache_tests::free_port());
    let seed = format!("127.0.0.1:{}", cluster.grpc_ports[0]);
    let intruder = nxcache_tests::NodeProcess::start(
        &dir.path().join("intruder"),
        &[
            "--node-id",
            "9",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            &grpc,
            "--advertise",
            &grpc,
            "--join",
            &seed,
        ],
        &[("NXCACHE_CLUSTER_SECRET", "not-the-cluster-secret")],
    );
    let url = cluster.nodes[0].url.clone();
    wait_until(PATIENCE, "the refused joins are counted", || {
        let url = url.clone();
        async move {
            let page = nxcache_tests::metrics_page(&url).await;
            nxcache_tests::metric(
                &page,
                r#"nxcache_cluster_rejected_calls_total{reason="wrong"}"#,
            )
            .is_some_and(|n| n >= 1.0)
        }
    })
    .await;
    let status = admin_status(&url).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 1, "{status}");
    // The intruder never becomes ready.
    let ready = nxcache_tests::http_client()
        .get(format!("{}/readyz", intruder.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Deterministic artifact bytes, made (and checked) a chunk at a time.
fn chunk_of(i: u64) -> bytes::Bytes {
    let mut v = vec![0u8; 1 << 20];
    for (j, b) in v.iter_mut().enumerate() {
        *b = (j as u64).wrapping_mul(2654435761).wrapping_add(i * 7919) as u8;
    }
    bytes::Bytes::from(v)
}

async fn settled_with(url: &str, members: usize, replication_factor: u64) {
    let url = url.to_owned();
    nxcache_tests::wait_until(PATIENCE, "cluster settled", || {
        let url = url.clone();
        async move {
            nxcache_tests::admin_status(&url).is_some_and(|s| {
                settled(&s, members) && s["data"]["replication_factor"] == replication_factor
            })
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_artifact_streams_through_a_node_that_does_not_own_it() {
    let cluster = nxcache_tests::ProcessCluster::start_with(
        3,
        &["--replication-factor", "2", "--max-artifact-size", "1GiB"],
    );
    for node in &cluster.nodes {
        settled_with(&node.url, 3, 2).await;
    }
    // Node 3 owns none of this key's copies: all bytes pass through it.
    let members: Vec<nxcache_placement::Member> = (1..=3)
        .map(|id| nxcache_placement::Member {
            id,
            zone: String::new(),
        })
        .collect();
    let ring = nxcache_placement::Ring::new(0, &members, 2, nxcache_placement::DEFAULT_VNODES);
    let hash = (1..1000u64)
        .map(|n| n.to_string())
        .find(|h| !ring.owners(h).contains(&3))
        .unwrap();
    let via = &cluster.nodes[2];
    let pid = via.pid();
    let (_, rss_before) = memory_kib(pid);
    const CHUNKS: u64 = 512;
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..CHUNKS).map(|i| Ok::<_, std::io::Error>(chunk_of(i))),
    ));
    let client = nxcache_tests::http_client();
    // Each transfer gets far longer than the shared client's minute: 512 MiB through two
    // hops of a debug build on a loaded machine, bounded still.
    let transfer = std::time::Duration::from_secs(420);
    let response = client
        .put(format!("{}/v1/cache/{hash}", via.url))
        .bearer_auth(RW_TOKEN)
        .header("content-length", CHUNKS << 20)
        .timeout(transfer)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut response = client
        .get(format!("{}/v1/cache/{hash}", via.url))
        .bearer_auth(RW_TOKEN)
        .timeout(transfer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (mut received, mut expected, mut at) = (0u64, chunk_of(0), 0usize);
    let mut index = 0;
    while let Some(part) = response.chunk().await.unwrap() {
        for b in part.iter() {
            if at == expected.len() {
                index += 1;
                expected = chunk_of(index);
                at = 0;
            }
            assert_eq!(*b, expected[at], "byte {received} differs");
            at += 1;
            received += 1;
        }
    }
    assert_eq!(received, CHUNKS << 20);
    let (peak, _) = memory_kib(pid);
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 64,
        "the relaying node grew by {growth_mib} MiB for a 512 MiB artifact"
    );
    eprintln!("peak RSS growth of the relaying node: {growth_mib} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_owner_during_uploads_loses_nothing_acknowledged() {
    let mut cluster = nxcache_tests::ProcessCluster::start(3);
    for node in &cluster.nodes {
        settled_with(&node.url, 3, 3).await;
    }
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    let client = nxcache_tests::http_client();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    for n in 0..200u64 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (client, acked) = (client.clone(), acked.clone());
        let url = urls[(n % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let body = nxcache_tests::random_bytes(1000 + (n as usize % 17) * 60_000);
            let hash = (7_000_000 + n).to_string();
            if nxcache_tests::put(&client, &url, &hash, body.clone()).await == 200 {
                acked.lock().unwrap().push((hash, body));
            }
        }));
        if n == 60 {
            cluster.nodes[2].kill9();
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 180, "{} of 200 acknowledged", acked.len());
    cluster.nodes[2].restart();
    settled_with(&urls[2], 3, 3).await;
    for (hash, body) in &acked {
        for url in &urls {
            let (status, got) = nxcache_tests::get(&client, url, hash).await;
            assert_eq!(status, 200, "{hash} through {url}");
            assert!(got == *body, "{hash} through {url}: other bytes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_through_a_node_that_holds_no_copy_is_served_by_an_owner() {
    // More nodes than copies: two of the four nodes hold each artifact, two hold none.
    let cluster = ProcessCluster::start_with(4, &["--replication-factor", "2"]);
    for node in &cluster.nodes {
        settled_with(&node.url, 4, 2).await;
    }
    let client = nxcache_tests::http_client();
    let body = nxcache_tests::random_bytes(300_000);
    assert_eq!(
        nxcache_tests::put(&client, &cluster.nodes[0].url, "4242", body.clone()).await,
        200
    );
    let holders = || -> Vec<usize> {
        (0..cluster.nodes.len())
            .filter(|i| nxcache_tests::holds_on_disk(&cluster.nodes[*i].data_dir, "4242"))
            .collect()
    };
    // The copies settle on their two owners (a copy the entry node kept while writing
    // moves to its owner).
    wait_until(
        PATIENCE,
        "the artifact on exactly two of the four disks",
        || {
            let two = holders().len() == 2;
            async move { two }
        },
    )
    .await;
    let owners = holders();
    let entry = (0..cluster.nodes.len())
        .find(|i| !owners.contains(i))
        .expect("a node without a copy");
    let via = &cluster.nodes[entry];
    assert!(
        !nxcache_tests::holds_on_disk(&via.data_dir, "4242"),
        "the entry node holds a copy"
    );
    let page = nxcache_tests::metrics_page(&via.url).await;
    let remote_before = nxcache_tests::metric_sum(&page, "nxcache_cache_remote_hits_total", &[]);
    let (status, got) = nxcache_tests::get(&client, &via.url, "4242").await;
    assert_eq!(status, 200, "GET through node {} (no copy)", entry + 1);
    assert!(got == body, "other bytes through node {}", entry + 1);
    // Answered from an owner's store: a remote hit on the entry node, a Blobs/Get served
    // by an owner, and still no copy on the entry node (it is not an owner).
    let page = nxcache_tests::metrics_page(&via.url).await;
    assert_eq!(
        nxcache_tests::metric_sum(&page, "nxcache_cache_remote_hits_total", &[]),
        remote_before + 1.0,
        "remote hits on the entry node"
    );
    let mut served = 0.0;
    for owner in &owners {
        served += nxcache_tests::metric_sum(
            &nxcache_tests::metrics_page(&cluster.nodes[*owner].url).await,
            "nxcache_grpc_server_calls_total",
            &[r#"method="Blobs/Get""#],
        );
    }
    assert!(served >= 1.0, "no owner served a Blobs/Get");
    assert!(
        !nxcache_tests::holds_on_disk(&via.data_dir, "4242"),
        "the entry node kept a copy it does not own"
    );
}
