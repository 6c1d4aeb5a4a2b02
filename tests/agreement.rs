//! Replicas that agree: one key, one body, cluster-wide. Concurrent writers of different
//! bytes through different coordinators (first write wins), partitions that heal into
//! one body by the deterministic rule, deletes that name the copy, bounded repair.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nxcache_store::BlobKey;
use nxcache_tests::{InProcessCluster, get, put, random_bytes, wait_until};

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
    let client = reqwest::Client::new();
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
    wait_until(
        Duration::from_secs(60),
        "every owner holds the winner's bytes",
        || {
            let agreed = winners.iter().all(|(hash, body)| {
                copies(&cluster, hash)
                    .iter()
                    .all(|(_, sum)| *sum == Some(expected(body)))
            });
            async move { agreed }
        },
    )
    .await;
    // Where neither write was acknowledged, the owners still agree (on one body, or on
    // nothing).
    wait_until(
        Duration::from_secs(60),
        "owners agree on refused keys",
        || {
            let agreed = neither.iter().all(|hash| {
                let sums: Vec<_> = copies(&cluster, hash).into_iter().map(|(_, s)| s).collect();
                sums.iter().all(|s| *s == sums[0])
            });
            async move { agreed }
        },
    )
    .await;
}
