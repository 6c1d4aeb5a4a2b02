//! A node whose file system (not its budget) fills up: PUT answers 507 with a message,
//! nothing partial is left behind, GETs keep working, and writes work again once space
//! returns. On a small tmpfs the test mounts (root needed, so `.ci/run` runs it with
//! `--ignored`).

use std::path::{Path, PathBuf};
use std::process::Command;

use nxcache_tests::{RW_TOKEN, get, metric, metrics_page, put, random_bytes, test_config};

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Every temp file under `dir`: in its `tmp` directory, or a `.tmp` upload in progress.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.starts_with(dir.join("tmp"))
                || path.extension().is_some_and(|e| e == "tmp")
            {
                found.push(path);
            }
        }
    }
    found
}

/// A node whose data dir is on a 24 MiB tmpfs, with a budget far beyond it (the disk
/// fills first).
async fn node_on_a_small_fs() -> (SmallFs, PathBuf, nxcache::RunningNode) {
    let fs = SmallFs::mount("24m");
    let data = fs.path().join("data");
    let mut config = test_config(&data);
    config.max_disk_usage = 1 << 30;
    let node = nxcache::start(config).await.unwrap();
    (fs, data, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "mounts a tmpfs (needs root); run by .ci/run"]
async fn a_full_disk_answers_507_keeps_serving_reads_and_recovers() {
    let (fs, data, node) = node_on_a_small_fs().await;
    let url = node.base_url();
    let http = nxcache_tests::http_client();

    // Ballast that the operator can later delete.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 8 << 20]).unwrap();

    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..40u64 {
        let hash = (6_000_000 + i).to_string();
        let body = random_bytes(1 << 20);
        match put(&http, &url, &hash, body.clone()).await {
            200 => stored.push((hash, body)),
            507 => {
                refused = Some(hash);
                break;
            }
            other => panic!("PUT {hash}: unexpected {other}"),
        }
    }
    let refused = refused.expect("the file system never filled");
    assert!(!stored.is_empty());
    eprintln!(
        "{} MiB stored before the disk was full; PUT {refused} got 507",
        stored.len()
    );
    let answer = http
        .put(format!("{url}/v1/cache/{refused}"))
        .bearer_auth(RW_TOKEN)
        .body(random_bytes(1 << 20))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 507);
    assert_eq!(answer.headers()["content-type"], "text/plain");
    let message = answer.text().await.unwrap();
    assert!(message.to_lowercase().contains("full"), "{message}");

    // Nothing partial: no temp file left, the refused key absent.
    assert!(temp_files(&data).is_empty(), "{:?}", temp_files(&data));
    assert_eq!(get(&http, &url, &refused).await.0, 404);
    // Reads go on, byte-identical.
    for (hash, body) in &stored {
        let (status, got) = get(&http, &url, hash).await;
        assert_eq!(status, 200);
        assert!(&got == body);
    }
    let page = metrics_page(&url).await;
    assert!(
        metric(
            &page,
            r#"nxcache_store_write_failures_total{reason="disk_full"}"#
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // Space comes back: writes work again, with no restart.
    std::fs::remove_file(&ballast).unwrap();
    let body = random_bytes(1 << 20);
    assert_eq!(put(&http, &url, &refused, body.clone()).await, 200);
    assert!(get(&http, &url, &refused).await.1 == body);
    node.shutdown().await.unwrap();
}

/// Fills `dir`'s file system with one file, as another process (or a volume shrunk under
/// the node) would; returns its path.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Down to the last byte: smaller writes until even those fail.
    for size in [4096usize, 512, 1] {
        while file.write_all(&chunk[..size]).is_ok() {}
    }
    let _ = file.flush();
    path
}

/// The regression test of finding F5 (docs/reliability.md): a full disk used to stop the
/// metadata log for good (sled's ENOSPC ends openraft's core). Uploads are refused before
/// the space kept for the log is touched, and when the disk is filled by something else,
/// the reserve's ballast gives the log room: metadata writes (tokens) keep working, the
/// node stays healthy, and uploads work again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "mounts a tmpfs (needs root); run by .ci/run"]
async fn a_full_disk_leaves_the_metadata_log_room_to_write() {
    let (fs, _data, node) = node_on_a_small_fs().await;
    let url = node.base_url();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    let create_token = |name: String| {
        http.post(format!("{url}/admin/v1/tokens"))
            .bearer_auth(nxcache_tests::ADMIN_TOKEN)
            .json(&serde_json::json!({ "name": name, "scope": "read" }))
            .send()
    };

    // Room an operator frees at the end.
    let freed_later = fs.path().join("freed-later");
    std::fs::write(&freed_later, vec![0u8; 8 << 20]).unwrap();

    // Uploads until refused: the reserve is still free then.
    let mut refused = None;
    for i in 0..40u64 {
        let hash = (7_000_000 + i).to_string();
        match put(&http, &url, &hash, random_bytes(1 << 20)).await {
            200 => {}
            507 => {
                refused = Some(hash);
                break;
            }
            other => panic!("PUT {hash}: unexpected {other}"),
        }
    }
    let refused = refused.expect("the file system never filled");
    let page = metrics_page(&url).await;
    let reserve = metric(&page, "nxcache_disk_reserve_bytes").expect("reserve gauge");
    let free = fs2::available_space(fs.path()).unwrap() as f64;
    assert!(
        free >= reserve,
        "uploads ate into the reserve: {free} bytes free, {reserve} reserved"
    );

    // Something else takes every byte left; the ballast goes, the log has room.
    let filler = fill_up(fs.path());
    nxcache_tests::wait_until(
        nxcache_tests::PATIENCE,
        "the space reserve released (nxcache_disk_reserve_released 1)",
        || {
            let url = url.clone();
            async move {
                metric(&metrics_page(&url).await, "nxcache_disk_reserve_released") == Some(1.0)
            }
        },
    )
    .await;
    for i in 0..20 {
        let answer = create_token(format!("on-a-full-disk-{i}")).await.unwrap();
        assert_eq!(answer.status(), 201, "token {i} on a full disk");
    }
    assert_eq!(put(&http, &url, &refused, random_bytes(1 << 20)).await, 507);
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "{}", health.text().await.unwrap());
    let page = metrics_page(&url).await;
    assert_eq!(metric(&page, "nxcache_raft_core_up"), Some(1.0));

    // Room again: the reserve is held again and uploads work, with no restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&freed_later).unwrap();
    // The watcher makes the ballast again (uploads never do it on their own path).
    nxcache_tests::wait_until(
        nxcache_tests::PATIENCE,
        "the space reserve held again (nxcache_disk_reserve_released 0)",
        || {
            let url = url.clone();
            async move {
                metric(&metrics_page(&url).await, "nxcache_disk_reserve_released") == Some(0.0)
            }
        },
    )
    .await;
    let body = random_bytes(1 << 20);
    assert_eq!(put(&http, &url, &refused, body.clone()).await, 200);
    assert!(get(&http, &url, &refused).await.1 == body);
    assert_eq!(create_token("after".into()).await.unwrap().status(), 201);
    node.shutdown().await.unwrap();
}
