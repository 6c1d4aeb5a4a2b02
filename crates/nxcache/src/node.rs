//! One running node: its store, its HTTP listener, its background workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use std::collections::BTreeMap;

use nxcache_auth::{Digest, GENERATED_TOKEN_NAME, Scope, env_token_name, load_or_create_token};
use nxcache_meta::{
    ClusterSettings, Faults, Formation, MemberNode, MetaConfig, MetaNode, RaftTiming, TokenRecord,
};
use nxcache_rpc::{ClusterSecret, PeerTls};

use crate::cluster::now_ms;
use nxcache_config::ServeConfig;
use nxcache_http::{ApiConfig, ApiState, HttpMetrics, Readiness};
use nxcache_store::{BlobStore, StoreConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::listener::{ListenerConfig, serve};

/// How long shutdown waits for a background worker to finish what it is doing.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

/// File in the data dir holding the token made when none is configured.
const GENERATED_TOKEN_FILE: &str = "generated-token";
/// File in the data dir holding the cluster secret made when none is configured.
const GENERATED_SECRET_FILE: &str = "cluster-secret";

/// A node that is serving. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    http_addr: SocketAddr,
    scheme: &'static str,
    base_path: String,
    stop: watch::Sender<bool>,
    serving: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    store: BlobStore,
    readiness: Readiness,
    meta: MetaNode,
    data: nxcache_replication::DataPlane,
}

impl RunningNode {
    /// The node's data plane (its store, its view of placement, its workers).
    pub fn data(&self) -> &nxcache_replication::DataPlane {
        &self.data
    }

    /// The node's metadata log member.
    pub fn meta(&self) -> &MetaNode {
        &self.meta
    }

