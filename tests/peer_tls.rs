//! Mutual TLS between nodes (`--peer-tls-cert/--peer-tls-key/--peer-tls-ca`), between real
//! `nxcache serve` processes: a cluster forms and works over it (Raft entries commit,
//! artifacts replicate), and a peer without a certificate signed by the cluster's CA gets
//! no call through, neither to the control-plane services (Raft, Membership) nor to the
//! Blobs service, even when it knows the cluster secret.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nxcache_rpc::pb::blobs_client::BlobsClient;
use nxcache_rpc::pb::membership_client::MembershipClient;
use nxcache_rpc::pb::raft_client::RaftClient;
use nxcache_rpc::{ClusterSecret, PeerTls};
use nxcache_testkit::pki::TestPki;
use nxcache_tests::{
    CLUSTER_SECRET, NodeProcess, PATIENCE, ProcessCluster, admin, admin_status, get, holds_on_disk,
    http_client, metric_sum, metrics_page, put, random_bytes, wait_until,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The cluster's CA with a node certificate it signed, and a stranger: a certificate for
/// the same address signed by another CA (see [`TestPki`]).
struct Pki {
    files: TestPki,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn make() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        Pki {
            files: TestPki::make(dir.path()),
            _dir: dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `serve` flags for a node presenting `leaf`'s certificate and trusting the cluster CA.
    fn flags(&self, leaf: &str) -> Vec<String> {
        vec![
            "--peer-tls-cert".into(),
            self.arg(&format!("{leaf}.pem")),
            "--peer-tls-key".into(),
            self.arg(&format!("{leaf}.key")),
            "--peer-tls-ca".into(),
            self.arg("ca.pem"),
        ]
    }

    fn peer_tls(&self, leaf: &str) -> PeerTls {
        let [cert, key, ca] = self.files.node_files(leaf);
        PeerTls::load(&cert, &key, &ca).unwrap()
    }
}

fn settled(status: &serde_json::Value, members: usize) -> bool {
    let list = status["members"].as_array().cloned().unwrap_or_default();
    status["leader_id"].as_u64().is_some()
        && list.len() == members
        && list.iter().all(|m| m["reachable"] == true)
}

fn as_refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls_commits_raft_entries_and_replicates_artifacts() {
    let pki = Pki::make();
    let cluster = ProcessCluster::start_with(3, &as_refs(&pki.flags("node")));
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    // Joins and Raft replication travel over mutual TLS: three reachable members.
    wait_until(
        PATIENCE,
        "three members over mutual TLS, one leader, every one reachable",
        || {
            let url = urls[0].clone();
            async move { admin_status(&url).is_some_and(|s| settled(&s, 3)) }
        },
    )
    .await;

    // Control plane: a token created through node 2 is a Raft entry; node 3 applies it.
    let (ok, created) = admin(
        &urls[1],
        &[
            "tokens",
            "create",
            "--scope",
            "read-write",
            "--name",
            "over-tls",
            "--json",
        ],
    );
    assert!(ok, "creating a token over a TLS cluster: {created}");
    let token = serde_json::from_str::<serde_json::Value>(created.trim()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = http_client();
    wait_until(
        PATIENCE,
        "the token created on node 2 accepted by node 3",
        || {
            let (client, url, token) = (client.clone(), urls[2].clone(), token.clone());
            async move {
                client
                    .head(format!("{url}/v1/cache/1"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 404)
            }
        },
    )
    .await;

    // Data plane: an artifact written through node 1 is stored on all three nodes (three
    // members, three copies) and read back through node 3.
    let body = random_bytes(300_000);
    assert_eq!(put(&client, &urls[0], "4711", body.clone()).await, 200);
    wait_until(PATIENCE, "the artifact on all three disks", || {
        let all = cluster
            .nodes
            .iter()
            .all(|n| holds_on_disk(&n.data_dir, "4711"));
        async move { all }
    })
    .await;
    let (status, got) = get(&client, &urls[2], "4711").await;
    assert_eq!(status, 200);
    assert!(got == body, "other bytes through node 3");
    // The copies went through the peers' Blobs service.
    let mut received = 0.0;
    for url in &urls[1..] {
        received += metric_sum(
            &metrics_page(url).await,
            "nxcache_grpc_server_calls_total",
            &[r#"method="Blobs/Put""#],
        );
    }
    assert!(received >= 2.0, "Blobs/Put calls served: {received}");
}

/// A channel to `addr`; over TLS with `tls`, in plain text without.
async fn channel(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// The outcome of one call of each service, made with the cluster secret: `Ok` when a
/// gRPC answer came back (whatever its status), `Err` with the transport error otherwise.
async fn call_each_service(channel: Channel) -> Vec<(&'static str, Result<(), String>)> {
    let secret = ClusterSecret::new(CLUSTER_SECRET).unwrap();
    let answered = |result: Result<(), tonic::Status>| match result {
        Ok(()) => Ok(()),
        // Codes a service or its secret check answers with: the call got through TLS.
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::PermissionDenied
            ) =>
        {
            Ok(())
        }
        Err(status) => Err(format!("{status:?}")),
    };
    let mut raft = RaftClient::with_interceptor(channel.clone(), secret.client_interceptor());
    let mut membership =
        MembershipClient::with_interceptor(channel.clone(), secret.client_interceptor());
    let mut blobs = BlobsClient::with_interceptor(channel, secret.client_interceptor());
    let vote = bounded(raft.vote(nxcache_rpc::pb::RaftMessage {
        payload: b"not a vote".to_vec(),
    }))
    .await;
    let remove = bounded(membership.remove(nxcache_rpc::pb::RemoveRequest { id: 999 })).await;
    let head = bounded(blobs.head(nxcache_rpc::pb::HeadRequest { key: "1".into() })).await;
    vec![
        ("Raft/Vote", answered(vote)),
        ("Membership/Remove", answered(remove)),
        ("Blobs/Head", answered(head)),
    ]
}

/// `call`, failed with DEADLINE_EXCEEDED when it takes longer than 15 s.
async fn bounded<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<(), tonic::Status> {
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(answer) => answer.map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 15 s")),
    }
}

async fn served_calls(url: &str, method: &str) -> f64 {
    metric_sum(
        &metrics_page(url).await,
        "nxcache_grpc_server_calls_total",
        &[&format!(r#"method="{method}""#)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_certificate_of_the_cluster_ca_are_refused_at_the_tls_level() {
    let pki = Pki::make();
    // One node: nothing else calls its services, so every call it serves is ours.
    let cluster = ProcessCluster::start_with(1, &as_refs(&pki.flags("node")));
    let url = cluster.nodes[0].url.clone();
    let addr = format!("127.0.0.1:{}", cluster.grpc_ports[0]);
    wait_until(PATIENCE, "the node leads itself", || {
        let url = url.clone();
        async move { admin_status(&url).is_some_and(|s| settled(&s, 1)) }
    })
    .await;
    let ca = Certificate::from_pem(std::fs::read(pki.path("ca.pem")).unwrap());
    let strangers = [
        // Trusts the node's certificate but presents none.
        (
            "no client certificate",
            Some(ClientTlsConfig::new().ca_certificate(ca)),
        ),
        // Presents a certificate for the right address, signed by another CA.
        (
            "a certificate of another CA",
            Some(pki.peer_tls("stranger").client_config()),
        ),
        ("plain text", None),
    ];
    for (who, tls) in strangers {
        // Refused while connecting (nothing can be called), or when the first call is
        // sent: with TLS 1.3 the node checks the client's certificate after the client
        // considers the handshake done, so the client sees the connection closed.
        let Ok(channel) = channel(&addr, tls).await else {
            continue;
        };
        for (method, outcome) in call_each_service(channel).await {
            assert!(
                outcome.is_err(),
                "{who}: {method} got through to the node's service"
            );
        }
    }
    // A member's certificate gets each call to its service (which answers it), the
    // same calls that were refused above. Each service then counts exactly one served
    // call, the member's: none of the strangers' calls reached a service (they carried
    // the right cluster secret, so only the transport can have turned them away).
    let member = channel(&addr, Some(pki.peer_tls("node").client_config()))
        .await
        .expect("a member connects");
    for (method, outcome) in call_each_service(member).await {
        assert!(
            outcome.is_ok(),
            "{method} refused a member: {}",
            outcome.unwrap_err()
        );
        assert_eq!(
            served_calls(&url, method).await,
            1.0,
            "{method}: calls served, the member's and any stranger's"
        );
    }

    // A real node with the cluster secret but a certificate of another CA never joins.
    let dir = tempfile::tempdir().unwrap();
    let grpc = format!("127.0.0.1:{}", nxcache_tests::free_port());
    let mut args: Vec<String> = [
        "--node-id",
        "9",
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        &grpc,
        "--advertise",
        &grpc,
        "--join",
        &addr,
    ]
    .map(String::from)
    .to_vec();
    args.extend(pki.flags("stranger"));
    let intruder = NodeProcess::start(
        &dir.path().join("intruder"),
        &as_refs(&args),
        &[("NXCACHE_CLUSTER_SECRET", CLUSTER_SECRET)],
    );
    // A negative: watched over a window in which the intruder retries its join many
    // times; the member list never grows and the intruder never becomes ready.
    let client = http_client();
    let watch_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < watch_until {
        let status = admin_status(&url).expect("the member answers");
        assert_eq!(
            status["members"].as_array().map(Vec::len),
            Some(1),
            "{status}"
        );
        let ready = client
            .get(format!("{}/readyz", intruder.url))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503, "the intruder became ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(served_calls(&url, "Membership/Join").await, 0.0);
}
