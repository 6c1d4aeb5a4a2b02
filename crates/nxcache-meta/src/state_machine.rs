//! The metadata state machine, persisted in sled.
//!
//! One tree holds the state: a small header (last applied log id, membership, settings,
//! rings, member states) and the token table, one key per token and per revoked name.
//! Each applied batch of entries changes only the keys it touches, with the header, in
//! one atomic sled batch; the node's in-memory `TokenSet` takes the same changes. So the
//! cost of applying an entry does not grow with the number of tokens, and readers never
//! copy the table. Snapshots are files (`snapshot.rs`); installing one fills a fresh tree
//! and then switches to it, so a crash leaves either the old state or the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nxcache_auth::{Authenticator, Digest, Principal, Scope, TokenSet};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::durable::flush;
use crate::snapshot::{RecordReader, SnapshotFile, write_file};
use crate::types::{
    ClusterState, MemberNode, MemberState, MetaResponse, NodeId, TokenRecord, TokenTable,
    TypeConfig,
};

/// The state machine's header: everything but the token table. Small; readers get copies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, MemberNode>,
    pub cluster: ClusterState,
}

type StoreResult<T> = Result<T, StorageError<NodeId>>;

const HEADER: &[u8] = b"header";
const TOKEN: &str = "token/";
const REVOKED: &str = "revoked/";
/// Tree naming the current state tree (`sm_state_<generation>`) and the current snapshot.
const CONTROL_TREE: &str = "sm";
const STATE_TREE_KEY: &[u8] = b"state_tree";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
const STATE_TREE_PREFIX: &str = "sm_state_";
/// The state machine of nodes from before the token table was stored token by token.
const LEGACY_TREE: &str = "state_machine";
/// Bytes of records per sled batch while a snapshot is installed.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

fn token_key(name: &str) -> Vec<u8> {
    format!("{TOKEN}{name}").into_bytes()
}

fn revoked_key(name: &str) -> Vec<u8> {
    format!("{REVOKED}{name}").into_bytes()
}

fn json_err(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// How a stored token becomes something authentication can match.
fn principal(name: &str, record: &TokenRecord) -> Option<(Digest, Principal)> {
    match (
        Digest::from_hex(&record.digest),
        Scope::parse(&record.scope),
    ) {
        (Some(digest), Some(scope)) => Some((
            digest,
            Principal {
                namespace: record.namespace.clone(),
                read_from: record.read_from.clone(),
                ..Principal::new(name, scope)
            },
        )),
        _ => {
            tracing::warn!(token = %name, "ignoring a token record that cannot be read");
            None
        }
    }
}

/// A stored token's change in an applied batch, for the in-memory `TokenSet`.
struct TokenChange {
    name: String,
    old: Option<TokenRecord>,
    new: Option<TokenRecord>,
}

/// The current snapshot, as recorded in the control tree.
#[derive(Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta<NodeId, MemberNode>,
    /// File name in the snapshot directory.
    file: String,
}

/// The applied state as the node reads it (authentication, status, placement), and its
/// storage. Shared by the state machine and the node.
pub struct StateStore {
    db: sled::Db,
    control: sled::Tree,
    tree: RwLock<sled::Tree>,
    header: RwLock<AppliedState>,
    tokens: RwLock<TokenSet>,
    token_count: AtomicUsize,
    /// Changes whenever what placement is built from changes.
    placement_version: AtomicU64,
    snapshot_dir: PathBuf,
    snapshot_bytes: AtomicU64,
    /// One snapshot becomes the current one at a time.
    snapshot_lock: Mutex<()>,
    /// Unique file names (seeded from the clock, so also across restarts).
    file_counter: AtomicU64,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore").finish_non_exhaustive()
    }
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// What placement depends on, to notice when it changed.
fn placement_inputs(state: &AppliedState) -> impl PartialEq + use<> {
    (
        state.cluster.ring.clone(),
        state.cluster.previous_ring.clone(),
        state.cluster.settings.clone(),
        state.last_membership.log_id().to_owned(),
    )
}

