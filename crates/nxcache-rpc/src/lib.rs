//! Inter-node gRPC of an nxcache cluster: the services generated from
//! `proto/nxcache/cluster/v1/cluster.proto`, and the cluster secret that every call carries.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

mod client_layer;
mod server_layer;

pub use client_layer::{GrpcClientMetrics, InstrumentedChannel};
pub use server_layer::{GrpcServerLayer, GrpcServerMetrics, METHODS, method_label};

/// A channel to one peer whose calls are counted in [`GrpcClientMetrics`].
pub type PeerChannel = InstrumentedChannel<tonic::transport::Channel>;

/// Generated messages, clients and servers.
pub mod pb {
    tonic::include_proto!("nxcache.cluster.v1");
}

/// Mutual TLS between nodes: each node presents its certificate and accepts only peers
/// whose certificate the cluster CA signed. Optional; the cluster secret is checked either
/// way.
#[derive(Clone)]
pub struct PeerTls {
    identity: Identity,
    ca: Certificate,
}

impl PeerTls {
    /// From PEM files: this node's certificate chain and key, and the CA that signs every
    /// node's certificate (whose names must match the advertised host).
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Self, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        Ok(PeerTls {
            identity: Identity::from_pem(read(cert)?, read(key)?),
            ca: Certificate::from_pem(read(ca)?),
        })
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}

/// How often an idle or busy connection to a peer is pinged (HTTP/2 PING), and how long
/// the answer may take. A connection whose packets vanish (a partitioned or re-addressed
/// peer) is otherwise only noticed when TCP gives up, many minutes later: every call on
/// it would time out meanwhile. With these, it is dropped within about 10 s and the next
/// call connects afresh, resolving the peer's name again.
pub const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A gRPC channel to a peer's `grpc_addr` (host:port), connected on first use; over
/// mutual TLS when `tls` is set.
pub fn channel(
    grpc_addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{grpc_addr}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .http2_keep_alive_interval(KEEPALIVE_EVERY)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    Ok(endpoint.connect_lazy())
}

/// Metadata entry that carries the cluster secret.
pub const SECRET_HEADER: &str = "x-nxcache-cluster-secret";

/// The shared secret that nodes of one cluster present to each other.
#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

impl ClusterSecret {
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.len() < 16 {
            return Err(
                "the cluster secret (NXCACHE_CLUSTER_SECRET) must be at least 16 characters".into(),
            );
        }
        if MetadataValue::<tonic::metadata::Ascii>::try_from(secret).is_err() {
            return Err("the cluster secret must be printable ASCII".into());
        }
        Ok(ClusterSecret(secret.into()))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        // Lengths are not secret; the comparison of equal-length values is constant-time.
        presented.len() == self.0.len() && bool::from(presented.ct_eq(self.0.as_bytes()))
    }

    /// Interceptor for clients: adds the secret to every call.
    pub fn client_interceptor(&self) -> ClientSecret {
        ClientSecret(
            MetadataValue::try_from(&*self.0).expect("validated as ASCII in ClusterSecret::new"),
        )
    }

    /// Interceptor for servers: refuses calls without the right secret, calling
    /// `on_reject` (metrics, audit log) for each.
    pub fn server_interceptor(&self, on_reject: Arc<RejectHook>) -> ServerSecret {
        ServerSecret {
            secret: self.clone(),
            on_reject,
        }
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

#[derive(Clone)]
pub struct ClientSecret(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for ClientSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(SECRET_HEADER, self.0.clone());
        // The caller's span becomes the parent of the peer's: one trace across nodes.
        let mut trace = http::HeaderMap::new();
        nxcache_telemetry::inject_trace(&tracing::Span::current(), &mut trace);
        for (name, value) in &trace {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
                value.to_str().map(MetadataValue::try_from),
            ) && let Ok(value) = value
            {
                request.metadata_mut().insert(key, value);
            }
        }
        Ok(request)
    }
}

#[derive(Clone)]
pub struct ServerSecret {
    secret: ClusterSecret,
    on_reject: Arc<RejectHook>,
}

/// Called for each refused call with the reason (`missing`, `wrong`) and the caller's
/// address when known.
pub type RejectHook = dyn Fn(&'static str, Option<std::net::SocketAddr>) + Send + Sync;

impl Interceptor for ServerSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let peer = request.remote_addr();
        match request.metadata().get(SECRET_HEADER) {
            None => {
                (self.on_reject)("missing", peer);
                Err(Status::unauthenticated(
                    "no cluster secret: set NXCACHE_CLUSTER_SECRET to the same value on every node",
                ))
            }
            Some(v) if !self.secret.matches(v.as_bytes()) => {
                (self.on_reject)("wrong", peer);
                Err(Status::unauthenticated(
                    "wrong cluster secret: every node needs the same NXCACHE_CLUSTER_SECRET",
                ))
            }
            Some(_) => Ok(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn secrets_are_checked() {
        assert!(ClusterSecret::new("short").is_err());
        let secret = ClusterSecret::new("0123456789abcdef-secret").unwrap();
        let rejected = Arc::new(AtomicUsize::new(0));
        let counter = rejected.clone();
        let mut server = secret.server_interceptor(Arc::new(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let signed = secret.client_interceptor().call(Request::new(())).unwrap();
        assert!(server.call(signed).is_ok());
        assert_eq!(
            server.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let other = ClusterSecret::new("another-secret-of-16").unwrap();
        let forged = other.client_interceptor().call(Request::new(())).unwrap();
        assert!(server.call(forged).is_err());
        assert_eq!(rejected.load(Ordering::SeqCst), 2);
        assert!(!format!("{secret:?}").contains("0123"));
    }
}
