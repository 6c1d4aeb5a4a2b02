//! In-process clusters: how clusters form, stay one cluster, and keep their voters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nxcache_meta::{Faults, Formation, MemberNode, MetaConfig, MetaNode, NodeId, RaftTiming};
use nxcache_rpc::ClusterSecret;
use nxcache_testkit::PATIENCE;

const SECRET: &str = "test-cluster-secret-0123456789";

/// A member with its own directory, port and metrics, started and stopped at will.
struct Member {
    id: NodeId,
    dir: PathBuf,
    addr: String,
    registry: prometheus::Registry,
    node: Option<MetaNode>,
}

impl Member {
    fn new(id: NodeId, root: &Path) -> Member {
        Member {
            id,
            dir: root.join(format!("node-{id}")),
            addr: format!("127.0.0.1:{}", nxcache_testkit::free_port()),
            registry: prometheus::Registry::new(),
            node: None,
        }
    }

    async fn start(&mut self, formation: Formation, join: Vec<String>) {
        let listener = tokio::net::TcpListener::bind(&self.addr).await.unwrap();
        // A fresh registry per start: a restarted node registers its metrics again.
        self.registry = prometheus::Registry::new();
        let config = MetaConfig {
            node_id: self.id,
            data_dir: self.dir.clone(),
            advertise: MemberNode {
                grpc_addr: self.addr.clone(),
                http_addr: format!("http://{}", self.addr),
                ..MemberNode::default()
            },
            secret: ClusterSecret::new(SECRET).unwrap(),
            tls: None,
            formation,
            join,
            seed_tokens: BTreeMap::new(),
            prune_env_tokens: false,
            timing: RaftTiming {
                heartbeat: Duration::from_millis(50),
                election_min: Duration::from_millis(300),
                election_max: Duration::from_millis(600),
                snapshot_after_entries: 20,
            },
            faults: Faults::default(),
            peer_services: None,
        };
        self.node = Some(
            MetaNode::start(config, listener, &self.registry)
                .await
                .unwrap(),
        );
    }

    async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }

    fn node(&self) -> &MetaNode {
        self.node.as_ref().expect("running")
    }

    /// The sum of a counter family's samples whose labels include `label`.
    fn counter(&self, family: &str, label: (&str, &str)) -> f64 {
        self.counter_where(family, &[label])
    }

    /// The sum of a counter family's samples whose labels include all of `labels`.
    fn counter_where(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| f.get_metric().to_vec())
            .filter(|m| {
                labels.iter().all(|(name, value)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *name && l.value() == *value)
                })
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }
}

async fn wait(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    nxcache_testkit::wait_until(timeout, what, || std::future::ready(check())).await;
}

