//! Behaviour of [`BlobStore`] over a real directory and the sled index.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::{
    BlobBody, BlobKey, BlobStore, Committed, CopyIdentity, DeleteReason, StoreConfig, StoreError,
    Version,
};

fn config(dir: &std::path::Path, max_bytes: u64) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        max_bytes,
        ttl: None,
        fsync: false,
    }
}

fn open(dir: &std::path::Path, max_bytes: u64) -> BlobStore {
    BlobStore::open(config(dir, max_bytes), &prometheus::Registry::new()).unwrap()
}

fn key(s: &str) -> BlobKey {
    BlobKey::parse(s).unwrap()
}

async fn put(store: &BlobStore, k: &str, data: &[u8]) -> Result<(), StoreError> {
    let mut w = store.begin_write(key(k), data.len() as u64).await?;
    for chunk in data.chunks(7000) {
        w.write(Bytes::copy_from_slice(chunk)).await?;
    }
    w.commit().await.map(|_| ())
}

async fn get(store: &BlobStore, k: &str) -> Option<Result<Vec<u8>, std::io::Error>> {
    let read = store.read(&key(k)).await.unwrap()?;
    Some(match read.body {
        BlobBody::Verified(bytes) => Ok(bytes.to_vec()),
        BlobBody::Stream(mut s) => {
            let mut out = Vec::new();
            loop {
                match s.next().await {
                    None => break Ok(out),
                    Some(Ok(chunk)) => out.extend_from_slice(&chunk),
                    Some(Err(e)) => break Err(e),
                }
            }
        }
    })
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Temp files anywhere in the store: uploads in progress or leftovers.
fn temp_files(dir: &std::path::Path) -> usize {
    let mut n = std::fs::read_dir(dir.join("tmp")).unwrap().count();
    for shard in std::fs::read_dir(dir.join("blobs")).unwrap() {
        n += std::fs::read_dir(shard.unwrap().path())
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
    n
}

#[tokio::test]
async fn stores_and_returns_exact_bytes_small_and_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let small = data(1000, 1);
    let large = data(3 * 1024 * 1024 + 17, 2);
    put(&store, "1", &small).await.unwrap();
    put(&store, "2", &large).await.unwrap();
    assert_eq!(get(&store, "1").await.unwrap().unwrap(), small);
    assert_eq!(get(&store, "2").await.unwrap().unwrap(), large);
    assert!(get(&store, "3").await.is_none());
    let stats = store.stats();
    assert_eq!(stats.objects, 2);
    assert_eq!(stats.stored_bytes, (small.len() + large.len()) as u64);
    assert_eq!(stats.reserved_bytes, 0);
    assert_eq!(
        store.head(&key("2")).unwrap().unwrap().size,
        large.len() as u64
    );
}

#[tokio::test]
async fn entries_are_immutable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    put(&store, "k", b"first").await.unwrap();
    assert!(matches!(
        put(&store, "k", b"second").await,
        Err(StoreError::Exists)
    ));
    assert_eq!(get(&store, "k").await.unwrap().unwrap(), b"first");
}

#[tokio::test]
async fn concurrent_uploads_of_one_key_have_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    // Both writers start before either commits, so neither is turned away early.
    let a = data(200_000, 1);
    let b = data(200_000, 2);
    let mut wa = store
        .begin_write(key("same"), a.len() as u64)
        .await
        .unwrap();
    let mut wb = store
        .begin_write(key("same"), b.len() as u64)
        .await
        .unwrap();
    wa.write(Bytes::from(a.clone())).await.unwrap();
    wb.write(Bytes::from(b.clone())).await.unwrap();
    let (ra, rb) = tokio::join!(wa.commit(), wb.commit());
    let winners = [ra.is_ok(), rb.is_ok()];
    assert_eq!(winners.iter().filter(|w| **w).count(), 1);
    let loser = if ra.is_ok() { rb } else { ra };
    assert!(matches!(loser, Err(StoreError::Exists)));
    let stored = get(&store, "same").await.unwrap().unwrap();
    assert!(
        stored == a || stored == b,
        "a mixed or torn file was stored"
    );
    assert_eq!(store.stats().objects, 1);
    assert_eq!(store.stats().reserved_bytes, 0);
    assert_eq!(temp_files(dir.path()), 0);
}