impl StateStore {
    /// Opens the state in `db` and the snapshots in `snapshot_dir`, converting the state of
    /// an older node if that is what it finds. Blocking: reads the whole token table.
    pub fn open(db: &sled::Db, snapshot_dir: &Path) -> io::Result<Arc<StateStore>> {
        let control = db.open_tree(CONTROL_TREE)?;
        let tree = match control.get(STATE_TREE_KEY)? {
            Some(name) => db.open_tree(name)?,
            None => {
                let name = format!("{STATE_TREE_PREFIX}1");
                let tree = db.open_tree(&name)?;
                tree.clear()?;
                convert_legacy_state(db, &tree)?;
                tree.flush()?;
                control.insert(STATE_TREE_KEY, name.as_bytes())?;
                control.flush()?;
                db.drop_tree(LEGACY_TREE)?;
                tree
            }
        };
        // Trees of installs that a crash interrupted.
        for name in db.tree_names() {
            if name.starts_with(STATE_TREE_PREFIX.as_bytes()) && name != tree.name() {
                db.drop_tree(name)?;
            }
        }
        let header: AppliedState = match tree.get(HEADER)? {
            Some(raw) => serde_json::from_slice(&raw).map_err(json_err)?,
            None => AppliedState::default(),
        };
        let (tokens, count) = token_set(&tree)?;
        std::fs::create_dir_all(snapshot_dir)?;
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let store = StateStore {
            db: db.clone(),
            control,
            tree: RwLock::new(tree),
            header: RwLock::new(header),
            tokens: RwLock::new(tokens),
            token_count: AtomicUsize::new(count),
            placement_version: AtomicU64::new(0),
            snapshot_dir: snapshot_dir.to_path_buf(),
            snapshot_bytes: AtomicU64::new(0),
            snapshot_lock: Mutex::new(()),
            file_counter: AtomicU64::new(clock),
        };
        store.clean_snapshot_dir()?;
        Ok(Arc::new(store))
    }

    /// The applied header (a copy: small).
    pub fn header(&self) -> AppliedState {
        read_lock(&self.header).clone()
    }

    /// Reads a few fields of the header without copying it.
    pub fn with_header<T>(&self, read: impl FnOnce(&AppliedState) -> T) -> T {
        read(&read_lock(&self.header))
    }

    fn current_tree(&self) -> sled::Tree {
        read_lock(&self.tree).clone()
    }

    pub fn token(&self, name: &str) -> io::Result<Option<TokenRecord>> {
        read_token(&self.current_tree(), name)
    }

    pub fn is_revoked(&self, name: &str) -> io::Result<bool> {
        Ok(self.current_tree().contains_key(revoked_key(name))?)
    }

