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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "mounts a tmpfs (needs root); run by .ci/run"]
async fn a_full_disk_answers_507_keeps_serving_reads_and_recovers() {
    let fs = SmallFs::mount("24m");
    let data = fs.path().join("data");
    let mut config = test_config(&data);
    // A budget far beyond the file system: the disk fills first.
    config.max_disk_usage = 1 << 30;
    let node = nxcache::start(config).await.unwrap();
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
