//! What one anti-entropy pass costs at scale: two nodes that both own every key, one
//! with 1,000,000 copies, the other missing 1% of them. Ignored by default (it writes
//! two indexes of a million entries); run it with
//!
//! ```sh
//! cargo test --release -p nxcache-replication --test anti_entropy_scale -- --ignored --nocapture
//! ```
//!
//! `NXCACHE_SCALE_KEYS` and `NXCACHE_SCALE_MISSING_PERMILLE` change the sizes. Only the
//! copies that must travel have files; the others exist in the index alone (a pass reads
//! the index and the digests, and opens files only to copy them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nxcache_placement::{Member, Ring};
use nxcache_replication::{
    BlobService, ClusterView, DataPlane, DegradedPolicy, FixedTopology, HintLog, Peers,
    ReplicationMetrics,
};
use nxcache_rpc::ClusterSecret;
use nxcache_rpc::pb::blobs_server::BlobsServer;
use nxcache_store::{
    BlobMeta, BlobStore, Index, SledIndex, StoreConfig, Version, checksum_of, ring_position,
};

const SECRET: &str = "scale-test-cluster-secret";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of this process so far (user + system), from /proc/self/stat (Linux; clock
/// ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn content(key: &str) -> Vec<u8> {
    format!("artifact {key} ").repeat(4).into_bytes()
}

fn key_of(n: u64) -> String {
    format!(
        "{}",
        13_661_868_522_198_395_722u64.wrapping_add(n.wrapping_mul(7919))
    )
}

/// Writes the index of a store holding `keys` (and the files of `with_files`) straight
/// into `dir`, as a clean shutdown would leave it.
fn populate(dir: &std::path::Path, keys: &[String], with_files: &[String], version: Version) {
    let index = SledIndex::open(&dir.join("index")).unwrap();
    for (seq, key) in keys.iter().enumerate() {
        let bytes = content(key);
        let meta = BlobMeta {
            size: bytes.len() as u64,
            checksum: checksum_of(&bytes),
            created_ms: 1,
            accessed_ms: 1,
            access_seq: seq as u64 + 1,
            version,
        };
        index.insert(key, &meta).unwrap();
    }
    index.flush().unwrap();
    for key in with_files {
        let shard = dir
            .join("blobs")
            .join(format!("{:02x}", ring_position(key) >> 56));
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(shard.join(key), content(key)).unwrap();
    }
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(dir.join("CLEAN_SHUTDOWN"), b"").unwrap();
}

struct Node {
    plane: DataPlane,
    store: BlobStore,
}

async fn start(
    dir: &std::path::Path,
    listener: tokio::net::TcpListener,
    view: ClusterView,
) -> Node {
    let registry = prometheus::Registry::new();
    let store = {
        let dir = dir.to_path_buf();
        let registry = registry.clone();
        tokio::task::spawn_blocking(move || {
            BlobStore::open(
                StoreConfig {
                    data_dir: dir,
                    max_bytes: 1 << 40,
                    ttl: None,
                    fsync: false,
                },
                &registry,
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    let topology = Arc::new(FixedTopology(Arc::new(view)));
    let secret = ClusterSecret::new(SECRET).unwrap();
    let service = BlobsServer::with_interceptor(
        BlobService::new(store.clone(), topology.clone()),
        secret.server_interceptor(Arc::new(|_, _| {})),
    );
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let plane = DataPlane::new(
        store.clone(),
        topology,
        Peers::new(secret, None, nxcache_rpc::GrpcClientMetrics::unregistered()),
        HintLog::temporary().unwrap(),
        ReplicationMetrics::register(&registry).unwrap(),
    );
    Node { plane, store }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes two indexes of a million entries; run by hand for the figures"]
async fn one_pass_over_a_million_keys_with_one_percent_missing() {
    let total = env_or("NXCACHE_SCALE_KEYS", 1_000_000);
    let permille = env_or("NXCACHE_SCALE_MISSING_PERMILLE", 10);
    let keys: Vec<String> = (0..total).map(key_of).collect();
    // Every (1000 / permille)-th key: spread over the whole ring, as lost writes are.
    let every = (1000 / permille.clamp(1, 1000)) as usize;
    let missing: Vec<String> = keys.iter().step_by(every).cloned().collect();
    let missing_set: std::collections::HashSet<&String> = missing.iter().collect();
    let present: Vec<String> = keys
        .iter()
        .filter(|k| !missing_set.contains(k))
        .cloned()
        .collect();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let version = Version::new();
    let started = Instant::now();
    {
        let (a, b) = (dir_a.path().to_path_buf(), dir_b.path().to_path_buf());
        let (keys_a, keys_b, files) = (keys.clone(), present.clone(), missing.clone());
        let fill_a = std::thread::spawn(move || populate(&a, &keys_a, &files, version));
        let fill_b = std::thread::spawn(move || populate(&b, &keys_b, &[], version));
        fill_a.join().unwrap();
        fill_b.join().unwrap();
    }
    eprintln!(
        "populated: node A {} keys, node B {} keys ({} missing) in {:.1?}",
        keys.len(),
        present.len(),
        missing.len(),
        started.elapsed()
    );
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = [
        (1u64, la.local_addr().unwrap().to_string()),
        (2u64, lb.local_addr().unwrap().to_string()),
    ];
    let members: Vec<Member> = [1, 2]
        .iter()
        .map(|id| Member {
            id: *id,
            zone: String::new(),
        })
        .collect();
    let ring = Ring::new(1, &members, 2, nxcache_placement::DEFAULT_VNODES);
    let view = |me| ClusterView {
        me,
        ring: ring.clone(),
        previous: None,
        addrs: addrs.iter().cloned().collect(),
        write_quorum: 2,
        policy: DegradedPolicy::Serve,
    };
    let opened = Instant::now();
    let a = start(dir_a.path(), la, view(1)).await;
    let b = start(dir_b.path(), lb, view(2)).await;
    eprintln!("opened both stores in {:.1?}", opened.elapsed());
    assert_eq!(a.store.stats().objects, total);
    assert_eq!(b.store.stats().objects, total - missing.len() as u64);

    let (wall, cpu) = (Instant::now(), cpu_time());
    let totals = b.plane.anti_entropy_pass().await;
    let (wall, cpu) = (wall.elapsed(), cpu_time() - cpu);
    eprintln!(
        "one pass on the node missing {} of {} keys: {:.2?} wall, {:.2?} CPU (both nodes, one process), {} keys repaired; {} ranges compared, {} differing, {} keys listed",
        missing.len(),
        total,
        wall,
        cpu,
        totals.keys_repaired,
        totals.ranges_compared,
        totals.ranges_differing,
        totals.keys_listed
    );
    assert_eq!(totals.keys_repaired, missing.len() as u64);
    assert_eq!(b.store.stats().objects, total);

    let (wall, cpu) = (Instant::now(), cpu_time());
    let again = b.plane.anti_entropy_pass().await;
    let (wall, cpu) = (wall.elapsed(), cpu_time() - cpu);
    eprintln!(
        "the next pass, nothing differing: {:.2?} wall, {:.2?} CPU; {} ranges compared, {} differing",
        wall, cpu, again.ranges_compared, again.ranges_differing
    );
    assert_eq!((again.ranges_differing, again.keys_repaired), (0, 0));
    drop(a.plane);
}
