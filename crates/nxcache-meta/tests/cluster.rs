//! In-process clusters: nodes on 127.0.0.1 with random ports in one test process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nxcache_auth::Digest;
use nxcache_meta::{
    Faults, Formation, MemberNode, MetaCommand, MetaConfig, MetaNode, MetaResponse, NodeId,
    RaftTiming, SettingsChange, TokenRecord,
};
use nxcache_rpc::{ClusterSecret, PeerTls};
use nxcache_testkit::PATIENCE;
use nxcache_testkit::pki::TestPki;
use tonic::transport::ClientTlsConfig;

const SECRET: &str = "test-cluster-secret-0123456789";

fn timing() -> RaftTiming {
    RaftTiming {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(300),
        election_max: Duration::from_millis(600),
        snapshot_after_entries: 20,
    }
}

struct Member {
    id: NodeId,
    dir: PathBuf,
    addr: String,
    faults: Faults,
    tls: Option<PeerTls>,
    node: Option<MetaNode>,
}

impl Member {
    /// A stopped member with a reserved port (the node binds it again, and again after a
    /// restart).
    fn new(id: NodeId, root: &std::path::Path, tls: Option<PeerTls>) -> Member {
        let addr = format!("127.0.0.1:{}", nxcache_testkit::free_port());
        Member {
            id,
            dir: root.join(format!("node-{id}")),
            addr,
            faults: Faults::default(),
            tls,
            node: None,
        }
    }
}

struct Cluster {
    members: Vec<Member>,
    _tmp: tempfile::TempDir,
}

async fn start(member: &mut Member, formation: Formation, join: Vec<String>) {
    let listener = tokio::net::TcpListener::bind(&member.addr).await.unwrap();
    let config = MetaConfig {
        node_id: member.id,
        data_dir: member.dir.clone(),
        advertise: MemberNode {
            grpc_addr: member.addr.clone(),
            http_addr: format!("http://{}", member.addr),
            ..MemberNode::default()
        },
        secret: ClusterSecret::new(SECRET).unwrap(),
        tls: member.tls.clone(),
        formation,
        join,
        seed_tokens: BTreeMap::new(),
        prune_env_tokens: false,
        timing: timing(),
        faults: member.faults.clone(),
        peer_services: None,
    };
    let node = MetaNode::start(config, listener, &prometheus::Registry::new())
        .await
        .unwrap();
    member.node = Some(node);
}

impl Cluster {
    /// Node 1 bootstraps; the others join through it.
    async fn new(size: u64) -> Cluster {
        Self::with_voters(size, 3).await
    }

    async fn with_voters(size: u64, max_voters: u32) -> Cluster {
        Self::build(size, max_voters, None).await
    }

    async fn build(size: u64, max_voters: u32, tls: Option<PeerTls>) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        for id in 1..=size {
            members.push(Member::new(id, tmp.path(), tls.clone()));
        }
        let mut cluster = Cluster { members, _tmp: tmp };
        start(&mut cluster.members[0], Formation::Found, vec![]).await;
        cluster.wait_leader_among(&[1]).await;
        if max_voters != 3 {
            let change = SettingsChange {
                max_voters: Some(max_voters),
                ..SettingsChange::default()
            };
            cluster
                .node(1)
                .write(MetaCommand::UpdateSettings { change })
                .await
                .unwrap();
        }
        let seed = vec![cluster.members[0].addr.clone()];
        for i in 1..cluster.members.len() {
            start(&mut cluster.members[i], Formation::Join, seed.clone()).await;
        }
        let expected = size.min(max_voters as u64) as usize;
        cluster
            .wait("all members joined", PATIENCE, |c| {
                c.running().all(|n| {
                    let s = n.status();
                    s.members.len() == size as usize
                        && !s.changing_membership
                        && s.members.iter().filter(|m| m.voter).count() == expected
                })
            })
            .await;
        cluster
    }

    fn node(&self, id: NodeId) -> &MetaNode {
        self.members[(id - 1) as usize]
            .node
            .as_ref()
            .expect("running")
    }

    fn running(&self) -> impl Iterator<Item = &MetaNode> {
        self.members.iter().filter_map(|m| m.node.as_ref())
    }

    async fn wait(&self, what: &str, timeout: Duration, check: impl Fn(&Cluster) -> bool) {
        nxcache_testkit::wait_until(timeout, what, || std::future::ready(check(self))).await;
    }

    /// Waits until every running node sees `size` members and no membership change.
    async fn wait_one_cluster_of(&self, size: usize) {
        self.wait("one settled cluster", PATIENCE, |c| {
            c.running().all(|n| {
                let s = n.status();
                s.members.len() == size && !s.changing_membership
            })
        })
        .await;
    }

    /// Waits until the running nodes among `ids` agree on one leader among `ids`.
    async fn wait_leader_among(&self, ids: &[NodeId]) -> NodeId {
        // Whichever node wins: a test never depends on which one leads.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let leaders: Vec<Option<NodeId>> =
                ids.iter().map(|id| self.node(*id).leader()).collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| *x == Some(*l))
                && ids.contains(l)
            {
                return *l;
            }
            if Instant::now() >= deadline {
                for id in ids {
                    let m = self.node(*id).raft().metrics().borrow().clone();
                    eprintln!("node {id}: {m:?}");
                }
                panic!("no agreed leader among {ids:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self, id: NodeId) {
        let node = self.members[(id - 1) as usize]
            .node
            .take()
            .expect("running");
        node.shutdown().await;
    }

    async fn restart(&mut self, id: NodeId) {
        let seed = vec![self.members[0].addr.clone()];
        start(&mut self.members[(id - 1) as usize], Formation::Join, seed).await;
    }

    /// Cuts every link between `a` and `b` (both directions).
    fn cut(&self, a: &[NodeId], b: &[NodeId]) {
        for x in a {
            self.members[(*x - 1) as usize]
                .faults
                .cut(b.iter().copied());
        }
        for y in b {
            self.members[(*y - 1) as usize]
                .faults
                .cut(a.iter().copied());
        }
    }

    fn heal(&self) {
        for m in &self.members {
            m.faults.heal();
        }
    }

    async fn shutdown(mut self) {
        for m in &mut self.members {
            if let Some(node) = m.node.take() {
                node.shutdown().await;
            }
        }
    }
}

