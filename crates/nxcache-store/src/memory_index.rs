use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::copy::{CopyIdentity, EvictionMark};
use crate::index::{BlobMeta, Index, IndexError, RingCursor};
use crate::ring_position;

/// An [`Index`] held in memory: nothing survives a restart. For tests and for measuring
/// what the embedded database costs.
#[derive(Default)]
pub struct MemoryIndex {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<String, BlobMeta>,
    lru: BTreeMap<u64, String>,
    ring: BTreeMap<(u64, String), CopyIdentity>,
    evicted: HashMap<String, EvictionMark>,
    seq: u64,
}

impl MemoryIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Index for MemoryIndex {
    fn get(&self, key: &str) -> Result<Option<BlobMeta>, IndexError> {
        Ok(self.state().blobs.get(key).copied())
    }

    fn insert(&self, key: &str, meta: &BlobMeta) -> Result<(), IndexError> {
        let mut state = self.state();
        if let Some(old) = state.blobs.insert(key.to_owned(), *meta) {
            state.lru.remove(&old.access_seq);
        }
        state.lru.insert(meta.access_seq, key.to_owned());
        state
            .ring
            .insert((ring_position(key), key.to_owned()), meta.identity());
        Ok(())
    }

    fn touch(&self, key: &str, old: &BlobMeta, new: &BlobMeta) -> Result<bool, IndexError> {
        let mut state = self.state();
        match state.blobs.get_mut(key) {
            Some(current) if current == old => {
                *current = *new;
                state.lru.remove(&old.access_seq);
                state.lru.insert(new.access_seq, key.to_owned());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn remove(&self, key: &str) -> Result<Option<BlobMeta>, IndexError> {
        let mut state = self.state();
        let removed = state.blobs.remove(key);
        if let Some(meta) = &removed {
            state.lru.remove(&meta.access_seq);
            state.ring.remove(&(ring_position(key), key.to_owned()));
        }
        Ok(removed)
    }

    fn least_recent(&self, limit: usize) -> Result<Vec<(String, BlobMeta)>, IndexError> {
        let state = self.state();
        Ok(state
            .lru
            .values()
            .filter_map(|key| state.blobs.get(key).map(|m| (key.clone(), *m)))
            .take(limit)
            .collect())
    }

    fn for_each(&self, visit: &mut dyn FnMut(&str, &BlobMeta)) -> Result<(), IndexError> {
        for (key, meta) in &self.state().blobs {
            visit(key, meta);
        }
        Ok(())
    }

    fn visit_ring(
        &self,
        first: u64,
        last: u64,
        after: RingCursor<'_>,
        visit: &mut dyn FnMut(u64, &str, &CopyIdentity) -> bool,
    ) -> Result<(), IndexError> {
        use std::ops::Bound;
        let state = self.state();
        let start = match after {
            Some((position, key)) if position >= first => {
                Bound::Excluded((position, key.to_owned()))
            }
            _ => Bound::Included((first, String::new())),
        };
        for ((position, key), copy) in state.ring.range((start, Bound::Unbounded)) {
            if *position > last || !visit(*position, key, copy) {
                break;
            }
        }
        Ok(())
    }

    fn ring_is_built(&self) -> Result<bool, IndexError> {
        Ok(true)
    }

    fn rebuild_ring(&self) -> Result<(), IndexError> {
        Ok(())
    }

    fn mark_evicted(&self, key: &str, mark: &EvictionMark) -> Result<(), IndexError> {
        self.state().evicted.insert(key.to_owned(), *mark);
        Ok(())
    }

    fn eviction_mark(&self, key: &str) -> Result<Option<EvictionMark>, IndexError> {
        Ok(self.state().evicted.get(key).copied())
    }

    fn purge_eviction_marks(&self, before_ms: u64) -> Result<u64, IndexError> {
        let mut state = self.state();
        state.evicted.retain(|_, m| m.at_ms >= before_ms);
        Ok(state.evicted.len() as u64)
    }

    fn next_seq(&self) -> Result<u64, IndexError> {
        let mut state = self.state();
        state.seq += 1;
        Ok(state.seq)
    }

    fn flush(&self) -> Result<(), IndexError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn behaves_like_an_index() {
        crate::index::contract_tests::check_all(&super::MemoryIndex::new());
        crate::index::contract_tests::check_ring_order(&super::MemoryIndex::new());
    }
}