#[tokio::test]
async fn short_or_long_bodies_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let mut w = store.begin_write(key("short"), 10).await.unwrap();
    w.write(Bytes::from_static(b"12345")).await.unwrap();
    assert!(matches!(
        w.commit().await,
        Err(StoreError::LengthMismatch { .. })
    ));

    let mut w = store.begin_write(key("long"), 4).await.unwrap();
    assert!(matches!(
        w.write(Bytes::from_static(b"12345")).await,
        Err(StoreError::LengthMismatch { .. })
    ));
    drop(w);

    // A writer dropped half-way (client went away).
    let mut w = store.begin_write(key("dropped"), 10).await.unwrap();
    w.write(Bytes::from_static(b"123")).await.unwrap();
    drop(w);

    for k in ["short", "long", "dropped"] {
        assert!(get(&store, k).await.is_none(), "{k}");
    }
    assert_eq!(
        store.stats(),
        crate::StoreStats {
            stored_bytes: 0,
            objects: 0,
            reserved_bytes: 0,
            budget_bytes: 1 << 20
        }
    );
    assert_eq!(temp_files(dir.path()), 0);
}

#[tokio::test]
async fn corrupt_small_blob_is_a_miss_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    put(&store, "c", &data(4096, 3)).await.unwrap();
    let path = crate::layout::Layout::new(dir.path()).blob_path(&key("c"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(get(&store, "c").await.is_none());
    assert!(store.head(&key("c")).unwrap().is_none());
    assert!(!path.exists());
    assert_eq!(store.stats().objects, 0);
    // The key can be uploaded again.
    put(&store, "c", &data(4096, 3)).await.unwrap();
}

#[tokio::test]
async fn corrupt_large_blob_never_delivers_all_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let original = data(5 * 1024 * 1024, 4);
    put(&store, "big", &original).await.unwrap();
    let path = crate::layout::Layout::new(dir.path()).blob_path(&key("big"));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // the very last byte: only a full checksum can tell
    std::fs::write(&path, &bytes).unwrap();
    let result = get(&store, "big").await.unwrap();
    let err = result.expect_err("a corrupt stream must end in an error");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(store.head(&key("big")).unwrap().is_none());

    // A truncated file is caught before any byte is sent.
    put(&store, "trunc", &original).await.unwrap();
    let path = crate::layout::Layout::new(dir.path()).blob_path(&key("trunc"));
    std::fs::write(&path, &original[..1000]).unwrap();
    assert!(get(&store, "trunc").await.is_none());
}

#[tokio::test]
async fn missing_file_is_a_miss_and_the_entry_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    put(&store, "m", b"bytes").await.unwrap();
    std::fs::remove_file(crate::layout::Layout::new(dir.path()).blob_path(&key("m"))).unwrap();
    assert!(get(&store, "m").await.is_none());
    assert_eq!(store.stats().objects, 0);
}

#[tokio::test]
async fn eviction_removes_least_recently_read_first_and_keeps_under_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10_000);
    for k in ["a", "b", "c", "d"] {
        put(&store, k, &data(2_000, 0)).await.unwrap();
    }
    // Read "a" and "b": "c" becomes the least recently used, then "d".
    get(&store, "a").await.unwrap().unwrap();
    get(&store, "b").await.unwrap().unwrap();
    put(&store, "e", &data(3_000, 0)).await.unwrap();
    assert!(
        get(&store, "c").await.is_none(),
        "c was least recently used"
    );
    assert!(get(&store, "d").await.is_some());
    assert!(store.stats().stored_bytes <= 10_000);
    put(&store, "f", &data(4_000, 0)).await.unwrap();
    assert!(store.stats().stored_bytes <= 10_000);
    // After reading d above, the order was a, b, e, d... "a" goes first.
    assert!(get(&store, "a").await.is_none());
    assert!(get(&store, "f").await.is_some());
}

