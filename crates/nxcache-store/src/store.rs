use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::copy::{
    CopyIdentity, DeleteReason, EvictionMark, RangeDigest, RingEntry, Version, entry_digest,
    ring_position,
};
use crate::error::StoreError;
use crate::index::{BlobMeta, Index};
use crate::key::BlobKey;
use crate::layout::Layout;
use crate::metrics::StoreMetrics;
use crate::read::{BlobBody, BlobRead, VERIFY_BEFORE_SEND_MAX, verified_stream};
use crate::sled_index::SledIndex;
use crate::write::BlobWriter;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Byte budget: committed plus in-flight bytes never exceed it.
    pub max_bytes: u64,
    /// Blobs not read or written for this long are evicted.
    pub ttl: Option<Duration>,
    /// fsync each blob and its directory before acknowledging it.
    pub fsync: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub stored_bytes: u64,
    pub objects: u64,
    pub reserved_bytes: u64,
    pub budget_bytes: u64,
}

/// Blobs up to this size are read on the calling task instead of the blocking pool.
const INLINE_READ_MAX: u64 = 64 * 1024;

/// Keys are locked in shards while a blob is published or removed, so that the check
/// "is it there?" and the rename that makes it so are one step for each key.
const KEY_LOCK_SHARDS: usize = 64;

/// How long this node remembers an eviction (see [`EvictionMark`]): long enough for
/// anti-entropy to meet every owner many times, and for a node that was down during the
/// eviction to come back; after that a copy found elsewhere is just a copy again.
pub const EVICTION_MARK_TTL: Duration = Duration::from_secs(6 * 3600);

/// Eviction marks kept at most; a node evicting faster than this per TTL records no
/// more (counted), and anti-entropy may then bring such an artifact back once.
pub const MAX_EVICTION_MARKS: u64 = 1_000_000;

/// How long a copy that another writer of the same bytes counted is spared from its own
/// writer's withdrawal. Withdrawals follow the write within seconds.
const CLAIM_TTL_MS: u64 = 10 * 60 * 1000;
const MAX_CLAIMS: usize = 65_536;

/// Digests of the ring order are kept per bucket of this many top bits of the position:
/// 65,536 buckets, 1 MiB of memory.
pub const DIGEST_BUCKET_BITS: u32 = 16;
const DIGEST_BUCKETS: usize = 1 << DIGEST_BUCKET_BITS;
const BUCKET_SHIFT: u32 = 64 - DIGEST_BUCKET_BITS;

/// Range digests kept up to date as copies come and go: one XOR and one count per bucket
/// of ring positions, so the digest of any range aligned to buckets costs one read per
/// bucket, whatever the number of keys.
struct RingDigests {
    xor: Vec<AtomicU64>,
    count: Vec<AtomicI64>,
}

impl RingDigests {
    fn new() -> Self {
        RingDigests {
            xor: (0..DIGEST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: (0..DIGEST_BUCKETS).map(|_| AtomicI64::new(0)).collect(),
        }
    }

    fn change(&self, key: &str, copy: &CopyIdentity, added: bool) {
        let b = (ring_position(key) >> BUCKET_SHIFT) as usize;
        self.xor[b].fetch_xor(entry_digest(key, copy), Ordering::Relaxed);
        self.count[b].fetch_add(if added { 1 } else { -1 }, Ordering::Relaxed);
    }

    fn bucket(&self, b: usize) -> RangeDigest {
        RangeDigest {
            xor: self.xor[b].load(Ordering::Relaxed),
            count: self.count[b].load(Ordering::Relaxed).max(0) as u64,
        }
    }
}

fn bucket_first(b: u64) -> u64 {
    b << BUCKET_SHIFT
}

fn bucket_last(b: u64) -> u64 {
    (b << BUCKET_SHIFT) | ((1u64 << BUCKET_SHIFT) - 1)
}

/// How a write ended when the key was taken meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This write's copy is stored (new, or replacing the copy it was told to replace).
    Stored(BlobMeta),
    /// Another copy holds the key; it is left as it is. When it holds the same bytes it
    /// is counted for this write and spared from its own writer's withdrawal.
    Existing(BlobMeta),
}

#[derive(Default)]
struct Accounting {
    stored: u64,
    objects: u64,
    reserved: u64,
}

/// The blob store of one node. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: StoreConfig,
    layout: Layout,
    index: Arc<dyn Index>,
    key_locks: Vec<Mutex<()>>,
    accounting: Mutex<Accounting>,
    metrics: StoreMetrics,
    tmp_counter: AtomicU64,
    pending_touches: Mutex<PendingTouches>,
    /// Told of every blob this store evicted (budget or TTL), so that a cluster can
    /// keep the other copies in step. Called with key locks held: must not block.
    eviction_listener: Mutex<Option<EvictionListener>>,
    digests: RingDigests,
    /// Copies that another writer of the same bytes counted: key -> (version, when).
    claims: Mutex<HashMap<BlobKey, (Version, u64)>>,
    /// Eviction marks recorded (approximate between purges).
    marks: AtomicU64,
    /// Added to the wall clock wherever idle time is measured (access times, the TTL):
    /// zero, except in tests that make time pass without waiting for it.
    clock_skew_ms: AtomicU64,
    /// Room on the file system kept for the metadata log: uploads that would eat into it
    /// are refused as a full disk.
    space_reserve: std::sync::OnceLock<Arc<nxcache_sled::SpaceReserve>>,
}

