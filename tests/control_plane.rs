//! The control plane seen through HTTP, with whole nodes in this test process: one ring
//! per epoch on every node while a node joins under load, cluster settings changed on
//! purpose (a lower replication factor), and a node cut off from the others that stays
//! ready and serves what it holds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nxcache_store::BlobKey;
use nxcache_tests::{ADMIN_TOKEN, InProcessCluster, PATIENCE, get, put, random_bytes, wait_until};
use serde_json::Value;

async fn status(client: &reqwest::Client, url: &str) -> Option<Value> {
    let response = client
        .get(format!("{url}/admin/v1/status"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// (epoch, digest) of each ring a status shows: the current one and the previous one.
fn rings(status: &Value) -> Vec<(u64, String)> {
    ["ring", "previous_ring"]
        .iter()
        .filter_map(|k| {
            let ring = &status[k];
            Some((ring["epoch"].as_u64()?, ring["digest"].as_str()?.to_owned()))
        })
        .collect()
}

/// Which running nodes hold `hash` in their own store.
fn holders(cluster: &InProcessCluster, hash: &str) -> Vec<u64> {
    let key = BlobKey::parse(hash).unwrap();
    (0..cluster.nodes.len())
        .filter(|i| {
            cluster.nodes[*i]
                .as_ref()
                .is_some_and(|n| n.data().store().contains(&key).unwrap())
        })
        .map(|i| i as u64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_reports_one_ring_per_epoch_while_a_node_joins_under_load() {
    let mut cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let urls = Arc::new(Mutex::new(
        (0..3).map(|i| cluster.url(i)).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let url = {
                    let urls = urls.lock().unwrap();
                    urls[n as usize % urls.len()].clone()
                };
                put(
                    &client,
                    &url,
                    &(7_000_000 + n).to_string(),
                    random_bytes(4096),
                )
                .await;
                n += 1;
            }
            n
        })
    };
    // Every ring every node shows, by epoch; a second digest for one epoch is a conflict.
    let seen = Arc::new(Mutex::new(BTreeMap::<u64, String>::new()));
    let conflicts = Arc::new(Mutex::new(Vec::<String>::new()));
    let polls = Arc::new(AtomicUsize::new(0));
    let poller = {
        let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
        let (seen, conflicts, polls) = (seen.clone(), conflicts.clone(), polls.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let round: Vec<String> = urls.lock().unwrap().clone();
                for url in round {
                    let Some(s) = status(&client, &url).await else {
                        continue;
                    };
                    for (epoch, digest) in rings(&s) {
                        let mut seen = seen.lock().unwrap();
                        let known = seen.entry(epoch).or_insert_with(|| digest.clone());
                        if *known != digest {
                            conflicts.lock().unwrap().push(format!(
                                "{url} shows epoch {epoch} as {digest}, another node as {known}"
                            ));
                        }
                    }
                    polls.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    let new = cluster.add_node(&[]).await;
    urls.lock().unwrap().push(cluster.url(new));
    let all: Vec<String> = urls.lock().unwrap().clone();
    wait_until(
        PATIENCE,
        "every node places by one ring of four members",
        || {
            let (client, all) = (client.clone(), all.clone());
            async move {
                let mut rings = Vec::new();
                for url in &all {
                    match status(&client, url).await {
                        Some(s) => rings.push((
                            s["ring"]["digest"].as_str().unwrap_or("").to_owned(),
                            s["ring"]["members"].as_array().map_or(0, Vec::len),
                        )),
                        None => return false,
                    }
                }
                rings.iter().all(|r| r.1 == 4 && *r == rings[0])
            }
        },
    )
    .await;

    // The ring before the join comes back from disk after a restart: reads still fall
    // back to it while data moves.
    let before = status(&client, &cluster.url(1)).await.unwrap()["previous_ring"].clone();
    assert!(before["epoch"].is_u64(), "no previous ring after a join");
    cluster.stop(1).await;
    cluster.restart(1).await;
    let after = status(&client, &cluster.url(1)).await.unwrap()["previous_ring"].clone();
    assert_eq!(after, before);

    let polled = polls.load(Ordering::SeqCst);
    wait_until(PATIENCE, "more status polls", || {
        let n = polls.load(Ordering::SeqCst);
        async move { n >= polled + 8 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let written = writer.await.unwrap();
    poller.await.unwrap();
    assert!(written > 0);
    let conflicts = conflicts.lock().unwrap().clone();
    assert!(conflicts.is_empty(), "{conflicts:#?}");
    assert!(
        seen.lock().unwrap().len() >= 2,
        "the join showed no new epoch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lowering_the_replication_factor_leaves_two_copies_and_every_read_succeeds() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let mut written = BTreeMap::new();
    for n in 0..60usize {
        let hash = (3_300_000 + n).to_string();
        let body = random_bytes(1000 + n * 997);
        assert_eq!(
            put(&client, &cluster.url(n % 3), &hash, body.clone()).await,
            200
        );
        written.insert(hash, body);
    }
    wait_until(PATIENCE, "three copies of each", || {
        let done = written.keys().all(|h| holders(&cluster, h).len() == 3);
        async move { done }
    })
    .await;
    let written = Arc::new(written);
    // Readers through every node the whole time: every artifact, every time.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let (client, url, written, stop) = (
                client.clone(),
                cluster.url(i),
                written.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut rounds = 0;
                while !stop.load(Ordering::SeqCst) {
                    for (hash, body) in written.iter() {
                        let (status, got) = get(&client, &url, hash).await;
                        assert_eq!(status, 200, "{hash} through {url} while copies go");
                        assert!(got == *body, "{hash} through {url}: other bytes");
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();

    let response = client
        .put(format!("{}/admin/v1/settings", cluster.url(1)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"replication_factor": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let settings: Value = response.json().await.unwrap();
    assert_eq!(settings["replication_factor"], 2);

    wait_until(
        Duration::from_secs(120),
        "exactly two copies of each artifact, on its owners",
        || {
            let view = cluster.node(0).data().view();
            let done = view.ring.replicas() == 2
                && written.keys().all(|h| {
                    let mut owners = view.owners(h);
                    owners.sort();
                    holders(&cluster, h) == owners
                });
            async move { done }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        assert!(reader.await.unwrap() >= 1);
    }
    for i in 0..3 {
        let s = status(&client, &cluster.url(i)).await.unwrap();
        assert_eq!(s["settings"]["replication_factor"], 2);
        assert_eq!(s["ring"]["replicas"], 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_the_others_stays_ready_and_serves_what_it_holds() {
    let mut cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let url = cluster.url(0);
    let mut written = BTreeMap::new();
    for n in 0..10usize {
        let hash = (4_400_000 + n).to_string();
        let body = random_bytes(5000 + n);
        assert_eq!(put(&client, &url, &hash, body.clone()).await, 200);
        written.insert(hash, body);
    }
    wait_until(PATIENCE, "three copies of each", || {
        let done = written.keys().all(|h| holders(&cluster, h).len() == 3);
        async move { done }
    })
    .await;
    // /readyz of node 0, asked all along: never anything but 200.
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (client, url, stop, probes) =
            (client.clone(), url.clone(), stop.clone(), probes.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let answer = client
                    .get(format!("{url}/readyz"))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
                probes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures
        })
    };

    cluster.stop(1).await;
    cluster.stop(2).await;
    wait_until(PATIENCE, "node 0 says it has no leader", || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            status(&client, &url)
                .await
                .is_some_and(|s| s["leader_id"].is_null() && s["leaderless_ms"].is_u64())
        }
    })
    .await;
    let page = nxcache_tests::metrics_page(&url).await;
    assert_eq!(
        nxcache_tests::metric(&page, "nxcache_raft_has_leader"),
        Some(0.0)
    );
    // Still serving: its copies, and a miss for what nobody stored.
    for (hash, body) in &written {
        assert_eq!(get(&client, &url, hash).await, (200, body.clone()));
    }
    assert_eq!(get(&client, &url, "4499999").await.0, 404);
    let probed = probes.load(Ordering::SeqCst);
    wait_until(PATIENCE, "more readiness probes", || {
        let n = probes.load(Ordering::SeqCst);
        async move { n >= probed + 20 }
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    let failures = prober.await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");

    // Restarted while the others are still down, it is ready again from its own disk.
    cluster.stop(0).await;
    cluster.restart(0).await;
    let url = cluster.url(0);
    let readyz = client.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200, "{}", readyz.text().await.unwrap());
    for (hash, body) in &written {
        assert_eq!(get(&client, &url, hash).await, (200, body.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_come_from_the_first_node_and_later_flags_change_nothing() {
    let mut cluster = InProcessCluster::start(1, &["--replication-factor", "2"]).await;
    let settings = |cluster: &InProcessCluster, i| cluster.node(i).meta().state().cluster.settings;
    assert_eq!(settings(&cluster, 0).replication_factor, 2);
    // Joined, and later restarted, with another value: the cluster's stays.
    let joiner = cluster
        .add_node(&["--replication-factor", "3", "--on-degraded", "strict"])
        .await;
    cluster.stop(joiner).await;
    cluster.restart(joiner).await;
    cluster.wait_members(2).await;
    for i in [0, joiner] {
        let s = settings(&cluster, i);
        assert_eq!((s.replication_factor, s.on_degraded.as_str()), (2, "serve"));
        assert_eq!(cluster.node(i).data().view().ring.replicas(), 2);
    }
    // Changed on purpose, through any node: every node applies it.
    let response = nxcache_tests::http_client()
        .put(format!("{}/admin/v1/settings", cluster.url(joiner)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"on_degraded": "strict", "write_quorum": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "W 3 > R 2 must be refused");
    let text = response.text().await.unwrap();
    assert!(
        text.contains("cannot exceed the replication factor"),
        "{text}"
    );
    assert_eq!(
        settings(&cluster, 0).on_degraded,
        "serve",
        "a refused change applied"
    );
    let response = nxcache_tests::http_client()
        .put(format!("{}/admin/v1/settings", cluster.url(joiner)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"on_degraded": "strict"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    wait_until(PATIENCE, "both nodes apply strict", || {
        let done = [0, joiner]
            .iter()
            .all(|i| settings(&cluster, *i).on_degraded == "strict");
        async move { done }
    })
    .await;
}