#[tokio::test]
async fn an_artifact_larger_than_the_budget_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1000);
    let err = store.begin_write(key("x"), 1001).await.err().unwrap();
    assert!(matches!(
        err,
        StoreError::LargerThanBudget {
            size: 1001,
            budget: 1000
        }
    ));
}

#[tokio::test]
async fn budget_held_by_uploads_in_flight_is_not_oversubscribed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1000);
    let mut in_flight = store.begin_write(key("x"), 900).await.unwrap();
    in_flight.write(Bytes::from(vec![1; 800])).await.unwrap();
    let mut late = store.begin_write(key("y"), 300).await.unwrap();
    let err = late.write(Bytes::from(vec![2; 300])).await.err().unwrap();
    assert!(matches!(err, StoreError::BudgetExhausted { budget: 1000 }));
    assert_eq!(store.stats().reserved_bytes, 800);
}

/// The attack of issue 15: an upload that announces most of the budget and sends nothing
/// used to evict, on its announced size alone, what the cache held.
#[tokio::test]
async fn an_announced_size_alone_reserves_and_evicts_nothing() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 * MIB as u64);
    for i in 0..8 {
        put(&store, &format!("kept{i}"), &data(MIB, i))
            .await
            .unwrap();
    }
    let announced = store
        .begin_write(key("attack"), 9 * MIB as u64)
        .await
        .unwrap();
    assert_eq!(store.stats().reserved_bytes, 0);
    drop(announced);
    let mut partial = store
        .begin_write(key("attack"), 9 * MIB as u64)
        .await
        .unwrap();
    partial.write(Bytes::from(vec![9; 1000])).await.unwrap();
    assert_eq!(store.stats().reserved_bytes, 1000, "reserved: what arrived");
    // Abandoned: its reservation is given back at once.
    drop(partial);
    let stats = store.stats();
    assert_eq!(stats.reserved_bytes, 0);
    assert_eq!(stats.objects, 8);
    for i in 0..8 {
        assert_eq!(
            get(&store, &format!("kept{i}")).await.unwrap().unwrap(),
            data(MIB, i)
        );
    }
}

#[tokio::test]
async fn bytes_that_arrive_evict_what_they_need_and_no_more() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 * MIB as u64);
    for i in 0..8 {
        put(&store, &format!("kept{i}"), &data(MIB, i))
            .await
            .unwrap();
    }
    // 3 MiB of a 9 MiB upload arrive: 1 MiB over the budget, one artifact goes.
    let mut w = store.begin_write(key("big"), 9 * MIB as u64).await.unwrap();
    w.write(Bytes::from(vec![3; 3 * MIB])).await.unwrap();
    assert_eq!(store.stats().objects, 7);
    drop(w);
    assert_eq!(store.stats().reserved_bytes, 0);
}

#[tokio::test]
async fn idle_entries_expire_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 20);
    // An hour, on the store's own clock, which the test moves on: nothing here depends on
    // how fast the machine runs.
    cfg.ttl = Some(Duration::from_secs(3600));
    let store = BlobStore::open(cfg, &prometheus::Registry::new()).unwrap();
    put(&store, "old", b"x").await.unwrap();
    store.advance_clock(Duration::from_secs(3599));
    assert!(store.head(&key("old")).unwrap().is_some(), "expired early");
    store.advance_clock(Duration::from_secs(2));
    assert!(
        store.head(&key("old")).unwrap().is_none(),
        "idle past the TTL"
    );
    put(&store, "new", b"y").await.unwrap();
    // expire_idle only removes what is past the TTL, oldest first.
    assert_eq!(store.expire_idle().unwrap(), 1);
    assert_eq!(store.stats().objects, 1);
}

