//! How the suite starts `nxcache serve`: the one place that knows the binary's flags.
//! When they change (issue 12 brings `--bootstrap-expect` and a cluster id), adapt
//! `serve_args` here, or pass `--serve-arg` to the runner for a one-off.

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

/// Arguments of `nxcache serve` for node `id`. Every node gets the same seed list and
/// names node 1 as the one that bootstraps (the StatefulSet/compose shape of
/// docs/operations.md), so a restarted or re-imaged node takes the same path as in
/// production.
pub fn serve_args(
    id: u64,
    addr: Ipv4Addr,
    data_dir: &Path,
    seeds: &[String],
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
        "--bootstrap-node",
        "1",
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
