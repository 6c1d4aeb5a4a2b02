//! A peer connection whose packets start vanishing (a partition, a peer that moved to
//! another address) is dropped by the HTTP/2 keepalive, and calls get through again on
//! a fresh connection, instead of timing out until TCP gives up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nxcache_rpc::pb::raft_client::RaftClient;
use nxcache_rpc::pb::raft_server::{Raft, RaftServer};
use nxcache_rpc::pb::{RaftMessage, SnapshotChunk};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};

struct Echo;

#[tonic::async_trait]
impl Raft for Echo {
    async fn append_entries(
        &self,
        r: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        Ok(Response::new(r.into_inner()))
    }
    async fn vote(&self, r: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        Ok(Response::new(r.into_inner()))
    }
    async fn install_snapshot(
        &self,
        r: Request<SnapshotChunk>,
    ) -> Result<Response<RaftMessage>, Status> {
        Ok(Response::new(RaftMessage {
            payload: r.into_inner().data,
        }))
    }
}

/// Forwards bytes one way until `frozen`; from then on swallows them and holds the
/// sockets open, like a network that silently drops packets.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if frozen.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_connection_that_goes_silent_is_replaced() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(server)),
    );

    // The proxy freezes the first connection on request; later ones pass.
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let freeze_first = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let (freeze_first, accepted) = (freeze_first.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = proxy.accept().await.unwrap();
                let n = accepted.fetch_add(1, Ordering::SeqCst);
                let frozen = if n == 0 {
                    freeze_first.clone()
                } else {
                    Arc::new(AtomicBool::new(false))
                };
                let upstream = TcpStream::connect(server_addr).await.unwrap();
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(pipe(cr, uw, frozen.clone()));
                tokio::spawn(pipe(ur, cw, frozen));
            }
        });
    }

    let channel = nxcache_rpc::channel(&proxy_addr.to_string(), None).unwrap();
    let client = RaftClient::new(channel);
    let call = |mut client: RaftClient<tonic::transport::Channel>| async move {
        let message = RaftMessage {
            payload: b"hello".to_vec(),
        };
        // Bounded: a call on the frozen connection must not hang the test. Far above a
        // normal call (milliseconds); a call cut by the keepalive fails sooner.
        tokio::time::timeout(Duration::from_secs(60), client.vote(message)).await
    };
    assert!(matches!(call(client.clone()).await, Ok(Ok(_))));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Without the keepalive the silent connection is kept (TCP gives up only after many
    // minutes) and every call on it fails: the deadline, far above the keepalive's ~10 s,
    // is reached. How soon it is replaced is not this test's business.
    freeze_first.store(true, Ordering::SeqCst);
    let answer = nxcache_testkit::wait_for(
        nxcache_testkit::PATIENCE,
        "a call answered over a new connection after the first went silent",
        || async { call(client.clone()).await.ok().and_then(Result::ok) },
    )
    .await;
    assert_eq!(answer.into_inner().payload, b"hello");
    assert!(accepted.load(Ordering::SeqCst) >= 2);
}
