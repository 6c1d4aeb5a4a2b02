//! One member of the metadata cluster: its Raft instance, gRPC server and the local view
//! of the applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nxcache_auth::{Authenticator, Digest, Principal, Scope, TokenSet};
use nxcache_rpc::pb::PingRequest;
use nxcache_rpc::pb::membership_client::MembershipClient;
use nxcache_rpc::pb::membership_server::MembershipServer;
use nxcache_rpc::pb::raft_server::RaftServer;
use nxcache_rpc::{
    ClusterSecret, GrpcClientMetrics, GrpcServerLayer, GrpcServerMetrics, PeerTls, RejectHook,
    ServerSecret,
};
use openraft::SnapshotPolicy;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;

use crate::bootstrap::Formation;
use crate::log_store::SledLogStore;
use crate::metrics::MetaMetrics;
use crate::network::{Faults, GrpcNetworkFactory, channel};
use crate::service::{MembershipService, RaftService};
use crate::state_machine::{AppliedState, SharedState, SledStateMachine};
use crate::types::{ClusterSettings, MemberNode, MemberState, NodeId, Raft, TokenRecord};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no Raft leader is known yet; retry in a moment")]
    NoLeader,
    #[error("the Raft leader could not be reached: {0}")]
    Unreachable(String),
    #[error("the metadata store failed: {0}")]
    Storage(String),
    #[error("Raft refused: {0}")]
    Raft(String),
    #[error("node {0} is not a member of the cluster")]
    NotAMember(NodeId),
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    /// The cluster cannot do it now (no quorum in time, another change in progress, the
    /// leader's own refusal); the message says why and what to do.
    #[error("{0}")]
    Unavailable(String),
}

impl From<MetaError> for tonic::Status {
    fn from(err: MetaError) -> Self {
        match err {
            MetaError::NoLeader | MetaError::Unreachable(_) | MetaError::Unavailable(_) => {
                tonic::Status::unavailable(err.to_string())
            }
            MetaError::Storage(_) | MetaError::Raft(_) => tonic::Status::internal(err.to_string()),
            MetaError::NotAMember(_) => tonic::Status::not_found(err.to_string()),
            MetaError::Config(_) => tonic::Status::failed_precondition(err.to_string()),
        }
    }
}

/// Raft timing; the defaults suit a LAN, tests shorten them.
#[derive(Debug, Clone)]
pub struct RaftTiming {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Build a snapshot (and purge the log) after this many entries.
    pub snapshot_after_entries: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat: Duration::from_millis(250),
            election_min: Duration::from_millis(1000),
            election_max: Duration::from_millis(2000),
            snapshot_after_entries: 1000,
        }
    }
}

pub struct MetaConfig {
    pub node_id: NodeId,
    /// The metadata database goes to `<data_dir>/meta`.
    pub data_dir: PathBuf,
    /// How peers and clients reach this node.
    pub advertise: MemberNode,
    pub secret: ClusterSecret,
    /// Mutual TLS between nodes (optional).
    pub tls: Option<PeerTls>,
    /// How this node becomes a member if it has no Raft state yet.
    pub formation: Formation,
    /// gRPC addresses of the seeds (members, or nodes that form the cluster together) to
    /// ask, when this node has no state.
    pub join: Vec<String>,
    /// Tokens from the environment, added to the cluster's table if their names are free.
    pub seed_tokens: BTreeMap<String, TokenRecord>,
    pub timing: RaftTiming,
    /// Test hook: links to cut. Leave empty.
    pub faults: Faults,
    /// Further gRPC services to serve beside Raft and Membership (the data plane), given
    /// the cluster-secret check to wrap them in.
    pub peer_services: Option<PeerServices>,
}

/// Adds services to the node's gRPC server; receives the check (cluster secret and id)
/// every service must be wrapped in.
pub type PeerServices = Box<dyn FnOnce(Routes, ServerSecret) -> Routes + Send>;

/// What `status` reports of one member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub grpc_addr: String,
    pub http_addr: String,
    pub zone: String,
    pub voter: bool,
    pub state: MemberState,
    /// The incarnation of its data dir as the membership records it (0: not recorded).
    pub incarnation: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    /// The cluster this node belongs to; None before it belongs to one.
    pub cluster_id: Option<String>,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub ring_epoch: u64,
    /// True while a membership change is half-way (joint configuration).
    pub changing_membership: bool,
    pub members: Vec<MemberStatus>,
}

