//! One member of the metadata cluster: its Raft instance, gRPC server and the local view
//! of the applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nxcache_auth::Authenticator;
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
use tonic::service::interceptor::InterceptedService;

use crate::bootstrap::Formation;
use crate::log_store::SledLogStore;
use crate::metrics::MetaMetrics;
use crate::network::{
    Faults, GrpcNetworkFactory, MAX_MESSAGE_BYTES, SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNK_TIMEOUT,
    channel,
};
use crate::service::{MembershipService, RaftService};
use crate::state_machine::{AppliedState, SledStateMachine, StateStore};
use crate::types::{ClusterSettings, MemberNode, MemberState, NodeId, Raft, RingSpec, TokenRecord};

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
    #[error("the change is {0} bytes; a metadata change may be at most {max} bytes", max = crate::network::MAX_COMMAND_BYTES)]
    TooLarge(usize),
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
            MetaError::TooLarge(_) => tonic::Status::invalid_argument(err.to_string()),
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
    /// Tokens from the environment, added to the cluster's table if their names are free
    /// and not revoked.
    pub seed_tokens: BTreeMap<String, TokenRecord>,
    /// `seed_tokens` are the environment's whole set: once they are seeded, the cluster's
    /// other environment tokens and its generated first-start token are removed
    /// ([`MetaCommand::PruneEnvTokens`]).
    pub prune_env_tokens: bool,
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
    /// How long this node has known no leader; `None` while it knows one. A node without
    /// a leader keeps serving from its own tokens and data, but changes (revocations
    /// included) reach it only once it hears from a leader again.
    pub leaderless_ms: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub ring_epoch: u64,
    /// True while a membership change is half-way (joint configuration).
    pub changing_membership: bool,
    pub members: Vec<MemberStatus>,
    /// Tokens in this node's applied table.
    pub tokens: usize,
    /// Size of this node's current metadata snapshot file.
    pub snapshot_bytes: u64,
}

