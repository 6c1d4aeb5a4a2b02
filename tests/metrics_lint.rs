//! The `/metrics` exposition of a working three-node cluster passes `promtool check
//! metrics` (naming, units, `_total` counters, help texts) and keeps hashes, tokens and
//! other unbounded values out of its labels.
//!
//! Needs Debian's `prometheus` package (promtool), so it is `#[ignore]`d in the plain
//! `cargo test` and run by `.ci/run` with `--ignored`.

use std::io::Write;
use std::process::{Command, Stdio};

use nxcache_tests::{ProcessCluster, get, metrics_page, put, random_bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool; run by .ci/run"]
async fn every_nodes_exposition_passes_promtool() {
    let cluster = ProcessCluster::start(3);
    let first = cluster.nodes[0].url.clone();
    nxcache_tests::wait_for_reachable_members(&first, 3).await;
    // Traffic through every node, so every family has samples: hits, misses, remote
    // reads, replica transfers, errors.
    let http = nxcache_tests::http_client();
    let hashes: Vec<String> = (0..20).map(|i| format!("{}", 90_000_000 + i)).collect();
    for (i, hash) in hashes.iter().enumerate() {
        let node = &cluster.nodes[i % 3].url;
        assert_eq!(put(&http, node, hash, random_bytes(10_000)).await, 200);
    }
    for (i, hash) in hashes.iter().enumerate() {
        let node = &cluster.nodes[(i + 1) % 3].url;
        assert_eq!(get(&http, node, hash).await.0, 200);
        assert_eq!(get(&http, node, &format!("{hash}9")).await.0, 404);
    }

    for node in &cluster.nodes {
        let page = metrics_page(&node.url).await;
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool (Debian package prometheus)");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        let findings = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && findings.trim().is_empty(),
            "promtool on {}:\n{findings}",
            node.url
        );
        let families = page
            .lines()
            .filter(|l| l.starts_with("# TYPE nxcache_"))
            .count();
        eprintln!("{}: {families} nxcache families, promtool clean", node.url);
        let labels: Vec<&str> = page
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| Some(&l[l.find('{')?..=l.rfind('}')?]))
            .collect();
        for hash in &hashes {
            assert!(
                !labels.iter().any(|l| l.contains(hash.as_str())),
                "a hash is in a label"
            );
        }
        for secret in [nxcache_tests::RW_TOKEN, nxcache_tests::CLUSTER_SECRET] {
            assert!(!page.contains(secret), "a secret is in the metrics");
        }
    }
}
