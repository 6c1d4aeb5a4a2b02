//! Server configuration.
//!
//! Every setting can come from a flag, an `NXCACHE_*` environment variable or a TOML file
//! (`--config`), in that order of precedence, then a default. [`ServeArgs`] is what clap
//! parses (flags and environment); [`FileConfig`] is the TOML file; [`ServeConfig`] is the
//! validated result the server runs with.

mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use units::{ByteSize, HumanDuration, Secret};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

/// `nxcache serve` flags; each also reads an `NXCACHE_*` variable.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (kebab-case keys). Flags and environment
    /// variables override it.
    #[arg(long, env = "NXCACHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API [default: 0.0.0.0:3000]
    #[arg(long, env = "NXCACHE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Where blobs and the index live [default: ./nxcache-data]
    #[arg(long, env = "NXCACHE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Path prefix of the cache API when served behind a reverse-proxy sub-path, e.g. /nx
    #[arg(long, env = "NXCACHE_BASE_PATH", value_name = "PATH")]
    pub base_path: Option<String>,
    /// Largest artifact accepted, e.g. 2GiB [default: 2GiB]
    #[arg(long, env = "NXCACHE_MAX_ARTIFACT_SIZE", value_name = "SIZE")]
    pub max_artifact_size: Option<ByteSize>,
    /// Disk budget for artifacts; least recently used ones are evicted beyond it [default: 10GiB]
    #[arg(long, env = "NXCACHE_MAX_DISK_USAGE", value_name = "SIZE")]
    pub max_disk_usage: Option<ByteSize>,
    /// Evict artifacts not read or written for this long, e.g. 7d [default: never]
    #[arg(long, env = "NXCACHE_TTL", value_name = "DURATION")]
    pub ttl: Option<HumanDuration>,
    /// Where the Bazel HTTP remote cache is served, below --base-path, or off [default: /bazel]
    #[arg(long, env = "NXCACHE_BAZEL_PATH", value_name = "PATH|off")]
    pub bazel_path: Option<String>,
    /// Where the Gradle HTTP build cache is served, below --base-path, or off [default: /gradle]
    #[arg(long, env = "NXCACHE_GRADLE_PATH", value_name = "PATH|off")]
    pub gradle_path: Option<String>,
    /// Where ccache's HTTP storage is served, below --base-path, or off [default: /ccache]
    #[arg(long, env = "NXCACHE_CCACHE_PATH", value_name = "PATH|off")]
    pub ccache_path: Option<String>,
    /// Serve the Turborepo remote cache API at /v8/, below --base-path [default: on]
    #[arg(long, env = "NXCACHE_TURBOREPO", value_name = "on|off")]
    pub turborepo: Option<OnOff>,
    /// fsync each artifact before acknowledging it [default: on]
    #[arg(long, env = "NXCACHE_FSYNC", value_name = "on|off")]
    pub fsync: Option<OnOff>,
    /// Status of a stored PUT: 200 (what the Nx CLI expects) or 202 (the spec's text) [default: 200]
    #[arg(long, env = "NXCACHE_PUT_SUCCESS_STATUS", value_name = "200|202")]
    pub put_success_status: Option<u16>,
    /// Log format [default: text]
    #[arg(long, env = "NXCACHE_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or nxcache_http=debug (RUST_LOG syntax) [default: info,openraft=warn]
    #[arg(long, env = "NXCACHE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// PEM certificate chain: serve HTTPS (with --tls-key)
    #[arg(long, env = "NXCACHE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert
    #[arg(long, env = "NXCACHE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Comma-separated tokens that may read and write. Prefer the variable: flags show in `ps`.
    #[arg(
        long,
        env = "NXCACHE_READ_WRITE_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "TOKENS"
    )]
    pub read_write_tokens: Option<Vec<Secret>>,
    /// Comma-separated tokens that may only read.
    #[arg(
        long,
        env = "NXCACHE_READ_ONLY_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "TOKENS"
    )]
    pub read_only_tokens: Option<Vec<Secret>>,
    /// On SIGTERM, how long in-flight requests may take to finish [default: 30s]
    #[arg(long, env = "NXCACHE_SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<HumanDuration>,
    /// Open client connections at most; further ones wait to be accepted [default: 4096]
    #[arg(long, env = "NXCACHE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// A client must send its request headers within this time [default: 30s]
    #[arg(long, env = "NXCACHE_HEADER_TIMEOUT", value_name = "DURATION")]
    pub header_timeout: Option<HumanDuration>,
    /// An upload that sends no data for this long is cut off [default: 60s]
    #[arg(long, env = "NXCACHE_BODY_IDLE_TIMEOUT", value_name = "DURATION")]
    pub body_idle_timeout: Option<HumanDuration>,
    /// Uploads taken at once; further PUTs get 503 with Retry-After [default: 512]
    #[arg(long, env = "NXCACHE_MAX_CONCURRENT_UPLOADS", value_name = "N")]
    pub max_concurrent_uploads: Option<usize>,
    /// Uploads one token may have in progress at once; further PUTs with it get 429 with
    /// Retry-After [default: half of --max-concurrent-uploads]
    #[arg(long, env = "NXCACHE_MAX_UPLOADS_PER_TOKEN", value_name = "N")]
    pub max_uploads_per_token: Option<usize>,
    /// Slowest average upload rate accepted once --upload-rate-grace has passed, per
    /// second; slower uploads are cut with 408. 0 turns the check off [default: 1KiB]
    #[arg(long, env = "NXCACHE_UPLOAD_MIN_RATE", value_name = "BYTES")]
    pub upload_min_rate: Option<ByteSize>,
    /// How long an upload may run before --upload-min-rate applies [default: 10s]
    #[arg(long, env = "NXCACHE_UPLOAD_RATE_GRACE", value_name = "DURATION")]
    pub upload_rate_grace: Option<HumanDuration>,
    /// Longest time an upload may take, whatever its pace; it is then cut with 408
    /// [default: 15m]
    #[arg(long, env = "NXCACHE_UPLOAD_DEADLINE", value_name = "DURATION")]
    pub upload_deadline: Option<HumanDuration>,
    /// A new connection must send the first byte of a request within this time, or it is
    /// closed [default: 10s]
    #[arg(long, env = "NXCACHE_FIRST_BYTE_TIMEOUT", value_name = "DURATION")]
    pub first_byte_timeout: Option<HumanDuration>,
    /// A response write that makes no progress for this long (a client that stopped
    /// reading) closes the connection [default: 60s]
    #[arg(long, env = "NXCACHE_SEND_TIMEOUT", value_name = "DURATION")]
    pub send_timeout: Option<HumanDuration>,
    /// Require `Authorization: Bearer <token>` on /metrics (any token works too: the
    /// server's read, read-write and admin tokens are also accepted) [default: /metrics
    /// is open]
    #[arg(
        long,
        env = "NXCACHE_METRICS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub metrics_token: Option<Secret>,
    /// Comma-separated tokens with the admin scope (admin API and `nxcache admin`).
    #[arg(
        long,
        env = "NXCACHE_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "TOKENS"
    )]
    pub admin_tokens: Option<Vec<Secret>>,
    /// This node's id in the cluster [default: the ordinal at the end of the host name
    /// (nxcache-2 -> 2), else 0]
    #[arg(long, env = "NXCACHE_NODE_ID", value_name = "N")]
    pub node_id: Option<u64>,
    /// Address of the inter-node gRPC listener [default: 0.0.0.0:3001]
    #[arg(long, env = "NXCACHE_GRPC_LISTEN", value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// host:port at which peers reach this node's gRPC listener [default: 127.0.0.1 and
    /// the --grpc-listen port; set it in any multi-node cluster]
    #[arg(long, env = "NXCACHE_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Base URL at which clients reach this node's HTTP API [default: from --advertise's
    /// host and the --listen port]
    #[arg(long, env = "NXCACHE_ADVERTISE_HTTP", value_name = "URL")]
    pub advertise_http: Option<String>,
    /// Failure domain of this node (rack, zone), for placement.
    #[arg(long, env = "NXCACHE_ZONE", value_name = "NAME")]
    pub zone: Option<String>,
    /// Found a new cluster of one if this node has no cluster state yet (the first node of
    /// a cluster that others then --join); not with --join [default: when --join is not
    /// given]
    #[arg(long, env = "NXCACHE_BOOTSTRAP")]
    pub bootstrap: bool,
    /// With --join listing every node that starts the cluster (the same list on each):
    /// nodes without cluster state found it together once all the seeds answer, none is in
    /// a cluster yet and they are at least N; until then they wait. A node that finds a
    /// seed in a cluster joins it instead
    #[arg(long, env = "NXCACHE_BOOTSTRAP_EXPECT", value_name = "N")]
    pub bootstrap_expect: Option<usize>,
    /// With --join: the node id that initialises the cluster formed as with
    /// --bootstrap-expect (default: the lowest id). Kept for older set-ups; prefer
    /// --bootstrap-expect
    #[arg(long, env = "NXCACHE_BOOTSTRAP_NODE", value_name = "ID")]
    pub bootstrap_node: Option<u64>,
    /// Comma-separated gRPC addresses (host:port) of the seeds: members to join through,
    /// or the nodes that form the cluster together (--bootstrap-expect), when this node
    /// has no cluster state yet.
    #[arg(
        long,
        env = "NXCACHE_JOIN",
        value_delimiter = ',',
        value_name = "SEEDS"
    )]
    pub join: Option<Vec<String>>,
    /// Shared secret of the cluster's nodes (at least 16 characters). Prefer the variable.
    #[arg(
        long,
        env = "NXCACHE_CLUSTER_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub cluster_secret: Option<Secret>,
    /// Voting members of the metadata log: 3 or 5; further members are learners. A cluster
    /// setting, taken from the node that creates the cluster; later `nxcache admin settings
    /// set` [default: 3]
    #[arg(long, env = "NXCACHE_MAX_VOTERS", value_name = "3|5")]
    pub max_voters: Option<u32>,
    /// Mutual TLS between nodes: this node's PEM certificate (with --peer-tls-key and
    /// --peer-tls-ca; its names must cover the --advertise host)
    #[arg(long, env = "NXCACHE_PEER_TLS_CERT", value_name = "FILE")]
    pub peer_tls_cert: Option<PathBuf>,
    /// PEM private key for --peer-tls-cert
    #[arg(long, env = "NXCACHE_PEER_TLS_KEY", value_name = "FILE")]
    pub peer_tls_key: Option<PathBuf>,
    /// PEM certificate of the CA that signs every node's certificate
    #[arg(long, env = "NXCACHE_PEER_TLS_CA", value_name = "FILE")]
    pub peer_tls_ca: Option<PathBuf>,
    /// Copies kept of each artifact, capped by the member count. A cluster setting, taken
    /// from the node that creates the cluster; later `nxcache admin settings set` [default: 3]
    #[arg(long, env = "NXCACHE_REPLICATION_FACTOR", value_name = "N")]
    pub replication_factor: Option<u32>,
    /// Copies that must be stored before a PUT is acknowledged. A cluster setting, like
    /// --replication-factor [default: a majority of the replication factor]
    #[arg(long, env = "NXCACHE_WRITE_QUORUM", value_name = "N")]
    pub write_quorum: Option<u32>,
    /// When fewer nodes than the write quorum can take a PUT: `serve` stores it on those
    /// that can (repaired later), `strict` answers 503. A cluster setting, like
    /// --replication-factor [default: serve]
    #[arg(long, env = "NXCACHE_ON_DEGRADED", value_name = "serve|strict")]
    pub on_degraded: Option<String>,
    /// Time between anti-entropy passes (replicas compared and repaired) [default: 60s]
    #[arg(long, env = "NXCACHE_ANTI_ENTROPY_INTERVAL", value_name = "DURATION")]
    pub anti_entropy_interval: Option<HumanDuration>,
    /// Read rate of the background scrub that re-verifies stored artifacts, per second
    /// [default: 16MiB]
    #[arg(long, env = "NXCACHE_SCRUB_RATE", value_name = "BYTES")]
    pub scrub_rate: Option<ByteSize>,
}