/// See [`BlobStore::set_eviction_listener`]: the key and the copy that was evicted.
pub type EvictionListener = Arc<dyn Fn(&BlobKey, &BlobMeta) + Send + Sync>;

/// What a scrub found for one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrubOutcome {
    /// The file matches its size and checksum.
    Intact,
    /// The file was damaged or missing: the blob was dropped.
    Dropped,
    /// Not stored (any more).
    Absent,
}

#[derive(Default)]
struct PendingTouches {
    counter: u64,
    accesses: HashMap<BlobKey, PendingAccess>,
}

#[derive(Clone, Copy)]
struct PendingAccess {
    order: u64,
    /// The record as the index held it when first read: the compare-and-swap base.
    seen: BlobMeta,
    accessed_ms: u64,
}

#[derive(Debug, Clone, Copy)]
enum Removal {
    Budget,
    Ttl,
    Corrupt,
    Missing,
    /// Dropped locally whatever it held ([`BlobStore::delete`]).
    Deleted,
    /// Removed on request, by naming the copy.
    Requested(DeleteReason),
}

impl Removal {
    fn label(self) -> &'static str {
        match self {
            Removal::Budget => "budget",
            Removal::Ttl => "ttl",
            Removal::Corrupt => "corrupt",
            Removal::Missing => "missing",
            Removal::Deleted => "deleted",
            Removal::Requested(reason) => reason.label(),
        }
    }

    /// Removals this node must not see undone by repair.
    fn is_eviction(self) -> bool {
        matches!(
            self,
            Removal::Budget | Removal::Ttl | Removal::Requested(DeleteReason::Evicted)
        )
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BlobStore {
    /// Opens the store in `config.data_dir` with a sled index. Blocking: call it before
    /// serving, or from a blocking thread.
    pub fn open(config: StoreConfig, registry: &prometheus::Registry) -> Result<Self, StoreError> {
        crate::create_private_dir(&config.data_dir)?;
        let layout = Layout::new(&config.data_dir);
        let index = SledIndex::open(&layout.index_dir())?;
        Self::open_with_index(config, Arc::new(index), registry)
    }

    /// Opens the store over any [`Index`].
    pub fn open_with_index(
        config: StoreConfig,
        index: Arc<dyn Index>,
        registry: &prometheus::Registry,
    ) -> Result<Self, StoreError> {
        let layout = Layout::new(&config.data_dir);
        // A brand-new store has nothing to reconcile.
        let fresh = !layout.blobs_dir().exists();
        crate::create_private_dir(&layout.tmp_dir())?;
        for shard in 0..=255u8 {
            crate::create_private_dir(&layout.shard_dir(shard))?;
        }
        let metrics = StoreMetrics::register(registry)
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        metrics.budget_bytes.set(config.max_bytes as i64);
        let store = BlobStore {
            inner: Arc::new(Inner {
                config,
                layout,
                index,
                key_locks: (0..KEY_LOCK_SHARDS).map(|_| Mutex::new(())).collect(),
                accounting: Mutex::new(Accounting::default()),
                metrics,
                tmp_counter: AtomicU64::new(0),
                pending_touches: Mutex::new(PendingTouches::default()),
                eviction_listener: Mutex::new(None),
                digests: RingDigests::new(),
                claims: Mutex::new(HashMap::new()),
                marks: AtomicU64::new(0),
                clock_skew_ms: AtomicU64::new(0),
                space_reserve: std::sync::OnceLock::new(),
            }),
        };
        store.recover(fresh)?;
        Ok(store)
    }

    fn recover(&self, fresh: bool) -> Result<(), StoreError> {
        let layout = &self.inner.layout;
        // Scratch files of a previous run: nothing refers to them. (Cut uploads, beside
        // their final place, are removed by the reconciliation after a crash.)
        let mut orphans = 0usize;
        for entry in std::fs::read_dir(layout.tmp_dir())? {
            std::fs::remove_file(entry?.path())?;
            orphans += 1;
        }
        let marker = layout.clean_marker();
        let was_clean = marker.exists();
        if was_clean {
            // From now on we are running: a crash must not find the marker.
            std::fs::remove_file(&marker)?;
            sync_dir(&self.inner.config.data_dir)?;
        } else if !fresh {
            self.reconcile_files()?;
        }
        // The ring order is written beside each record, not atomically with it: after a
        // crash (or on an index from before it existed) it is made to match again.
        if !was_clean || !self.inner.index.ring_is_built()? {
            self.inner.index.rebuild_ring()?;
        }
        let mut acct = Accounting::default();
        let digests = &self.inner.digests;
        self.inner.index.for_each(&mut |key, meta| {
            acct.stored += meta.size;
            acct.objects += 1;
            digests.change(key, &meta.identity(), true);
        })?;
        let marks = self.purge_eviction_marks()?;
        tracing::info!(
            objects = acct.objects,
            bytes = acct.stored,
            orphan_temp_files = orphans,
            eviction_marks = marks,
            clean_shutdown = was_clean,
            new_store = fresh,
            "blob store opened"
        );
        *lock(&self.inner.accounting) = acct;
        self.publish_gauges();
        // The budget may have been lowered since the last run.
        let over = self
            .stats()
            .stored_bytes
            .saturating_sub(self.inner.config.max_bytes);
        if over > 0 {
            self.evict_lru(over)?;
        }
        Ok(())
    }

    /// After a crash: drop index entries whose file is gone, and adopt blob files that were
    /// renamed into place but not yet indexed (they are complete: only whole, verified
    /// uploads are ever renamed). Lists directories; reads only the files it adopts.
    fn reconcile_files(&self) -> Result<(), StoreError> {
        let index = &self.inner.index;
        let mut indexed: HashMap<String, u64> = HashMap::new();
        index.for_each(&mut |key, meta| {
            indexed.insert(key.to_owned(), meta.size);
        })?;
        let (mut adopted, mut removed) = (0usize, 0usize);
        for shard in 0..=255u8 {
            for entry in std::fs::read_dir(self.inner.layout.shard_dir(shard))? {
                let entry = entry?;
                let name = entry.file_name();
                let key = name.to_str().and_then(|n| BlobKey::parse(n).ok());
                match key {
                    Some(key) if key.shard() == shard => {
                        if indexed.remove(key.as_str()).is_none() {
                            let meta = self.describe_file(&entry.path())?;
                            index.insert(key.as_str(), &meta)?;
                            adopted += 1;
                        }
                    }
                    _ => {
                        std::fs::remove_file(entry.path())?;
                        removed += 1;
                    }
                }
            }
        }
        let missing = indexed.len();
        for key in indexed.keys() {
            index.remove(key)?;
        }
        index.flush()?;
        tracing::warn!(
            adopted,
            missing,
            removed_strays = removed,
            "reconciled blob files with the index after an unclean shutdown"
        );
        self.inner
            .metrics
            .dropped
            .with_label_values(&["missing"])
            .inc_by(missing as u64);
        Ok(())
    }

    /// Now, in ms since the epoch, on the clock that idle times and the TTL are measured
    /// with.
    fn now(&self) -> u64 {
        now_ms() + self.inner.clock_skew_ms.load(Ordering::Relaxed)
    }

    /// Makes `by` pass for access times and the TTL (tests: expiry without waiting).
    #[cfg(test)]
    pub(crate) fn advance_clock(&self, by: Duration) {
        self.inner
            .clock_skew_ms
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }

    fn describe_file(&self, path: &Path) -> Result<BlobMeta, StoreError> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = crate::checksum::ChecksumHasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let now = self.now();
        let checksum = hasher.finish();
        Ok(BlobMeta {
            size,
            checksum,
            created_ms: now,
            accessed_ms: now,
            access_seq: self.inner.index.next_seq()?,
            // Its write's version went with the lost index entry.
            version: Version::legacy(&checksum),
        })
    }

    /// Flushes the index and marks the shutdown clean, so the next start skips the
    /// file reconciliation.
    pub fn close(&self) -> Result<(), StoreError> {
        self.apply_accesses();
        self.inner.index.flush()?;
        let marker = self.inner.layout.clean_marker();
        let file = std::fs::File::create(&marker)?;
        file.sync_all()?;
        sync_dir(&self.inner.config.data_dir)?;
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        let acct = lock(&self.inner.accounting);
        StoreStats {
            stored_bytes: acct.stored,
            objects: acct.objects,
            reserved_bytes: acct.reserved,
            budget_bytes: self.inner.config.max_bytes,
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub(crate) fn fsync_enabled(&self) -> bool {
        self.inner.config.fsync
    }

    /// Metadata only: no file access, no change to the LRU order.
    pub fn head(&self, key: &BlobKey) -> Result<Option<BlobMeta>, StoreError> {
        let meta = self.inner.index.get(key.as_str())?;
        Ok(meta.filter(|m| !self.is_expired(m)))
    }

    pub fn contains(&self, key: &BlobKey) -> Result<bool, StoreError> {
        Ok(self.head(key)?.is_some())
    }

    /// Counts as a read for the LRU order (a read of this key through another owner).
    pub fn touch(&self, key: &BlobKey) -> Result<bool, StoreError> {
        match self.inner.index.get(key.as_str())? {
            Some(meta) => {
                self.note_access(key, &meta);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Registers the function told of each eviction (budget or TTL; not deletions).
    pub fn set_eviction_listener(&self, listener: EvictionListener) {
        *lock(&self.inner.eviction_listener) = Some(listener);
    }

    /// Drops the local copy of `key`, whatever it holds. For operators and tests only:
    /// the cluster removes a replica only by naming it ([`BlobStore::delete_copy`]).
    /// Blocking: index and file system. Returns whether there was one.
    pub fn delete(&self, key: &BlobKey) -> Result<bool, StoreError> {
        let Some(meta) = self.inner.index.get(key.as_str())? else {
            return Ok(false);
        };
        self.remove_if_current(key, &meta, Removal::Deleted)?;
        Ok(true)
    }

    /// Removes the copy of `key` only if it is the copy of write `version`; a copy of
    /// another write (a newer upload, the winner of a conflict) is left alone. A
    /// withdrawal also spares a copy that another writer of the same bytes counted
    /// towards its acknowledgement. The check and the removal are one step under the
    /// key's lock. Blocking. Returns whether the copy was removed.
    pub fn delete_copy(
        &self,
        key: &BlobKey,
        version: Version,
        reason: DeleteReason,
    ) -> Result<bool, StoreError> {
        let _guard = self.key_lock(key);
        let Some(current) = self.inner.index.get(key.as_str())? else {
            return Ok(false);
        };
        if current.version != version {
            return Ok(false);
        }
        if reason == DeleteReason::Withdrawn && self.is_claimed(key, version) {
            tracing::debug!(key = %key, %version, "withdrawal spared a copy another writer counted");
            return Ok(false);
        }
        Ok(self.remove_locked(key, Removal::Requested(reason))? > 0)
    }

    /// The copy of `key` if it holds `copy`'s bytes, now counted for a writer of those
    /// bytes (spared from its own writer's withdrawal); otherwise the copy as it is,
    /// unclaimed. Blocking (takes the key's lock).
    pub fn claim_if_same(
        &self,
        key: &BlobKey,
        copy: &CopyIdentity,
    ) -> Result<Option<BlobMeta>, StoreError> {
        let _guard = self.key_lock(key);
        let current = self.inner.index.get(key.as_str())?;
        if let Some(cur) = &current
            && cur.identity().same_content(copy)
        {
            self.claim(key, cur.version);
        }
        Ok(current)
    }

    fn claim(&self, key: &BlobKey, version: Version) {
        let now = now_ms();
        let mut claims = lock(&self.inner.claims);
        if claims.len() >= MAX_CLAIMS {
            claims.retain(|_, (_, at)| now.saturating_sub(*at) < CLAIM_TTL_MS);
            if claims.len() >= MAX_CLAIMS
                && let Some(any) = claims.keys().next().cloned()
            {
                claims.remove(&any);
            }
        }
        claims.insert(key.clone(), (version, now));
    }

    fn is_claimed(&self, key: &BlobKey, version: Version) -> bool {
        lock(&self.inner.claims)
            .get(key)
            .is_some_and(|(v, at)| *v == version && now_ms().saturating_sub(*at) < CLAIM_TTL_MS)
    }

    /// This node's record of evicting `key`, while it is recent enough to matter.
    pub fn eviction_mark(&self, key: &BlobKey) -> Result<Option<EvictionMark>, StoreError> {
        let cutoff = now_ms().saturating_sub(EVICTION_MARK_TTL.as_millis() as u64);
        Ok(self
            .inner
            .index
            .eviction_mark(key.as_str())?
            .filter(|m| m.at_ms >= cutoff))
    }

    /// Forgets eviction marks older than [`EVICTION_MARK_TTL`]. Blocking; walks the marks.
    pub fn purge_eviction_marks(&self) -> Result<u64, StoreError> {
        let cutoff = now_ms().saturating_sub(EVICTION_MARK_TTL.as_millis() as u64);
        let left = self.inner.index.purge_eviction_marks(cutoff)?;
        self.inner.marks.store(left, Ordering::Relaxed);
        self.inner.metrics.eviction_marks.set(left as i64);
        Ok(left)
    }

    /// The digest of the copies whose ring position lies in `first..=last`: whole
    /// buckets from the digests kept up to date, the parts of buckets at either end by
    /// a scan of those parts only. Blocking when a part must be scanned.
    pub fn ring_digest(&self, first: u64, last: u64) -> Result<RangeDigest, StoreError> {
        let mut total = RangeDigest::default();
        if first > last {
            return Ok(total);
        }
        let (fb, lb) = (first >> BUCKET_SHIFT, last >> BUCKET_SHIFT);
        for b in fb..=lb {
            let (lo, hi) = (first.max(bucket_first(b)), last.min(bucket_last(b)));
            if lo == bucket_first(b) && hi == bucket_last(b) {
                total.add(self.inner.digests.bucket(b as usize));
            } else {
                total.add(self.scan_digest(lo, hi)?);
            }
        }
        Ok(total)
    }

    fn scan_digest(&self, first: u64, last: u64) -> Result<RangeDigest, StoreError> {
        let mut d = RangeDigest::default();
        self.inner
            .index
            .visit_ring(first, last, None, &mut |_, key, copy| {
                d.xor ^= entry_digest(key, copy);
                d.count += 1;
                true
            })?;
        Ok(d)
    }

    /// Up to `limit` copies in the ring ranges `ranges` (inclusive, ascending, disjoint),
    /// in ring order, after `after`. Costs the entries returned (and the ranges skipped).
    /// Blocking.
    pub fn ring_entries(
        &self,
        ranges: &[(u64, u64)],
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RingEntry>, StoreError> {
        let mut out = Vec::new();
        for (first, last) in ranges {
            if out.len() >= limit {
                break;
            }
            let cursor = match after {
                Some((position, _)) if position > *last => continue,
                Some((position, key)) if position >= *first => Some((position, key)),
                _ => None,
            };
            self.inner
                .index
                .visit_ring(*first, *last, cursor, &mut |position, key, copy| {
                    out.push(RingEntry {
                        position,
                        key: key.to_owned(),
                        copy: *copy,
                    });
                    out.len() < limit
                })?;
        }
        Ok(out)
    }

    /// Every stored blob's key and metadata, in key order. Blocking; memory grows with
    /// the number of blobs (about 100 bytes each), which background passes accept.
    pub fn list(&self) -> Result<Vec<(BlobKey, BlobMeta)>, StoreError> {
        let mut all = Vec::new();
        self.inner.index.for_each(&mut |key, meta| {
            if let Ok(key) = BlobKey::parse(key) {
                all.push((key, *meta));
            }
        })?;
        all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(all)
    }

    /// Re-reads a blob's file and checks it against its checksum, dropping it when it
    /// does not match. Does not count as an access. Blocking (reads the whole file).
    pub fn scrub(&self, key: &BlobKey) -> Result<ScrubOutcome, StoreError> {
        let Some(meta) = self.inner.index.get(key.as_str())? else {
            return Ok(ScrubOutcome::Absent);
        };
        let path = self.inner.layout.blob_path(key);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.drop_missing(key, &meta)?;
                return Ok(ScrubOutcome::Dropped);
            }
            Err(err) => return Err(err.into()),
        };
        let mut hasher = crate::checksum::ChecksumHasher::new();
        let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        if size == meta.size && hasher.finish() == meta.checksum {
            return Ok(ScrubOutcome::Intact);
        }
        tracing::error!(key = %key, "scrub: stored artifact failed verification; dropping it");
        self.remove_if_current(key, &meta, Removal::Corrupt)?;
        Ok(ScrubOutcome::Dropped)
    }

    /// Checks that the data directory accepts writes (readiness): a probe file is written,
    /// synced and removed. Run by one background check, not per request.
    pub async fn probe_writable(&self) -> Result<(), StoreError> {
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .inner
            .layout
            .tmp_dir()
            .join(format!(".probe.{}.{n}", std::process::id()));
        tokio::task::spawn_blocking(move || {
            let written = (|| {
                let mut file = std::fs::File::create(&path)?;
                std::io::Write::write_all(&mut file, b"ok")?;
                file.sync_all()
            })();
            let removed = std::fs::remove_file(&path);
            written.and(removed)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// Keeps `reserve` free: from now on an upload or copy that would leave less than it
    /// free on the file system is refused with [`StoreError::DiskFull`] before it writes.
    /// Set once; later calls are ignored.
    pub fn keep_space_reserve(&self, reserve: Arc<nxcache_sled::SpaceReserve>) {
        let _ = self.inner.space_reserve.set(reserve);
    }

    /// Starts an upload of exactly `len` bytes. Nothing is reserved yet: each chunk
    /// reserves its bytes in the budget as it arrives (evicting least recently used blobs
    /// if needed). The copy gets a new [`Version`].
    pub async fn begin_write(&self, key: BlobKey, len: u64) -> Result<BlobWriter, StoreError> {
        self.begin_copy(key, len, Version::new(), None).await
    }

    /// Starts storing a copy of write `version` (a replica, or a copy made by repair).
    /// With `replaces`, the copy of that version is replaced at commit (a conflict
    /// repair); any other copy of the key makes it fail with [`StoreError::Exists`].
    pub async fn begin_copy(
        &self,
        key: BlobKey,
        len: u64,
        version: Version,
        replaces: Option<Version>,
    ) -> Result<BlobWriter, StoreError> {
        if let Some(current) = self.head(&key)?
            && replaces != Some(current.version)
        {
            return Err(StoreError::Exists);
        }
        // Only a size that can never fit is refused here. Space is reserved (and evicted
        // for) as the bytes arrive, in [`BlobWriter::write`]: an announced size alone
        // costs the cache nothing, so an upload that never sends its body evicts nothing.
        let budget = self.inner.config.max_bytes;
        if len > budget {
            return Err(StoreError::LargerThanBudget { size: len, budget });
        }
        if let Some(reserve) = self.inner.space_reserve.get()
            && !reserve.admits(len)
        {
            self.count_write_failure("disk_full");
            tracing::debug!(
                len,
                available = reserve.available(),
                reserve = reserve.bytes(),
                "upload refused: it would eat into the space kept for the metadata log"
            );
            return Err(StoreError::DiskFull);
        }
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self
            .inner
            .layout
            .temp_path(&key, &format!("{}.{n}", std::process::id()));
        Ok(BlobWriter::new(
            self.clone(),
            key,
            len,
            tmp_path,
            version,
            replaces,
        ))
    }

    /// Reserves `len` more bytes of an upload in progress, evicting least recently used
    /// blobs when they do not fit (off the async threads: eviction deletes files).
    ///
    /// Cancel-safe: the bytes are only ever reserved here, synchronously, never inside
    /// the blocking task. A caller dropped while an eviction runs (a reset stream, a cut
    /// connection) therefore leaves nothing reserved that its writer would not release.
    pub(crate) async fn reserve_received(&self, len: u64) -> Result<(), StoreError> {
        loop {
            if self.try_reserve(len)? {
                return Ok(());
            }
            let shortfall = {
                let acct = lock(&self.inner.accounting);
                (acct.stored + acct.reserved + len).saturating_sub(self.inner.config.max_bytes)
            };
            let store = self.clone();
            let freed = tokio::task::spawn_blocking(move || store.evict_lru(shortfall))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
            // Nothing freed: either nothing is left to evict, or concurrent evictors took
            // the same candidates (then the space they freed may fit this chunk).
            if freed == 0 {
                if self.try_reserve(len)? {
                    return Ok(());
                }
                return Err(StoreError::BudgetExhausted {
                    budget: self.inner.config.max_bytes,
                });
            }
        }
    }

    /// Reserves `len` bytes if they fit without evicting anything.
    fn try_reserve(&self, len: u64) -> Result<bool, StoreError> {
        let budget = self.inner.config.max_bytes;
        if len > budget {
            return Err(StoreError::LargerThanBudget { size: len, budget });
        }
        let mut acct = lock(&self.inner.accounting);
        if acct.stored + acct.reserved + len <= budget {
            acct.reserved += len;
            self.inner.metrics.reserved_bytes.set(acct.reserved as i64);
            return Ok(true);
        }
        Ok(false)
    }

    pub(crate) fn release_reservation(&self, len: u64) {
        let mut acct = lock(&self.inner.accounting);
        acct.reserved = acct.reserved.saturating_sub(len);
        self.inner.metrics.reserved_bytes.set(acct.reserved as i64);
    }

    pub(crate) fn count_write_failure(&self, reason: &str) {
        self.inner
            .metrics
            .write_failures
            .with_label_values(&[reason])
            .inc();
    }

    fn key_lock(&self, key: &BlobKey) -> std::sync::MutexGuard<'_, ()> {
        let shard = key.shard() as usize % KEY_LOCK_SHARDS;
        lock(&self.inner.key_locks[shard])
    }

    /// Renames a complete temp file into place and indexes it; consumes the temp file and
    /// the reservation whatever happens. Blocking.
    pub(crate) fn publish_blocking(
        &self,
        key: &BlobKey,
        tmp_path: &Path,
        copy: CopyIdentity,
        replaces: Option<Version>,
    ) -> Result<Committed, StoreError> {
        let outcome = self.publish_renamed(key, tmp_path, copy, replaces);
        match &outcome {
            Ok(Committed::Stored(_)) => {}
            Ok(Committed::Existing(_)) => {
                let _ = std::fs::remove_file(tmp_path);
                self.count_write_failure("exists");
            }
            Err(err) => {
                let _ = std::fs::remove_file(tmp_path);
                self.count_write_failure(crate::write::failure_reason(err));
            }
        }
        self.release_reservation(copy.size);
        outcome
    }

    fn publish_renamed(
        &self,
        key: &BlobKey,
        tmp_path: &Path,
        copy: CopyIdentity,
        replaces: Option<Version>,
    ) -> Result<Committed, StoreError> {
        let final_path = self.inner.layout.blob_path(key);
        let now = self.now();
        let meta = BlobMeta {
            size: copy.size,
            checksum: copy.checksum,
            created_ms: now,
            accessed_ms: now,
            access_seq: self.inner.index.next_seq()?,
            version: copy.version,
        };
        {
            let _guard = self.key_lock(key);
            let replaced = match self.inner.index.get(key.as_str())? {
                Some(current) if replaces == Some(current.version) => Some(current),
                Some(current) => {
                    if current.identity().same_content(&copy) {
                        self.claim(key, current.version);
                    }
                    return Ok(Committed::Existing(current));
                }
                None => None,
            };
            // Over the replaced copy's file, if any: readers that opened it keep reading
            // the old bytes, verified against the old checksum.
            std::fs::rename(tmp_path, &final_path)?;
            if let Err(err) = self.inner.index.insert(key.as_str(), &meta) {
                let _ = std::fs::remove_file(&final_path);
                if let Some(old) = replaced {
                    // The old copy's file is gone with the rename: so is the copy.
                    let _ = self.inner.index.remove(key.as_str());
                    self.forget(key, &old);
                }
                return Err(err.into());
            }
            let mut acct = lock(&self.inner.accounting);
            if let Some(old) = &replaced {
                self.inner
                    .digests
                    .change(key.as_str(), &old.identity(), false);
                acct.stored = acct.stored.saturating_sub(old.size);
                acct.objects = acct.objects.saturating_sub(1);
                self.inner
                    .metrics
                    .dropped
                    .with_label_values(&["replaced"])
                    .inc();
            }
            self.inner.digests.change(key.as_str(), &copy, true);
            acct.stored += copy.size;
            acct.objects += 1;
        }
        if self.inner.config.fsync {
            // The rename itself must survive power loss before we acknowledge.
            sync_dir(final_path.parent().expect("blob path has a parent"))?;
        }
        self.publish_gauges();
        Ok(Committed::Stored(meta))
    }

    /// Accounting for a copy that left the index.
    fn forget(&self, key: &BlobKey, removed: &BlobMeta) {
        self.inner
            .digests
            .change(key.as_str(), &removed.identity(), false);
        let mut acct = lock(&self.inner.accounting);
        acct.stored = acct.stored.saturating_sub(removed.size);
        acct.objects = acct.objects.saturating_sub(1);
    }

    /// Opens a blob for reading, or `None` on a miss. A blob whose file is missing,
    /// truncated or fails its checksum is dropped and reported as a miss (small blobs) or
    /// as a stream error before its last chunk (large blobs).
    pub async fn read(&self, key: &BlobKey) -> Result<Option<BlobRead>, StoreError> {
        let Some(meta) = self.inner.index.get(key.as_str())? else {
            return Ok(None);
        };
        if self.is_expired(&meta) {
            self.remove_if_current(key, &meta, Removal::Ttl)?;
            return Ok(None);
        }
        let path = self.inner.layout.blob_path(key);
        let body = if meta.size <= VERIFY_BEFORE_SEND_MAX {
            let read = if meta.size <= INLINE_READ_MAX {
                // A few pages, nearly always in the page cache: reading them here costs
                // less than the two thread hand-offs of the blocking pool.
                std::fs::read(path)
            } else {
                tokio::task::spawn_blocking(move || std::fs::read(path))
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            };
            match read {
                Ok(bytes) => {
                    if bytes.len() as u64 != meta.size
                        || crate::checksum::checksum_of(&bytes) != meta.checksum
                    {
                        self.drop_corrupt(key, &meta).await;
                        return Ok(None);
                    }
                    BlobBody::Verified(Bytes::from(bytes))
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    self.drop_missing(key, &meta)?;
                    return Ok(None);
                }
                Err(err) => return Err(err.into()),
            }
        } else {
            match tokio::fs::File::open(&path).await {
                Ok(file) => {
                    if file.metadata().await?.len() != meta.size {
                        self.drop_corrupt(key, &meta).await;
                        return Ok(None);
                    }
                    verified_stream(self.clone(), key.clone(), meta, file)
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    self.drop_missing(key, &meta)?;
                    return Ok(None);
                }
                Err(err) => return Err(err.into()),
            }
        };
        self.note_access(key, &meta);
        Ok(Some(BlobRead { meta, body }))
    }

    /// Records a read. Reads do not write to the index themselves: accesses are
    /// collected here and applied in one batch, in access order, by the maintenance
    /// worker and before anything consults the LRU order (eviction, expiry, close).
    fn note_access(&self, key: &BlobKey, meta: &BlobMeta) {
        let mut pending = lock(&self.inner.pending_touches);
        pending.counter += 1;
        let order = pending.counter;
        let now = self.now();
        pending
            .accesses
            .entry(key.clone())
            .and_modify(|a| {
                a.order = order;
                a.accessed_ms = now;
            })
            .or_insert(PendingAccess {
                order,
                seen: *meta,
                accessed_ms: now,
            });
    }

    /// Moves every blob read since the last call to the recent end of the LRU order.
    /// Best effort: a failure only makes eviction less exact, so it is logged.
    pub fn apply_accesses(&self) {
        let mut batch: Vec<(BlobKey, PendingAccess)> = {
            let mut pending = lock(&self.inner.pending_touches);
            if pending.accesses.is_empty() {
                return;
            }
            pending.accesses.drain().collect()
        };
        batch.sort_by_key(|(_, a)| a.order);
        let index = &self.inner.index;
        for (key, access) in batch {
            let result = index.next_seq().and_then(|seq| {
                let newer = BlobMeta {
                    accessed_ms: access.accessed_ms,
                    access_seq: seq,
                    ..access.seen
                };
                // Refused when the blob changed meanwhile (evicted, dropped): nothing to do.
                index.touch(key.as_str(), &access.seen, &newer)
            });
            if let Err(err) = result {
                tracing::warn!(%err, "could not record an access in the index");
            }
        }
    }

    fn is_expired(&self, meta: &BlobMeta) -> bool {
        match self.inner.config.ttl {
            Some(ttl) => self.now().saturating_sub(meta.accessed_ms) > ttl.as_millis() as u64,
            None => false,
        }
    }

    pub(crate) async fn drop_corrupt(&self, key: &BlobKey, meta: &BlobMeta) {
        tracing::error!(key = %key, "stored artifact failed verification; dropping it");
        let store = self.clone();
        let (key, meta) = (key.clone(), *meta);
        let outcome = tokio::task::spawn_blocking(move || {
            store.remove_if_current(&key, &meta, Removal::Corrupt)
        })
        .await;
        if let Ok(Err(err)) = outcome {
            tracing::error!(%err, "could not drop a corrupt artifact");
        }
    }

    fn drop_missing(&self, key: &BlobKey, meta: &BlobMeta) -> Result<(), StoreError> {
        tracing::warn!(key = %key, "indexed artifact has no file; dropping the entry");
        self.remove_if_current(key, meta, Removal::Missing)
            .map(|_| ())
    }

    /// Removes a blob if the index still describes the same copy as `seen` (a newer
    /// upload of the key after an eviction must not be removed by a stale decision).
    /// Returns the bytes freed.
    fn remove_if_current(
        &self,
        key: &BlobKey,
        seen: &BlobMeta,
        why: Removal,
    ) -> Result<u64, StoreError> {
        let _guard = self.key_lock(key);
        match self.inner.index.get(key.as_str())? {
            Some(current)
                if current.version == seen.version && current.created_ms == seen.created_ms => {}
            _ => return Ok(0),
        }
        self.remove_locked(key, why)
    }

    /// Removes the key's copy; the caller holds the key's lock and checked which copy it
    /// is. Returns the bytes freed.
    fn remove_locked(&self, key: &BlobKey, why: Removal) -> Result<u64, StoreError> {
        let Some(removed) = self.inner.index.remove(key.as_str())? else {
            return Ok(0);
        };
        if let Err(err) = std::fs::remove_file(self.inner.layout.blob_path(key))
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(key = %key, %err, "could not delete an evicted blob file");
        }
        self.forget(key, &removed);
        let m = &self.inner.metrics;
        match why {
            Removal::Budget | Removal::Ttl => {
                m.evictions.with_label_values(&[why.label()]).inc();
                m.evicted_bytes
                    .with_label_values(&[why.label()])
                    .inc_by(removed.size);
            }
            _ => {
                m.dropped.with_label_values(&[why.label()]).inc();
            }
        }
        if why.is_eviction() {
            self.mark_evicted(key, &removed);
        }
        self.publish_gauges();
        if matches!(why, Removal::Budget | Removal::Ttl) {
            let listener = lock(&self.inner.eviction_listener).clone();
            if let Some(listener) = listener {
                listener(key, &removed);
            }
        }
        Ok(removed.size)
    }

    /// Records the eviction, so that repair does not bring the copy back (best effort:
    /// past [`MAX_EVICTION_MARKS`], or when the index fails, it is only counted/logged).
    fn mark_evicted(&self, key: &BlobKey, removed: &BlobMeta) {
        if self.inner.marks.load(Ordering::Relaxed) >= MAX_EVICTION_MARKS {
            self.inner.metrics.eviction_marks_skipped.inc();
            return;
        }
        let mark = EvictionMark {
            copy: removed.identity(),
            at_ms: now_ms(),
        };
        match self.inner.index.mark_evicted(key.as_str(), &mark) {
            Ok(()) => {
                let n = self.inner.marks.fetch_add(1, Ordering::Relaxed) + 1;
                self.inner.metrics.eviction_marks.set(n as i64);
            }
            Err(err) => tracing::warn!(key = %key, %err, "could not record an eviction"),
        }
    }

    /// Evicts least recently used blobs until at least `needed` bytes are freed or nothing
    /// is left. Returns the bytes freed.
    fn evict_lru(&self, needed: u64) -> Result<u64, StoreError> {
        self.apply_accesses();
        let mut freed = 0;
        while freed < needed {
            let batch = self.inner.index.least_recent(32)?;
            if batch.is_empty() {
                break;
            }
            let mut progress = false;
            for (key, meta) in batch {
                let Ok(key) = BlobKey::parse(&key) else {
                    continue;
                };
                let n = self.remove_if_current(&key, &meta, Removal::Budget)?;
                progress |= n > 0;
                freed += n;
                if freed >= needed {
                    break;
                }
            }
            if !progress {
                break;
            }
        }
        if freed > 0 {
            tracing::debug!(freed, needed, "evicted least recently used artifacts");
        }
        Ok(freed)
    }

    /// Evicts every blob idle for longer than the TTL. Returns how many.
    pub fn expire_idle(&self) -> Result<usize, StoreError> {
        let Some(ttl) = self.inner.config.ttl else {
            return Ok(0);
        };
        self.apply_accesses();
        let cutoff = self.now().saturating_sub(ttl.as_millis() as u64);
        let mut expired = 0;
        loop {
            let batch = self.inner.index.least_recent(64)?;
            let mut progressed = false;
            for (key, meta) in &batch {
                if meta.accessed_ms >= cutoff {
                    return Ok(expired);
                }
                if let Ok(key) = BlobKey::parse(key)
                    && self.remove_if_current(&key, meta, Removal::Ttl)? > 0
                {
                    expired += 1;
                    progressed = true;
                }
            }
            if batch.is_empty() || !progressed {
                return Ok(expired);
            }
        }
    }

    /// The store's background worker, until `stop` resolves: applies recorded reads to
    /// the LRU order every second, and evicts idle blobs every `expire_every` when a TTL
    /// is set.
    pub async fn run_maintenance(
        &self,
        expire_every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut touches = tokio::time::interval(Duration::from_secs(1));
        let mut expiry = tokio::time::interval(expire_every);
        let mut marks = tokio::time::interval(Duration::from_secs(60));
        touches.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        marks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let store = self.clone();
            tokio::select! {
                _ = &mut stop => return,
                _ = touches.tick() => {
                    let _ = tokio::task::spawn_blocking(move || store.apply_accesses()).await;
                }
                _ = marks.tick() => {
                    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || store.purge_eviction_marks()).await {
                        tracing::warn!(%err, "could not purge old eviction marks");
                    }
                }
                _ = expiry.tick(), if self.inner.config.ttl.is_some() => {
                    match tokio::task::spawn_blocking(move || store.expire_idle()).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(expired = n, "evicted idle artifacts"),
                        Ok(Err(err)) => tracing::warn!(%err, "TTL sweep failed"),
                        _ => {}
                    }
                }
            }
        }
    }

    fn publish_gauges(&self) {
        let acct = lock(&self.inner.accounting);
        let m = &self.inner.metrics;
        m.stored_bytes.set(acct.stored as i64);
        m.objects.set(acct.objects as i64);
        m.reserved_bytes.set(acct.reserved as i64);
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
