//! Replicas that agree, with whole data planes over real gRPC on 127.0.0.1 and no
//! background workers: each test drives the passes itself, so every interleaving it
//! checks happens in the order it states.

use std::sync::Arc;

use bytes::Bytes;
use nxcache_placement::{Member, Ring};
use nxcache_replication::{
    BlobClient, BlobService, ClusterView, DataPlane, DegradedPolicy, FixedTopology, HintLog, Peers,
    Purpose, PutAnswer, PutError, ReplicationMetrics,
};
use nxcache_rpc::ClusterSecret;
use nxcache_rpc::pb::blobs_server::BlobsServer;
use nxcache_store::{
    BlobKey, BlobStore, Committed, CopyIdentity, DeleteReason, StoreConfig, Version, checksum_of,
};

const SECRET: &str = "agreement-test-cluster-secret";

struct Node {
    id: u64,
    plane: DataPlane,
    store: BlobStore,
    hints: HintLog,
    registry: prometheus::Registry,
    addr: String,
    _dir: tempfile::TempDir,
}

struct Cluster {
    nodes: Vec<Node>,
}

struct Setup {
    nodes: usize,
    replicas: usize,
    quorum: usize,
    policy: DegradedPolicy,
    /// Disk budget of node 1 (the others get 1 GiB).
    first_budget: u64,
    /// Nodes (ids) that listen but never answer: owners cut off by a partition.
    silent: Vec<u64>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            nodes: 3,
            replicas: 3,
            quorum: 2,
            policy: DegradedPolicy::Serve,
            first_budget: 1 << 30,
            silent: Vec::new(),
        }
    }
}

/// An address that accepts TCP connections and then never answers.
async fn black_hole(listener: tokio::net::TcpListener) {
    let mut held = Vec::new();
    while let Ok((socket, _)) = listener.accept().await {
        held.push(socket);
    }
}

impl Cluster {
    async fn start(setup: Setup) -> Cluster {
        let mut listeners = Vec::new();
        for _ in 0..setup.nodes {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let members: Vec<Member> = (1..=setup.nodes as u64)
            .map(|id| Member {
                id,
                zone: String::new(),
            })
            .collect();
        let ring = Ring::new(1, &members, setup.replicas, 64);
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = i as u64 + 1;
            if setup.silent.contains(&id) {
                tokio::spawn(black_hole(listener));
                continue;
            }
            let view = ClusterView {
                me: id,
                ring: ring.clone(),
                previous: None,
                addrs: (1..=setup.nodes as u64)
                    .map(|n| (n, addrs[n as usize - 1].clone()))
                    .collect(),
                write_quorum: setup.quorum,
                policy: setup.policy,
            };
            let topology = Arc::new(FixedTopology(Arc::new(view)));
            let dir = tempfile::tempdir().unwrap();
            let registry = prometheus::Registry::new();
            let store = BlobStore::open(
                StoreConfig {
                    data_dir: dir.path().to_path_buf(),
                    max_bytes: if id == 1 { setup.first_budget } else { 1 << 30 },
                    ttl: None,
                    fsync: false,
                },
                &registry,
            )
            .unwrap();
            let secret = ClusterSecret::new(SECRET).unwrap();
            let service = BlobsServer::with_interceptor(
                BlobService::new(store.clone(), topology.clone()),
                secret.server_interceptor(Arc::new(|_, _| {})),
            );
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
            let hints = HintLog::temporary().unwrap();
            let plane = DataPlane::new(
                store.clone(),
                topology,
                Peers::new(
                    secret,
                    None,
                    nxcache_rpc::GrpcClientMetrics::register(&registry).unwrap(),
                ),
                hints.clone(),
                ReplicationMetrics::register(&registry).unwrap(),
            );
            nodes.push(Node {
                id,
                plane,
                store,
                hints,
                registry,
                addr: addrs[i].clone(),
                _dir: dir,
            });
        }
        Cluster { nodes }
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }
}

impl Node {
    fn client(&self) -> BlobClient {
        BlobClient::new(
            &self.addr,
            &ClusterSecret::new(SECRET).unwrap(),
            None,
            &nxcache_rpc::GrpcClientMetrics::unregistered(),
            self.id,
        )
        .unwrap()
    }