/// A running metadata node. Cheap to clone.
#[derive(Clone)]
pub struct MetaNode {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) id: NodeId,
    /// This node's data dir incarnation.
    pub(crate) incarnation: u64,
    /// The Raft log store, for what is kept beside the vote (the cluster id).
    pub(crate) log_store: SledLogStore,
    pub(crate) raft: Raft,
    pub(crate) shared: SharedState,
    pub(crate) tokens: Arc<RwLock<TokenSet>>,
    pub(crate) secret: ClusterSecret,
    pub(crate) client_tls: Option<tonic::transport::ClientTlsConfig>,
    pub(crate) faults: Faults,
    /// Counts this node's calls to its peers (Raft here; the data plane shares it).
    pub(crate) grpc_clients: GrpcClientMetrics,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Membership changes are decided one at a time (count voters, then act).
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    /// The environment's tokens are in the applied table (or there were none).
    pub(crate) seeded: AtomicBool,
}

/// Answers token checks from the locally applied token table.
struct ReplicatedTokens(Arc<RwLock<TokenSet>>);

impl Authenticator for ReplicatedTokens {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .authenticate(secret)
    }
}

fn token_table(state: &AppliedState) -> TokenSet {
    let mut set = TokenSet::new();
    for (name, record) in &state.cluster.tokens {
        match (
            Digest::from_hex(&record.digest),
            Scope::parse(&record.scope),
        ) {
            (Some(digest), Some(scope)) => set.add_principal(
                digest,
                Principal {
                    namespace: record.namespace.clone(),
                    read_from: record.read_from.clone(),
                    ..Principal::new(name.clone(), scope)
                },
            ),
            _ => tracing::warn!(token = %name, "ignoring a token record that cannot be read"),
        }
    }
    set
}

