//! Limits a node keeps, checked on real `nxcache serve` processes through their flags:
//! `--ttl`, `--max-connections` (with shedding) and `--shutdown-timeout`.

use std::time::{Duration, Instant};

use nxcache_tests::{
    NodeProcess, PATIENCE, RW_TOKEN, get, holds_on_disk, http_client, metric_sum, metrics_page,
    put, random_bytes, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKENS: &[(&str, &str)] = &[("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN)];

fn node(dir: &tempfile::TempDir, extra: &[&str]) -> NodeProcess {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    NodeProcess::start(&dir.path().join("node"), &args, TOKENS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_not_read_for_longer_than_the_ttl_becomes_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir, &["--ttl", "2s"]);
    let client = http_client();
    let body = random_bytes(10_000);
    assert_eq!(put(&client, &node.url, "31337", body.clone()).await, 200);
    // Not read again: once idle for longer than the TTL it is evicted. Awaited through
    // the metrics, since polling with GET would read it and keep it alive.
    wait_until(PATIENCE, "the idle artifact evicted for its TTL", || {
        let url = node.url.clone();
        async move {
            metric_sum(
                &metrics_page(&url).await,
                "nxcache_store_evictions_total",
                &[r#"reason="ttl""#],
            ) >= 1.0
        }
    })
    .await;
    assert!(!holds_on_disk(&node.data_dir, "31337"), "its file is left");
    assert_eq!(get(&client, &node.url, "31337").await.0, 404);
    // Really gone, not hidden: the same hash can be stored again.
    assert_eq!(put(&client, &node.url, "31337", body).await, 200);
}

async fn read_response(stream: &mut TcpStream) -> Result<u16, String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = &text[..head_end];
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
            .ok_or("no content-length")?;
        if seen.len() >= head_end + 4 + length {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or("no status")?;
            return Ok(status);
        }
    }
}

/// Starts a 20-byte PUT on an open connection and sends its first half: a request in
/// progress until the rest comes. Returns once the node reads its body (its
/// `100 Continue`), which no other connection is needed to observe.
async fn start_upload(stream: &mut TcpStream, hash: &str) {
    stream
        .write_all(
            format!(
                "PUT /v1/cache/{hash} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {RW_TOKEN}\r\ncontent-length: 20\r\nexpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("no 100 Continue for the upload")
            .unwrap();
        assert!(n > 0, "connection closed before 100 Continue");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream.write_all(b"0123456789").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_limit_waits_while_every_connection_serves_a_request() {
    let dir = tempfile::tempdir().unwrap();
    // The uploads held below are neither stalled nor too slow for these.
    let node = node(
        &dir,
        &[
            "--max-connections",
            "2",
            "--header-timeout",
            "600s",
            "--body-idle-timeout",
            "600s",
            "--upload-min-rate",
            "0",
        ],
    );
    let addr = node.url.trim_start_matches("http://").to_owned();
    let answer = Duration::from_secs(30);
    let mut held = Vec::new();
    for hash in ["7001", "7002"] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        start_upload(&mut stream, hash).await;
        held.push(stream);
    }
    // A third connection is accepted by the kernel, but its request waits: no connection
    // may be shed while each serves a request.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let answered = tokio::time::timeout(Duration::from_secs(120), read_response(&mut third))
            .await
            .map_err(|_| "the waiting connection was never served".to_owned())
            .and_then(|r| r);
        (answered, third)
    });
    // A negative, watched over a window.
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        assert!(
            !waiting.is_finished(),
            "a connection beyond --max-connections was served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One upload ends: its connection falls idle and makes room for the waiting one.
    let mut first = held.remove(0);
    first.write_all(b"abcdefghij").await.unwrap();
    assert_eq!(
        tokio::time::timeout(answer, read_response(&mut first)).await,
        Ok(Ok(200))
    );
    let (answered, third) = waiting.await.unwrap();
    assert_eq!(answered, Ok(200));
    let page = metrics_page(&node.url).await;
    // The idle connection was shed for it (and, to fetch this page, maybe the third).
    let shed = metric_sum(
        &page,
        "nxcache_http_connections_shed_total",
        &[r#"state="idle""#],
    );
    assert!(shed >= 1.0, "{shed} idle connections shed");
    // Healthy afterwards: with the others closed, new clients are served as usual.
    drop(third);
    drop(held);
    drop(first);
    let client = http_client();
    wait_until(PATIENCE, "a new client served", || {
        let (client, url) = (client.clone(), node.url.clone());
        async move {
            client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    let body = random_bytes(5_000);
    assert_eq!(put(&client, &node.url, "2024", body.clone()).await, 200);
    assert_eq!(get(&client, &node.url, "2024").await, (200, body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_running_at_the_shutdown_timeout_is_cut_and_the_process_exits() {
    let dir = tempfile::tempdir().unwrap();
    // The stalled upload below would otherwise be cut by the body timeout instead.
    let mut node = node(
        &dir,
        &["--shutdown-timeout", "1s", "--body-idle-timeout", "600s"],
    );
    let url = node.url.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let upload = tokio::spawn({
        let url = url.clone();
        async move {
            // Bounded, but well past the wait for the exit below: the client must not be
            // what ends the upload.
            reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap()
                .put(format!("{url}/v1/cache/6060"))
                .bearer_auth(RW_TOKEN)
                .header("content-length", 20)
                .body(reqwest::Body::wrap_stream(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tx.send(Ok(vec![1; 10])).await.unwrap();
    // In flight once the node has reserved its budget; the rest never comes.
    wait_until(PATIENCE, "the upload in flight", || {
        let url = url.clone();
        async move {
            nxcache_tests::metric(&metrics_page(&url).await, "nxcache_store_reserved_bytes")
                == Some(10.0)
        }
    })
    .await;
    node.sigterm();
    let log = node.log.clone();
    // The node says when the timeout expired, once the request is cut.
    wait_until(
        PATIENCE,
        "the node to report requests cut at the shutdown timeout",
        || {
            let cut = std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("did not finish within the shutdown timeout"));
            async move { cut }
        },
    )
    .await;
    // Too late now: the rest of the body finds the request gone.
    let _ = tx.send(Ok(vec![2; 10])).await;
    drop(tx);
    let outcome = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("the client noticed nothing")
        .unwrap();
    assert!(outcome.is_err(), "the upload was answered: {outcome:?}");
    let status = tokio::task::block_in_place(|| node.wait_exit_within(Duration::from_secs(90)))
        .expect("the process still runs 90 s after SIGTERM");
    assert!(status.success(), "exited with {status}");
    assert!(
        !holds_on_disk(&node.data_dir, "6060"),
        "the cut upload was stored"
    );
    assert!(
        node.data_dir.join("CLEAN_SHUTDOWN").exists(),
        "the store was not closed cleanly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_at_the_shutdown_timeout_does_not_outlive_the_node() {
    // In process, so that the test's runtime (and any task the node left behind) goes on
    // after the node reports itself stopped.
    let dir = tempfile::tempdir().unwrap();
    let mut config = nxcache_tests::test_config(dir.path());
    config.shutdown_timeout = Duration::from_secs(1);
    config.body_idle_timeout = Duration::from_secs(600);
    let node = nxcache::start(config).await.unwrap();
    let url = node.base_url();
    let mut upload = TcpStream::connect(node.http_addr()).await.unwrap();
    upload
        .write_all(
            format!(
                "PUT /v1/cache/7070 HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {RW_TOKEN}\r\n\
                 content-length: 20\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    wait_until(PATIENCE, "the upload in flight", || {
        let url = url.clone();
        async move {
            nxcache_tests::metric(&metrics_page(&url).await, "nxcache_store_reserved_bytes")
                == Some(10.0)
        }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(90), node.shutdown())
        .await
        .expect("shutdown did not end after its timeout")
        .unwrap();
    // The node is stopped: the rest of the body reaches nothing and nothing answers.
    let _ = upload.write_all(b"0123456789").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), upload.read_to_end(&mut answer))
        .await
        .expect("the connection of a cut request is still open");
    assert!(
        answer.is_empty(),
        "a request outlived the node's shutdown: {read:?} {}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        !holds_on_disk(dir.path(), "7070"),
        "the cut upload was stored"
    );
}
