//! A metadata state far larger than one gRPC message (64 MiB and more) reaches nodes
//! that need a snapshot: one that joins, and one that lagged past a log purge. Its own
//! test binary, so that it does not compete with the quick cluster tests for the CPU.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nxcache_auth::Digest;
use nxcache_meta::{
    Faults, Formation, MemberNode, MetaCommand, MetaConfig, MetaNode, MetaResponse, NodeId,
    RaftTiming, TokenRecord,
};
use nxcache_rpc::ClusterSecret;

const SECRET: &str = "test-cluster-secret-0123456789";

/// Nodes on reserved loopback ports: node 1 bootstraps, the others join through it.
struct Cluster {
    timing: RaftTiming,
    dirs: BTreeMap<NodeId, PathBuf>,
    addrs: BTreeMap<NodeId, String>,
    nodes: BTreeMap<NodeId, MetaNode>,
    tmp: tempfile::TempDir,
}

impl Cluster {
    async fn start(size: u64, timing: RaftTiming) -> Cluster {
        let mut cluster = Cluster {
            timing,
            dirs: BTreeMap::new(),
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            tmp: tempfile::tempdir().unwrap(),
        };
        for id in 1..=size {
            cluster.add(id).await;
        }
        cluster
            .wait(
                "every node applied every member",
                Duration::from_secs(120),
                |c| {
                    c.nodes.values().all(|n| {
                        n.placement().ring.members.len() == size as usize
                            && !n.status().changing_membership
                    })
                },
            )
            .await;
        cluster
    }

    /// Starts node `id`: new (bootstrapping when it is node 1) or from its data dir.
    async fn add(&mut self, id: NodeId) {
        let addr = self
            .addrs
            .entry(id)
            .or_insert_with(|| format!("127.0.0.1:{}", nxcache_testkit::free_port()))
            .clone();
        let dir = self
            .dirs
            .entry(id)
            .or_insert_with(|| self.tmp.path().join(format!("node-{id}")))
            .clone();
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        let config = MetaConfig {
            node_id: id,
            data_dir: dir,
            advertise: MemberNode {
                grpc_addr: addr.clone(),
                http_addr: format!("http://{addr}"),
                zone: String::new(),
                incarnation: 0,
            },
            secret: ClusterSecret::new(SECRET).unwrap(),
            tls: None,
            formation: if id == 1 {
                Formation::Found
            } else {
                Formation::Join
            },
            join: if id == 1 {
                vec![]
            } else {
                vec![self.addrs[&1].clone()]
            },
            seed_tokens: BTreeMap::new(),
            prune_env_tokens: false,
            timing: self.timing.clone(),
            faults: Faults::default(),
            peer_services: None,
        };
        let node = MetaNode::start(config, listener, &prometheus::Registry::new())
            .await
            .unwrap();
        self.nodes.insert(id, node);
    }

    fn node(&self, id: NodeId) -> &MetaNode {
        &self.nodes[&id]
    }

    async fn stop(&mut self, id: NodeId) {
        self.nodes.remove(&id).expect("running").shutdown().await;
    }

    async fn restart(&mut self, id: NodeId) {
        self.add(id).await;
    }

