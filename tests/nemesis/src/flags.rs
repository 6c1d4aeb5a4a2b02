//! How the suite starts `nxcache serve`: the one place that knows the binary's flags.
//! When they change, adapt `serve_args` here, or pass `--serve-arg` to the runner for a
//! one-off.

use std::net::Ipv4Addr;
use std::path::Path;

/// HTTP API of every node (the workload and the admin API).
pub const HTTP_PORT: u16 = 3000;
/// The node's own gRPC listener, on loopback: peers can reach it only through the proxy.
pub const GRPC_PORT: u16 = 3001;
/// The link proxy in front of the gRPC listener; the address a node advertises.
pub const PROXY_PORT: u16 = 4001;

/// The name the server gives an environment read-write token: the list and the first 12
/// hex digits of the value's BLAKE3 digest (README, "Tokens").
pub fn rw_token_name(secret: &str) -> String {
    format!(
        "read-write-{}",
        &blake3::hash(secret.as_bytes()).to_hex()[..12]
    )
}

/// Secrets shared by every node of a run (made per run, never printed).
#[derive(Debug, Clone)]
pub struct Secrets {
    pub cluster: String,
    pub read_write: String,
    pub admin: String,
}

impl Secrets {
    pub fn generate() -> Secrets {
        use rand::Rng;
        let word = |prefix: &str| {
            let n: u128 = rand::rng().random();
            format!("{prefix}-{n:032x}")
        };
        Secrets {
            cluster: word("nemesis-cluster"),
            read_write: word("nemesis-rw"),
            admin: word("nemesis-admin"),
        }
    }
}

/// The peer address a node advertises (its proxy).
pub fn advertise(addr: Ipv4Addr) -> String {
    format!("{addr}:{PROXY_PORT}")
}

/// How a node without cluster state becomes a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formation {
    /// One of the nodes that start the cluster: every one of them gets the same seed list
    /// and `--bootstrap-expect N` (docs/operations.md, "Form a cluster by hand"), so they
    /// form it together, and a restarted or re-imaged one takes the production path.
    Expect(usize),
    /// A node added later: it joins through the seeds and never founds a cluster.
    Join,
}

/// Arguments of `nxcache serve` for node `id`.
pub fn serve_args(
    id: u64,
    addr: Ipv4Addr,
    data_dir: &Path,
    seeds: &[String],
    formation: Formation,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--node-id",
        &id.to_string(),
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen",
        &format!("0.0.0.0:{HTTP_PORT}"),
        "--grpc-listen",
        &format!("127.0.0.1:{GRPC_PORT}"),
        "--advertise",
        &advertise(addr),
        "--join",
        &seeds.join(","),
        // Short, so that the settle after the last heal does not wait minutes.
        "--anti-entropy-interval",
        "5s",
        // A kill -9 keeps the page cache: power loss is not in this fault model.
        "--fsync",
        "off",
        // Nothing is ever evicted: check 1 expects every acknowledged key to stay.
        "--max-disk-usage",
        "1TiB",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Formation::Expect(n) = formation {
        args.extend(["--bootstrap-expect".to_string(), n.to_string()]);
    }
    args.extend(extra.iter().cloned());
    args
}

/// Environment of `nxcache serve`: the secrets (never on the command line).
pub fn serve_env(secrets: &Secrets) -> Vec<(String, String)> {
    vec![
        ("NXCACHE_CLUSTER_SECRET".into(), secrets.cluster.clone()),
        (
            "NXCACHE_READ_WRITE_TOKENS".into(),
            secrets.read_write.clone(),
        ),
        ("NXCACHE_ADMIN_TOKENS".into(), secrets.admin.clone()),
    ]
}
