//! Real `nxcache serve` processes: crashes, clean shutdown, first start without tokens.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nxcache_tests::{NodeProcess, PATIENCE, RW_TOKEN, random_bytes};
use reqwest::StatusCode;

const TOKENS: &[(&str, &str)] = &[("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN)];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_50_uploads_loses_no_acknowledged_artifact_and_serves_no_partial_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // fsync on: the single-node default, the configuration whose promise is tested.
    let mut node = NodeProcess::start(&data, &["--listen", "127.0.0.1:0", "--fsync", "on"], TOKENS);
    let url = node.url.clone();
    let client = nxcache_tests::http_client();
    let bodies: Arc<HashMap<String, Vec<u8>>> = Arc::new(
        (0..50)
            .map(|i| {
                (
                    format!("{}", 9_000_000 + i),
                    random_bytes(256 * 1024 + i * 61_441),
                )
            })
            .collect(),
    );
    // Every other upload sends its first 64 KiB, then waits for a gate that opens only
    // after the kill: whatever the timing, some uploads are cut in the middle.
    let gate = Arc::new(tokio::sync::Notify::new());
    // Budget is reserved for the bytes received: each held upload holds its first chunk.
    let held_bytes: usize = bodies.keys().filter(|h| is_held(h)).count() * 64 * 1024;
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let uploads: Vec<_> = bodies
        .keys()
        .cloned()
        .map(|hash| {
            let (client, url, bodies, acknowledged, gate) = (
                client.clone(),
                url.clone(),
                bodies.clone(),
                acknowledged.clone(),
                gate.clone(),
            );
            tokio::spawn(async move {
                let body = bodies[&hash].clone();
                let held = is_held(&hash);
                let chunks: Vec<Vec<u8>> = body.chunks(64 * 1024).map(|c| c.to_vec()).collect();
                let stream = futures_util::stream::unfold((0usize, chunks), move |(i, chunks)| {
                    let gate = gate.clone();
                    async move {
                        if i == chunks.len() {
                            return None;
                        }
                        if held && i == 1 {
                            gate.notified().await;
                        }
                        let chunk = chunks[i].clone();
                        Some((Ok::<_, std::io::Error>(chunk), (i + 1, chunks)))
                    }
                });
                let sent = client
                    .put(format!("{url}/v1/cache/{hash}"))
                    .bearer_auth(RW_TOKEN)
                    .header("content-length", body.len())
                    .body(reqwest::Body::wrap_stream(stream))
                    .send()
                    .await;
                let ok = matches!(&sent, Ok(r) if r.status() == StatusCode::OK);
                if ok {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                (hash, ok)
            })
        })
        .collect();
    nxcache_tests::wait_until(
        Duration::from_secs(120),
        "acks, and held uploads in flight",
        || {
            let (url, acked) = (url.clone(), acknowledged.load(Ordering::SeqCst));
            async move {
                let page = nxcache_tests::metrics_page(&url).await;
                let reserved =
                    nxcache_tests::metric(&page, "nxcache_store_reserved_bytes").unwrap_or(0.0);
                acked >= 10 && reserved >= held_bytes as f64
            }
        },
    )
    .await;
    node.kill9();
    gate.notify_waiters();
    let mut acked = Vec::new();
    for upload in uploads {
        let (hash, ok) = upload.await.unwrap();
        if ok {
            acked.push(hash);
        }
    }
    assert!(
        acked.len() >= 10 && acked.len() <= 25,
        "{} acknowledged",
        acked.len()
    );

    node.restart();
    let mut served_unacked = 0;
    for (hash, body) in bodies.iter() {
        let resp = client
            .get(format!("{}/v1/cache/{hash}", node.url))
            .bearer_auth(RW_TOKEN)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let got = resp.bytes().await.unwrap();
        if acked.contains(hash) {
            assert_eq!(status, StatusCode::OK, "acknowledged artifact {hash} lost");
            assert!(got[..] == body[..], "acknowledged artifact {hash} differs");
        } else if status == StatusCode::OK {
            // Complete but not yet acknowledged at the kill: allowed, if whole.
            assert!(got[..] == body[..], "a partial artifact {hash} was served");
            assert!(!is_held(hash), "a cut upload {hash} was stored");
            served_unacked += 1;
        } else {
            assert_eq!(status, StatusCode::NOT_FOUND);
        }
    }
    eprintln!(
        "acknowledged before kill: {}, complete but unacknowledged: {served_unacked}",
        acked.len()
    );
    let mut tmp_left = 0;
    for shard in std::fs::read_dir(data.join("blobs")).unwrap() {
        tmp_left += std::fs::read_dir(shard.unwrap().path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
    }
    assert_eq!(
        tmp_left, 0,
        "temp files of cut uploads must be cleaned on start"
    );
}

fn is_held(hash: &str) -> bool {
    hash.ends_with(['1', '3', '5', '7', '9'])
}

#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_finish_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = NodeProcess::start(&data, &["--listen", "127.0.0.1:0"], TOKENS);
    let url = node.url.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let upload = tokio::spawn({
        let url = url.clone();
        async move {
            nxcache_tests::http_client()
                .put(format!("{url}/v1/cache/555"))
                .bearer_auth(RW_TOKEN)
                .header("content-length", 20)
                .body(reqwest::Body::wrap_stream(stream_from_receiver(rx)))
                .send()
                .await
                .map(|r| r.status())
        }
    });
    tx.send(Ok(vec![1; 10])).await.unwrap();
    // The upload is in flight once the server has reserved budget for it.
    nxcache_tests::wait_until(PATIENCE, "upload in flight", || {
        let url = url.clone();
        async move {
            let page = nxcache_tests::metrics_page(&url).await;
            nxcache_tests::metric(&page, "nxcache_store_reserved_bytes") == Some(10.0)
        }
    })
    .await;
    let pid = node.pid();
    let terminate = std::thread::spawn(move || node.terminate());
    // The server now drains: /readyz would say so; the upload may still finish.
    nxcache_tests::wait_until(PATIENCE, "listener closed", || {
        let url = url.clone();
        async move {
            nxcache_tests::http_client()
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_err()
        }
    })
    .await;
    tx.send(Ok(vec![2; 10])).await.unwrap();
    drop(tx);
    assert_eq!(upload.await.unwrap().unwrap(), StatusCode::OK);
    let status = terminate.join().unwrap();
    assert!(status.success(), "pid {pid} exited with {status}");
    assert!(data.join("CLEAN_SHUTDOWN").exists());
}

fn stream_from_receiver(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::stream::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn first_start_without_tokens_generates_one_kept_private_and_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = NodeProcess::start(&data, &["--listen", "127.0.0.1:0"], &[]);
    let printed = std::fs::read_to_string(&node.stdout).unwrap();
    let token = printed
        .lines()
        .find_map(|l| l.strip_prefix("NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN="))
        .expect("the token line is printed")
        .to_owned();
    assert!(
        printed.contains(&format!("NX_SELF_HOSTED_REMOTE_CACHE_SERVER={}", node.url)),
        "{printed}"
    );
    let file = data.join("generated-token");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let put = |url: String, token: String| async move {
        nxcache_tests::http_client()
            .put(format!("{url}/v1/cache/1"))
            .bearer_auth(token)
            .body("x")
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(put(node.url.clone(), token.clone()).await, StatusCode::OK);
    assert_eq!(
        put(node.url.clone(), "guess".into()).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(node.terminate().success());
    node.restart();
    let printed = std::fs::read_to_string(&node.stdout).unwrap();
    assert!(
        !printed.contains(&token),
        "the token is printed only when created"
    );
    assert_eq!(put(node.url.clone(), token).await, StatusCode::CONFLICT);
}
