//! Blob transfer between two nodes' stores over real gRPC on 127.0.0.1.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use nxcache_replication::{BlobClient, BlobService, CHUNK_SIZE, Purpose, PutAnswer};
use nxcache_rpc::ClusterSecret;
use nxcache_rpc::pb::blobs_server::BlobsServer;
use nxcache_store::{BlobKey, BlobStore, StoreConfig, Version, checksum_of};

const SECRET: &str = "blob-test-cluster-secret";

struct Peer {
    store: BlobStore,
    addr: String,
    _dir: tempfile::TempDir,
}

/// A store of 1 GiB in `dir`, without fsync.
fn open_store(dir: &std::path::Path, registry: &prometheus::Registry) -> BlobStore {
    BlobStore::open(
        StoreConfig {
            data_dir: dir.to_path_buf(),
            max_bytes: 1 << 30,
            ttl: None,
            fsync: false,
        },
        registry,
    )
    .unwrap()
}

async fn peer() -> Peer {
    nxcache_testkit::watchdog::arm();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &prometheus::Registry::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let secret = ClusterSecret::new(SECRET).unwrap();
    let service = BlobsServer::with_interceptor(
        BlobService::new(
            store.clone(),
            Arc::new(nxcache_replication::FixedTopology(Arc::new(
                nxcache_replication::ClusterView::lone(1),
            ))),
        ),
        secret.server_interceptor(Arc::new(|_, _| {})),
    );
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Peer {
        store,
        addr,
        _dir: dir,
    }
}

fn client(addr: &str) -> BlobClient {
    BlobClient::new(
        addr,
        &ClusterSecret::new(SECRET).unwrap(),
        None,
        &nxcache_rpc::GrpcClientMetrics::unregistered(),
        2,
    )
    .unwrap()
}