#[tokio::test]
async fn clean_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 1 << 20);
        put(&store, "keep", b"payload").await.unwrap();
        store.close().unwrap();
    }
    let store = open(dir.path(), 1 << 20);
    assert_eq!(get(&store, "keep").await.unwrap().unwrap(), b"payload");
    assert_eq!(store.stats().objects, 1);
}

#[tokio::test]
async fn restart_after_crash_reconciles_files_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let layout = crate::layout::Layout::new(dir.path());
    {
        let store = open(dir.path(), 1 << 20);
        put(&store, "kept", b"kept bytes").await.unwrap();
        put(&store, "lost", b"file vanishes").await.unwrap();
        // Simulated crash: no close(), index flushed as sled would in the background.
        drop(store);
    }
    std::fs::remove_file(layout.blob_path(&key("lost"))).unwrap();
    // A blob renamed into place whose index entry never made it.
    std::fs::write(layout.blob_path(&key("adopted")), b"whole upload").unwrap();
    // Uploads cut by the crash, and a stray file.
    std::fs::write(layout.tmp_dir().join("scratch"), b"?").unwrap();
    std::fs::write(layout.temp_path(&key("cut"), "1.0"), b"half").unwrap();
    std::fs::write(layout.shard_dir(0).join("not a key"), b"?").unwrap();

    let store = open(dir.path(), 1 << 20);
    assert_eq!(get(&store, "kept").await.unwrap().unwrap(), b"kept bytes");
    assert!(get(&store, "lost").await.is_none());
    assert_eq!(
        get(&store, "adopted").await.unwrap().unwrap(),
        b"whole upload"
    );
    assert_eq!(temp_files(dir.path()), 0);
    assert!(!layout.shard_dir(0).join("not a key").exists());
    assert_eq!(store.stats().objects, 2);
    assert_eq!(
        store.stats().stored_bytes,
        (b"kept bytes".len() + b"whole upload".len()) as u64
    );
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), 1 << 20);
    let second = BlobStore::open(config(dir.path(), 1 << 20), &prometheus::Registry::new());
    let err = second.err().expect("the data dir is locked");
    assert!(err.to_string().contains("another"), "{err}");
}

#[tokio::test]
async fn works_over_the_memory_index_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open_with_index(
        config(dir.path(), 1 << 20),
        std::sync::Arc::new(crate::MemoryIndex::new()),
        &prometheus::Registry::new(),
    )
    .unwrap();
    put(&store, "k", b"v").await.unwrap();
    assert_eq!(
        get(&store, "k").await.unwrap().unwrap(),
        Bytes::from_static(b"v")
    );
}

#[tokio::test]
async fn a_replica_write_with_the_wrong_checksum_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let mut w = store.begin_write(key("r"), 5).await.unwrap();
    w.write(Bytes::from_static(b"12345")).await.unwrap();
    let wrong = crate::checksum::checksum_of(b"54321");
    assert!(matches!(
        w.commit_verified(wrong).await,
        Err(StoreError::ChecksumMismatch)
    ));
    assert!(get(&store, "r").await.is_none());
    assert_eq!(temp_files(dir.path()), 0);
    let mut w = store.begin_write(key("r"), 5).await.unwrap();
    w.write(Bytes::from_static(b"12345")).await.unwrap();
    let right = crate::checksum::checksum_of(b"12345");
    assert_eq!(w.commit_verified(right).await.unwrap().checksum, right);
}

#[tokio::test]
async fn scrub_keeps_intact_blobs_and_drops_damaged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    put(&store, "good", &data(3_000_000, 1)).await.unwrap();
    put(&store, "bad", &data(3_000_000, 2)).await.unwrap();
    let path = crate::layout::Layout::new(dir.path()).blob_path(&key("bad"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1_234_567] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(
        store.scrub(&key("good")).unwrap(),
        crate::ScrubOutcome::Intact
    );
    assert_eq!(
        store.scrub(&key("bad")).unwrap(),
        crate::ScrubOutcome::Dropped
    );
    assert_eq!(
        store.scrub(&key("bad")).unwrap(),
        crate::ScrubOutcome::Absent
    );
    assert!(get(&store, "bad").await.is_none());
    assert_eq!(
        get(&store, "good").await.unwrap().unwrap(),
        data(3_000_000, 1)
    );
}

