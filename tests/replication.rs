//! The replicated data plane, with whole nodes in this test process: quorum writes
//! through node loss, the degraded policies, hinted hand-off, read repair, rebalancing
//! on join and drain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nxcache_store::BlobKey;
use nxcache_tests::{InProcessCluster, PATIENCE, get, put, random_bytes, wait_until};
use rand::Rng;

fn key(hash: &str) -> BlobKey {
    BlobKey::parse(hash).unwrap()
}

/// Which running nodes hold `hash` in their own store.
fn holders(cluster: &InProcessCluster, hash: &str) -> Vec<usize> {
    (0..cluster.nodes.len())
        .filter(|i| {
            cluster.nodes[*i]
                .as_ref()
                .is_some_and(|n| n.data().store().contains(&key(hash)).unwrap())
        })
        .collect()
}

/// A size up to 4 MiB, most of them small (like real build outputs).
fn random_size(rng: &mut impl Rng) -> usize {
    let exp: f64 = rng.random_range(6.0..22.0);
    (2f64.powf(exp) as usize).min(4 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_put_survives_losing_an_owner_mid_load() {
    let mut cluster = InProcessCluster::start(3, &[]).await;
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let client = nxcache_tests::http_client();
    let acked = Arc::new(std::sync::Mutex::new(BTreeMap::<String, Vec<u8>>::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // 500 PUTs, 24 at a time, through nodes 0 and 1 (node 2 is the one that goes).
    let sem = Arc::new(tokio::sync::Semaphore::new(24));
    for n in 0..500u64 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (client, acked, started) = (client.clone(), acked.clone(), started.clone());
        let url = urls[(n % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let size = random_size(&mut rand::rng());
            let body = random_bytes(size);
            let hash = format!("{}", 1_000_000 + n);
            started.fetch_add(1, Ordering::SeqCst);
            if put(&client, &url, &hash, body.clone()).await == 200 {
                acked.lock().unwrap().insert(hash, body);
            }
        }));
        if n == 150 {
            // An owner of about every key leaves while uploads are in flight.
            cluster.stop(2).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 450,
        "only {} of 500 PUTs acknowledged",
        acked.len()
    );
    cluster.restart(2).await;
    cluster.wait_members(3).await;
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    for (hash, body) in &acked {
        for url in &urls {
            let (status, got) = get(&client, url, hash).await;
            assert_eq!(status, 200, "{hash} through {url}");
            assert!(got == *body, "{hash} through {url}: other bytes");
        }
    }
    // Hints and anti-entropy put the returned node back in step: 3 copies of each.
    wait_until(
        Duration::from_secs(120),
        "every key on all three nodes",
        || {
            let all = acked.keys().all(|h| holders(&cluster, h).len() == 3);
            async move { all }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_policy_refuses_writes_it_cannot_replicate() {
    let mut cluster = InProcessCluster::start(3, &["--on-degraded", "strict"]).await;
    let client = nxcache_tests::http_client();
    let url = cluster.url(0);
    assert_eq!(put(&client, &url, "1", random_bytes(5000)).await, 200);
    cluster.stop(1).await;
    cluster.stop(2).await;
    let body = random_bytes(300_000);
    // The first attempt finds out the peers are gone; every attempt is refused.
    for _ in 0..3 {
        let response = client
            .put(format!("{url}/v1/cache/2"))
            .bearer_auth(nxcache_tests::RW_TOKEN)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 503);
        let text = response.text().await.unwrap();
        assert!(text.contains("--on-degraded strict"), "{text}");
    }
    assert!(
        holders(&cluster, "2").is_empty(),
        "a refused write left a copy"
    );
    // A key this node lacks while the other replicas are out of reach: 503 under
    // strict (they may hold it), never a silent miss.
    assert_eq!(get(&client, &url, "999999").await.0, 503);
    // A key with a live replica is still served.
    assert_eq!(get(&client, &url, "1").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_policy_accepts_degraded_writes_and_hands_them_back() {
    let mut cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let url = cluster.url(0);
    let before = random_bytes(10_000);
    assert_eq!(put(&client, &url, "100", before.clone()).await, 200);
    cluster.stop(1).await;
    cluster.stop(2).await;
    let mut written = BTreeMap::new();
    for n in 0..20 {
        let hash = format!("{}", 200 + n);
        let body = random_bytes(50_000 + n * 1000);
        assert_eq!(put(&client, &url, &hash, body.clone()).await, 200);
        written.insert(hash, body);
    }
    // Missing everywhere reachable: a miss, never a 5xx.
    assert_eq!(get(&client, &url, "999999").await.0, 404);
    assert_eq!(get(&client, &url, "100").await, (200, before));
    assert!(cluster.node(0).data().pending_hints() >= 20);
    cluster.restart(1).await;
    cluster.restart(2).await;
    cluster.wait_members(3).await;
    wait_until(PATIENCE, "hints delivered, 3 copies each", || {
        let done = cluster.node(0).data().pending_hints() == 0
            && written.keys().all(|h| holders(&cluster, h).len() == 3);
        async move { done }
    })
    .await;
    for (hash, body) in &written {
        for i in 1..3 {
            let (status, got) = get(&client, &cluster.url(i), hash).await;
            assert_eq!(status, 200);
            assert!(got == *body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_replica_is_never_served_and_is_repaired() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let body = random_bytes(200_000);
    assert_eq!(
        put(&client, &cluster.url(0), "4242", body.clone()).await,
        200
    );
    wait_until(PATIENCE, "three copies", || {
        let n = holders(&cluster, "4242").len();
        async move { n == 3 }
    })
    .await;
    // Damage node 1's file in place.
    let data_dir = cluster.node(1).data().store().config().data_dir.clone();
    let file = find_file(&data_dir.join("blobs"), "4242").expect("blob file");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (status, got) = get(&client, &cluster.url(1), "4242").await;
    assert_eq!(status, 200);
    assert!(got == body, "served damaged bytes");
    wait_until(PATIENCE, "node 1 repaired", || {
        let ok = cluster.node(1).data().store().scrub(&key("4242")).unwrap()
            == nxcache_store::ScrubOutcome::Intact;
        async move { ok }
    })
    .await;
}

fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_node_takes_its_share_and_a_drained_node_empties() {
    let mut cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let mut written = BTreeMap::new();
    for n in 0..300 {
        let hash = format!("{}", 50_000 + n);
        let body = random_bytes(2000 + n);
        assert_eq!(
            put(&client, &cluster.url(n % 3), &hash, body.clone()).await,
            200
        );
        written.insert(hash, body);
    }
    let written = Arc::new(written);
    // Readers through node 0 the whole time: every key, every time.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (client, url, written, stop) = (
            client.clone(),
            cluster.url(0),
            written.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut rounds = 0;
            while !stop.load(Ordering::SeqCst) {
                for (hash, body) in written.iter() {
                    let (status, got) = get(&client, &url, hash).await;
                    assert_eq!(status, 200, "{hash} unreadable during the rebalance");
                    assert!(got == *body);
                }
                rounds += 1;
            }
            rounds
        })
    };
    let new = cluster.add_node(&[]).await;
    wait_until(Duration::from_secs(120), "rebalanced onto 4 nodes", || {
        let settled = written.keys().all(|h| {
            let owners = cluster.node(0).data().view().owners(h);
            let mut held = holders(&cluster, h);
            held.sort();
            let mut owners = owners;
            owners.sort();
            held.iter().map(|i| *i as u64).collect::<Vec<_>>() == owners
        });
        async move { settled }
    })
    .await;
    let counts: Vec<u64> = (0..4)
        .map(|i| cluster.node(i).data().store().stats().objects)
        .collect();
    let mean = counts.iter().sum::<u64>() as f64 / 4.0;
    for (i, c) in counts.iter().enumerate() {
        assert!(
            (*c as f64 - mean).abs() <= mean * 0.25,
            "node {i} holds {c} keys, mean {mean}: {counts:?}"
        );
    }
    // Drain the new node: everything moves off it, nothing is lost.
    let new_id = new as u64;
    cluster
        .node(0)
        .meta()
        .write(nxcache_meta_command_drain(new_id))
        .await
        .unwrap();
    wait_until(Duration::from_secs(120), "drained node empty", || {
        let empty = cluster.node(new).data().store().stats().objects == 0
            && written.keys().all(|h| holders(&cluster, h).len() == 3);
        async move { empty }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    assert!(reader.await.unwrap() >= 1);
    // The drain is visible in the drained node's metrics: keys and bytes moved, none left.
    let page = nxcache_tests::metrics_page(&cluster.url(new)).await;
    let value =
        |series| nxcache_tests::metric(&page, series).unwrap_or_else(|| panic!("{series} missing"));
    assert!(value("nxcache_rebalance_moved_total") > 0.0);
    assert!(value("nxcache_rebalance_moved_bytes_total") >= value("nxcache_rebalance_moved_total"));
    assert_eq!(value("nxcache_rebalance_pending_keys"), 0.0);
    assert_eq!(value("nxcache_rebalance_pending_bytes"), 0.0);
}

fn nxcache_meta_command_drain(id: u64) -> nxcache_meta::MetaCommand {
    nxcache_meta::MetaCommand::SetMemberState {
        id,
        state: nxcache_meta::MemberState::Draining,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_given_at_start_become_cluster_settings() {
    let cluster = InProcessCluster::start(
        1,
        &[
            "--max-voters",
            "5",
            "--replication-factor",
            "2",
            "--write-quorum",
            "2",
            "--on-degraded",
            "strict",
        ],
    )
    .await;
    let settings = cluster.node(0).meta().state().cluster.settings;
    assert_eq!(settings.max_voters, 5);
    assert_eq!(settings.replication_factor, 2);
    assert_eq!(settings.write_quorum, 2);
    assert_eq!(settings.on_degraded, "strict");
    let view = cluster.node(0).data().view();
    assert_eq!(view.policy, nxcache_replication::DegradedPolicy::Strict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evicted_key_leaves_all_its_owners() {
    let mut cluster = InProcessCluster::start(3, &[]).await;
    // A fourth node with room for a few artifacts only: it evicts keys it owns.
    let small = cluster.add_node(&["--max-disk-usage", "400KiB"]).await;
    let client = nxcache_tests::http_client();
    let hashes: Vec<String> = (0..24).map(|n| (880_000 + n).to_string()).collect();
    for (n, hash) in hashes.iter().enumerate() {
        assert_eq!(
            put(&client, &cluster.url(n % 3), hash, random_bytes(60_000)).await,
            200
        );
    }
    assert!(
        cluster.node(small).data().store().stats().objects < 7,
        "the small node kept more than its budget"
    );
    // Every key ends up on all of its owners or on none: never half-evicted.
    wait_until(PATIENCE, "owners agree on every key", || {
        let view = cluster.node(0).data().view();
        let mut dropped = 0;
        let agreed = hashes.iter().all(|h| {
            let mut owners: Vec<usize> = view.owners(h).iter().map(|o| *o as usize).collect();
            owners.sort();
            let held = holders(&cluster, h);
            dropped += usize::from(held.is_empty());
            held.is_empty() || held == owners
        });
        async move { agreed && dropped > 0 }
    })
    .await;
}