    fn copy(&self, k: &str) -> Option<CopyIdentity> {
        self.store.head(&key(k)).unwrap().map(|m| m.identity())
    }

    /// A counter of this node's registry (summed over its labels matching `label`).
    fn counter(&self, name: &str, label: Option<(&str, &str)>) -> u64 {
        let mut total = 0.0;
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let matches = label.is_none_or(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == k && l.value() == v)
                });
                if matches {
                    total += m.get_counter().get_value();
                }
            }
        }
        total as u64
    }
}

fn key(k: &str) -> BlobKey {
    BlobKey::parse(k).unwrap()
}

fn body(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// Stores `data` in `store` as a copy of write `version`, as a replica would.
async fn put_copy(store: &BlobStore, k: &str, data: &Bytes, version: Version) -> Committed {
    let mut w = store
        .begin_copy(key(k), data.len() as u64, version, None)
        .await
        .unwrap();
    w.write(data.clone()).await.unwrap();
    w.finish(Some(checksum_of(data))).await.unwrap()
}

/// A write through `plane`, as the HTTP layer makes it.
async fn write(plane: &DataPlane, k: &str, data: &Bytes) -> Result<(), PutError> {
    let mut upload = plane.begin_put(key(k), data.len() as u64).await?;
    upload.write(data.clone()).await?;
    upload.commit().await
}

/// Waits (with a deadline) until `node` holds a copy of `k`.
async fn until_held(node: &Node, k: &str) -> CopyIdentity {
    let what = format!("node {} holding a copy of {k}", node.id);
    nxcache_testkit::wait_for(nxcache_testkit::PATIENCE, &what, || {
        std::future::ready(node.copy(k))
    })
    .await
}

#[tokio::test]
async fn a_strict_rollback_never_removes_a_copy_another_writer_counted() {
    // Owners 1, 2, 3 with a quorum of all three; 3 takes connections but never answers,
    // so a write through 1 holds on 1 and 2, waits for 3 (10 s), and is rolled back.
    let cluster = Cluster::start(Setup {
        quorum: 3,
        policy: DegradedPolicy::Strict,
        silent: vec![3],
        ..Setup::default()
    })
    .await;
    let (one, two) = (cluster.node(1), cluster.node(2));
    let (counted, replaced) = (body(50_000, 1), body(40_000, 2));
    // Two refused writes at once (before node 3 is known to be silent).
    let writers: Vec<_> = [("77", counted.clone()), ("78", replaced.clone())]
        .into_iter()
        .map(|(k, data)| {
            let plane = one.plane.clone();
            tokio::spawn(async move { write(&plane, k, &data).await })
        })
        .collect();
    // While "77" waits for node 3, another writer of the same bytes finds node 2's copy
    // and counts it towards its own acknowledgement.
    let first = until_held(two, "77").await;
    let mut other = two
        .client()
        .start_put(
            "77",
            counted.len() as u64,
            Version::new(),
            Purpose::Write,
            None,
        )
        .await
        .unwrap();
    assert!(other.send(counted.clone()).await);
    assert_eq!(
        other.finish(checksum_of(&counted)).await.unwrap(),
        PutAnswer::Held(Some(first)),
        "the second writer counts the copy that is there"
    );
    // While "78" waits, node 2's copy of it is replaced by another write's (evicted, then
    // written again by someone else).
    until_held(two, "78").await;
    assert!(two.store.delete(&key("78")).unwrap());
    let newer = Version::new();
    put_copy(&two.store, "78", &body(40_000, 3), newer).await;
    // Both writes are refused and roll back: their own unclaimed copies go; the copy the
    // second writer counted, and the other write's copy, stay.
    for writer in writers {
        match writer.await.unwrap() {
            Err(PutError::Unavailable(why)) => assert!(why.contains("strict"), "{why}"),
            other => panic!("expected a strict refusal: {other:?}"),
        }
    }
    assert_eq!(
        one.copy("77"),
        None,
        "the rolled-back write left its own copy"
    );
    assert_eq!(
        one.copy("78"),
        None,
        "the rolled-back write left its own copy"
    );
    assert_eq!(
        two.copy("77"),
        Some(first),
        "the rollback removed a copy another writer counted"
    );
    assert_eq!(
        two.copy("78").map(|c| c.version),
        Some(newer),
        "the rollback removed another write's copy"
    );
}

#[tokio::test]
async fn a_losing_writer_withdraws_and_the_winners_body_is_everywhere() {
    let cluster = Cluster::start(Setup::default()).await;
    let (a, b) = (body(30_000, 1), body(30_000, 2));
    // Node 3 already holds another body (a write that reached it first).
    let first = Version::new();
    put_copy(&cluster.node(3).store, "5", &b, first).await;
    put_copy(&cluster.node(2).store, "5", &b, first).await;
    // A write of other bytes through node 1 gets only node 1: it withdraws, 409.
    assert!(matches!(
        write(&cluster.node(1).plane, "5", &a).await,
        Err(PutError::Exists)
    ));
    assert_eq!(cluster.node(1).copy("5"), None, "the losing copy stayed");
    assert_eq!(
        cluster.node(1).counter(
            "nxcache_replication_writes_total",
            Some(("outcome", "conflict"))
        ),
        1
    );
    // The same bytes again: already stored, 409 too, and nothing removed.
    assert!(matches!(
        write(&cluster.node(1).plane, "5", &b).await,
        Ok(()) | Err(PutError::Exists)
    ));
    assert!(cluster.node(2).copy("5").is_some());
}

#[tokio::test]
async fn anti_entropy_replaces_a_replica_that_holds_another_body() {
    let cluster = Cluster::start(Setup::default()).await;
    let (winner, loser) = (body(20_000, 1), body(25_000, 2));
    let (vw, vl) = (Version::new(), Version::new());
    put_copy(&cluster.node(1).store, "9", &winner, vw).await;
    put_copy(&cluster.node(2).store, "9", &winner, vw).await;
    put_copy(&cluster.node(3).store, "9", &loser, vl).await;
    // A key the nodes agree on, and one node 3 lacks.
    for n in 1..=3 {
        put_copy(&cluster.node(n).store, "10", &body(100, 9), vw).await;
    }
    put_copy(&cluster.node(1).store, "11", &body(100, 8), vw).await;
    let totals = cluster.node(3).plane.anti_entropy_pass().await;
    assert!(totals.ranges_differing > 0, "{totals:?}");
    for n in 1..=3 {
        let copy = cluster.node(n).copy("9").unwrap();
        assert_eq!(copy.checksum, checksum_of(&winner), "node {n}");
        assert_eq!(copy.version, vw, "a copy keeps its write's version");
        assert!(cluster.node(n).copy("11").is_some(), "node {n} lacks 11");
    }
    let three = cluster.node(3);
    assert_eq!(
        three.counter("nxcache_replication_conflicts_total", None),
        1
    );
    assert_eq!(
        three.counter("nxcache_replication_conflict_repairs_total", None),
        1
    );
    // Agreed now: the next pass finds nothing to do.
    let again = three.plane.anti_entropy_pass().await;
    assert_eq!(
        (again.ranges_differing, again.keys_repaired),
        (0, 0),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_range_with_more_keys_than_a_page_converges_in_bounded_messages() {
    let cluster = Cluster::start(Setup {
        nodes: 2,
        replicas: 2,
        quorum: 2,
        ..Setup::default()
    })
    .await;
    let one = cluster.node(1);
    let v = Version::new();
    for n in 0..2500 {
        put_copy(&one.store, &format!("k{n}"), &body(10, n as u8), v).await;
    }
    // One page of a listing is at most 1000 keys, whatever the caller asks for.
    let mut raw = nxcache_rpc::pb::blobs_client::BlobsClient::with_interceptor(
        nxcache_rpc::channel(&one.addr, None).unwrap(),
        ClusterSecret::new(SECRET).unwrap().client_interceptor(),
    );
    let page = raw
        .range_keys(nxcache_rpc::pb::RangeKeysRequest {
            peer_id: 2,
            ring_epoch: 1,
            ranges: vec![nxcache_rpc::pb::RingRange {
                first: 0,
                last: u64::MAX,
            }],
            after: None,
            limit: 100_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), nxcache_replication::MAX_PAGE);
    assert!(page.more);
    let totals = cluster.node(2).plane.anti_entropy_pass().await;
    assert_eq!(totals.keys_repaired, 2500, "{totals:?}");
    assert_eq!(cluster.node(2).store.stats().objects, 2500);
    let pages = cluster.node(2).counter(
        "nxcache_grpc_client_calls_total",
        Some(("method", "Blobs/RangeKeys")),
    );
    assert!(pages >= 3, "2500 keys listed in {pages} pages");
    // A delete of more copies than one batch is refused by the receiver...
    let too_many: Vec<(String, Version)> = (0..1025).map(|n| (format!("k{n}"), v)).collect();
    let client = one.client();
    let refused = raw
        .delete(nxcache_rpc::pb::DeleteRequest {
            copies: too_many
                .iter()
                .map(|(k, v)| nxcache_rpc::pb::CopyRef {
                    key: k.clone(),
                    version: v.to_bytes().to_vec(),
                })
                .collect(),
            reason: nxcache_rpc::pb::DeleteReason::HandedOff as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // ...and the client sends it in batches.
    assert_eq!(
        client
            .delete(&too_many, DeleteReason::HandedOff)
            .await
            .unwrap(),
        1025
    );
}

#[tokio::test]
async fn an_eviction_is_passed_on_by_name_and_never_undone_by_anti_entropy() {
    // Node 1 has room for two artifacts; owners 1 and 2 (two nodes, two copies).
    let cluster = Cluster::start(Setup {
        nodes: 2,
        replicas: 2,
        quorum: 2,
        first_budget: 25_000,
        ..Setup::default()
    })
    .await;
    let (one, two) = (cluster.node(1), cluster.node(2));
    let (old, fresh) = (Version::new(), Version::new());
    put_copy(&one.store, "a", &body(10_000, 1), old).await;
    put_copy(&two.store, "a", &body(10_000, 1), old).await;
    put_copy(&two.store, "b", &body(10_000, 2), old).await;
    put_copy(&one.store, "b", &body(10_000, 2), old).await;
    // "c" makes node 1 evict "a" (least recently used).
    put_copy(&one.store, "c", &body(10_000, 3), old).await;
    assert_eq!(one.copy("a"), None);
    // Before node 1 passes its eviction on, node 2's copy of "a" is replaced by a newer
    // write of "a" (the artifact was rebuilt and uploaded again).
    assert!(two.store.delete(&key("a")).unwrap());
    put_copy(&two.store, "a", &body(10_000, 4), fresh).await;
    one.plane.sync_owners().await;
    assert_eq!(
        two.copy("a").map(|c| c.version),
        Some(fresh),
        "the eviction took another write's copy"
    );

    // Node 1 evicts "b"; node 2 misses the eviction (it is cut off when it goes out).
    one.plane.cut_peers([2]);
    put_copy(&one.store, "d", &body(10_000, 5), old).await;
    assert_eq!(one.copy("b"), None);
    one.plane.sync_owners().await;
    one.plane.heal_peers();
    assert!(two.copy("b").is_some());
    // Anti-entropy from either side does not bring "b" back to node 1: node 2 drops it.
    two.plane.anti_entropy_pass().await;
    assert_eq!(
        one.copy("b"),
        None,
        "anti-entropy brought an evicted artifact back"
    );
    assert_eq!(
        two.copy("b"),
        None,
        "node 2 kept an artifact its owners evicted"
    );
    // The newer "a" is a new artifact: it reaches node 1 again.
    one.plane.anti_entropy_pass().await;
    assert_eq!(one.copy("a").map(|c| c.version), Some(fresh));
}

#[tokio::test]
async fn one_owner_down_never_holds_back_another_owners_hints() {
    let cluster = Cluster::start(Setup::default()).await;
    let one = cluster.node(1);
    // Many hints for owner 2 (down), a few for owner 3 (up), all held by node 1. Owner 2
    // sorts first: a hand-off taking the first hints in owner order never gets to 3.
    let v = Version::new();
    for n in 0..300 {
        let k = format!("to-two-{n:03}");
        put_copy(&one.store, &k, &body(10, 1), v).await;
        one.hints.add_for_all(&[2], &key(&k), &[1]).unwrap();
    }
    for n in 0..5 {
        let k = format!("to-three-{n}");
        put_copy(&one.store, &k, &body(10, 2), v).await;
        one.hints.add_for_all(&[3], &key(&k), &[1]).unwrap();
    }
    one.plane.cut_peers([2]);
    one.plane.deliver_hints().await;
    for n in 0..5 {
        assert!(
            cluster.node(3).copy(&format!("to-three-{n}")).is_some(),
            "owner 3's hint {n} was not delivered"
        );
    }
    assert_eq!(one.plane.pending_hints(), 300);
    // Owner 2 back: its hints flow too, a page per pass.
    one.plane.heal_peers();
    let mut passes = 0;
    while one.plane.pending_hints() > 0 {
        one.plane.deliver_hints().await;
        passes += 1;
        assert!(passes < 20, "{} hints left", one.plane.pending_hints());
    }
    assert_eq!(cluster.node(2).store.stats().objects, 300);
}

#[tokio::test]
async fn a_hint_whose_owner_holds_another_body_is_settled_by_the_rule() {
    let cluster = Cluster::start(Setup::default()).await;
    let (mine, theirs) = (body(5_000, 1), body(5_000, 2));
    // A partition: node 1 accepted one body alone (serve), nodes 2 and 3 another.
    let (v1, v2) = (Version::new(), Version::new());
    put_copy(&cluster.node(1).store, "p", &mine, v1).await;
    cluster
        .node(1)
        .hints
        .add_for_all(&[2, 3], &key("p"), &[1])
        .unwrap();
    put_copy(&cluster.node(2).store, "p", &theirs, v2).await;
    put_copy(&cluster.node(3).store, "p", &theirs, v2).await;
    cluster.node(1).plane.deliver_hints().await;
    assert_eq!(cluster.node(1).plane.pending_hints(), 0);
    for n in 1..=3 {
        assert_eq!(
            cluster.node(n).copy("p").map(|c| c.checksum),
            Some(checksum_of(&theirs)),
            "node {n}"
        );
    }
    assert_eq!(
        cluster.node(1).counter(
            "nxcache_replication_conflicts_total",
            Some(("found_by", "handoff"))
        ),
        1
    );
}

#[tokio::test]
async fn a_losing_write_withdraws_its_copy_from_an_owner_that_received_it_meanwhile() {
    // Owners 1, 2, 3, quorum 2; node 3 takes connections but never answers (cut off), so
    // a write through node 1 waits for it before it concludes.
    let cluster = Cluster::start(Setup {
        silent: vec![3],
        ..Setup::default()
    })
    .await;
    let (one, two) = (cluster.node(1), cluster.node(2));
    // Node 2 holds another body: the write through node 1 is going to lose (409).
    let other_body = body(20_000, 7);
    put_copy(&two.store, "91", &other_body, Version::new()).await;
    let plane = one.plane.clone();
    let losing = body(20_000, 8);
    let writer = {
        let data = losing.clone();
        tokio::spawn(async move { write(&plane, "91", &data).await })
    };
    // While it waits for node 3, node 2's body goes (its own writer withdrew it) and
    // anti-entropy hands node 2 node 1's copy, this write's version.
    let mine = until_held(one, "91").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while two.copy("91").map(|c| c.version) != Some(mine.version) {
        assert!(
            std::time::Instant::now() < deadline,
            "could not put the write's copy on node 2"
        );
        let _ = two.store.delete(&key("91"));
        put_copy(&two.store, "91", &losing, mine.version).await;
    }
    assert!(
        !writer.is_finished(),
        "the write concluded before its copy reached node 2: the test needs it waiting"
    );
    assert!(matches!(writer.await.unwrap(), Err(PutError::Exists)));
    assert_eq!(one.copy("91"), None, "the losing write left its own copy");
    assert_eq!(
        two.copy("91"),
        None,
        "the losing write left its copy on an owner that got it while the write waited"
    );
}
