//! Clients that try to wipe, starve or exhaust a node (issue 15): uploads that announce
//! what they never send, trickle, or hold slots; connections that never speak, never
//! finish a request or never read; floods of probes. Each test checks the defence and
//! that a real client is still served during the attack (every client has a timeout;
//! nothing asserts on elapsed time).

use std::time::Duration;

use nxcache::RunningNode;
use nxcache_tests::{
    RW_TOKEN, get, http_client, metric_sum, metrics_page, put, random_bytes, test_config,
    wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

async fn start(
    adjust: impl FnOnce(&mut nxcache_config::ServeConfig),
) -> (RunningNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    adjust(&mut config);
    (nxcache::start(config).await.unwrap(), dir)
}

/// Opens a connection and sends the head of a PUT announcing `len` bytes.
async fn put_head(node: &RunningNode, hash: &str, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(node.http_addr()).await.unwrap();
    s.write_all(
        format!(
            "PUT /v1/cache/{hash} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: {len}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s
}

async fn reserved_bytes(url: &str) -> f64 {
    metric_sum(
        &metrics_page(url).await,
        "nxcache_store_reserved_bytes",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_announces_the_budget_and_sends_nothing_evicts_nothing() {
    let (node, _dir) = start(|c| c.max_disk_usage = 10 * MIB as u64).await;
    let url = node.base_url();
    let client = http_client();
    let bodies: Vec<Vec<u8>> = (0..8).map(|_| random_bytes(MIB)).collect();
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            put(&client, &url, &format!("{}", 800 + i), body.clone()).await,
            200
        );
    }
    // 9 MiB announced, nothing sent, then the client disconnects.
    let attack = put_head(&node, "999", 9 * MIB).await;
    wait_until(
        Duration::from_secs(30),
        "the announced upload in progress",
        || {
            let url = url.clone();
            async move {
                metric_sum(
                    &metrics_page(&url).await,
                    "nxcache_http_uploads_in_progress",
                    &[],
                ) == 1.0
            }
        },
    )
    .await;
    assert_eq!(
        reserved_bytes(&url).await,
        0.0,
        "an announced size reserved budget"
    );
    drop(attack);
    // A second one that sends a little and gives up: its bytes are given back.
    let mut partial = put_head(&node, "998", 9 * MIB).await;
    partial.write_all(&[1u8; 1000]).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the partial upload's bytes reserved",
        || {
            let url = url.clone();
            async move { reserved_bytes(&url).await == 1000.0 }
        },
    )
    .await;
    drop(partial);
    wait_until(
        Duration::from_secs(30),
        "the abandoned upload's reservation released",
        || {
            let url = url.clone();
            async move { reserved_bytes(&url).await == 0.0 }
        },
    )
    .await;
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            get(&client, &url, &format!("{}", 800 + i)).await,
            (200, body.clone()),
            "artifact {i} was evicted by an upload that sent (almost) nothing"
        );
    }
    let page = metrics_page(&url).await;
    assert_eq!(metric_sum(&page, "nxcache_store_evictions_total", &[]), 0.0);
    // A size that can never fit is still refused before its body is read.
    let mut s = put_head(&node, "997", 11 * MIB).await;
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut answer))
        .await
        .expect("no answer to an upload larger than the budget")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");
    node.shutdown().await.unwrap();
}