impl MetaNode {
    /// Opens the node's Raft state, serves gRPC on `listener`, and bootstraps or joins if
    /// this node has never been part of a cluster. A node with state just resumes: a
    /// restart never creates a second cluster.
    pub async fn start(
        config: MetaConfig,
        listener: tokio::net::TcpListener,
        registry: &prometheus::Registry,
    ) -> Result<MetaNode, MetaError> {
        let storage = |e: &dyn std::fmt::Display| MetaError::Storage(e.to_string());
        let metrics = MetaMetrics::register(registry).map_err(|e| storage(&e))?;
        let meta_dir = config.data_dir.join("meta");
        // Off the runtime: the open may wait for a lock a restarted node is letting go of.
        let db = tokio::task::spawn_blocking(move || {
            // Metadata is small; sled's default 1 GiB cache would only cost memory.
            nxcache_sled::open(
                sled::Config::new().cache_capacity(8 * 1024 * 1024),
                &meta_dir,
            )
        })
        .await
        .map_err(|e| storage(&e))?
        .map_err(|e| storage(&e))?;
        let log_store = SledLogStore::open(&db).map_err(|e| storage(&e))?;
        let (has_state, incarnation, cluster_id) = {
            let store = log_store.clone();
            tokio::task::spawn_blocking(move || -> Result<_, sled::Error> {
                let has_state = store.has_state()?;
                if !has_state {
                    // No Raft state, no cluster: an id kept from an admission that never
                    // got as far as the first entry is learnt again.
                    store.set_cluster_id(None)?;
                }
                Ok((has_state, store.incarnation()?, store.cluster_id()?))
            })
            .await
            .map_err(|e| storage(&e))?
            .map_err(|e| storage(&e))?
        };
        match &cluster_id {
            Some(id) => config
                .secret
                .cluster_id()
                .set(id)
                .map_err(MetaError::Config)?,
            None => config.secret.cluster_id().clear(),
        }
        tracing::info!(
            node_id = config.node_id,
            incarnation,
            cluster_id = cluster_id.as_deref().unwrap_or("none yet"),
            "metadata store opened"
        );
        let tokens = Arc::new(RwLock::new(TokenSet::new()));
        let on_change = {
            let tokens = tokens.clone();
            Arc::new(move |state: &AppliedState| {
                *tokens.write().unwrap_or_else(|p| p.into_inner()) = token_table(state);
            })
        };
        let (state_machine, shared) =
            SledStateMachine::open(&db, on_change).map_err(|e| storage(&e))?;
        let t = &config.timing;
        let raft_config = openraft::Config {
            cluster_name: "nxcache".into(),
            heartbeat_interval: t.heartbeat.as_millis() as u64,
            election_timeout_min: t.election_min.as_millis() as u64,
            election_timeout_max: t.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_after_entries),
            max_in_snapshot_log_to_keep: t.snapshot_after_entries / 2,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetaError::Raft(e.to_string()))?;
        let grpc_clients = GrpcClientMetrics::register(registry).map_err(|e| storage(&e))?;
        let network = GrpcNetworkFactory {
            secret: config.secret.clone(),
            tls: config.tls.as_ref().map(PeerTls::client_config),
            faults: config.faults.clone(),
            metrics: metrics.clone(),
            grpc: grpc_clients.clone(),
        };
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log_store.clone(),
            state_machine,
        )
        .await
        .map_err(|e| MetaError::Raft(e.to_string()))?;
        let (stop, _) = watch::channel(false);
        let node = MetaNode {
            inner: Arc::new(Inner {
                id: config.node_id,
                incarnation,
                log_store,
                raft: raft.clone(),
                shared,
                tokens,
                secret: config.secret.clone(),
                client_tls: config.tls.as_ref().map(PeerTls::client_config),
                faults: config.faults.clone(),
                grpc_clients,
                stop,
                tasks: Mutex::new(Vec::new()),
                membership_lock: tokio::sync::Mutex::new(()),
                seeded: AtomicBool::new(config.seed_tokens.is_empty()),
            }),
        };
        let grpc_metrics = GrpcServerMetrics::register(registry).map_err(|e| storage(&e))?;
        node.spawn_server(
            listener,
            config.tls.as_ref(),
            config.peer_services,
            metrics.clone(),
            grpc_metrics,
        )?;
        node.spawn_metrics(metrics);
        node.spawn_upkeep();
        let advertise = MemberNode {
            incarnation,
            ..config.advertise
        };
        if !has_state {
            match config.formation {
                Formation::Found => node.found(&advertise).await?,
                formation => node.spawn_formation(formation, config.join, advertise),
            }
        }
        if !config.seed_tokens.is_empty() {
            node.spawn_seed(config.seed_tokens);
        }
        Ok(node)
    }

    pub(crate) fn spawn(&self, task: JoinHandle<()>) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    pub(crate) fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    fn spawn_server(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<&PeerTls>,
        peer_services: Option<PeerServices>,
        metrics: MetaMetrics,
        grpc_metrics: GrpcServerMetrics,
    ) -> Result<(), MetaError> {
        let reject: Arc<RejectHook> = Arc::new(
            move |reason: &'static str, peer: Option<std::net::SocketAddr>| {
                // In the audit trail: a misconfigured node, a node of another cluster, a
                // node back with an empty disk, or someone probing the port.
                tracing::warn!(
                    target: "audit",
                    action = "inter_node.refused",
                    reason,
                    peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                    "refused an inter-node call: {}",
                    match reason {
                        "missing" | "wrong" => "bad cluster secret",
                        "other_cluster" => "it comes from another cluster",
                        "no_cluster_id" => "the caller belongs to no cluster",
                        "incarnation" => "addressed to this node's previous data dir",
                        _ => "refused by the service",
                    }
                );
                metrics.rejected(reason);
            },
        );
        let interceptor = self.inner.secret.server_interceptor(reject.clone());
        let raft = RaftServer::with_interceptor(
            RaftService {
                raft: self.inner.raft.clone(),
                node_id: self.inner.id,
                incarnation: self.inner.incarnation,
                on_reject: reject,
            },
            interceptor.clone(),
        );
        let interceptor_for_peers = interceptor.clone();
        // Nodes without a cluster ping and ask to join through this one.
        let membership = MembershipServer::with_interceptor(
            MembershipService { node: self.clone() },
            interceptor.admitting_newcomers(),
        );
        let stopped = self.stopped();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let routes = Routes::new(raft).add_service(membership);
        let routes = match peer_services {
            Some(add) => add(routes, interceptor_for_peers),
            None => routes,
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls.server_config())
                .map_err(|e| MetaError::Config(format!("peer TLS: {e}")))?;
        }
        self.spawn(tokio::spawn(async move {
            let served = builder
                .layer(GrpcServerLayer::new(grpc_metrics))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stopped)
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "the gRPC server stopped");
            }
        }));
        Ok(())
    }

    fn spawn_metrics(&self, metrics: MetaMetrics) {
        let mut watch = self.inner.raft.metrics();
        let shared = self.inner.shared.clone();
        let stopped = self.stopped();
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            loop {
                {
                    let m = watch.borrow_and_update().clone();
                    let epoch = shared
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .cluster
                        .ring_epoch;
                    metrics.update(&m, epoch);
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    changed = watch.changed() => if changed.is_err() { return },
                }
            }
        }));
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's data dir incarnation.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The cluster this node belongs to; None before it founded or joined one.
    pub fn cluster_id(&self) -> Option<String> {
        self.inner.secret.cluster_id().get()
    }

    /// The per-peer call metrics, for the node's other gRPC clients.
    pub fn grpc_client_metrics(&self) -> GrpcClientMetrics {
        self.inner.grpc_clients.clone()
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The locally applied state (may trail the leader by a few entries).
    pub fn state(&self) -> AppliedState {
        self.inner
            .shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Token checks against the replicated table, with no network call.
    pub fn authenticator(&self) -> Arc<dyn Authenticator> {
        Arc::new(ReplicatedTokens(self.inner.tokens.clone()))
    }

    /// Ready for traffic: a leader is known and this node's bootstrap tokens are in the
    /// applied table. The error says what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        if self.leader().is_none() {
            return Err("no Raft leader is known (cluster forming, or no quorum)".into());
        }
        if !self.inner.seeded.load(Ordering::SeqCst) {
            return Err("the tokens from the environment are not applied yet".into());
        }
        Ok(())
    }

    /// Waits until [`MetaNode::readiness`] is Ok; false on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.readiness().is_err() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Which members answer a ping within half a second (this node always does).
    pub async fn reachable(&self) -> BTreeMap<NodeId, bool> {
        let members: Vec<(NodeId, String)> = {
            let m = self.inner.raft.metrics().borrow().membership_config.clone();
            m.membership()
                .nodes()
                .map(|(id, n)| (*id, n.grpc_addr.clone()))
                .collect()
        };
        let pings = members.into_iter().map(|(id, addr)| {
            let node = self.clone();
            async move {
                if id == node.inner.id {
                    return (id, true);
                }
                if node.inner.faults.is_cut(id) {
                    return (id, false);
                }
                let Ok(ch) = channel(&addr, node.inner.client_tls.as_ref()) else {
                    return (id, false);
                };
                let mut client =
                    MembershipClient::with_interceptor(ch, node.inner.secret.client_interceptor());
                let answered =
                    tokio::time::timeout(Duration::from_millis(500), client.ping(PingRequest {}))
                        .await
                        .is_ok_and(|r| r.is_ok_and(|p| p.get_ref().node_id == id));
                (id, answered)
            }
        });
        futures_util::future::join_all(pings)
            .await
            .into_iter()
            .collect()
    }

    /// What placement is computed from: the ring epoch, the settings and each member's
    /// state, without copying the token table (read on every request).
    pub fn placement_inputs(&self) -> (u64, ClusterSettings, BTreeMap<NodeId, MemberState>) {
        let shared = self.inner.shared.read().unwrap_or_else(|p| p.into_inner());
        (
            shared.cluster.ring_epoch,
            shared.cluster.settings.clone(),
            shared.cluster.member_states.clone(),
        )
    }

    pub fn status(&self) -> ClusterStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let state = self.state();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| MemberStatus {
                id: *id,
                grpc_addr: n.grpc_addr.clone(),
                http_addr: n.http_addr.clone(),
                zone: n.zone.clone(),
                voter: voters.contains(id),
                incarnation: n.incarnation,
                state: state
                    .cluster
                    .member_states
                    .get(id)
                    .copied()
                    .unwrap_or_default(),
            })
            .collect();
        ClusterStatus {
            node_id: self.inner.id,
            cluster_id: self.cluster_id(),
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            ring_epoch: state.cluster.ring_epoch,
            changing_membership: membership.get_joint_config().len() > 1,
            members,
        }
    }

    /// Stops Raft and the gRPC server; the node's data stays for a restart.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(10), self.inner.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "Raft did not shut down cleanly"),
            Err(_) => tracing::warn!("Raft did not stop within 10 s; leaving it behind"),
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        // The gRPC server drains its in-flight calls first; a peer's stream that never
        // ends (a long transfer to a stalled peer) must not hold the shutdown.
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}
