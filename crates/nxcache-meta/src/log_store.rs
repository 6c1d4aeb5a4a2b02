//! The Raft log and vote, persisted in sled.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};

use crate::durable::flush;
use crate::types::{NodeId, TypeConfig};

/// Log entries keyed by big-endian index (so sled's order is log order), plus the vote,
/// the committed id and the last purged id. Every write is flushed before openraft is told
/// it is durable.
#[derive(Clone)]
pub struct SledLogStore {
    logs: sled::Tree,
    meta: sled::Tree,
}

type StoreResult<T> = Result<T, StorageError<NodeId>>;

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl SledLogStore {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(SledLogStore {
            logs: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
        })
    }

    /// Whether this node has ever taken part in a cluster (a vote or any log).
    pub fn has_state(&self) -> Result<bool, sled::Error> {
        Ok(self.meta.get("vote")?.is_some() || !self.logs.is_empty())
    }

    /// This data dir's incarnation, beside the vote: made (random, non-zero) the first
    /// time it is asked for, i.e. when the dir is new, or for a dir from before
    /// incarnations existed. Blocking (flushes once when it makes one).
    pub fn incarnation(&self) -> Result<u64, sled::Error> {
        if let Some(raw) = self.meta.get("incarnation")?
            && let Ok(bytes) = <[u8; 8]>::try_from(raw.as_ref())
        {
            return Ok(u64::from_be_bytes(bytes));
        }
        let incarnation = rand::random_range(1..=u64::MAX);
        self.meta
            .insert("incarnation", &incarnation.to_be_bytes())?;
        self.meta.flush()?;
        Ok(incarnation)
    }

    /// The id of the cluster this node belongs to, once it founded or was admitted to one.
    pub fn cluster_id(&self) -> Result<Option<String>, sled::Error> {
        Ok(self
            .meta
            .get("cluster_id")?
            .map(|raw| String::from_utf8_lossy(&raw).into_owned()))
    }

    /// Records (or, with None, forgets) the cluster id. Blocking: flushes before returning.
    pub fn set_cluster_id(&self, id: Option<&str>) -> Result<(), sled::Error> {
        match id {
            Some(id) => self.meta.insert("cluster_id", id.as_bytes())?,
            None => self.meta.remove("cluster_id")?,
        };
        self.meta.flush()?;
        Ok(())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        let raw = self.meta.get(key).map_err(|e| StorageIOError::read(&e))?;
        raw.map(|raw| serde_json::from_slice(&raw).map_err(|e| StorageIOError::read(&e).into()))
            .transpose()
    }

    async fn write_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> StoreResult<()> {
        let raw = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(key, raw)
            .map_err(|e| StorageIOError::write(&e))?;
        flush(&self.meta)
            .await
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }
}

impl SledLogStore {
    /// Deletes the entries `range` yields, in one batch, and flushes.
    async fn remove_entries(&self, range: sled::Iter) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for item in range {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        flush(&self.logs)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let iter = match range.end_bound() {
            Bound::Included(i) => self.logs.range(index_key(start)..=index_key(*i)),
            Bound::Excluded(i) => self.logs.range(index_key(start)..index_key(*i)),
            Bound::Unbounded => self.logs.range(index_key(start)..),
        };
        let mut entries = Vec::new();
        for item in iter {
            let (_, raw) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(serde_json::from_slice(&raw).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.read_meta("last_purged")?;
        let last = match self
            .logs
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((_, raw)) => {
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(&raw).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        self.write_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.read_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        self.write_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let raw = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&index_key(entry.log_id.index), raw);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        callback.log_io_completed(flush(&self.logs).await);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.remove_entries(self.logs.range(index_key(log_id.index)..))
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // Record the purge first: a crash after it leaves extra entries, never a hole.
        self.write_meta("last_purged", &log_id).await?;
        self.remove_entries(self.logs.range(..=index_key(log_id.index)))
            .await
    }
}
