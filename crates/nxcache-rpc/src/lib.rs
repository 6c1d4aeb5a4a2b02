//! Inter-node gRPC of an nxcache cluster: the services generated from
//! `proto/nxcache/cluster/v1/cluster.proto`, and the cluster secret that every call carries.

use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
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
/// Metadata entry that carries the id of the caller's cluster (absent while the caller
/// belongs to none).
pub const CLUSTER_ID_HEADER: &str = "x-nxcache-cluster-id";
/// Metadata entry of a Raft call: the incarnation (the identity of the data dir) that the
/// caller's membership records for the callee. A node whose disk was replaced has another
/// incarnation and refuses calls addressed to the old one.
pub const TARGET_INCARNATION_HEADER: &str = "x-nxcache-target-incarnation";

/// The id of the cluster this node belongs to, once it has one: fixed when a node founds
/// the cluster or is admitted to it. Every clone shares one value, so the checks made by
/// every client and server of a node (Raft, membership, blobs) see it as soon as it is set.
#[derive(Clone, Default)]
pub struct ClusterId(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl ClusterId {
    /// The id, when this node belongs to a cluster.
    pub fn get(&self) -> Option<String> {
        self.value()
            .and_then(|v| v.to_str().ok().map(str::to_owned))
    }

    fn value(&self) -> Option<MetadataValue<Ascii>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the id: 1 to 64 characters from `0-9 a-z A-Z -`.
    pub fn set(&self, id: &str) -> Result<(), String> {
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("{id:?} is not a cluster id"));
        }
        let value = MetadataValue::try_from(id).map_err(|e| e.to_string())?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// Forgets the id (a node without cluster state belongs to no cluster).
    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl std::fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterId({:?})", self.get())
    }
}

/// What a node presents to its peers and requires of them: the shared secret of the
/// cluster's nodes and, once known, the cluster's id. Clones share the id.
#[derive(Clone)]
pub struct ClusterSecret {
    secret: Arc<str>,
    cluster: ClusterId,
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.len() < 16 {
            return Err(
                "the cluster secret (NXCACHE_CLUSTER_SECRET) must be at least 16 characters".into(),
            );
        }
        if MetadataValue::<Ascii>::try_from(secret).is_err() {
            return Err("the cluster secret must be printable ASCII".into());
        }
        Ok(ClusterSecret {
            secret: secret.into(),
            cluster: ClusterId::default(),
        })
    }

    /// The id of the cluster this node belongs to, shared by all of its checks.
    pub fn cluster_id(&self) -> &ClusterId {
        &self.cluster
    }

    fn matches(&self, presented: &[u8]) -> bool {
        // Lengths are not secret; the comparison of equal-length values is constant-time.
        presented.len() == self.secret.len() && bool::from(presented.ct_eq(self.secret.as_bytes()))
    }

    /// Interceptor for clients: adds the secret and the cluster id to every call.
    pub fn client_interceptor(&self) -> ClientSecret {
        ClientSecret {
            secret: MetadataValue::try_from(&*self.secret)
                .expect("validated as ASCII in ClusterSecret::new"),
            cluster: self.cluster.clone(),
        }
    }

    /// Interceptor for servers: refuses calls without the right secret, and calls from
    /// another cluster (or from no cluster, once this node has one), calling `on_reject`
    /// (metrics, audit log) for each.
    pub fn server_interceptor(&self, on_reject: Arc<RejectHook>) -> ServerSecret {
        ServerSecret {
            secret: self.clone(),
            on_reject,
            admits_newcomers: false,
        }
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

#[derive(Clone)]
pub struct ClientSecret {
    secret: MetadataValue<Ascii>,
    cluster: ClusterId,
}

impl Interceptor for ClientSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(SECRET_HEADER, self.secret.clone());
        if let Some(id) = self.cluster.value() {
            request.metadata_mut().insert(CLUSTER_ID_HEADER, id);
        }
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
    admits_newcomers: bool,
}

