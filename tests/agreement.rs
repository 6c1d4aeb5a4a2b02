//! Replicas that agree: one key, one body, cluster-wide. Concurrent writers of different
//! bytes through different coordinators (first write wins), partitions that heal into
//! one body by the deterministic rule, deletes that name the copy, bounded repair.

use std::collections::BTreeMap;
use std::sync::Arc;

use nxcache_store::BlobKey;
use nxcache_tests::{InProcessCluster, PATIENCE, get, put, random_bytes, wait_until};

fn key(hash: &str) -> BlobKey {
    BlobKey::parse(hash).unwrap()
}

/// The checksum of the copy each running node holds of `hash` (None: no copy).
fn copies(cluster: &InProcessCluster, hash: &str) -> Vec<(usize, Option<[u8; 16]>)> {
    (0..cluster.nodes.len())
        .filter_map(|i| {
            let node = cluster.nodes[i].as_ref()?;
            let meta = node.data().store().head(&key(hash)).unwrap();
            Some((i, meta.map(|m| m.checksum)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_of_different_bytes_never_both_succeed_and_nodes_agree() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let (a, b) = (cluster.url(0), cluster.url(1));
    let mut tasks = Vec::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    for n in 0..200u64 {
        let hash = format!("{}", 7_000_000 + n);
        let (first, second) = (random_bytes(20_000), random_bytes(20_000));
        let (client, a, b, sem) = (client.clone(), a.clone(), b.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            // Both uploads start together, through two different coordinators.
            let (sa, sb) = tokio::join!(
                put(&client, &a, &hash, first.clone()),
                put(&client, &b, &hash, second.clone())
            );
            (hash, (sa, first), (sb, second))
        }));
    }
    let mut winners = BTreeMap::new();
    let mut both = Vec::new();
    let mut neither = Vec::new();
    for t in tasks {
        let (hash, (sa, first), (sb, second)) = t.await.unwrap();
        for s in [sa, sb] {
            assert!(s == 200 || s == 409, "{hash}: status {s}");
        }
        match (sa, sb) {
            (200, 200) => both.push(hash),
            (200, _) => {
                winners.insert(hash, first);
            }
            (_, 200) => {
                winners.insert(hash, second);
            }
            _ => neither.push(hash),
        }
    }
    eprintln!(
        "{} hashes with one 200, {} with two, {} with none",
        winners.len(),
        both.len(),
        neither.len()
    );
    assert!(
        both.is_empty(),
        "{} of 200 hashes got two 200s for different bytes: {:?}",
        both.len(),
        &both[..both.len().min(5)]
    );
    // Every node serves the winner's bytes, and every owner's disk holds them.
    for (hash, body) in &winners {
        for i in 0..3 {
            let (status, got) = get(&client, &cluster.url(i), hash).await;
            assert_eq!(status, 200, "{hash} through node {i}");
            assert!(
                got == *body,
                "{hash}: node {i} serves other bytes than the 200"
            );
        }
    }
    let expected = |body: &Vec<u8>| nxcache_store::checksum_of(body);
    wait_until(PATIENCE, "every owner holds the winner's bytes", || {
        let agreed = winners.iter().all(|(hash, body)| {
            copies(&cluster, hash)
                .iter()
                .all(|(_, sum)| *sum == Some(expected(body)))
        });
        async move { agreed }
    })
    .await;
    // Where neither write was acknowledged, the owners still agree (on one body, or on
    // nothing).
    wait_until(PATIENCE, "owners agree on refused keys", || {
        let agreed = neither.iter().all(|hash| {
            let sums: Vec<_> = copies(&cluster, hash).into_iter().map(|(_, s)| s).collect();
            sums.iter().all(|s| *s == sums[0])
        });
        async move { agreed }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_sides_of_a_partition_acknowledge_then_converge_to_the_body_the_rule_picks() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let client = nxcache_tests::http_client();
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    // Node 0 alone on one side, nodes 1 and 2 on the other. Under `serve` both sides
    // accept a write of the same hash with different bytes (availability first).
    cluster.partition_data(&[0], &[1, 2]);
    let (alone, pair) = (random_bytes(30_000), random_bytes(30_000));
    assert_eq!(put(&client, &urls[0], "8100", alone.clone()).await, 200);
    assert_eq!(put(&client, &urls[1], "8100", pair.clone()).await, 200);
    // During the partition each side serves what it holds.
    assert_eq!(get(&client, &urls[0], "8100").await, (200, alone.clone()));
    assert_eq!(get(&client, &urls[2], "8100").await, (200, pair.clone()));
    // Every node on its own: three bodies, one owner each.
    cluster.partition_data(&[1], &[2]);
    let three: Vec<Vec<u8>> = (0..3).map(|_| random_bytes(20_000)).collect();
    for (i, body) in three.iter().enumerate() {
        assert_eq!(put(&client, &urls[i], "8200", body.clone()).await, 200);
    }
    // The body each key must end with, by the rule, from the copies on the disks.
    let expected = |hash: &str| {
        let held: Vec<nxcache_store::CopyIdentity> = (0..3)
            .filter_map(|i| {
                let node = cluster.nodes[i].as_ref()?;
                node.data()
                    .store()
                    .head(&key(hash))
                    .unwrap()
                    .map(|m| m.identity())
            })
            .collect();
        assert_eq!(
            held.len(),
            3,
            "{hash}: every owner holds a copy before the heal"
        );
        nxcache_replication::winner(&held).unwrap().checksum
    };
    let (want_8100, want_8200) = (expected("8100"), expected("8200"));
    // Two owners against one: the pair's body, whatever the clocks say.
    assert_eq!(want_8100, nxcache_store::checksum_of(&pair));
    cluster.heal_data();
    wait_until(PATIENCE, "every owner holds the rule's body", || {
        let done = copies(&cluster, "8100")
            .iter()
            .all(|(_, s)| *s == Some(want_8100))
            && copies(&cluster, "8200")
                .iter()
                .all(|(_, s)| *s == Some(want_8200));
        async move { done }
    })
    .await;
    for url in &urls {
        let (status, got) = get(&client, url, "8100").await;
        assert_eq!(status, 200);
        assert!(got == pair, "{url} serves another body for 8100");
        let (status, got) = get(&client, url, "8200").await;
        assert_eq!(status, 200);
        assert_eq!(nxcache_store::checksum_of(&got), want_8200, "{url}");
    }
    // The conflicts were found and repaired, and counted.
    let mut found = 0.0;
    for url in &urls {
        let page = nxcache_tests::metrics_page(url).await;
        for line in page
            .lines()
            .filter(|l| l.starts_with("nxcache_replication_conflicts_total"))
        {
            found += line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap();
        }
    }
    assert!(found >= 2.0, "{found} conflicts counted");
}
