//! This node's copies in ring ranges, a page at a time: background passes hold one page
//! in memory, whatever the store holds.

use nxcache_store::{BlobStore, RingEntry};

/// Entries read from the store at a time.
pub(crate) const PAGE: usize = 512;

pub(crate) struct RingPages {
    store: BlobStore,
    ranges: Vec<(u64, u64)>,
    cursor: Option<(u64, String)>,
    done: bool,
}

impl RingPages {
    /// `ranges`: ascending, disjoint, inclusive.
    pub(crate) fn new(store: BlobStore, ranges: Vec<(u64, u64)>) -> Self {
        let done = ranges.is_empty();
        RingPages {
            store,
            ranges,
            cursor: None,
            done,
        }
    }

    /// The next page of up to `limit` entries (read on the blocking pool); None at the
    /// end, or when the store fails (the pass ends there, the next one starts over).
    pub(crate) async fn next(&mut self, limit: usize) -> Option<Vec<RingEntry>> {
        if self.done {
            return None;
        }
        let (store, ranges, after) = (self.store.clone(), self.ranges.clone(), self.cursor.clone());
        let page = tokio::task::spawn_blocking(move || {
            store.ring_entries(
                &ranges,
                after.as_ref().map(|(p, k)| (*p, k.as_str())),
                limit,
            )
        })
        .await;
        let page = match page {
            Ok(Ok(page)) => page,
            Ok(Err(err)) => {
                tracing::warn!(%err, "could not read the index in ring order");
                self.done = true;
                return None;
            }
            Err(_) => {
                self.done = true;
                return None;
            }
        };
        self.done = page.len() < limit;
        match page.last() {
            Some(last) => self.cursor = Some((last.position, last.key.clone())),
            None => return None,
        }
        Some(page)
    }
}