fn has_token(node: &MetaNode, name: &str) -> bool {
    node.token(name).unwrap().is_some()
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

fn create(name: &str, secret: &str) -> MetaCommand {
    MetaCommand::CreateToken {
        name: name.into(),
        token: token(secret, "read-write"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_elect_a_leader_and_tokens_reach_every_node() {
    let cluster = Cluster::new(3).await;
    let leader = cluster.wait_leader_among(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();

    // Created through a follower (forwarded to the leader), accepted everywhere.
    let answer = cluster
        .node(follower)
        .write(create("ci", "ci-secret"))
        .await
        .unwrap();
    assert_eq!(answer, MetaResponse::Done);
    cluster
        .wait("token accepted by all", PATIENCE, |c| {
            c.running()
                .all(|n| n.authenticator().authenticate("ci-secret").is_some())
        })
        .await;

    // Revoked through another node, rejected everywhere.
    let other = [1, 2, 3].into_iter().find(|id| *id != follower).unwrap();
    let answer = cluster
        .node(other)
        .write(MetaCommand::RevokeToken { name: "ci".into() })
        .await
        .unwrap();
    assert_eq!(answer, MetaResponse::Done);
    cluster
        .wait("token rejected by all", PATIENCE, |c| {
            c.running()
                .all(|n| n.authenticator().authenticate("ci-secret").is_none())
        })
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_elects_a_new_one_and_writes_go_on() {
    let mut cluster = Cluster::new(3).await;
    let old = cluster.wait_leader_among(&[1, 2, 3]).await;
    cluster.stop(old).await;
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
    let new = cluster.wait_leader_among(&rest).await;
    assert_ne!(new, old);
    let answer = cluster
        .node(rest[0])
        .write(create("after", "after-secret"))
        .await
        .unwrap();
    assert_eq!(answer, MetaResponse::Done);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_recovers_from_its_disk_and_catches_up() {
    let mut cluster = Cluster::new(3).await;
    cluster.wait_leader_among(&[1, 2, 3]).await;
    cluster
        .node(1)
        .write(create("before", "before-secret"))
        .await
        .unwrap();
    cluster
        .wait("node 3 applied", PATIENCE, |c| {
            has_token(c.node(3), "before")
        })
        .await;
    cluster.stop(3).await;
    for i in 0..5 {
        cluster
            .node(1)
            .write(create(&format!("t{i}"), &format!("s{i}")))
            .await
            .unwrap();
    }
    cluster.restart(3).await;
    // Its own disk has "before" at once, even before it hears from the leader.
    assert!(has_token(cluster.node(3), "before"));
    cluster
        .wait("node 3 caught up", PATIENCE, |c| {
            c.node(3).token_count() == 6
        })
        .await;
    // Still one cluster: the same three voters, one leader (whichever it is) that node 3
    // follows too.
    cluster.wait_leader_among(&[1, 2, 3]).await;
    let status = cluster.node(3).status();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_many_entries_catches_up_by_snapshot() {
    let mut cluster = Cluster::new(3).await;
    cluster.wait_leader_among(&[1, 2, 3]).await;
    cluster.stop(3).await;
    // Far more than the snapshot threshold (20): the leader snapshots and purges its log.
    for i in 0..80 {
        cluster
            .node(1)
            .write(create(&format!("t{i}"), &format!("s{i}")))
            .await
            .unwrap();
    }
    cluster
        .wait("leader purged its log", PATIENCE, |c| {
            c.node(1).raft().metrics().borrow().purged.is_some()
        })
        .await;
    cluster.restart(3).await;
    cluster
        .wait("node 3 caught up", PATIENCE, |c| {
            c.node(3).token_count() == 80
        })
        .await;
    let snapshot = cluster.node(3).raft().metrics().borrow().snapshot;
    assert!(
        snapshot.is_some(),
        "node 3 should hold an installed snapshot"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_voters_survive_the_loss_of_the_leader() {
    let mut cluster = Cluster::with_voters(5, 5).await;
    let old = cluster.wait_leader_among(&[1, 2, 3, 4, 5]).await;
    cluster.stop(old).await;
    let rest: Vec<NodeId> = (1..=5).filter(|id| *id != old).collect();
    let new = cluster.wait_leader_among(&rest).await;
    assert_ne!(new, old);
    cluster
        .node(rest[0])
        .write(create("x", "x-secret"))
        .await
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_beyond_max_voters_are_learners_and_can_be_removed() {
    let cluster = Cluster::new(4).await;
    let leader = cluster.wait_leader_among(&[1, 2, 3, 4]).await;
    let status = cluster.node(leader).status();
    assert_eq!(status.members.len(), 4);
    let learner = status
        .members
        .iter()
        .find(|m| !m.voter)
        .expect("one learner")
        .id;
    let epoch_before = status.ring_epoch;
    cluster.node(leader).remove(learner).await.unwrap();
    cluster
        .wait("learner removed everywhere", PATIENCE, |c| {
            c.running()
                .filter(|n| n.id() != learner)
                .all(|n| n.status().members.len() == 3)
        })
        .await;
    assert!(cluster.node(leader).status().ring_epoch > epoch_before);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minority_partition_cannot_commit() {
    let cluster = Cluster::new(3).await;
    let old = cluster.wait_leader_among(&[1, 2, 3]).await;
    let majority: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
    cluster.cut(&[old], &majority);

    // The isolated leader cannot get a write committed.
    let isolated = tokio::time::timeout(
        Duration::from_secs(3),
        cluster.node(old).write(create("lost", "lost-secret")),
    )
    .await;
    assert!(
        !matches!(isolated, Ok(Ok(_))),
        "a minority committed: {isolated:?}"
    );

    // The majority elects a leader of its own and commits.
    let new = cluster.wait_leader_among(&majority).await;
    assert_ne!(new, old);
    cluster
        .node(new)
        .write(create("kept", "kept-secret"))
        .await
        .unwrap();
    assert!(!has_token(cluster.node(old), "kept"));

    // Healed: the old leader follows and converges; the uncommitted write is gone.
    cluster.heal();
    cluster
        .wait("old leader converged", PATIENCE, |c| {
            has_token(c.node(old), "kept") && !has_token(c.node(old), "lost")
        })
        .await;
    for id in [1, 2, 3] {
        assert!(!has_token(cluster.node(id), "lost"));
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_without_the_cluster_secret_are_refused_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let registry = prometheus::Registry::new();
    let node = MetaNode::start(
        MetaConfig {
            node_id: 1,
            data_dir: tmp.path().to_path_buf(),
            advertise: MemberNode {
                grpc_addr: addr.clone(),
                ..MemberNode::default()
            },
            secret: ClusterSecret::new(SECRET).unwrap(),
            tls: None,
            formation: Formation::Found,
            join: vec![],
            seed_tokens: BTreeMap::new(),
            prune_env_tokens: false,
            timing: timing(),
            faults: Faults::default(),
            peer_services: None,
        },
        listener,
        &registry,
    )
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(60))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    let message = || nxcache_rpc::pb::RaftMessage {
        payload: b"{}".to_vec(),
    };

    let mut anonymous = nxcache_rpc::pb::raft_client::RaftClient::new(channel.clone());
    let err = anonymous.vote(message()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let forged = ClusterSecret::new("a-different-secret-value").unwrap();
    let mut forger = nxcache_rpc::pb::raft_client::RaftClient::with_interceptor(
        channel.clone(),
        forged.client_interceptor(),
    );
    let err = forger.append_entries(message()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // With the secret (and, as a member, the cluster's id), a malformed message is
    // refused as such (not as unauthenticated).
    let good = ClusterSecret::new(SECRET).unwrap();
    good.cluster_id().set(&node.cluster_id().unwrap()).unwrap();
    let mut member = nxcache_rpc::pb::raft_client::RaftClient::with_interceptor(
        channel,
        good.client_interceptor(),
    );
    let err = member
        .vote(nxcache_rpc::pb::RaftMessage {
            payload: b"not json".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let families = registry.gather();
    let rejected: u64 = families
        .iter()
        .filter(|f| f.name() == "nxcache_cluster_rejected_calls_total")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_counter().get_value() as u64)
        })
        .sum();
    assert_eq!(rejected, 2);
    node.shutdown().await;
}

/// The cluster's [`PeerTls`] (`node.pem`, signed by `ca.pem`) of a [`TestPki`].
fn peer_tls(pki: &TestPki, leaf: &str) -> PeerTls {
    let [cert, key, ca] = pki.node_files(leaf);
    PeerTls::load(&cert, &key, &ca).unwrap()
}

/// A Raft Vote call to `addr` carrying the cluster secret, over TLS with `tls` (plain
/// text without); `Err` with the reason when the call got no answer from the service.
async fn vote_with(addr: &str, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let call = async {
        let channel = nxcache_rpc::channel(addr, tls.as_ref()).unwrap();
        let secret = ClusterSecret::new(SECRET).unwrap();
        let mut client = nxcache_rpc::pb::raft_client::RaftClient::with_interceptor(
            channel,
            secret.client_interceptor(),
        );
        match client
            .vote(nxcache_rpc::pb::RaftMessage {
                payload: b"{}".to_vec(),
            })
            .await
        {
            Ok(_) => Ok(()),
            // Answered past TLS: by the cluster checks (this client was never admitted)
            // or by the service (an empty vote is malformed).
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                ) =>
            {
                Ok(())
            }
            Err(status) => Err(format!("{status:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 20 s".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_can_talk_over_mutual_tls_and_refuse_peers_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::make(dir.path());
    let cluster = Cluster::build(3, 3, Some(peer_tls(&pki, "node"))).await;
    let leader = cluster.wait_leader_among(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    cluster
        .node(follower)
        .write(create("tls", "tls-secret"))
        .await
        .unwrap();
    cluster
        .wait("token everywhere", PATIENCE, |c| {
            c.running()
                .all(|n| n.authenticator().authenticate("tls-secret").is_some())
        })
        .await;

    // Clients with the cluster secret but without a certificate of the cluster's CA get
    // no call through (refused by the TLS handshake; with TLS 1.3 the client may see it
    // as an alert or as the connection closed on its first call).
    let addr = cluster.members[0].addr.clone();
    let ca = tonic::transport::Certificate::from_pem(pki.read("ca.pem"));
    for (who, tls) in [
        (
            "no client certificate",
            Some(ClientTlsConfig::new().ca_certificate(ca)),
        ),
        (
            "a certificate of another CA",
            Some(peer_tls(&pki, "stranger").client_config()),
        ),
        ("plain text", None),
    ] {
        let outcome = vote_with(&addr, tls).await;
        assert!(outcome.is_err(), "{who}: the call got through: {outcome:?}");
    }
    // The same call with a member's certificate reaches the service.
    let member = vote_with(&addr, Some(peer_tls(&pki, "node").client_config())).await;
    assert_eq!(member, Ok(()), "a member's call");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stops_promptly_while_its_join_cannot_be_committed() {
    let mut cluster = Cluster::new(3).await;
    // Leader 1 alone: no membership change can commit, so a join waits forever.
    cluster.stop(2).await;
    cluster.stop(3).await;
    let addr = format!("127.0.0.1:{}", nxcache_testkit::free_port());
    let mut joiner = Member {
        id: 4,
        dir: cluster._tmp.path().join("node-4"),
        addr,
        faults: Faults::default(),
        tls: None,
        node: None,
    };
    start(
        &mut joiner,
        Formation::Join,
        vec![cluster.members[0].addr.clone()],
    )
    .await;
    let node = joiner.node.take().unwrap();
    // The join reached the leader: the new member is proposed, never committed.
    cluster
        .wait("the join is pending on the leader", PATIENCE, |c| {
            c.node(1).status().members.len() == 4
        })
        .await;
    // Bounded far above a normal stop (well under a second): only a shutdown that waits
    // for the join reaches it.
    tokio::time::timeout(PATIENCE, node.shutdown())
        .await
        .expect("shutdown waited for a join that could not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bootstrap_node_with_seeds_joins_a_cluster_that_already_exists() {
    // Node 1 founds the cluster and node 2 joins, as usual.
    let mut cluster = Cluster::new(2).await;
    // Node 3 is configured as the one that founds (a StatefulSet's ordinal 0 back on an
    // empty disk): seeing a seed in a cluster, it joins instead.
    let joiner = Member::new(3, cluster._tmp.path(), None);
    cluster.members.push(joiner);
    let seeds = vec![
        cluster.members[0].addr.clone(),
        cluster.members[1].addr.clone(),
    ];
    let founder = Formation::Expect {
        expect: 3,
        founder: Some(3),
    };
    start(&mut cluster.members[2], founder, seeds).await;
    cluster.wait_one_cluster_of(3).await;
    // One cluster, not two: all three follow one leader (whichever it is), and node 3
    // lists the two members that were there before it.
    cluster.wait_leader_among(&[1, 2, 3]).await;
    let members: Vec<NodeId> = cluster
        .node(3)
        .status()
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert!(members.contains(&1) && members.contains(&2), "{members:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_sharing_one_seed_list_start_together_as_one_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members: Vec<Member> = (1..=3)
        .map(|id| Member::new(id, tmp.path(), None))
        .collect();
    let seeds: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    // The highest ids first: the founder (the lowest id) finds them up but in no cluster.
    let formation = Formation::Expect {
        expect: 3,
        founder: None,
    };
    for i in [2, 1, 0] {
        start(&mut members[i], formation, seeds.clone()).await;
    }
    let cluster = Cluster { members, _tmp: tmp };
    cluster.wait_one_cluster_of(3).await;
    cluster.wait_leader_among(&[1, 2, 3]).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_whose_admission_is_not_committed_never_appears_in_placement() {
    let mut cluster = Cluster::new(3).await;
    cluster
        .wait("node 1 applied the three members", PATIENCE, |c| {
            c.node(1).placement().ring.members.len() == 3
        })
        .await;
    let before = cluster.node(1).placement();
    assert_eq!(before.ring.members.len(), 3);
    // Leader 1 alone: the join of node 4 is proposed, never committed.
    cluster.stop(2).await;
    cluster.stop(3).await;
    cluster.wait_leader_among(&[1]).await;
    let mut joiner = Member::new(4, cluster._tmp.path(), None);
    start(
        &mut joiner,
        Formation::Join,
        vec![cluster.members[0].addr.clone()],
    )
    .await;
    cluster
        .wait("the join is pending on the leader", PATIENCE, |c| {
            c.node(1).status().members.len() == 4
        })
        .await;
    // Raft's effective membership has node 4; placement, from the applied state, does not.
    let placement = cluster.node(1).placement();
    assert_eq!(placement.ring, before.ring);
    assert!(!placement.ring.members.contains_key(&4));
    assert!(placement.addrs.iter().all(|(id, _)| *id != 4));
    assert_eq!(cluster.node(1).status().ring_epoch, before.ring.epoch);
    joiner.node.take().unwrap().shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_previous_ring_is_applied_state_and_survives_a_restart() {
    let mut cluster = Cluster::new(4).await;
    let leader = cluster.wait_leader_among(&[1, 2, 3, 4]).await;
    cluster
        .wait("every node applied the four members", PATIENCE, |c| {
            c.running().all(|n| n.placement().ring.members.len() == 4)
        })
        .await;
    let before = cluster.node(leader).placement();
    let drained = [1, 2, 3, 4].into_iter().find(|id| *id != leader).unwrap();
    cluster
        .node(leader)
        .write(MetaCommand::SetMemberState {
            id: drained,
            state: nxcache_meta::MemberState::Draining,
        })
        .await
        .unwrap();
    let expected = cluster.node(leader).placement();
    assert_eq!(expected.ring.epoch, before.ring.epoch + 1);
    assert_eq!(expected.previous_ring.as_ref(), Some(&before.ring));
    cluster
        .wait("every node applied the drain", PATIENCE, |c| {
            c.running().all(|n| n.placement().ring == expected.ring)
        })
        .await;
    let other = [1, 2, 3, 4]
        .into_iter()
        .find(|id| *id != leader && *id != drained)
        .unwrap();
    cluster.stop(other).await;
    cluster.restart(other).await;
    // From its own disk, before it hears from anyone.
    let restarted = cluster.node(other).placement();
    assert_eq!(restarted.ring, expected.ring);
    assert_eq!(restarted.previous_ring, expected.previous_ring);
    cluster.shutdown().await;
}