    /// The address the HTTP API listens on (the real port when 0 was asked for).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Base URL for `NX_SELF_HOSTED_REMOTE_CACHE_SERVER`.
    pub fn base_url(&self) -> String {
        let host = if self.http_addr.ip().is_unspecified() {
            format!("localhost:{}", self.http_addr.port())
        } else {
            self.http_addr.to_string()
        };
        format!("{}://{host}{}", self.scheme, self.base_path)
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the shutdown
    /// timeout), stops the workers and closes the store cleanly.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.readiness.start_draining();
        let _ = self.stop.send(true);
        let _ = self.serving.await;
        // Workers stop at their next pause; one in the middle of a copy to a peer that
        // no longer answers is cut off (a cut copy stores nothing anywhere).
        for mut worker in self.workers {
            if tokio::time::timeout(WORKER_STOP_GRACE, &mut worker)
                .await
                .is_err()
            {
                worker.abort();
            }
        }
        self.meta.shutdown().await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .context("closing the store")??;
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

/// Tokens from the configuration, to be seeded into the cluster's table, and the token
/// generated on a first start (when it was just created, to print it once). Configured
/// tokens are the environment's whole set: the cluster's other environment tokens and
/// its generated token are removed once they are seeded.
fn seed_tokens(
    config: &ServeConfig,
) -> anyhow::Result<(BTreeMap<String, TokenRecord>, Option<String>)> {
    let record = |secret: &str, scope: Scope| TokenRecord {
        namespace: String::new(),
        read_from: Vec::new(),
        digest: Digest::of(secret).to_hex(),
        scope: scope.as_str().into(),
        created_ms: now_ms(),
    };
    let mut seeds = BTreeMap::new();
    for (list, scope) in [
        (&config.read_write_tokens, Scope::ReadWrite),
        (&config.read_only_tokens, Scope::Read),
        (&config.admin_tokens, Scope::Admin),
    ] {
        for t in list {
            let name = env_token_name(scope, &Digest::of(t.expose()));
            seeds.insert(name, record(t.expose(), scope));
        }
    }
    if !seeds.is_empty() || config.cluster.formation != nxcache_config::Formation::Found {
        // A joining node with no tokens of its own uses the cluster's (and a node that
        // may found one with others cannot know whether its generated token would win).
        return Ok((seeds, None));
    }
    // Never run open: a new cluster with no token configured gets one, kept on disk.
    let path = config.data_dir.join(GENERATED_TOKEN_FILE);
    let (token, created) = load_or_create_token(&path)
        .with_context(|| format!("cannot create or read the token file {}", path.display()))?;
    seeds.insert(
        GENERATED_TOKEN_NAME.into(),
        record(&token, Scope::ReadWrite),
    );
    if created {
        Ok((seeds, Some(token)))
    } else {
        tracing::info!(
            path = %path.display(),
            "no token configured; using the read-write token generated on first start"
        );
        Ok((seeds, None))
    }
}

/// Whether tokens are configured (the environment's lists are then the cluster's set of
/// environment tokens).
fn configured_tokens(config: &ServeConfig) -> bool {
    !(config.read_write_tokens.is_empty()
        && config.read_only_tokens.is_empty()
        && config.admin_tokens.is_empty())
}

/// The configured cluster secret, or (for a node that starts a cluster alone) one
/// generated on first start and kept in the data dir.
fn cluster_secret(config: &ServeConfig) -> anyhow::Result<ClusterSecret> {
    let secret = match &config.cluster.secret {
        Some(secret) => secret.expose().to_owned(),
        None => {
            let path = config.data_dir.join(GENERATED_SECRET_FILE);
            let (secret, created) = load_or_create_token(&path)
                .with_context(|| format!("cannot create or read {}", path.display()))?;
            if created {
                tracing::info!(
                    path = %path.display(),
                    "generated a cluster secret; other nodes need this value as NXCACHE_CLUSTER_SECRET to join"
                );
            }
            secret
        }
    };
    ClusterSecret::new(&secret).map_err(anyhow::Error::msg)
}

/// The settings a new cluster starts with: this node's flags over the defaults.
fn initial_settings(cluster: &nxcache_config::ClusterConfig) -> ClusterSettings {
    let defaults = ClusterSettings::default();
    ClusterSettings {
        replication_factor: cluster
            .replication_factor
            .unwrap_or(defaults.replication_factor),
        write_quorum: cluster.write_quorum.unwrap_or(defaults.write_quorum),
        on_degraded: cluster.on_degraded.clone().unwrap_or(defaults.on_degraded),
        max_voters: cluster.max_voters.unwrap_or(defaults.max_voters),
    }
}

/// One line per setting given to this node that differs from the cluster's: the
/// cluster's value stays, and the line says how to change it.
pub(crate) fn settings_warnings(
    cluster: &nxcache_config::ClusterConfig,
    current: &ClusterSettings,
) -> Vec<String> {
    let quorum = |w: u32| match w {
        0 => "0 (a majority)".to_owned(),
        w => w.to_string(),
    };
    // (flag, setting, given to this node, the cluster's, the cluster's as shown)
    let settings = [
        (
            "--replication-factor",
            "replication factor",
            cluster.replication_factor.map(|v| v.to_string()),
            current.replication_factor.to_string(),
            current.replication_factor.to_string(),
        ),
        (
            "--write-quorum",
            "write quorum",
            cluster.write_quorum.map(|v| v.to_string()),
            current.write_quorum.to_string(),
            quorum(current.write_quorum),
        ),
        (
            "--on-degraded",
            "degraded policy",
            cluster.on_degraded.clone(),
            current.on_degraded.clone(),
            current.on_degraded.clone(),
        ),
        (
            "--max-voters",
            "max voters",
            cluster.max_voters.map(|v| v.to_string()),
            current.max_voters.to_string(),
            current.max_voters.to_string(),
        ),
    ];
    settings
        .into_iter()
        .filter_map(|(flag, name, given, now, shown)| {
            let given = given.filter(|g| *g != now)?;
            Some(format!(
                "{flag} {given} is ignored: the cluster's {name} is {shown}. Flags only set up a new cluster; to change it, run `nxcache admin settings set {flag} {given}`"
            ))
        })
        .collect()
}

/// Sets a new cluster's settings from this node's flags, once it holds the cluster's
/// state; in an existing cluster, warns about flags that differ (they change nothing).
async fn settle_settings(
    meta: MetaNode,
    cluster: nxcache_config::ClusterConfig,
    mut stop: watch::Receiver<bool>,
) {
    while meta.readiness().is_err() {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    if !meta.state().cluster.settings_initialized {
        let command = nxcache_meta::MetaCommand::InitSettings {
            settings: initial_settings(&cluster),
        };
        loop {
            let written = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                written = meta.write(command.clone()) => written,
            };
            match written {
                Ok(nxcache_meta::MetaResponse::Settings { settings, changed }) => {
                    if changed {
                        tracing::info!(
                            ?settings,
                            "cluster settings set from this node's configuration"
                        );
                    }
                    break;
                }
                Ok(other) => {
                    tracing::warn!(?other, "the cluster refused this node's settings");
                    return;
                }
                Err(err) => {
                    tracing::debug!(%err, "setting the cluster settings waits for a leader");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
    for warning in settings_warnings(&cluster, &meta.state().cluster.settings) {
        tracing::warn!("{warning}");
    }
}

/// Opens the store and starts serving. Returns once the listener is bound.
pub async fn start(config: ServeConfig) -> anyhow::Result<RunningNode> {
    let registry = nxcache_telemetry::new_registry();
    nxcache_store::create_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    let store_config = StoreConfig {
        data_dir: config.data_dir.clone(),
        max_bytes: config.max_disk_usage,
        ttl: config.ttl,
        fsync: config.fsync,
    };
    let store = {
        let registry = registry.clone();
        tokio::task::spawn_blocking(move || BlobStore::open(store_config, &registry))
            .await?
            .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?
    };
    // Before the metadata log opens: its writes must always find room (a write it cannot
    // make stops its Raft core for good).
    let space_reserve = crate::reserve::open(&config.data_dir).await?;
    store.keep_space_reserve(space_reserve.clone());
    let (seeds, new_token) = seed_tokens(&config)?;
    let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let http_addr = listener.local_addr()?;
    let grpc_listener = tokio::net::TcpListener::bind(config.cluster.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for peers on {}", config.cluster.grpc_listen))?;
    // Port 0 (tests, ephemeral set-ups): advertise the port actually bound.
    let mut config = config;
    let grpc_port = grpc_listener.local_addr()?.port();
    if let Some(host) = config.cluster.advertise.strip_suffix(":0") {
        config.cluster.advertise = format!("{host}:{grpc_port}");
    }
    if config.listen.port() == 0 {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let host = config
            .cluster
            .advertise
            .rsplit_once(':')
            .map_or("127.0.0.1", |(h, _)| h);
        config.cluster.advertise_http =
            format!("{scheme}://{host}:{}{}", http_addr.port(), config.base_path);
    }
    let secret = cluster_secret(&config)?;
    let peer_tls = config
        .cluster
        .peer_tls
        .as_ref()
        .map(|f| PeerTls::load(&f.cert, &f.key, &f.ca))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let topology = Arc::new(crate::topology::MetaTopology::new(config.cluster.node_id));
    let blobs_for_peers = nxcache_replication::BlobService::new(store.clone(), topology.clone());
    let meta = MetaNode::start(
        MetaConfig {
            node_id: config.cluster.node_id,
            data_dir: config.data_dir.clone(),
            advertise: MemberNode {
                grpc_addr: config.cluster.advertise.clone(),
                http_addr: config.cluster.advertise_http.clone(),
                zone: config.cluster.zone.clone(),
                ..MemberNode::default()
            },
            secret: secret.clone(),
            tls: peer_tls.clone(),
            formation: match config.cluster.formation {
                nxcache_config::Formation::Found => Formation::Found,
                nxcache_config::Formation::Join => Formation::Join,
                nxcache_config::Formation::Expect { expect, founder } => {
                    Formation::Expect { expect, founder }
                }
            },
            join: config.cluster.join.clone(),
            prune_env_tokens: configured_tokens(&config),
            seed_tokens: seeds,
            timing: RaftTiming::default(),
            faults: Faults::default(),
            // Peers read this node's artifacts through the same gRPC server.
            peer_services: Some(Box::new(move |routes, secret_check| {
                routes.add_service(
                    nxcache_rpc::pb::blobs_server::BlobsServer::with_interceptor(
                        blobs_for_peers,
                        secret_check,
                    ),
                )
            })),
        },
        grpc_listener,
        &registry,
    )
    .await
    .context("cannot start the cluster metadata node")?;
    // A node that founds its cluster alone has a leader within moments; the others serve
    // at once (and say in /readyz what they wait for) while their cluster forms.
    if config.cluster.formation == nxcache_config::Formation::Found
        && !meta.wait_ready(Duration::from_secs(30)).await
    {
        tracing::warn!("not ready after 30 s: serving anyway; /readyz says why");
    }
    topology.attach(meta.clone());
    let (stop, stop_rx) = watch::channel(false);
    let mut workers = vec![crate::reserve::spawn_watch(
        space_reserve,
        &registry,
        stop_rx.clone(),
    )?];
    let settling = tokio::spawn(settle_settings(
        meta.clone(),
        config.cluster.clone(),
        stop_rx.clone(),
    ));
    if config.cluster.formation == nxcache_config::Formation::Found || meta.readiness().is_ok() {
        // A new cluster's first requests already see its settings; a restarted node has
        // compared its flags before it serves. A joining node does it once it joined.
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while !settling.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    workers.push(settling);
    let hints_dir = config.data_dir.join("hints");
    let hints = tokio::task::spawn_blocking(move || nxcache_replication::HintLog::open(&hints_dir))
        .await?
        .context("cannot open the hint log")?;
    let data = nxcache_replication::DataPlane::new(
        store.clone(),
        topology,
        nxcache_replication::Peers::new(
            secret,
            peer_tls.as_ref().map(PeerTls::client_config),
            meta.grpc_client_metrics(),
        ),
        hints,
        nxcache_replication::ReplicationMetrics::register(&registry)?,
    );
    let readiness = Readiness::default();
    // /readyz answers from the last check: the first is made before serving.
    let writable = prometheus::IntGauge::new(
        "nxcache_data_dir_writable",
        "1 when the last background check could write, sync and remove a file in the data directory, else 0 (/readyz answers 503).",
    )?;
    registry.register(Box::new(writable.clone()))?;
    nxcache_http::check_disk(&store, &readiness, &writable).await;
    let state = ApiState {
        data: data.clone(),
        auth: meta.authenticator(),
        cluster: Arc::new(crate::cluster::MetaControl(meta.clone())),
        config: Arc::new(ApiConfig {
            base_path: config.base_path.clone(),
            max_artifact_size: config.max_artifact_size,
            put_success_status: StatusCode::from_u16(config.put_success_status)
                .expect("validated status"),
            body_idle_timeout: config.body_idle_timeout,
            upload_pace: nxcache_http::UploadPace {
                min_rate: config.upload_min_rate,
                grace: config.upload_rate_grace,
                deadline: config.upload_deadline,
            },
            metrics_token: config
                .metrics_token
                .as_ref()
                .map(|t| nxcache_auth::Digest::of(t.expose())),
            protocols: nxcache_http::ProtocolMounts {
                bazel: config.bazel_path.clone(),
                gradle: config.gradle_path.clone(),
                ccache: config.ccache_path.clone(),
                turbo: config.turborepo,
            },
        }),
        metrics: HttpMetrics::register(&registry)?,
        registry: registry.clone(),
        readiness: readiness.clone(),
        uploads: nxcache_http::UploadSlots::new(
            config.max_concurrent_uploads,
            config.max_uploads_per_token,
        ),
    };
    let router = nxcache_http::router(state);
    let listener_metrics = crate::listener::ListenerMetrics::register(&registry)?;
    let serving = tokio::spawn(serve(
        listener,
        router,
        tls,
        ListenerConfig {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            first_byte_timeout: config.first_byte_timeout,
            send_timeout: config.send_timeout,
            shutdown_timeout: config.shutdown_timeout,
        },
        listener_metrics,
        stop_rx.clone(),
    ));
    {
        let store = store.clone();
        let mut stop_rx = stop_rx.clone();
        // Sweep often enough that nothing outlives its TTL by more than a tenth of it.
        let expire_every = config
            .ttl
            .map_or(Duration::from_secs(300), |ttl| ttl / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(300));
        workers.push(tokio::spawn(async move {
            store
                .run_maintenance(expire_every, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    {
        let (store, readiness, mut stop_rx) = (store.clone(), readiness.clone(), stop_rx.clone());
        workers.push(tokio::spawn(nxcache_http::run_readiness_checks(
            store,
            readiness,
            writable,
            nxcache_http::READINESS_CHECK_EVERY,
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        )));
    }
    workers.extend(data.spawn_workers(
        nxcache_replication::WorkerConfig {
            anti_entropy_every: config.cluster.anti_entropy_interval,
            scrub_bytes_per_sec: config.cluster.scrub_rate,
            ..Default::default()
        },
        stop_rx.clone(),
    ));
    let node = RunningNode {
        http_addr,
        scheme: if config.tls.is_some() {
            "https"
        } else {
            "http"
        },
        base_path: config.base_path.clone(),
        stop,
        serving,
        workers,
        store,
        readiness,
        meta,
        data,
    };
    if let Some(token) = new_token {
        // Printed once, on stdout (not in the log stream), ready to paste.
        println!(
            "No access token was configured, so nxcache generated a read-write token and keeps it in {}.\n\
             Point Nx at this server with:\n\n\
             NX_SELF_HOSTED_REMOTE_CACHE_SERVER={}\n\
             NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN={token}\n",
            config.data_dir.join(GENERATED_TOKEN_FILE).display(),
            node.base_url()
        );
    }
    tracing::info!(url = %node.base_url(), data_dir = %config.data_dir.display(), "nxcache is serving");
    Ok(node)
}

#[cfg(test)]
mod tests {
    use nxcache_config::{FileConfig, ServeArgs, ServeConfig};

    use super::*;

    fn cluster_flags(args: ServeArgs) -> nxcache_config::ClusterConfig {
        ServeConfig::merge(args, FileConfig::default())
            .unwrap()
            .cluster
    }

    #[test]
    fn flags_that_differ_from_the_cluster_are_named_with_the_command_that_changes_them() {
        let current = ClusterSettings {
            replication_factor: 3,
            write_quorum: 0,
            on_degraded: "serve".into(),
            max_voters: 3,
        };
        // No flags, or flags equal to the cluster's: nothing to say.
        assert!(settings_warnings(&cluster_flags(ServeArgs::default()), &current).is_empty());
        let same = cluster_flags(ServeArgs {
            replication_factor: Some(3),
            on_degraded: Some("serve".into()),
            ..ServeArgs::default()
        });
        assert!(settings_warnings(&same, &current).is_empty());
        let other = cluster_flags(ServeArgs {
            replication_factor: Some(2),
            write_quorum: Some(2),
            on_degraded: Some("strict".into()),
            ..ServeArgs::default()
        });
        let warnings = settings_warnings(&other, &current);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[0].contains("the cluster's replication factor is 3")
                && warnings[0].contains("nxcache admin settings set --replication-factor 2"),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[1].contains("write quorum is 0 (a majority)"),
            "{}",
            warnings[1]
        );
        assert!(
            warnings[2].contains("--on-degraded strict"),
            "{}",
            warnings[2]
        );
        // A new cluster starts from the flags, the rest from the defaults.
        let initial = initial_settings(&other);
        assert_eq!(
            (
                initial.replication_factor,
                initial.write_quorum,
                initial.max_voters
            ),
            (2, 2, 3)
        );
    }
}