impl ServerSecret {
    /// The same check for the service through which nodes that belong to no cluster yet
    /// ask to be admitted (membership: ping, join): a call without a cluster id passes;
    /// one from another cluster is still refused.
    pub fn admitting_newcomers(mut self) -> Self {
        self.admits_newcomers = true;
        self
    }
}

/// Called for each refused call with the reason (`missing`, `wrong`: the secret;
/// `other_cluster`, `no_cluster_id`: the cluster id; or a reason of the service itself)
/// and the caller's address when known.
pub type RejectHook = dyn Fn(&'static str, Option<std::net::SocketAddr>) + Send + Sync;

impl Interceptor for ServerSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let peer = request.remote_addr();
        let reject = |reason: &'static str, status: Status| {
            (self.on_reject)(reason, peer);
            Err(status)
        };
        match request.metadata().get(SECRET_HEADER) {
            None => {
                return reject(
                    "missing",
                    Status::unauthenticated(
                        "no cluster secret: set NXCACHE_CLUSTER_SECRET to the same value on every node",
                    ),
                );
            }
            Some(v) if !self.secret.matches(v.as_bytes()) => {
                return reject(
                    "wrong",
                    Status::unauthenticated(
                        "wrong cluster secret: every node needs the same NXCACHE_CLUSTER_SECRET",
                    ),
                );
            }
            Some(_) => {}
        }
        let Some(ours) = self.secret.cluster.value() else {
            // This node belongs to no cluster yet: nothing to compare.
            return Ok(request);
        };
        match request.metadata().get(CLUSTER_ID_HEADER) {
            Some(theirs) if theirs != ours => reject(
                "other_cluster",
                Status::permission_denied(format!(
                    "this call comes from cluster {} but this node belongs to cluster {}: a node \
                     of another cluster (or one that founded a cluster of its own) uses this \
                     cluster's secret and addresses",
                    theirs.to_str().unwrap_or("?"),
                    ours.to_str().unwrap_or("?"),
                )),
            ),
            None if !self.admits_newcomers => reject(
                "no_cluster_id",
                Status::permission_denied(format!(
                    "this call carries no cluster id and this node belongs to cluster {}: the \
                     caller has not been admitted to the cluster",
                    ours.to_str().unwrap_or("?"),
                )),
            ),
            _ => Ok(request),
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

    #[test]
    fn calls_from_another_cluster_or_from_none_are_refused_once_a_cluster_id_is_set() {
        let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reasons.clone();
        let ours = ClusterSecret::new("0123456789abcdef-secret").unwrap();
        let hook: Arc<RejectHook> = Arc::new(move |reason, _| seen.lock().unwrap().push(reason));
        let mut strict = ours.server_interceptor(hook.clone());
        let mut membership = ours.server_interceptor(hook).admitting_newcomers();
        let newcomer = ClusterSecret::new("0123456789abcdef-secret").unwrap();
        let other = ClusterSecret::new("0123456789abcdef-secret").unwrap();
        other.cluster_id().set("other-cluster").unwrap();
        let call = |s: &ClusterSecret| s.client_interceptor().call(Request::new(())).unwrap();

        // A node without a cluster checks only the secret.
        assert!(strict.call(call(&other)).is_ok());
        assert!(strict.call(call(&newcomer)).is_ok());

        // Once it has one (the clone in the interceptor sees it), callers must share it.
        ours.cluster_id().set("c0ffee-1").unwrap();
        let same = ClusterSecret::new("0123456789abcdef-secret").unwrap();
        same.cluster_id().set("c0ffee-1").unwrap();
        assert!(strict.call(call(&same)).is_ok());
        let err = strict.call(call(&other)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("other-cluster"), "{}", err.message());
        assert!(strict.call(call(&newcomer)).is_err());
        // Membership lets a node without a cluster ask in, never another cluster's node.
        assert!(membership.call(call(&newcomer)).is_ok());
        assert!(membership.call(call(&other)).is_err());
        assert_eq!(
            *reasons.lock().unwrap(),
            ["other_cluster", "no_cluster_id", "other_cluster"]
        );
        assert!(ClusterId::default().set("bad id").is_err());
        assert!(ClusterId::default().set("").is_err());
    }
}