/// The TOML file: the same settings as the flags, kebab-case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub base_path: Option<String>,
    pub max_artifact_size: Option<ByteSize>,
    pub max_disk_usage: Option<ByteSize>,
    pub ttl: Option<HumanDuration>,
    pub bazel_path: Option<String>,
    pub gradle_path: Option<String>,
    pub ccache_path: Option<String>,
    pub turborepo: Option<OnOff>,
    pub fsync: Option<OnOff>,
    pub put_success_status: Option<u16>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub read_write_tokens: Option<Vec<Secret>>,
    pub read_only_tokens: Option<Vec<Secret>>,
    pub shutdown_timeout: Option<HumanDuration>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<HumanDuration>,
    pub body_idle_timeout: Option<HumanDuration>,
    pub max_concurrent_uploads: Option<usize>,
    pub max_uploads_per_token: Option<usize>,
    pub upload_min_rate: Option<ByteSize>,
    pub upload_rate_grace: Option<HumanDuration>,
    pub upload_deadline: Option<HumanDuration>,
    pub first_byte_timeout: Option<HumanDuration>,
    pub send_timeout: Option<HumanDuration>,
    pub metrics_token: Option<Secret>,
    pub admin_tokens: Option<Vec<Secret>>,
    pub node_id: Option<u64>,
    pub grpc_listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub advertise_http: Option<String>,
    pub zone: Option<String>,
    pub bootstrap: Option<bool>,
    pub bootstrap_expect: Option<usize>,
    pub bootstrap_node: Option<u64>,
    pub join: Option<Vec<String>>,
    pub cluster_secret: Option<Secret>,
    pub max_voters: Option<u32>,
    pub peer_tls_cert: Option<PathBuf>,
    pub peer_tls_key: Option<PathBuf>,
    pub peer_tls_ca: Option<PathBuf>,
    pub replication_factor: Option<u32>,
    pub write_quorum: Option<u32>,
    pub on_degraded: Option<String>,
    pub anti_entropy_interval: Option<HumanDuration>,
    pub scrub_rate: Option<ByteSize>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|err| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: err.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated configuration of `nxcache serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `""` or `/prefix`, never a trailing slash.
    pub base_path: String,
    pub max_artifact_size: u64,
    pub max_disk_usage: u64,
    pub ttl: Option<Duration>,
    /// Mount points of the other protocols below `base_path` (`/bazel`; `None`: off).
    pub bazel_path: Option<String>,
    pub gradle_path: Option<String>,
    pub ccache_path: Option<String>,
    pub turborepo: bool,
    pub fsync: bool,
    pub put_success_status: u16,
    pub log_format: LogFormat,
    pub log_level: String,
    pub tls: Option<TlsFiles>,
    pub read_write_tokens: Vec<Secret>,
    pub read_only_tokens: Vec<Secret>,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_concurrent_uploads: usize,
    pub max_uploads_per_token: usize,
    /// Bytes per second; 0: no minimum.
    pub upload_min_rate: u64,
    pub upload_rate_grace: Duration,
    pub upload_deadline: Duration,
    pub first_byte_timeout: Duration,
    pub send_timeout: Duration,
    pub metrics_token: Option<Secret>,
    pub admin_tokens: Vec<Secret>,
    pub cluster: ClusterConfig,
}

/// How a node without cluster state becomes a member (a node with state resumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formation {
    /// Found a cluster of one at once: no seeds (a lone node), or `--bootstrap`.
    Found,
    /// Join through the seeds; never found a cluster.
    Join,
    /// Found a cluster with the seeds once every seed answers, none is in a cluster and
    /// they are at least `expect` nodes; `founder` (default: the lowest id) initialises it.
    Expect { expect: usize, founder: Option<u64> },
}

/// The formation the flags ask for. A node never founds a cluster on its own while it has
/// seeds, since a seed that does not answer may hold one.
fn formation(
    bootstrap: bool,
    expect: Option<usize>,
    founder: Option<u64>,
    node_id: u64,
    has_seeds: bool,
) -> Result<Formation, ConfigError> {
    let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
    if expect == Some(0) {
        return invalid("--bootstrap-expect must be at least 1");
    }
    match (has_seeds, bootstrap, expect, founder) {
        (true, true, _, _) => invalid(
            "--bootstrap with --join could found a second cluster whenever the seeds do not \
             answer: give every node that starts the cluster the same --join list and \
             --bootstrap-expect N (how many they are), or drop --bootstrap on a node that joins",
        ),
        (true, false, None, None) => Ok(Formation::Join),
        (true, false, expect, founder) => Ok(Formation::Expect {
            expect: expect.unwrap_or(1),
            founder,
        }),
        (false, _, Some(n), _) if n > 1 => invalid(
            "--bootstrap-expect above 1 needs --join with the gRPC addresses of the nodes that \
             form the cluster",
        ),
        (false, _, _, Some(id)) if id != node_id => invalid(
            "--bootstrap-node names another node: give this node --join with the seeds to join",
        ),
        (false, _, _, _) => Ok(Formation::Found),
    }
}

/// How this node takes part in a cluster. A single node is a one-member cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: u64,
    pub grpc_listen: SocketAddr,
    /// host:port peers dial.
    pub advertise: String,
    /// Base URL of this node's HTTP API for clients and peers.
    pub advertise_http: String,
    pub zone: String,
    /// How the node becomes a member when it has no cluster state.
    pub formation: Formation,
    pub join: Vec<String>,
    /// `None`: no secret configured (a bootstrapping node generates one).
    pub secret: Option<Secret>,
    /// Cluster settings for a new cluster (a node of an existing one only compares them
    /// with the cluster's and warns). The cluster's default is 3.
    pub max_voters: Option<u32>,
    /// Mutual TLS between nodes.
    pub peer_tls: Option<PeerTlsFiles>,
    /// Cluster settings for a new cluster, like `max_voters`.
    pub replication_factor: Option<u32>,
    pub write_quorum: Option<u32>,
    /// `serve` or `strict`.
    pub on_degraded: Option<String>,
    pub anti_entropy_interval: Duration,
    pub scrub_rate: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The ordinal at the end of a host name: `nxcache-2` -> 2 (StatefulSet pods).
pub fn ordinal_of(hostname: &str) -> Option<u64> {
    let (_, tail) = hostname.trim().rsplit_once('-')?;
    tail.parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

impl ServeConfig {
    /// Merges flags/environment over the config file (if any) over defaults, and checks
    /// the result.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args.clone(), file)
    }

    pub fn merge(args: ServeArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "--tls-cert and --tls-key go together: set both to serve HTTPS, or neither"
                        .into(),
                ));
            }
        };
        let tokens = |list: Option<Vec<Secret>>| -> Vec<Secret> {
            list.unwrap_or_default()
                .into_iter()
                .filter(|t| !t.expose().trim().is_empty())
                .map(|t| Secret::new(t.expose().trim()))
                .collect()
        };
        let max_concurrent_uploads = args
            .max_concurrent_uploads
            .or(file.max_concurrent_uploads)
            .unwrap_or(512);
        let config = ServeConfig {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "0.0.0.0:3000".parse().expect("valid default")),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./nxcache-data")),
            base_path: normalize_base_path(&args.base_path.or(file.base_path).unwrap_or_default())?,
            max_artifact_size: args
                .max_artifact_size
                .or(file.max_artifact_size)
                .map_or(2 << 30, |b| b.0),
            max_disk_usage: args
                .max_disk_usage
                .or(file.max_disk_usage)
                .map_or(10 << 30, |b| b.0),
            ttl: args.ttl.or(file.ttl).map(|d| d.0),
            bazel_path: mount_path(
                "--bazel-path",
                args.bazel_path.or(file.bazel_path),
                "/bazel",
            )?,
            gradle_path: mount_path(
                "--gradle-path",
                args.gradle_path.or(file.gradle_path),
                "/gradle",
            )?,
            ccache_path: mount_path(
                "--ccache-path",
                args.ccache_path.or(file.ccache_path),
                "/ccache",
            )?,
            turborepo: args.turborepo.or(file.turborepo).unwrap_or(OnOff::On) == OnOff::On,
            fsync: args.fsync.or(file.fsync).unwrap_or(OnOff::On) == OnOff::On,
            put_success_status: args
                .put_success_status
                .or(file.put_success_status)
                .unwrap_or(200),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            log_level: args
                .log_level
                .or(file.log_level)
                // openraft narrates every membership step at info; operators want warnings.
                .unwrap_or_else(|| "info,openraft=warn".into()),
            tls,
            read_write_tokens: tokens(args.read_write_tokens.or(file.read_write_tokens)),
            read_only_tokens: tokens(args.read_only_tokens.or(file.read_only_tokens)),
            shutdown_timeout: args
                .shutdown_timeout
                .or(file.shutdown_timeout)
                .map_or(Duration::from_secs(30), |d| d.0),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(4096),
            header_timeout: args
                .header_timeout
                .or(file.header_timeout)
                .map_or(Duration::from_secs(30), |d| d.0),
            body_idle_timeout: args
                .body_idle_timeout
                .or(file.body_idle_timeout)
                .map_or(Duration::from_secs(60), |d| d.0),
            max_concurrent_uploads,
            max_uploads_per_token: args
                .max_uploads_per_token
                .or(file.max_uploads_per_token)
                .unwrap_or((max_concurrent_uploads / 2).max(1)),
            upload_min_rate: args
                .upload_min_rate
                .or(file.upload_min_rate)
                .map_or(1024, |b| b.0),
            upload_rate_grace: args
                .upload_rate_grace
                .or(file.upload_rate_grace)
                .map_or(Duration::from_secs(10), |d| d.0),
            upload_deadline: args
                .upload_deadline
                .or(file.upload_deadline)
                .map_or(Duration::from_secs(15 * 60), |d| d.0),
            first_byte_timeout: args
                .first_byte_timeout
                .or(file.first_byte_timeout)
                .map_or(Duration::from_secs(10), |d| d.0),
            send_timeout: args
                .send_timeout
                .or(file.send_timeout)
                .map_or(Duration::from_secs(60), |d| d.0),
            metrics_token: args.metrics_token.or(file.metrics_token),
            admin_tokens: tokens(args.admin_tokens.or(file.admin_tokens)),
            cluster: ClusterConfig {
                node_id: 0,
                grpc_listen: "0.0.0.0:3001".parse().expect("valid default"),
                advertise: String::new(),
                advertise_http: String::new(),
                zone: args.zone.or(file.zone).unwrap_or_default(),
                formation: Formation::Found,
                join: Vec::new(),
                secret: args.cluster_secret.or(file.cluster_secret),
                max_voters: args.max_voters.or(file.max_voters),
                replication_factor: args.replication_factor.or(file.replication_factor),
                write_quorum: args.write_quorum.or(file.write_quorum),
                on_degraded: args.on_degraded.or(file.on_degraded),
                anti_entropy_interval: args
                    .anti_entropy_interval
                    .or(file.anti_entropy_interval)
                    .map_or(Duration::from_secs(60), |d| d.0),
                scrub_rate: args
                    .scrub_rate
                    .or(file.scrub_rate)
                    .map_or(16 * 1024 * 1024, |b| b.0),
                peer_tls: match (
                    args.peer_tls_cert.or(file.peer_tls_cert),
                    args.peer_tls_key.or(file.peer_tls_key),
                    args.peer_tls_ca.or(file.peer_tls_ca),
                ) {
                    (Some(cert), Some(key), Some(ca)) => Some(PeerTlsFiles { cert, key, ca }),
                    (None, None, None) => None,
                    _ => {
                        return Err(ConfigError::Invalid(
                            "--peer-tls-cert, --peer-tls-key and --peer-tls-ca go together: set all three for mutual TLS between nodes, or none".into(),
                        ));
                    }
                },
            },
        };
        let mut config = config;
        let c = &mut config.cluster;
        c.node_id = args
            .node_id
            .or(file.node_id)
            .or_else(|| ordinal_of(&hostname()))
            .unwrap_or(0);
        if let Some(addr) = args.grpc_listen.or(file.grpc_listen) {
            c.grpc_listen = addr;
        }
        c.join = args
            .join
            .or(file.join)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        c.formation = formation(
            args.bootstrap || file.bootstrap.unwrap_or(false),
            args.bootstrap_expect.or(file.bootstrap_expect),
            args.bootstrap_node.or(file.bootstrap_node),
            c.node_id,
            !c.join.is_empty(),
        )?;
        c.advertise = match args.advertise.or(file.advertise) {
            Some(a) => a,
            None if c.grpc_listen.ip().is_unspecified() => {
                format!("127.0.0.1:{}", c.grpc_listen.port())
            }
            None => c.grpc_listen.to_string(),
        };
        c.advertise_http = match args.advertise_http.or(file.advertise_http) {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let host = c
                    .advertise
                    .rsplit_once(':')
                    .map_or(c.advertise.as_str(), |(h, _)| h);
                let scheme = if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!(
                    "{scheme}://{host}:{}{}",
                    config.listen.port(),
                    config.base_path
                )
            }
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mounts: Vec<&String> = [&self.bazel_path, &self.gradle_path, &self.ccache_path]
            .into_iter()
            .flatten()
            .collect();
        for (i, a) in mounts.iter().enumerate() {
            for b in &mounts[i + 1..] {
                let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
                if long.starts_with(short.as_str())
                    && long[short.len()..].chars().next().is_none_or(|c| c == '/')
                {
                    return invalid(format!(
                        "the protocol mount points {a} and {b} overlap: --bazel-path, --gradle-path and --ccache-path need distinct paths"
                    ));
                }
            }
        }
        if !matches!(self.put_success_status, 200 | 202) {
            return invalid(format!(
                "--put-success-status must be 200 or 202, not {}",
                self.put_success_status
            ));
        }
        if self.max_artifact_size == 0 {
            return invalid("--max-artifact-size must be more than 0 bytes".into());
        }
        if self.max_disk_usage == 0 {
            return invalid("--max-disk-usage must be more than 0 bytes".into());
        }
        if self.max_connections == 0 {
            return invalid("--max-connections must be at least 1".into());
        }
        if self.max_concurrent_uploads == 0 {
            return invalid("--max-concurrent-uploads must be at least 1".into());
        }
        if self.max_uploads_per_token == 0 {
            return invalid("--max-uploads-per-token must be at least 1".into());
        }
        if self
            .metrics_token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            return invalid(
                "--metrics-token (NXCACHE_METRICS_TOKEN) is empty: set a secret, or unset it to leave /metrics open".into(),
            );
        }
        for (name, d) in [
            ("--header-timeout", self.header_timeout),
            ("--body-idle-timeout", self.body_idle_timeout),
            ("--upload-deadline", self.upload_deadline),
            ("--first-byte-timeout", self.first_byte_timeout),
            ("--send-timeout", self.send_timeout),
        ] {
            if d.is_zero() {
                return invalid(format!("{name} must be longer than 0s"));
            }
        }
        let c = &self.cluster;
        if let Some(voters) = c.max_voters
            && !matches!(voters, 1 | 3 | 5 | 7)
        {
            return invalid(format!("--max-voters must be 1, 3, 5 or 7, not {voters}"));
        }
        if let Some(rf) = c.replication_factor
            && !(1..=7).contains(&rf)
        {
            return invalid(format!("--replication-factor must be 1 to 7, not {rf}"));
        }
        if let Some(w) = c.write_quorum
            && (w == 0 || w > c.replication_factor.unwrap_or(3))
        {
            return invalid(format!(
                "--write-quorum must be 1 to the replication factor ({}), not {w}",
                c.replication_factor.unwrap_or(3)
            ));
        }
        if let Some(p) = &c.on_degraded
            && p != "serve"
            && p != "strict"
        {
            return invalid(format!(
                "--on-degraded must be 'serve' or 'strict', not '{p}'"
            ));
        }
        if c.anti_entropy_interval.is_zero() || c.scrub_rate == 0 {
            return invalid("--anti-entropy-interval and --scrub-rate must be more than 0".into());
        }
        if !c.join.is_empty() && c.secret.is_none() {
            return invalid(
                "joining a cluster needs its secret: set NXCACHE_CLUSTER_SECRET to the value the other nodes use".into(),
            );
        }
        for (variable, flag, list) in [
            (
                "NXCACHE_READ_WRITE_TOKENS",
                "--read-write-tokens",
                &self.read_write_tokens,
            ),
            (
                "NXCACHE_READ_ONLY_TOKENS",
                "--read-only-tokens",
                &self.read_only_tokens,
            ),
            ("NXCACHE_ADMIN_TOKENS", "--admin-tokens", &self.admin_tokens),
        ] {
            for (i, token) in list.iter().enumerate() {
                let which = format!("{variable} ({flag}): token {} of {}", i + 1, list.len());
                check_secret(&which, token.expose())?;
            }
        }
        if let Some(secret) = &c.secret {
            check_secret("NXCACHE_CLUSTER_SECRET (--cluster-secret)", secret.expose())?;
        }
        if c.advertise
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return invalid(format!(
                "--advertise must be host:port, not {:?}",
                c.advertise
            ));
        }
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return invalid("--ttl must be longer than 0s (leave it unset to never expire)".into());
        }
        Ok(())
    }
}

/// The shortest token or cluster secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// Parts of the example values shipped in `.env.example` and
/// `deploy/kubernetes/secret.yaml` (and of the usual stand-ins): a secret containing one
/// is a placeholder someone forgot to replace, known to anyone who read the repository.
const PLACEHOLDER_MARKS: &[&str] = &["change-me", "changeme", "replace-me", "placeholder"];

/// Refuses a placeholder or a short secret; `which` names the variable (and the entry of
/// a list) so the operator knows what to replace. The value itself is never shown.
fn check_secret(which: &str, value: &str) -> Result<(), ConfigError> {
    const HOW: &str =
        "generate one with `openssl rand -hex 32` (or `nxcache admin tokens create` for tokens)";
    let lower = value.to_ascii_lowercase();
    if let Some(mark) = PLACEHOLDER_MARKS.iter().find(|m| lower.contains(*m)) {
        return Err(ConfigError::Invalid(format!(
            "{which} is a placeholder (it contains '{mark}', like the examples in .env.example and deploy/kubernetes/secret.yaml): replace it with a random value; {HOW}"
        )));
    }
    if value.chars().count() < MIN_SECRET_LEN {
        return Err(ConfigError::Invalid(format!(
            "{which} is {} characters long; at least {MIN_SECRET_LEN} are needed: {HOW}",
            value.chars().count()
        )));
    }
    Ok(())
}

/// A protocol's mount point: `off`, or a path below the base path that no other route
/// of the API takes.
fn mount_path(
    flag: &str,
    raw: Option<String>,
    default: &str,
) -> Result<Option<String>, ConfigError> {
    let raw = raw.unwrap_or_else(|| default.to_owned());
    if raw.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let path = normalize_base_path(&raw).map_err(|_| {
        ConfigError::Invalid(format!(
            "{flag} must be off or look like {default}, not {raw:?}"
        ))
    })?;
    let first = path.split('/').nth(1).unwrap_or_default();
    if path.is_empty() || ["v1", "v8", "admin", "healthz", "readyz", "metrics"].contains(&first) {
        return Err(ConfigError::Invalid(format!(
            "{flag} {raw:?} would take the place of another route of the API; use a path of its own, such as {default}"
        )));
    }
    Ok(Some(path))
}

fn normalize_base_path(raw: &str) -> Result<String, ConfigError> {
    let trimmed = raw.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let valid = trimmed.starts_with('/')
        && !trimmed.contains("//")
        && trimmed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
        && !trimmed.split('/').any(|seg| seg == "." || seg == "..");
    if !valid {
        return Err(ConfigError::Invalid(format!(
            "--base-path must look like /nx or /cache/nx (letters, digits, '-', '_', '.', '~'), not {raw:?}"
        )));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests;
