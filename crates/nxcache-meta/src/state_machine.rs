//! The metadata state machine: [`ClusterState`] plus openraft's membership, persisted in
//! sled after every applied batch, with snapshots kept beside it.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::durable::flush;
use crate::types::{ClusterState, MemberNode, MetaResponse, NodeId, TypeConfig};

/// What the state machine holds; also the content of a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, MemberNode>,
    pub cluster: ClusterState,
}

/// Readers (authentication, status) see the applied state through this handle, without
/// going through Raft.
pub type SharedState = Arc<RwLock<AppliedState>>;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

pub struct SledStateMachine {
    tree: sled::Tree,
    shared: SharedState,
    /// Called after every change, e.g. to rebuild the token table.
    on_change: Arc<dyn Fn(&AppliedState) + Send + Sync>,
    snapshot_counter: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshotMeta {
    meta: SnapshotMeta<NodeId, MemberNode>,
}

impl SledStateMachine {
    pub fn open(
        db: &sled::Db,
        on_change: Arc<dyn Fn(&AppliedState) + Send + Sync>,
    ) -> Result<(Self, SharedState), String> {
        let tree = db.open_tree("state_machine").map_err(|e| e.to_string())?;
        let state: AppliedState = match tree.get("applied").map_err(|e| e.to_string())? {
            Some(raw) => serde_json::from_slice(&raw).map_err(|e| e.to_string())?,
            None => AppliedState::default(),
        };
        on_change(&state);
        let shared = Arc::new(RwLock::new(state));
        Ok((
            SledStateMachine {
                tree,
                shared: shared.clone(),
                on_change,
                snapshot_counter: 0,
            },
            shared,
        ))
    }

    fn current(&self) -> AppliedState {
        self.shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn persist(&self, state: &AppliedState) -> StoreResult<()> {
        let raw = serde_json::to_vec(state).map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.tree
            .insert("applied", raw)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        flush(&self.tree)
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(())
    }

    fn publish(&self, state: AppliedState) {
        (self.on_change)(&state);
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = state;
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SledStateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let state = self.current();
        let data =
            serde_json::to_vec(&state).map_err(|e| StorageIOError::read_state_machine(&e))?;
        self.snapshot_counter += 1;
        let snapshot_id = match state.last_applied {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term, id.index, self.snapshot_counter
            ),
            None => format!("empty-{}", self.snapshot_counter),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.last_membership.clone(),
            snapshot_id,
        };
        save_snapshot(&self.tree, &meta, &data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

async fn save_snapshot(
    tree: &sled::Tree,
    meta: &SnapshotMeta<NodeId, MemberNode>,
    data: &[u8],
) -> StoreResult<()> {
    let err = |e: &dyn std::error::Error| {
        StorageIOError::write_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
    };
    let raw_meta =
        serde_json::to_vec(&StoredSnapshotMeta { meta: meta.clone() }).map_err(|e| err(&e))?;
    let mut batch = sled::Batch::default();
    batch.insert("snapshot_meta", raw_meta);
    batch.insert("snapshot_data", data);
    tree.apply_batch(batch).map_err(|e| err(&e))?;
    flush(tree).await.map_err(|e| err(&e))?;
    Ok(())
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, MemberNode>)> {
        let state = self.current();
        Ok((state.last_applied, state.last_membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<MetaResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.current();
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let response = match &entry.payload {
                EntryPayload::Blank => MetaResponse::Done,
                EntryPayload::Normal(command) => state.cluster.apply(command),
                EntryPayload::Membership(membership) => {
                    state.last_membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    state
                        .cluster
                        .membership_changed(membership.nodes().map(|(id, _)| *id));
                    MetaResponse::Done
                }
            };
            responses.push(response);
        }
        self.persist(&state).await?;
        self.publish(state);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SledStateMachine {
            tree: self.tree.clone(),
            shared: self.shared.clone(),
            on_change: self.on_change.clone(),
            snapshot_counter: self.snapshot_counter + 1000,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let state: AppliedState = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        save_snapshot(&self.tree, meta, &data).await?;
        self.persist(&state).await?;
        self.publish(state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let read = |key: &str| {
            self.tree
                .get(key)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))
        };
        let (Some(raw_meta), Some(data)) = (read("snapshot_meta")?, read("snapshot_data")?) else {
            return Ok(None);
        };
        let stored: StoredSnapshotMeta = serde_json::from_slice(&raw_meta)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}
