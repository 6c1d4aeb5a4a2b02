//! The node's own gRPC handlers, fed decoded messages: one node (a lone cluster) serves
//! the Raft, Membership and Blobs services on one gRPC server, as `nxcache serve` does
//! (cluster-secret check included), and each input becomes one call of one method with
//! the caller's right secret. Whatever a peer sends, a handler answers (any status) and
//! the node keeps answering: a panic, a hang or a node that stops serving is a finding.
//!
//! Input: the first byte picks the method, the rest is its request message (protobuf;
//! for Raft, the JSON payload carried in it). For `Blobs/Put`, the rest is a sequence of
//! chunks, each one length byte and that many bytes of a `PutChunk`. Join, Remove and
//! ForwardWrite are left out: they change the cluster's membership and settings, after
//! which later inputs would test another node.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nxcache_meta::{Faults, Formation, MemberNode, MetaConfig, MetaNode, RaftTiming};
use nxcache_replication::{BlobService, ClusterView, FixedTopology};
use nxcache_rpc::pb::blobs_client::BlobsClient;
use nxcache_rpc::pb::blobs_server::BlobsServer;
use nxcache_rpc::pb::membership_client::MembershipClient;
use nxcache_rpc::pb::raft_client::RaftClient;
use nxcache_rpc::{ClientSecret, ClusterSecret, pb};
use nxcache_store::{BlobStore, StoreConfig};
use prost::Message;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

const SECRET: &str = "fuzz-cluster-secret-0123456789";
/// Longer than any handler may take on a lone node; past it the call is a hang.
const CALL_LIMIT: Duration = Duration::from_secs(20);

/// A channel whose calls carry the cluster secret.
type Secured = InterceptedService<Channel, ClientSecret>;

struct Node {
    runtime: tokio::runtime::Runtime,
    raft: RaftClient<Secured>,
    membership: MembershipClient<Secured>,
    blobs: BlobsClient<Secured>,
    _meta: MetaNode,
}

/// The node, started on first use with its data in a fresh temporary directory.
fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("nxcache-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (meta, addr) = runtime.block_on(async {
            let registry = prometheus::Registry::new();
            let store = BlobStore::open(
                StoreConfig {
                    data_dir: dir.clone(),
                    max_bytes: 64 << 20,
                    ttl: None,
                    fsync: false,
                },
                &registry,
            )
            .unwrap();
            let blobs = BlobService::new(
                store,
                Arc::new(FixedTopology(Arc::new(ClusterView::lone(1)))),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let meta = MetaNode::start(
                MetaConfig {
                    node_id: 1,
                    data_dir: dir.clone(),
                    advertise: MemberNode {
                        grpc_addr: addr.clone(),
                        http_addr: "http://127.0.0.1:1".into(),
                        ..MemberNode::default()
                    },
                    secret: ClusterSecret::new(SECRET).unwrap(),
                    tls: None,
                    formation: Formation::Found,
                    join: Vec::new(),
                    seed_tokens: Default::default(),
                    prune_env_tokens: false,
                    timing: RaftTiming::default(),
                    faults: Faults::default(),
                    peer_services: Some(Box::new(move |routes, secret_check| {
                        routes.add_service(BlobsServer::with_interceptor(blobs, secret_check))
                    })),
                },
                listener,
                &registry,
            )
            .await
            .unwrap();
            assert!(
                meta.wait_ready(Duration::from_secs(30)).await,
                "the fuzzed node did not become ready"
            );
            (meta, addr)
        });
        let secret = ClusterSecret::new(SECRET).unwrap();
        // The node's own cluster id: calls from a member of its cluster.
        secret
            .cluster_id()
            .set(&meta.cluster_id().expect("a founded cluster has an id"))
            .unwrap();
        let channel = {
            let _entered = runtime.enter();
            nxcache_rpc::channel(&addr, None).unwrap()
        };
        Node {
            raft: RaftClient::with_interceptor(channel.clone(), secret.client_interceptor()),
            membership: MembershipClient::with_interceptor(
                channel.clone(),
                secret.client_interceptor(),
            ),
            blobs: BlobsClient::with_interceptor(channel, secret.client_interceptor()),
            runtime,
            _meta: meta,
        }
    })
}

/// `Blobs/Put`'s chunks: each one length byte, then that many bytes; stops at the first
/// piece that is not a `PutChunk`.
fn put_chunks(mut rest: &[u8]) -> Vec<pb::PutChunk> {
    let mut chunks = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let (piece, after) = tail.split_at(usize::from(len).min(tail.len()));
        let Ok(chunk) = pb::PutChunk::decode(piece) else {
            break;
        };
        chunks.push(chunk);
        rest = after;
    }
    chunks
}

/// One call: `Ok` with whatever status the handler answered; `Err` when the transport
/// failed (the node stopped serving).
async fn call(node: &Node, method: u8, body: &[u8]) -> Result<(), tonic::Status> {
    let (mut raft, mut membership, mut blobs) = (
        node.raft.clone(),
        node.membership.clone(),
        node.blobs.clone(),
    );
    let raft_message = || pb::RaftMessage {
        payload: body.to_vec(),
    };
    let answer = match method % 10 {
        0 => raft.vote(raft_message()).await.map(drop),
        1 => raft.append_entries(raft_message()).await.map(drop),
        2 => match pb::SnapshotChunk::decode(body) {
            Ok(chunk) => raft.install_snapshot(chunk).await.map(drop),
            Err(_) => return Ok(()),
        },
        3 => membership.ping(pb::PingRequest {}).await.map(drop),
        4 => {
            let chunks = put_chunks(body);
            blobs.put(tokio_stream::iter(chunks)).await.map(drop)
        }
        5 => match pb::GetRequest::decode(body) {
            Ok(request) => match blobs.get(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    // Read to the end: the handler's stream is part of the handler.
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break Ok(()),
                            Err(status) => break Err(status),
                        }
                    }
                }
                Err(status) => Err(status),
            },
            Err(_) => return Ok(()),
        },
        6 => match pb::HeadRequest::decode(body) {
            Ok(request) => blobs.head(request).await.map(drop),
            Err(_) => return Ok(()),
        },
        7 => match pb::DeleteRequest::decode(body) {
            Ok(request) => blobs.delete(request).await.map(drop),
            Err(_) => return Ok(()),
        },
        8 => match pb::TouchRequest::decode(body) {
            Ok(request) => blobs.touch(request).await.map(drop),
            Err(_) => return Ok(()),
        },
        _ => match (method / 10) % 2 {
            0 => match pb::RangeDigestsRequest::decode(body) {
                Ok(request) => blobs.range_digests(request).await.map(drop),
                Err(_) => return Ok(()),
            },
            _ => match pb::RangeKeysRequest::decode(body) {
                Ok(request) => blobs.range_keys(request).await.map(drop),
                Err(_) => return Ok(()),
            },
        },
    };
    match answer {
        // A status from the transport, not from a handler: the node stopped answering.
        Err(status)
            if status.code() == tonic::Code::Unavailable
                || (status.code() == tonic::Code::Unknown
                    && status.message().contains("transport")) =>
        {
            Err(status)
        }
        _ => Ok(()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    let node = node();
    let outcome = node
        .runtime
        .block_on(async { tokio::time::timeout(CALL_LIMIT, call(node, method, body)).await });
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(status)) => panic!("the node stopped answering after method {method}: {status:?}"),
        Err(_) => panic!("method {method} got no answer within {CALL_LIMIT:?}: a hang"),
    }
});