    /// Every token, by name (reads the table: for listings, not for requests).
    pub fn tokens(&self) -> io::Result<Vec<(String, TokenRecord)>> {
        let mut out = Vec::new();
        for item in self.current_tree().scan_prefix(TOKEN) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[TOKEN.len()..]).into_owned();
            out.push((name, serde_json::from_slice(&value).map_err(json_err)?));
        }
        Ok(out)
    }

    pub fn token_count(&self) -> usize {
        self.token_count.load(Ordering::SeqCst)
    }

    pub fn placement_version(&self) -> u64 {
        self.placement_version.load(Ordering::SeqCst)
    }

    /// Size of the current snapshot file (0 before the first one).
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.load(Ordering::SeqCst)
    }

    fn next_file(&self, prefix: &str, suffix: &str) -> PathBuf {
        let n = self.file_counter.fetch_add(1, Ordering::SeqCst);
        self.snapshot_dir.join(format!("{prefix}-{n:020}.{suffix}"))
    }

    fn current_snapshot(&self) -> io::Result<Option<CurrentSnapshot>> {
        self.control
            .get(SNAPSHOT_KEY)?
            .map(|raw| serde_json::from_slice(&raw).map_err(json_err))
            .transpose()
    }

    /// Removes files that are not the current snapshot (interrupted builds and receives,
    /// replaced snapshots).
    fn clean_snapshot_dir(&self) -> io::Result<()> {
        let current = self.current_snapshot()?.map(|c| c.file);
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if Some(&name) == current.as_ref() {
                self.snapshot_bytes
                    .store(entry.metadata()?.len(), Ordering::SeqCst);
            } else if name.ends_with(".tmp") || name.ends_with(".snap") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Makes the snapshot file at `file` the current snapshot, unless a newer one is
    /// current already (a build that finished after an install). Blocking.
    fn keep_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        file: &Path,
    ) -> io::Result<PathBuf> {
        let _one_at_a_time = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current_snapshot()?;
        if let Some(current) = &current
            && current.meta.last_log_id > meta.last_log_id
        {
            std::fs::remove_file(file)?;
            return Ok(self.snapshot_dir.join(&current.file));
        }
        let kept = self.next_file("snapshot", "snap");
        std::fs::rename(file, &kept)?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()?;
        let name = kept
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let record = CurrentSnapshot {
            meta: meta.clone(),
            file: name,
        };
        self.control
            .insert(SNAPSHOT_KEY, serde_json::to_vec(&record).map_err(json_err)?)?;
        self.control.flush()?;
        self.snapshot_bytes
            .store(std::fs::metadata(&kept)?.len(), Ordering::SeqCst);
        if let Some(old) = current {
            // Senders that opened it keep reading it (unlinked files stay readable).
            let _ = std::fs::remove_file(self.snapshot_dir.join(old.file));
        }
        Ok(kept)
    }

    /// Fills a new state tree from a snapshot file and switches to it. Blocking.
    fn install_file(
        &self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        file: &Path,
    ) -> io::Result<(sled::Tree, AppliedState, TokenSet, usize)> {
        let old = self.current_tree();
        let generation = String::from_utf8_lossy(&old.name())
            .strip_prefix(STATE_TREE_PREFIX)
            .and_then(|g| g.parse::<u64>().ok())
            .unwrap_or(1);
        let name = format!("{STATE_TREE_PREFIX}{}", generation + 1);
        self.db.drop_tree(&name)?;
        let tree = self.db.open_tree(&name)?;
        let mut reader = RecordReader::open(file)?;
        let mut tokens = TokenSet::new();
        let mut count = 0;
        let mut header: Option<AppliedState> = None;
        let mut batch = sled::Batch::default();
        let mut batch_bytes = 0;
        while let Some((key, value)) = reader.next_record()? {
            if key == HEADER {
                header = Some(serde_json::from_slice(&value).map_err(json_err)?);
                continue;
            }
            if let Some(name) = key.strip_prefix(TOKEN.as_bytes()) {
                let name = String::from_utf8_lossy(name);
                let record: TokenRecord = serde_json::from_slice(&value).map_err(json_err)?;
                if let Some((digest, principal)) = principal(&name, &record) {
                    tokens.add_principal(digest, principal);
                    count += 1;
                }
            }
            batch_bytes += key.len() + value.len();
            batch.insert(key, value);
            if batch_bytes >= INSTALL_BATCH_BYTES {
                tree.apply_batch(std::mem::take(&mut batch))?;
                batch_bytes = 0;
            }
        }
        let mut header = header.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "the snapshot has no header")
        })?;
        // The snapshot's own description is what openraft goes by.
        header.last_applied = meta.last_log_id;
        header.last_membership = meta.last_membership.clone();
        batch.insert(HEADER, serde_json::to_vec(&header).map_err(json_err)?);
        tree.apply_batch(batch)?;
        tree.flush()?;
        self.control.insert(STATE_TREE_KEY, name.as_bytes())?;
        self.control.flush()?;
        Ok((tree, header, tokens, count))
    }

    fn publish(&self, header: AppliedState, changes: Vec<TokenChange>) {
        {
            let mut tokens = write_lock(&self.tokens);
            for change in changes {
                if let Some(old) = &change.old
                    && let Some(digest) = Digest::from_hex(&old.digest)
                    && tokens.remove(&digest, &change.name)
                {
                    self.token_count.fetch_sub(1, Ordering::SeqCst);
                }
                if let Some(new) = &change.new
                    && let Some((digest, principal)) = principal(&change.name, new)
                {
                    tokens.add_principal(digest, principal);
                    self.token_count.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        self.set_header(header);
    }

    fn set_header(&self, header: AppliedState) {
        let mut current = write_lock(&self.header);
        let moved = placement_inputs(&current) != placement_inputs(&header);
        *current = header;
        if moved {
            self.placement_version.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Authenticator for StateStore {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        read_lock(&self.tokens).authenticate(secret)
    }
}

fn read_token(tree: &sled::Tree, name: &str) -> io::Result<Option<TokenRecord>> {
    tree.get(token_key(name))?
        .map(|raw| serde_json::from_slice(&raw).map_err(json_err))
        .transpose()
}

/// The in-memory token table of a stored state, and its size.
fn token_set(tree: &sled::Tree) -> io::Result<(TokenSet, usize)> {
    let mut set = TokenSet::new();
    let mut count = 0;
    for item in tree.scan_prefix(TOKEN) {
        let (key, value) = item?;
        let name = String::from_utf8_lossy(&key[TOKEN.len()..]);
        let record: TokenRecord = serde_json::from_slice(&value).map_err(json_err)?;
        if let Some((digest, principal)) = principal(&name, &record) {
            set.add_principal(digest, principal);
            count += 1;
        }
    }
    Ok((set, count))
}

/// The state of a node from before this layout: one JSON value holding everything.
#[derive(Deserialize)]
struct LegacyState {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, MemberNode>,
    cluster: LegacyCluster,
}

#[derive(Deserialize)]
struct LegacyCluster {
    tokens: BTreeMap<String, TokenRecord>,
    #[serde(default)]
    revoked: std::collections::BTreeSet<String>,
    member_states: BTreeMap<NodeId, MemberState>,
    settings: crate::types::ClusterSettings,
    ring_epoch: u64,
}

/// Writes the state an older node kept in the tree `state_machine` into `tree`. Its
/// snapshot is not kept: the next one is built in the new format.
fn convert_legacy_state(db: &sled::Db, tree: &sled::Tree) -> io::Result<()> {
    if !db.tree_names().iter().any(|n| n == LEGACY_TREE.as_bytes()) {
        return Ok(());
    }
    let Some(raw) = db.open_tree(LEGACY_TREE)?.get("applied")? else {
        return Ok(());
    };
    let legacy: LegacyState = serde_json::from_slice(&raw).map_err(json_err)?;
    let mut cluster = ClusterState {
        member_states: legacy.cluster.member_states,
        settings: legacy.cluster.settings,
        settings_initialized: true,
        ..ClusterState::default()
    };
    cluster.membership_changed(
        legacy
            .last_membership
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.zone.as_str())),
    );
    // Keep the epoch moving forward from where the older node was.
    cluster.ring.epoch = cluster.ring.epoch.max(legacy.cluster.ring_epoch);
    cluster.previous_ring = None;
    let header = AppliedState {
        last_applied: legacy.last_applied,
        last_membership: legacy.last_membership,
        cluster,
    };
    let mut batch = sled::Batch::default();
    for (name, token) in &legacy.cluster.tokens {
        batch.insert(
            token_key(name),
            serde_json::to_vec(token).map_err(json_err)?,
        );
    }
    for name in &legacy.cluster.revoked {
        batch.insert(revoked_key(name), &[][..]);
    }
    batch.insert(HEADER, serde_json::to_vec(&header).map_err(json_err)?);
    tree.apply_batch(batch)?;
    tracing::info!(
        tokens = legacy.cluster.tokens.len(),
        "converted the metadata state of an older version"
    );
    Ok(())
}

/// The token table as a batch of entries sees it: the stored table plus the batch's
/// changes so far.
struct PendingTokens<'a> {
    tree: &'a sled::Tree,
    tokens: BTreeMap<String, Option<TokenRecord>>,
    revoked: BTreeMap<String, bool>,
}

impl TokenTable for PendingTokens<'_> {
    type Error = io::Error;

    fn token(&self, name: &str) -> io::Result<Option<TokenRecord>> {
        match self.tokens.get(name) {
            Some(pending) => Ok(pending.clone()),
            None => read_token(self.tree, name),
        }
    }

    fn token_names(&self) -> io::Result<Vec<String>> {
        let mut names = BTreeSet::new();
        for item in self.tree.scan_prefix(TOKEN) {
            let (key, _) = item?;
            names.insert(String::from_utf8_lossy(&key[TOKEN.len()..]).into_owned());
        }
        for (name, pending) in &self.tokens {
            if pending.is_some() {
                names.insert(name.clone());
            } else {
                names.remove(name);
            }
        }
        Ok(names.into_iter().collect())
    }

    fn is_revoked(&self, name: &str) -> io::Result<bool> {
        match self.revoked.get(name) {
            Some(pending) => Ok(*pending),
            None => Ok(self.tree.contains_key(revoked_key(name))?),
        }
    }

    fn put_token(&mut self, name: &str, token: TokenRecord) {
        self.tokens.insert(name.to_owned(), Some(token));
    }

    fn remove_token(&mut self, name: &str) {
        self.tokens.insert(name.to_owned(), None);
    }

    fn set_revoked(&mut self, name: &str, revoked: bool) {
        self.revoked.insert(name.to_owned(), revoked);
    }
}

