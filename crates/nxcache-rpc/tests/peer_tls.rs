//! Mutual TLS at the gRPC level ([`PeerTls`]): a server configured with
//! `PeerTls::server_config` answers only clients presenting a certificate signed by the
//! cluster CA; one presenting no certificate, one signed by another CA, and one in plain
//! text get no call through to the service. And a client with `PeerTls::client_config`
//! refuses a server whose certificate another CA signed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nxcache_rpc::PeerTls;
use nxcache_rpc::pb::raft_client::RaftClient;
use nxcache_rpc::pb::raft_server::{Raft, RaftServer};
use nxcache_rpc::pb::{RaftMessage, SnapshotChunk};
use nxcache_testkit::pki::TestPki;
use tonic::transport::{Certificate, ClientTlsConfig, Server};
use tonic::{Request, Response, Status};

/// A Raft service that only counts the calls that reach it.
#[derive(Clone, Default)]
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn served(&self) -> Result<Response<RaftMessage>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(RaftMessage {
            payload: b"served".to_vec(),
        }))
    }
}

#[tonic::async_trait]
impl Raft for Counted {
    async fn append_entries(
        &self,
        _: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.served()
    }
    async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.served()
    }
    async fn install_snapshot(
        &self,
        _: Request<SnapshotChunk>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.served()
    }
}

fn peer_tls(pki: &TestPki, leaf: &str) -> PeerTls {
    let [cert, key, ca] = pki.node_files(leaf);
    PeerTls::load(&cert, &key, &ca).unwrap()
}

/// Serves [`Counted`] over TLS with `tls`'s server configuration on a loopback port;
/// returns the address.
async fn serve(tls: &PeerTls, service: Counted) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = Server::builder()
        .tls_config(tls.server_config())
        .unwrap()
        .add_service(RaftServer::new(service))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// One Vote call to `addr` (over TLS with `tls`, in plain text without): the payload
/// answered, or why no answer came (a connection or gRPC error).
async fn vote(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Vec<u8>, String> {
    let call = async {
        let channel = nxcache_rpc::channel(addr, tls.as_ref()).map_err(|e| format!("{e:?}"))?;
        RaftClient::new(channel)
            .vote(RaftMessage {
                payload: b"vote".to_vec(),
            })
            .await
            .map(|r| r.into_inner().payload)
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 20 s".into()))
}

#[tokio::test]
async fn only_clients_with_a_certificate_of_the_cluster_ca_get_a_call_through() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::make(dir.path());
    let service = Counted::default();
    let addr = serve(&peer_tls(&pki, "node"), service.clone()).await;

    let ca = Certificate::from_pem(pki.read("ca.pem"));
    let strangers = [
        // Trusts the server's certificate but presents none.
        (
            "no client certificate",
            Some(ClientTlsConfig::new().ca_certificate(ca)),
        ),
        // Presents a certificate for the right address, signed by another CA.
        (
            "a certificate of another CA",
            Some(peer_tls(&pki, "stranger").client_config()),
        ),
        // No TLS: the server finds no handshake and drops the connection.
        ("plain text", None),
    ];
    for (who, tls) in strangers {
        let outcome = vote(&addr, tls).await;
        assert!(outcome.is_err(), "{who}: the call got through: {outcome:?}");
        assert_eq!(
            service.0.load(Ordering::SeqCst),
            0,
            "{who}: the service was reached"
        );
        eprintln!("{who}: refused ({})", outcome.unwrap_err());
    }

    // A member's certificate gets the same call through, to the service.
    let member = vote(&addr, Some(peer_tls(&pki, "node").client_config())).await;
    assert_eq!(member.as_deref(), Ok(&b"served"[..]), "a member's call");
    assert_eq!(service.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_member_refuses_a_server_whose_certificate_another_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::make(dir.path());
    // An impostor server: a certificate for the right address, signed by another CA (it
    // would accept the member's certificate: it trusts the cluster CA).
    let service = Counted::default();
    let addr = serve(&peer_tls(&pki, "stranger"), service.clone()).await;
    let outcome = vote(&addr, Some(peer_tls(&pki, "node").client_config())).await;
    assert!(outcome.is_err(), "a member called an impostor: {outcome:?}");
    assert_eq!(
        service.0.load(Ordering::SeqCst),
        0,
        "the impostor was called"
    );
}