#[tokio::test]
async fn delete_and_list_and_the_eviction_listener() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 25_000);
    let evicted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = evicted.clone();
    store.set_eviction_listener(std::sync::Arc::new(
        move |k: &BlobKey, _: &crate::BlobMeta| seen.lock().unwrap().push(k.to_string()),
    ));
    for k in ["a", "b", "c"] {
        put(&store, k, &data(10_000, 3)).await.unwrap();
    }
    // "a" made room for "c": evicted, and the listener heard of it.
    assert_eq!(*evicted.lock().unwrap(), vec!["a".to_string()]);
    let listed: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(listed, vec!["b", "c"]);
    // A deletion is not an eviction: nobody is told, the space is free again.
    assert!(store.delete(&key("b")).unwrap());
    assert!(!store.delete(&key("b")).unwrap());
    assert_eq!(evicted.lock().unwrap().len(), 1);
    assert_eq!(store.stats().objects, 1);
    assert_eq!(store.stats().stored_bytes, 10_000);
}

/// Stores `data` under `k` as a copy of write `version`, replacing `replaces` if given.
async fn put_copy(
    store: &BlobStore,
    k: &str,
    data: &[u8],
    version: Version,
    replaces: Option<Version>,
) -> Result<Committed, StoreError> {
    let mut w = store
        .begin_copy(key(k), data.len() as u64, version, replaces)
        .await?;
    w.write(Bytes::copy_from_slice(data)).await?;
    w.finish(Some(crate::checksum_of(data))).await
}

#[tokio::test]
async fn a_copy_is_deleted_only_by_naming_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let (old, new) = (Version::new(), Version::new());
    put_copy(&store, "k", &data(100, 1), old, None)
        .await
        .unwrap();
    assert_eq!(store.head(&key("k")).unwrap().unwrap().version, old);
    // Gone and written again by another writer: a decision about the old copy cannot
    // touch the new one.
    assert!(
        store
            .delete_copy(&key("k"), old, DeleteReason::HandedOff)
            .unwrap()
    );
    put_copy(&store, "k", &data(100, 2), new, None)
        .await
        .unwrap();
    for reason in [
        DeleteReason::Withdrawn,
        DeleteReason::HandedOff,
        DeleteReason::Evicted,
    ] {
        assert!(!store.delete_copy(&key("k"), old, reason).unwrap());
    }
    assert_eq!(get(&store, "k").await.unwrap().unwrap(), data(100, 2));
    assert!(
        store
            .delete_copy(&key("k"), new, DeleteReason::HandedOff)
            .unwrap()
    );
    assert!(get(&store, "k").await.is_none());
}

#[tokio::test]
async fn a_withdrawal_spares_a_copy_another_writer_of_the_same_bytes_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let (first, second) = (Version::new(), Version::new());
    let body = data(5000, 7);
    put_copy(&store, "k", &body, first, None).await.unwrap();
    // A second writer of the same bytes finds the first copy and counts it.
    match put_copy(&store, "k", &body, second, None).await {
        Err(StoreError::Exists) => {
            let copy = CopyIdentity {
                size: body.len() as u64,
                checksum: crate::checksum_of(&body),
                version: second,
            };
            let held = store.claim_if_same(&key("k"), &copy).unwrap().unwrap();
            assert_eq!(held.version, first);
        }
        other => panic!("expected the first copy to hold the key: {other:?}"),
    }
    // The first writer's withdrawal must not take it away from the second.
    assert!(
        !store
            .delete_copy(&key("k"), first, DeleteReason::Withdrawn)
            .unwrap()
    );
    assert!(store.contains(&key("k")).unwrap());
    // A writer of other bytes claims nothing: a withdrawal of an unclaimed copy goes on.
    let other = data(5000, 8);
    put_copy(&store, "j", &body, first, None).await.unwrap();
    let copy = CopyIdentity {
        size: other.len() as u64,
        checksum: crate::checksum_of(&other),
        version: second,
    };
    assert_eq!(
        store
            .claim_if_same(&key("j"), &copy)
            .unwrap()
            .unwrap()
            .version,
        first
    );
    assert!(
        store
            .delete_copy(&key("j"), first, DeleteReason::Withdrawn)
            .unwrap()
    );
}

