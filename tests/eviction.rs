//! Eviction through the HTTP API: the least recently *read* artifacts go first, and the
//! store never holds more than its budget.

use nxcache_tests::{RW_TOKEN, metric, metrics_page, random_bytes, test_config};
use reqwest::StatusCode;

const OBJECT: usize = 100 * 1024;

#[tokio::test]
async fn writing_past_the_budget_evicts_least_recently_read_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_disk_usage = 10 * OBJECT as u64;
    let node = nxcache::start(config).await.unwrap();
    let url = node.base_url();
    let client = nxcache_tests::http_client();
    let put = |hash: u32| {
        let req = client
            .put(format!("{url}/v1/cache/{hash}"))
            .bearer_auth(RW_TOKEN)
            .body(random_bytes(OBJECT));
        async move { req.send().await.unwrap().status() }
    };
    let get = |hash: u32| {
        let req = client
            .get(format!("{url}/v1/cache/{hash}"))
            .bearer_auth(RW_TOKEN);
        async move { req.send().await.unwrap().status() }
    };

    for hash in 0..10 {
        assert_eq!(put(hash).await, StatusCode::OK);
    }
    // Read the older half: now 5..9 are the least recently used.
    for hash in 0..5 {
        assert_eq!(get(hash).await, StatusCode::OK);
    }
    for hash in 10..15 {
        assert_eq!(put(hash).await, StatusCode::OK);
        let page = metrics_page(&url).await;
        let stored = metric(&page, "nxcache_store_stored_bytes").unwrap();
        assert!(stored <= (10 * OBJECT) as f64, "over budget: {stored}");
    }
    for hash in 5..10 {
        assert_eq!(
            get(hash).await,
            StatusCode::NOT_FOUND,
            "{hash} should have been evicted"
        );
    }
    for hash in (0..5).chain(10..15) {
        assert_eq!(
            get(hash).await,
            StatusCode::OK,
            "{hash} should have been kept"
        );
    }
    let page = metrics_page(&url).await;
    assert_eq!(
        metric(&page, r#"nxcache_store_evictions_total{reason="budget"}"#),
        Some(5.0)
    );
    assert_eq!(metric(&page, "nxcache_store_objects"), Some(10.0));
    node.shutdown().await.unwrap();
}