/// What the data plane places artifacts by: all of it from the applied state, so every
/// node that applied the same entries places the same way.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Changes whenever anything below changes.
    pub version: u64,
    pub ring: RingSpec,
    pub previous_ring: Option<RingSpec>,
    pub settings: ClusterSettings,
    /// Every member of the applied membership and its gRPC address.
    pub addrs: Vec<(NodeId, String)>,
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
    pub(crate) store: Arc<StateStore>,
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
    /// Since when this node has known no leader (`None` while it knows one).
    pub(crate) leaderless_since: Mutex<Option<Instant>>,
    /// A leader that no quorum acknowledged for this long leads nothing.
    pub(crate) quorum_lapse: Duration,
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
        let store = {
            let (db, dir) = (db.clone(), config.data_dir.join("meta-snapshots"));
            // Blocking: reads the token table into memory.
            tokio::task::spawn_blocking(move || StateStore::open(&db, &dir))
                .await
                .map_err(|e| storage(&e))?
                .map_err(|e| storage(&e))?
        };
        let state_machine = SledStateMachine::new(store.clone());
        let t = &config.timing;
        let raft_config = openraft::Config {
            cluster_name: "nxcache".into(),
            heartbeat_interval: t.heartbeat.as_millis() as u64,
            election_timeout_min: t.election_min.as_millis() as u64,
            election_timeout_max: t.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_after_entries),
            max_in_snapshot_log_to_keep: t.snapshot_after_entries / 2,
            // Every message stays below MAX_MESSAGE_BYTES: snapshot chunks by size, and
            // AppendEntries split by the network when its entries would not fit.
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            max_payload_entries: 256,
            // Sending a chunk, and installing the last one (a large table takes seconds).
            install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT.as_millis() as u64,
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
        // Tokens a restarted node holds already need no leader to be seeded again (nor
        // pruned, when the cluster holds no environment token beyond them).
        let mut seeded = true;
        for (name, token) in &config.seed_tokens {
            match store.token(name).map_err(|e| storage(&e))? {
                Some(held) if held.digest != token.digest => tracing::warn!(
                    token = %name,
                    "the cluster already holds another token under this environment token's name; the cluster's is kept (revoke it to replace it)"
                ),
                Some(_) => {}
                None => seeded &= store.is_revoked(name).map_err(|e| storage(&e))?,
            }
        }
        let prune = config.prune_env_tokens.then(|| {
            config
                .seed_tokens
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        });
        if let Some(keep) = &prune {
            let held = store.tokens().map_err(|e| storage(&e))?;
            seeded &= !held
                .iter()
                .any(|(name, _)| nxcache_auth::is_env_token_name(name) && !keep.contains(name));
        }
        let node = MetaNode {
            inner: Arc::new(Inner {
                id: config.node_id,
                incarnation,
                log_store,
                raft: raft.clone(),
                store,
                secret: config.secret.clone(),
                client_tls: config.tls.as_ref().map(PeerTls::client_config),
                faults: config.faults.clone(),
                grpc_clients,
                stop,
                tasks: Mutex::new(Vec::new()),
                membership_lock: tokio::sync::Mutex::new(()),
                seeded: AtomicBool::new(seeded),
                leaderless_since: Mutex::new(Some(Instant::now())),
                quorum_lapse: config.timing.election_max,
            }),
        };
        let grpc_metrics = GrpcServerMetrics::register(registry).map_err(|e| storage(&e))?;
        let audit = nxcache_telemetry::AuditLimiter::register(registry, "inter_node")
            .map_err(|e| storage(&e))?;
        node.spawn_server(
            listener,
            config.tls.as_ref(),
            config.peer_services,
            metrics.clone(),
            audit,
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
        if !seeded {
            node.spawn_seed(config.seed_tokens, prune);
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
        audit: nxcache_telemetry::AuditLimiter,
        grpc_metrics: GrpcServerMetrics,
    ) -> Result<(), MetaError> {
        let reject: Arc<RejectHook> = Arc::new(
            move |reason: &'static str, peer: Option<std::net::SocketAddr>| {
                // In the audit trail: a misconfigured node, a node of another cluster, a
                // node back with an empty disk, or someone probing the port (rate-limited:
                // a flood of calls cannot flood the log).
                if let Some(suppressed) = audit.admit() {
                    tracing::warn!(
                        target: "audit",
                        action = "inter_node.refused",
                        reason,
                        suppressed,
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
                }
                metrics.rejected(reason);
            },
        );
        let interceptor = self.inner.secret.server_interceptor(reject.clone());
        // Raft messages (snapshot chunks, batches of entries) are bounded by the sender
        // below MAX_MESSAGE_BYTES; tonic's default limit is 4 MiB.
        let raft = InterceptedService::new(
            RaftServer::new(RaftService {
                raft: self.inner.raft.clone(),
                node_id: self.inner.id,
                incarnation: self.inner.incarnation,
                on_reject: reject,
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            interceptor.clone(),
        );
        let interceptor_for_peers = interceptor.clone();
        // Nodes without a cluster ping and ask to join through this one.
        let membership = InterceptedService::new(
            MembershipServer::new(MembershipService { node: self.clone() })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
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
        let node = self.clone();
        let stopped = self.stopped();
        self.spawn(tokio::spawn(async move {
            tokio::pin!(stopped);
            loop {
                {
                    let m = watch.borrow_and_update().clone();
                    let store = &node.inner.store;
                    let epoch = store.with_header(|h| h.cluster.ring_epoch());
                    let leader = node.effective_leader(&m);
                    metrics.update(&m, leader, epoch, store.snapshot_bytes());
                    let mut since = node
                        .inner
                        .leaderless_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    match (leader, *since) {
                        (Some(_), Some(_)) => *since = None,
                        (None, None) => *since = Some(Instant::now()),
                        _ => {}
                    }
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    changed = watch.changed() => if changed.is_err() {
                        metrics.core_down();
                        return;
                    },
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

    /// The locally applied state, without the token table (may trail the leader by a
    /// few entries).
    pub fn state(&self) -> AppliedState {
        self.inner.store.header()
    }

    /// A token of the applied table.
    pub fn token(&self, name: &str) -> Result<Option<TokenRecord>, MetaError> {
        self.inner
            .store
            .token(name)
            .map_err(|e| MetaError::Storage(e.to_string()))
    }

    /// The applied token table, by name (reads it all: for listings).
    pub fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, MetaError> {
        self.inner
            .store
            .tokens()
            .map_err(|e| MetaError::Storage(e.to_string()))
    }

    pub fn token_count(&self) -> usize {
        self.inner.store.token_count()
    }

    /// Token checks against the replicated table, with no network call.
    pub fn authenticator(&self) -> Arc<dyn Authenticator> {
        self.inner.store.clone()
    }

    /// Ready for traffic once this node holds its token table: it is a member of the
    /// membership it applied (so it applied every entry before its admission) and this
    /// node's environment tokens are in the table. A leader is not needed: a node cut off
    /// from the others still serves what it holds (a cache outage must not fail builds).
    /// The error says what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        let id = self.inner.id;
        let member = self.inner.store.with_header(|h| {
            h.last_membership
                .membership()
                .nodes()
                .any(|(n, _)| *n == id)
        });
        if !member {
            return Err(
                "this node holds no cluster state yet (joining, or the cluster is forming)".into(),
            );
        }
        if let Some(why) = self.core_failure() {
            return Err(format!(
                "the metadata log (Raft) has stopped: {why}; restart this node"
            ));
        }
        if !self.inner.seeded.load(Ordering::SeqCst) {
            return Err("the tokens from the environment are not applied yet".into());
        }
        Ok(())
    }

    /// The leader this node can count on: the one it follows, or itself while a quorum
    /// acknowledges it (an isolated leader keeps its role in openraft until it hears of a
    /// newer term, but leads nothing).
    pub(crate) fn effective_leader(
        &self,
        m: &openraft::RaftMetrics<NodeId, MemberNode>,
    ) -> Option<NodeId> {
        if m.running_state.is_err() {
            // A stopped core leads and follows nothing, whatever its last metrics say.
            return None;
        }
        match m.current_leader {
            Some(me) if me == m.id => m
                .millis_since_quorum_ack
                .filter(|ms| *ms <= self.inner.quorum_lapse.as_millis() as u64)
                .map(|_| me),
            other => other,
        }
    }

    /// How long this node has known no Raft leader; `None` while it knows one.
    pub fn leaderless_for(&self) -> Option<Duration> {
        self.inner
            .leaderless_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|since| since.elapsed())
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

    /// Changes whenever [`MetaNode::placement`] would answer differently (one atomic
    /// read: asked on every request).
    pub fn placement_version(&self) -> u64 {
        self.inner.store.placement_version()
    }

    /// What placement is built from, all of it from the applied state: members of
    /// uncommitted membership entries never appear in it.
    pub fn placement(&self) -> Placement {
        let version = self.inner.store.placement_version();
        self.inner.store.with_header(|h| Placement {
            version,
            ring: h.cluster.ring.clone(),
            previous_ring: h.cluster.previous_ring.clone(),
            settings: h.cluster.settings.clone(),
            addrs: h
                .last_membership
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.grpc_addr.clone()))
                .collect(),
        })
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
        let leader = self.effective_leader(&m);
        ClusterStatus {
            node_id: self.inner.id,
            cluster_id: self.cluster_id(),
            leader_id: leader,
            leaderless_ms: match leader {
                Some(_) => None,
                None => Some(self.leaderless_for().map_or(0, |d| d.as_millis() as u64)),
            },
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            ring_epoch: state.cluster.ring_epoch(),
            changing_membership: membership.get_joint_config().len() > 1,
            members,
            tokens: self.inner.store.token_count(),
            snapshot_bytes: self.inner.store.snapshot_bytes(),
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
