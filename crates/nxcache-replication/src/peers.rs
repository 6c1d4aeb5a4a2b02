//! Clients to the other members, and which of them failed recently.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nxcache_placement::NodeId;
use nxcache_rpc::{ClusterSecret, GrpcClientMetrics};
use tonic::transport::ClientTlsConfig;

use crate::BlobClient;

/// A peer that failed is skipped for this long before it is tried again, so a dead
/// node costs one failed call per period instead of one per request. Each further
/// failure in a row doubles the period, up to [`DOWN_AT_MOST`]; an answer resets it.
const DOWN_FOR: Duration = Duration::from_secs(2);
const DOWN_AT_MOST: Duration = Duration::from_secs(16);

pub struct Peers {
    secret: ClusterSecret,
    metrics: GrpcClientMetrics,
    tls: Option<ClientTlsConfig>,
    clients: Mutex<HashMap<NodeId, (String, BlobClient)>>,
    /// Until when a peer is skipped, and how many failures in a row led there.
    down_until: Mutex<HashMap<NodeId, (Instant, u32)>>,
    /// Peers cut off by a test (a partition inside one process): no client, always down.
    cut: Mutex<HashSet<NodeId>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peers {
    pub fn new(
        secret: ClusterSecret,
        tls: Option<ClientTlsConfig>,
        metrics: GrpcClientMetrics,
    ) -> Self {
        Peers {
            secret,
            metrics,
            tls,
            clients: Mutex::new(HashMap::new()),
            down_until: Mutex::new(HashMap::new()),
            cut: Mutex::new(HashSet::new()),
        }
    }

    /// Test hook: calls to these peers fail from now on (see [`crate::DataPlane::cut_peers`]).
    pub fn cut(&self, peers: impl IntoIterator<Item = NodeId>) {
        lock(&self.cut).extend(peers);
    }

    /// Test hook: every cut peer is reachable again.
    pub fn heal(&self) {
        lock(&self.cut).clear();
    }

    fn is_cut(&self, id: NodeId) -> bool {
        lock(&self.cut).contains(&id)
    }

    /// A client for member `id` at `addr` (made again when its address changed).
    pub fn client(&self, id: NodeId, addr: &str) -> Option<BlobClient> {
        if self.is_cut(id) {
            return None;
        }
        let mut clients = lock(&self.clients);
        if let Some((known, client)) = clients.get(&id)
            && known == addr
        {
            return Some(client.clone());
        }
        let client =
            BlobClient::new(addr, &self.secret, self.tls.as_ref(), &self.metrics, id).ok()?;
        clients.insert(id, (addr.to_owned(), client.clone()));
        Some(client)
    }

    /// Failed recently (within its current back-off period).
    pub fn is_down(&self, id: NodeId) -> bool {
        if self.is_cut(id) {
            return true;
        }
        lock(&self.down_until)
            .get(&id)
            .is_some_and(|(until, _)| Instant::now() < *until)
    }

    pub fn failed(&self, id: NodeId) {
        let mut down = lock(&self.down_until);
        let now = Instant::now();
        let streak = match down.get(&id) {
            // Calls already in flight when it was marked down fail too: same streak.
            Some((until, _)) if now < *until => return,
            Some((_, streak)) => streak + 1,
            None => 1,
        };
        down.insert(id, (now + back_off(streak), streak));
    }

    pub fn answered(&self, id: NodeId) {
        lock(&self.down_until).remove(&id);
    }
}

/// How long a peer is left alone after the `streak`-th failure in a row.
fn back_off(streak: u32) -> Duration {
    DOWN_FOR
        .saturating_mul(1 << (streak - 1).min(8))
        .min(DOWN_AT_MOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Peers {
        Peers::new(
            ClusterSecret::new("0123456789abcdef").unwrap(),
            None,
            GrpcClientMetrics::unregistered(),
        )
    }

    fn period(p: &Peers, id: NodeId) -> Duration {
        let (until, _) = lock(&p.down_until)[&id];
        until.saturating_duration_since(Instant::now())
    }

    fn expire(p: &Peers, id: NodeId) {
        let mut down = lock(&p.down_until);
        let entry = down.get_mut(&id).unwrap();
        entry.0 = Instant::now() - Duration::from_millis(1);
    }

    #[test]
    fn failures_in_a_row_back_off_up_to_a_limit_and_an_answer_resets() {
        let p = peers();
        p.failed(7);
        assert!(p.is_down(7));
        assert!(period(&p, 7) <= DOWN_FOR);
        // Failures while it is marked down belong to the same streak.
        p.failed(7);
        assert!(period(&p, 7) <= DOWN_FOR);
        let mut periods = Vec::new();
        for _ in 0..5 {
            expire(&p, 7);
            assert!(!p.is_down(7));
            // The period set, read from the entry rather than from the time left (which
            // shrinks with however long this thread is descheduled).
            let before = Instant::now();
            p.failed(7);
            let after = Instant::now();
            let (until, streak) = lock(&p.down_until)[&7];
            let set = back_off(streak);
            assert!(before + set <= until && until <= after + set);
            periods.push(set.as_secs());
        }
        assert_eq!(periods, [4, 8, 16, 16, 16]);
        p.answered(7);
        assert!(!p.is_down(7));
        p.failed(7);
        assert!(period(&p, 7) <= DOWN_FOR);
    }
}