#[tokio::test]
async fn a_copy_at_commit_finds_the_holder_and_claims_it_only_for_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let body = data(3000, 1);
    let (a, b, c) = (Version::new(), Version::new(), Version::new());
    // Two uploads begun before either committed.
    let mut wb = store.begin_copy(key("k"), 3000, b, None).await.unwrap();
    let mut wc = store.begin_copy(key("k"), 3000, c, None).await.unwrap();
    put_copy(&store, "k", &body, a, None).await.unwrap();
    wb.write(Bytes::from(body.clone())).await.unwrap();
    match wb.finish(None).await.unwrap() {
        Committed::Existing(held) => assert_eq!(held.version, a),
        other => panic!("{other:?}"),
    }
    assert!(
        !store
            .delete_copy(&key("k"), a, DeleteReason::Withdrawn)
            .unwrap()
    );
    let other = data(3000, 2);
    wc.write(Bytes::from(other)).await.unwrap();
    assert!(matches!(
        wc.finish(None).await.unwrap(),
        Committed::Existing(_)
    ));
    assert_eq!(store.stats().reserved_bytes, 0);
}

#[tokio::test]
async fn a_conflict_repair_replaces_only_the_named_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let (loser, winner, other) = (Version::new(), Version::new(), Version::new());
    put_copy(&store, "k", &data(100, 1), loser, None)
        .await
        .unwrap();
    let before = store.ring_digest(0, u64::MAX).unwrap();
    // Naming a version the key does not hold: refused.
    assert!(matches!(
        put_copy(&store, "k", &data(300, 2), winner, Some(other)).await,
        Err(StoreError::Exists)
    ));
    put_copy(&store, "k", &data(300, 2), winner, Some(loser))
        .await
        .unwrap();
    assert_eq!(get(&store, "k").await.unwrap().unwrap(), data(300, 2));
    let meta = store.head(&key("k")).unwrap().unwrap();
    assert_eq!((meta.version, meta.size), (winner, 300));
    assert_eq!(store.stats().objects, 1);
    assert_eq!(store.stats().stored_bytes, 300);
    assert_ne!(store.ring_digest(0, u64::MAX).unwrap(), before);
    // And it survives a restart as it is.
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.head(&key("k")).unwrap().unwrap().version, winner);
    assert_eq!(store.stats().stored_bytes, 300);
}

#[tokio::test]
async fn range_digests_are_kept_up_to_date_and_match_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    for n in 0..300 {
        put(&store, &format!("k{n}"), &data(10 + n, n as u8))
            .await
            .unwrap();
    }
    let scan = |store: &BlobStore, first: u64, last: u64| {
        let mut d = crate::RangeDigest::default();
        for e in store
            .ring_entries(&[(first, last)], None, usize::MAX)
            .unwrap()
        {
            d.add(crate::RangeDigest {
                xor: crate::entry_digest(&e.key, &e.copy),
                count: 1,
            });
        }
        d
    };
    let whole = store.ring_digest(0, u64::MAX).unwrap();
    assert_eq!(whole.count, 300);
    assert_eq!(whole, scan(&store, 0, u64::MAX));
    // Ranges that cut buckets anywhere agree with a scan of the same range.
    for (first, last) in [
        (0, 1),
        (12_345_678_901, 9_876_543_210_123_456_789),
        (1 << 63, u64::MAX),
        (u64::MAX / 3, u64::MAX / 3 + (1 << 40)),
    ] {
        assert_eq!(
            store.ring_digest(first, last).unwrap(),
            scan(&store, first, last)
        );
    }
    // Removal, eviction and a restart keep digests and order in step.
    store.delete(&key("k7")).unwrap();
    let after = store.ring_digest(0, u64::MAX).unwrap();
    assert_eq!(after.count, 299);
    assert_eq!(after, scan(&store, 0, u64::MAX));
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 1 << 30);
    assert_eq!(store.ring_digest(0, u64::MAX).unwrap(), after);
    // Pages of entries: in ring order, resumed after a cursor, nothing twice.
    let mut seen = Vec::new();
    let mut cursor: Option<(u64, String)> = None;
    loop {
        let page = store
            .ring_entries(
                &[(0, u64::MAX / 2), (u64::MAX / 2 + 1, u64::MAX)],
                cursor.as_ref().map(|(p, k)| (*p, k.as_str())),
                17,
            )
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some((last.position, last.key.clone()));
        seen.extend(page.into_iter().map(|e| (e.position, e.key)));
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted);
    assert_eq!(seen.len(), 299);
}