fn bytes(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Sends `data` as a new write; true when the peer stored it, false when it held the key.
async fn send(
    client: &BlobClient,
    key: &str,
    data: &Bytes,
    checksum: [u8; 16],
) -> Result<bool, tonic::Status> {
    Ok(send_version(client, key, data, checksum, Version::new()).await? == PutAnswer::Stored)
}

async fn send_version(
    client: &BlobClient,
    key: &str,
    data: &Bytes,
    checksum: [u8; 16],
    version: Version,
) -> Result<PutAnswer, tonic::Status> {
    let mut upload = client
        .start_put(key, data.len() as u64, version, Purpose::Write, None)
        .await?;
    for at in (0..data.len()).step_by(CHUNK_SIZE) {
        if !upload
            .send(data.slice(at..(at + CHUNK_SIZE).min(data.len())))
            .await
        {
            break;
        }
    }
    upload.finish(checksum).await
}

#[tokio::test]
async fn a_blob_goes_to_a_peer_and_comes_back_identical() {
    let peer = peer().await;
    let c = client(&peer.addr);
    let data = bytes(3 * 1024 * 1024 + 77);
    let version = Version::new();
    assert_eq!(
        send_version(&c, "42", &data, checksum_of(&data), version)
            .await
            .unwrap(),
        PutAnswer::Stored
    );
    // Immutable: a second put is answered with the copy that holds the key.
    match send_version(&c, "42", &data, checksum_of(&data), Version::new())
        .await
        .unwrap()
    {
        PutAnswer::Held(Some(held)) => assert_eq!(held.version, version),
        other => panic!("{other:?}"),
    }

    let head = c.head("42").await.unwrap().unwrap();
    assert_eq!(
        (head.size, head.checksum, head.version),
        (data.len() as u64, checksum_of(&data), version)
    );
    assert!(c.head("43").await.unwrap().is_none());

    let (info, mut stream) = c.get("42").await.unwrap().unwrap();
    assert_eq!(info.size, data.len() as u64);
    let mut back = Vec::new();
    while let Some(chunk) = stream.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(back == data[..]);
    assert!(c.get("43").await.unwrap().is_none());

    // Small blobs come back the same way.
    let small = bytes(10);
    assert!(send(&c, "7", &small, checksum_of(&small)).await.unwrap());
    let (_, stream) = c.get("7").await.unwrap().unwrap();
    let back: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(back.concat(), small.to_vec());
}

#[tokio::test]
async fn damaged_or_cut_transfers_store_nothing() {
    let peer = peer().await;
    let c = client(&peer.addr);
    let data = bytes(600_000);
    let err = send(&c, "1", &data, checksum_of(b"other bytes"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss);
    assert!(
        peer.store
            .head(&BlobKey::parse("1").unwrap())
            .unwrap()
            .is_none()
    );

    // The sender gives up half-way.
    let mut upload = c
        .start_put("2", data.len() as u64, Version::new(), Purpose::Write, None)
        .await
        .unwrap();
    assert!(upload.send(data.slice(..100_000)).await);
    upload.abort().await;
    assert!(
        peer.store
            .head(&BlobKey::parse("2").unwrap())
            .unwrap()
            .is_none()
    );

    // More bytes than announced.
    let mut upload = c
        .start_put("4", 5, Version::new(), Purpose::Write, None)
        .await
        .unwrap();
    upload.send(bytes(10)).await;
    assert_eq!(
        upload
            .finish(checksum_of(&bytes(10)))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::DataLoss
    );
    assert!(
        peer.store
            .head(&BlobKey::parse("4").unwrap())
            .unwrap()
            .is_none()
    );
    assert_eq!(peer.store.stats().reserved_bytes, 0);

    // A key that is not one.
    let err = c.head("../etc").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_peer_without_the_cluster_secret_gets_nothing() {
    let peer = peer().await;
    let data = bytes(100);
    assert!(
        send(&client(&peer.addr), "1", &data, checksum_of(&data))
            .await
            .unwrap()
    );
    let stranger = BlobClient::new(
        &peer.addr,
        &ClusterSecret::new("some-other-secret-xx").unwrap(),
        None,
        &nxcache_rpc::GrpcClientMetrics::unregistered(),
        2,
    )
    .unwrap();
    assert_eq!(
        stranger.head("1").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert!(stranger.get("1").await.is_err());
    assert!(
        send(&stranger, "2", &data, checksum_of(&data))
            .await
            .is_err()
    );
    assert!(
        peer.store
            .head(&BlobKey::parse("2").unwrap())
            .unwrap()
            .is_none()
    );
}

/// An address that accepts TCP connections and then never answers: an owner cut off by a
/// partition that drops packets (no reset, no refusal).
async fn black_hole() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

#[tokio::test]
async fn a_write_with_its_quorum_does_not_wait_for_an_owner_that_never_answers() {
    use nxcache_placement::{Member, Ring};
    use nxcache_replication::{
        ClusterView, DataPlane, DegradedPolicy, FixedTopology, HintLog, Peers, ReplicationMetrics,
    };

    let live = peer().await;
    let silent = black_hole().await;
    let members: Vec<Member> = (1..=3)
        .map(|id| Member {
            id,
            zone: String::new(),
        })
        .collect();
    let view = ClusterView {
        me: 1,
        ring: Ring::new(1, &members, 3, 16),
        previous: None,
        addrs: [(2, live.addr.clone()), (3, silent)].into_iter().collect(),
        write_quorum: 2,
        policy: DegradedPolicy::Serve,
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let store = open_store(dir.path(), &registry);
    let hints = HintLog::temporary().unwrap();
    let plane = DataPlane::new(
        store.clone(),
        Arc::new(FixedTopology(Arc::new(view))),
        Peers::new(
            ClusterSecret::new(SECRET).unwrap(),
            None,
            nxcache_rpc::GrpcClientMetrics::unregistered(),
        ),
        hints.clone(),
        ReplicationMetrics::register(&registry).unwrap(),
    );

    let data = bytes(100_000);
    let key = BlobKey::parse("1234").unwrap();
    let mut upload = plane
        .begin_put(key.clone(), data.len() as u64)
        .await
        .unwrap();
    upload.write(data.clone()).await.unwrap();
    upload.commit().await.unwrap();

    // Two of three hold it (this node and the live one): answered after the short grace
    // while the silent owner's call was still pending (a straggler, counted), not once
    // the stall timeout had ended that call; and a hint for the silent owner. No clock
    // is read: the straggler count says which of the two happened.
    let stragglers = registry
        .gather()
        .iter()
        .find(|family| family.name() == "nxcache_replication_stragglers_total")
        .map(|family| family.get_metric()[0].get_counter().get_value());
    assert_eq!(
        stragglers,
        Some(1.0),
        "the write waited for the silent owner"
    );
    assert!(store.contains(&key).unwrap());
    assert!(live.store.contains(&key).unwrap());
    assert_eq!(hints.owners(), vec![3]);
    assert_eq!(hints.for_owner(3, None, 10).len(), 1);
}