    async fn wait(&self, what: &str, timeout: Duration, check: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the nodes `ids` agree on one leader among them. Generous: a node that
    /// installs a large snapshot (seconds in a debug build on a busy machine) can cost an
    /// election or two before every node follows one leader again.
    async fn wait_leader_among(&self, ids: &[NodeId]) -> NodeId {
        self.wait("an agreed leader", Duration::from_secs(300), |c| {
            let leaders: Vec<_> = ids.iter().map(|id| c.node(*id).leader()).collect();
            leaders[0].is_some_and(|l| ids.contains(&l)) && leaders.iter().all(|l| *l == leaders[0])
        })
        .await;
        self.node(ids[0]).leader().expect("an agreed leader")
    }

    async fn shutdown(self) {
        for node in self.nodes.into_values() {
            node.shutdown().await;
        }
    }
}

fn token(secret: &str, scope: &str) -> TokenRecord {
    TokenRecord {
        digest: Digest::of(secret).to_hex(),
        scope: scope.into(),
        created_ms: 1,
        namespace: String::new(),
        read_from: Vec::new(),
    }
}

/// About 80 MiB of tokens (110,000 of them, each read-from list long), in commands of
/// under `MAX_COMMAND_BYTES` each.
fn large_token_table() -> Vec<MetaCommand> {
    let read_from: Vec<String> = (0..12)
        .map(|i| format!("namespace-read-from-number-{i:02}-padding-x"))
        .collect();
    let mut commands = Vec::new();
    let mut batch = BTreeMap::new();
    for i in 0..110_000u32 {
        let token = TokenRecord {
            namespace: format!("namespace-of-token-{i:08}-padding-padding"),
            read_from: read_from.clone(),
            ..token(&format!("large-state-secret-{i}"), "read")
        };
        batch.insert(format!("token-{i:08}-with-a-long-name-padding"), token);
        if batch.len() == 300 {
            commands.push(MetaCommand::SeedTokens {
                tokens: std::mem::take(&mut batch),
            });
        }
    }
    commands.push(MetaCommand::SeedTokens { tokens: batch });
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_64_mib_state_reaches_a_joining_node_and_a_node_that_lagged_past_a_purge() {
    // Production's heartbeat (each AppendEntries has one heartbeat to be stored and
    // answered; a debug build on a busy machine needs it), snapshots every 100 entries.
    let timing = RaftTiming {
        snapshot_after_entries: 100,
        ..RaftTiming::default()
    };
    let mut cluster = Cluster::start(3, timing).await;
    cluster.wait_leader_among(&[1, 2, 3]).await;
    // Node 3 lags from here on.
    cluster.stop(3).await;
    // Off the runtime the nodes share (as every large step below).
    let commands = tokio::task::spawn_blocking(large_token_table)
        .await
        .unwrap();
    // Stopping node 3 may have cost the leader: a write waits for a new one, and one that
    // found no quorum in time (a loaded machine) is tried again. Seeding is idempotent.
    for command in commands {
        let deadline = Instant::now() + Duration::from_secs(300);
        let answer = loop {
            match cluster.node(1).write(command.clone()).await {
                Ok(answer) => break answer,
                Err(err) => {
                    assert!(
                        Instant::now() < deadline,
                        "a seeding write never committed: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        assert!(matches!(answer, MetaResponse::Seeded { .. }), "{answer:?}");
    }
    let leader = cluster.wait_leader_among(&[1, 2]).await;
    let expected = cluster.node(leader).token_count();
    assert_eq!(expected, 110_000);
    // A snapshot of everything (not only of what the last automatic one covered).
    cluster
        .node(leader)
        .raft()
        .trigger()
        .snapshot()
        .await
        .unwrap();
    let applied = cluster.node(leader).status().applied_index;
    cluster
        .wait(
            "the leader snapshotted everything and purged its log",
            Duration::from_secs(300),
            |c| {
                let m = c.node(leader).raft().metrics().borrow().clone();
                m.snapshot.is_some_and(|s| s.index >= applied) && m.purged.is_some()
            },
        )
        .await;
    let snapshot_bytes = cluster.node(leader).status().snapshot_bytes;
    assert!(snapshot_bytes >= 64 << 20, "{snapshot_bytes} bytes");

    // A new node joins, and the lagging one comes back: both need the snapshot.
    cluster.add(4).await;
    cluster.restart(3).await;
    cluster
        .wait(
            "nodes 3 and 4 hold the whole token table",
            Duration::from_secs(600),
            |c| c.node(3).token_count() == expected && c.node(4).token_count() == expected,
        )
        .await;
    cluster.wait_leader_among(&[1, 2, 3, 4]).await;
    let table = |node: &MetaNode| {
        let node = node.clone();
        tokio::task::spawn_blocking(move || node.tokens().unwrap())
    };
    let reference = table(cluster.node(1)).await.unwrap();
    for id in [3, 4] {
        let node = cluster.node(id);
        assert!(
            node.raft().metrics().borrow().snapshot.is_some(),
            "node {id} caught up without a snapshot"
        );
        assert!(
            table(node).await.unwrap() == reference,
            "node {id}: another table"
        );
        // And authentication works from the installed table.
        let principal = node
            .authenticator()
            .authenticate("large-state-secret-109999")
            .expect("a token of the snapshot authenticates");
        assert_eq!(principal.read_from.len(), 12);
    }
    cluster.shutdown().await;
}