#[tokio::test]
async fn evictions_are_remembered_and_requested_deletes_are_not_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 25_000);
    for k in ["a", "b", "c"] {
        put(&store, k, &data(10_000, 3)).await.unwrap();
    }
    // "a" was evicted to make room for "c": remembered, naming that copy.
    let mark = store.eviction_mark(&key("a")).unwrap().unwrap();
    assert_eq!(mark.copy.size, 10_000);
    assert!(store.eviction_mark(&key("b")).unwrap().is_none());
    // Another owner's eviction, passed on: remembered too. A hand-off is not.
    let b = store.head(&key("b")).unwrap().unwrap();
    assert!(
        store
            .delete_copy(&key("b"), b.version, DeleteReason::Evicted)
            .unwrap()
    );
    assert_eq!(
        store.eviction_mark(&key("b")).unwrap().unwrap().copy,
        b.identity()
    );
    let c = store.head(&key("c")).unwrap().unwrap();
    assert!(
        store
            .delete_copy(&key("c"), c.version, DeleteReason::HandedOff)
            .unwrap()
    );
    assert!(store.eviction_mark(&key("c")).unwrap().is_none());
    // Marks survive a restart.
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 25_000);
    assert_eq!(store.eviction_mark(&key("a")).unwrap(), Some(mark));
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_dir_is_private_and_artifacts_are_readable_by_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("nested").join("data");
    let store = open(&dir, 1 << 20);
    put(&store, "0123abcd", b"secret build output")
        .await
        .unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for created in [parent.path().join("nested"), dir.clone()] {
        assert_eq!(mode(&created), 0o700, "{}", created.display());
    }
    let layout = crate::layout::Layout::new(&dir);
    let path = layout.blob_path(&key("0123abcd"));
    assert_eq!(mode(&path), 0o600, "{}", path.display());
    assert_eq!(mode(path.parent().unwrap()), 0o700);
}

#[test]
fn a_write_cancelled_while_it_evicts_leaves_nothing_reserved() {
    use std::future::Future;
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        let store = open(dir.path(), 4 * MIB as u64);
        for i in 0..4 {
            put(&store, &format!("old{i}"), &data(MIB, i))
                .await
                .unwrap();
        }
        let mut writer = store.begin_write(key("new"), MIB as u64).await.unwrap();
        // The budget is full: this chunk must evict, on the blocking pool. The write is
        // polled once (it starts the eviction) and dropped, as a reset stream drops it.
        let mut write = Box::pin(writer.write(Bytes::from(vec![7; MIB])));
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx).is_pending()))
                .await;
        assert!(
            polled,
            "the write needed an eviction, off the async threads"
        );
        drop(write);
        drop(writer);
        store
    });
    // Dropping the runtime waits for its blocking tasks: the eviction has ended.
    drop(runtime);
    assert_eq!(
        store.stats().reserved_bytes,
        0,
        "a cancelled write left bytes reserved"
    );
}