/// The running members agree on one leader and one cluster id, see `size` members,
/// `voters` voters, and no membership change in progress.
fn one_settled_cluster(members: &[Member], size: usize, voters: usize) -> bool {
    let running: Vec<&MetaNode> = members.iter().filter_map(|m| m.node.as_ref()).collect();
    let first = running[0].status();
    first.leader_id.is_some()
        && first.cluster_id.is_some()
        && running.iter().all(|n| {
            let s = n.status();
            s.leader_id == first.leader_id
                && s.cluster_id == first.cluster_id
                && s.members.len() == size
                && s.members.iter().filter(|m| m.voter).count() == voters
                && !s.changing_membership
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_starting_in_any_order_form_one_cluster_and_never_part_of_one() {
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let tmp = tempfile::tempdir().unwrap();
        let mut members: Vec<Member> = (1..=3).map(|id| Member::new(id, tmp.path())).collect();
        let seeds: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
        let formation = Formation::Expect {
            expect: 3,
            founder: None,
        };
        for &i in &order[..2] {
            members[i].start(formation, seeds.clone()).await;
        }
        // Two of the three have asked each other (and the missing one) several times...
        wait("the first two asked their seeds", PATIENCE, || {
            let asked = order[..2].iter().all(|&i| {
                members[i].counter(
                    "nxcache_grpc_server_calls_total",
                    ("method", "Membership/Ping"),
                ) >= 6.0
            });
            let founded = order[..2]
                .iter()
                .any(|&i| members[i].node().cluster_id().is_some());
            asked || founded
        })
        .await;
        // ...and neither founded anything: the third seed may hold a cluster.
        for &i in &order[..2] {
            let status = members[i].node().status();
            assert_eq!(
                status.cluster_id,
                None,
                "order {order:?}: node {} founded",
                i + 1
            );
            assert!(status.members.is_empty(), "order {order:?}: {status:?}");
        }
        members[order[2]].start(formation, seeds.clone()).await;
        wait(
            &format!("one cluster of three (start order {order:?})"),
            PATIENCE,
            || one_settled_cluster(&members, 3, 3),
        )
        .await;
        for m in &mut members {
            m.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_founded_another_cluster_is_refused_by_this_ones_members() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members: Vec<Member> = (1..=3).map(|id| Member::new(id, tmp.path())).collect();
    let seed = vec![members[0].addr.clone()];
    members[0].start(Formation::Found, vec![]).await;
    members[1].start(Formation::Join, seed.clone()).await;
    members[2].start(Formation::Join, seed).await;
    wait("one cluster of three", PATIENCE, || {
        one_settled_cluster(&members, 3, 3)
    })
    .await;
    let ours = members[0].node().cluster_id().unwrap();

    // Node 3 loses its disk and is (wrongly) started to found a cluster of its own, under
    // the same secret and address: its old peers' Raft calls now reach another cluster.
    members[2].stop().await;
    std::fs::remove_dir_all(&members[2].dir).unwrap();
    members[2].start(Formation::Found, vec![]).await;
    let theirs = members[2].node().cluster_id().unwrap();
    assert_ne!(theirs, ours);
    wait(
        "the stray node refuses the calls of its old peers",
        PATIENCE,
        || {
            members[2].counter(
                "nxcache_cluster_rejected_calls_total",
                ("reason", "other_cluster"),
            ) >= 1.0
        },
    )
    .await;
    // Neither cluster takes anything from the other: node 3 leads its own cluster of
    // one; nodes 1 and 2 still form theirs, and it still lists node 3 (unreachable).
    wait("two clusters apart", PATIENCE, || {
        let stray = members[2].node().status();
        let kept: Vec<_> = members[..2].iter().map(|m| m.node().status()).collect();
        stray.leader_id == Some(3)
            && stray.members.len() == 1
            && kept.iter().all(|s| {
                s.leader_id.is_some_and(|l| l != 3)
                    && s.leader_id == kept[0].leader_id
                    && s.members.len() == 3
                    && s.cluster_id.as_deref() == Some(ours.as_str())
            })
    })
    .await;
    for m in &mut members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_voter_is_replaced_by_a_caught_up_learner() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members: Vec<Member> = (1..=5).map(|id| Member::new(id, tmp.path())).collect();
    let seed = vec![members[0].addr.clone()];
    members[0].start(Formation::Found, vec![]).await;
    for m in &mut members[1..] {
        m.start(Formation::Join, seed.clone()).await;
    }
    wait("five members, three voters", PATIENCE, || {
        one_settled_cluster(&members, 5, 3)
    })
    .await;
    // Every join has been answered (through the seed): none is left to promote anyone.
    wait("four joins answered", PATIENCE, || {
        members[0].counter_where(
            "nxcache_grpc_server_calls_total",
            &[("method", "Membership/Join"), ("code", "0")],
        ) >= 4.0
    })
    .await;
    let status = members[0].node().status();
    let leader = status.leader_id.unwrap();
    let voters: Vec<NodeId> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    let removed = *voters.iter().find(|id| **id != leader).unwrap();
    members[0].node().remove(removed).await.unwrap();
    members[(removed - 1) as usize].stop().await;
    wait("three voters again", PATIENCE, || {
        one_settled_cluster(&members, 4, 3)
    })
    .await;

    // Another voter goes: with the learner promoted, two of three voters remain.
    members[(leader - 1) as usize].stop().await;
    wait("a leader among the rest", PATIENCE, || {
        let leaders: Vec<_> = members
            .iter()
            .filter_map(|m| m.node.as_ref())
            .map(|n| n.leader())
            .collect();
        leaders[0].is_some_and(|l| l != leader) && leaders.iter().all(|l| *l == leaders[0])
    })
    .await;
    for m in &mut members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_fills_in_incarnations_missing_from_older_records() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members: Vec<Member> = (1..=3).map(|id| Member::new(id, tmp.path())).collect();
    let seed = vec![members[0].addr.clone()];
    members[0].start(Formation::Found, vec![]).await;
    for m in &mut members[1..] {
        m.start(Formation::Join, seed.clone()).await;
    }
    wait("one cluster of three", PATIENCE, || {
        one_settled_cluster(&members, 3, 3)
    })
    .await;
    wait("two joins answered", PATIENCE, || {
        members[0].counter_where(
            "nxcache_grpc_server_calls_total",
            &[("method", "Membership/Join"), ("code", "0")],
        ) >= 2.0
    })
    .await;
    // Records as an older version wrote them: no incarnation.
    let leader = members[0].node().leader().unwrap();
    let raft = members[(leader - 1) as usize].node().raft();
    let old_records: BTreeMap<NodeId, MemberNode> = members[0]
        .node()
        .members()
        .into_iter()
        .map(|(id, n)| {
            (
                id,
                MemberNode {
                    incarnation: 0,
                    ..n
                },
            )
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    // The leader may be settling a change of its own: retry while one is in progress.
    while let Err(err) = raft
        .change_membership(openraft::ChangeMembers::SetNodes(old_records.clone()), true)
        .await
    {
        assert!(
            Instant::now() < deadline,
            "cannot rewrite the records: {err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        members[0]
            .node()
            .status()
            .members
            .iter()
            .any(|m| m.incarnation == 0)
    );
    wait(
        "every record carries its member's incarnation again",
        PATIENCE,
        || {
            members.iter().all(|m| {
                m.node()
                    .status()
                    .members
                    .iter()
                    .all(|r| r.incarnation == members[(r.id - 1) as usize].node().incarnation())
            })
        },
    )
    .await;
    for m in &mut members {
        m.stop().await;
    }
}