impl PendingTokens<'_> {
    /// The sled batch that stores the changes and `header`, and the token changes (read
    /// before the batch is applied).
    fn finish(self, header: &AppliedState) -> io::Result<(sled::Batch, Vec<TokenChange>)> {
        let mut batch = sled::Batch::default();
        let mut changes = Vec::with_capacity(self.tokens.len());
        for (name, new) in self.tokens {
            let old = read_token(self.tree, &name)?;
            if old == new {
                continue;
            }
            match &new {
                Some(token) => batch.insert(
                    token_key(&name),
                    serde_json::to_vec(token).map_err(json_err)?,
                ),
                None => batch.remove(token_key(&name)),
            }
            changes.push(TokenChange { name, old, new });
        }
        for (name, revoked) in self.revoked {
            if revoked {
                batch.insert(revoked_key(&name), &[][..]);
            } else {
                batch.remove(revoked_key(&name));
            }
        }
        batch.insert(HEADER, serde_json::to_vec(header).map_err(json_err)?);
        Ok((batch, changes))
    }
}

/// openraft's state machine over a [`StateStore`].
pub struct SledStateMachine {
    store: Arc<StateStore>,
}

impl SledStateMachine {
    pub fn new(store: Arc<StateStore>) -> Self {
        SledStateMachine { store }
    }
}

/// Builds a snapshot file from a copy of the state taken between two applied batches.
pub struct SnapshotBuilder {
    store: Arc<StateStore>,
    header: AppliedState,
    /// The copy of the state, or why it could not be taken.
    records: io::Result<Vec<(sled::IVec, sled::IVec)>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let snapshot_id = match self.header.last_applied {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term,
                id.index,
                self.store.file_counter.fetch_add(1, Ordering::SeqCst)
            ),
            None => format!(
                "empty-{}",
                self.store.file_counter.fetch_add(1, Ordering::SeqCst)
            ),
        };
        let meta = SnapshotMeta {
            last_log_id: self.header.last_applied,
            last_membership: self.header.last_membership.clone(),
            snapshot_id,
        };
        let store = self.store.clone();
        let signature = meta.signature();
        let err = move |e: &dyn std::error::Error| {
            StorageIOError::write_snapshot(Some(signature.clone()), openraft::AnyError::error(e))
        };
        let records = std::mem::replace(&mut self.records, Ok(Vec::new())).map_err(|e| err(&e))?;
        let kept = {
            let meta = meta.clone();
            tokio::task::spawn_blocking(move || {
                let building = store.next_file("build", "tmp");
                let written = write_file(&building, records)
                    .and_then(|_| store.keep_snapshot(&meta, &building));
                if written.is_err() {
                    let _ = std::fs::remove_file(&building);
                }
                written
            })
            .await
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e))?
        };
        let file = SnapshotFile::open(&kept).await.map_err(|e| err(&e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = self.store.snapshot_bytes(), "built a metadata snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, MemberNode>)> {
        Ok(self
            .store
            .with_header(|h| (h.last_applied, h.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<MetaResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let tree = self.store.current_tree();
        let mut header = self.store.header();
        let mut pending = PendingTokens {
            tree: &tree,
            tokens: BTreeMap::new(),
            revoked: BTreeMap::new(),
        };
        let mut responses = Vec::new();
        for entry in entries {
            header.last_applied = Some(entry.log_id);
            let response = match &entry.payload {
                EntryPayload::Blank => MetaResponse::Done,
                EntryPayload::Normal(command) => header
                    .cluster
                    .apply(command, &mut pending)
                    .map_err(|e| StorageIOError::write_state_machine(&e))?,
                EntryPayload::Membership(membership) => {
                    header.last_membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    header.cluster.membership_changed(
                        membership.nodes().map(|(id, n)| (*id, n.zone.as_str())),
                    );
                    MetaResponse::Done
                }
            };
            responses.push(response);
        }
        let (batch, changes) = pending
            .finish(&header)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        tree.apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        flush(&tree)
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.store.publish(header, changes);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called between two applied batches: the copy is consistent. Values are shared
        // with sled's cache rather than copied where sled allows.
        let tree = self.store.current_tree();
        let header = self.store.header();
        // Off the runtime's threads: a large table takes a while to walk.
        let records = tokio::task::spawn_blocking(move || {
            tree.iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(io::Error::from)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        SnapshotBuilder {
            store: self.store.clone(),
            header,
            records,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<SnapshotFile>> {
        let path = self.store.next_file("receiving", "tmp");
        let file = SnapshotFile::create(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        mut snapshot: Box<SnapshotFile>,
    ) -> StoreResult<()> {
        let err = |e: &dyn std::error::Error| {
            StorageIOError::write_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
        };
        snapshot.sync().await.map_err(|e| err(&e))?;
        let path = snapshot.path().to_path_buf();
        drop(snapshot);
        let store = self.store.clone();
        let owned_meta = meta.clone();
        let (tree, header, tokens, count) = tokio::task::spawn_blocking(move || {
            let installed = store.install_file(&owned_meta, &path)?;
            store.keep_snapshot(&owned_meta, &path)?;
            Ok::<_, io::Error>(installed)
        })
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
        let old = std::mem::replace(&mut *write_lock(&self.store.tree), tree);
        *write_lock(&self.store.tokens) = tokens;
        self.store.token_count.store(count, Ordering::SeqCst);
        self.store.set_header(header);
        self.store.db.drop_tree(old.name()).map_err(|e| err(&e))?;
        tracing::info!(snapshot = %meta.snapshot_id, tokens = count, "installed a metadata snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let Some(current) = self
            .store
            .current_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let path = self.store.snapshot_dir.join(&current.file);
        let file = SnapshotFile::open(&path)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(current.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: current.meta,
            snapshot: Box::new(file),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_nodes_state_is_converted_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("meta")).unwrap();
        let legacy = serde_json::json!({
            "last_applied": null,
            "last_membership": StoredMembership::<NodeId, MemberNode>::default(),
            "cluster": {
                "tokens": {"ci": {"digest": "ab".repeat(32), "scope": "read-write", "created_ms": 1}},
                "revoked": ["old"],
                "member_states": {},
                "settings": {"replication_factor": 2, "max_voters": 3},
                "ring_epoch": 7
            }
        });
        db.open_tree(LEGACY_TREE)
            .unwrap()
            .insert("applied", serde_json::to_vec(&legacy).unwrap())
            .unwrap();
        let store = StateStore::open(&db, &dir.path().join("snapshots")).unwrap();
        assert_eq!(store.token("ci").unwrap().unwrap().scope, "read-write");
        assert!(store.is_revoked("old").unwrap());
        assert_eq!(store.token_count(), 1);
        let header = store.header();
        assert_eq!(header.cluster.settings.replication_factor, 2);
        assert!(header.cluster.settings_initialized);
        assert_eq!(header.cluster.ring_epoch(), 7);
        assert!(!db.tree_names().iter().any(|n| n == LEGACY_TREE.as_bytes()));
        drop(store);
        // Opened again: the converted state is simply there.
        let store = StateStore::open(&db, &dir.path().join("snapshots")).unwrap();
        assert_eq!(store.token_count(), 1);
    }
}
