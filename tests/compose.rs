//! The docker-compose cluster (`docker-compose.yml`, image from `deploy/docker/build.sh`)
//! under real faults: a killed container, a container cut off its network, a rolling
//! restart; and the real Nx CLI through it.
//!
//! Needs a Docker engine, the image and `node`, so these tests are `#[ignore]`d in the plain
//! `cargo test` and run by `.ci/run` (after it builds the image) with `--ignored
//! --test-threads=1`. Each test is its own compose project on free host ports, taken down
//! with its volumes even when the test fails.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nxcache_tests::nx::{PROJECTS, Workspace, nx_node_modules, restored_from_remote};
use nxcache_tests::{
    ADMIN_TOKEN, CLUSTER_SECRET, PATIENCE, RO_TOKEN, RW_TOKEN, admin_status, free_port, get,
    metric_sum, put, random_bytes, wait_until, workspace_root,
};

const IMAGE: &str = "nxcache:local";
const NODES: usize = 3;

/// One compose project: the three nodes of `docker-compose.yml`.
struct ComposeCluster {
    project: String,
    ports: [u16; NODES],
}

/// `docker compose` (v2 plugin) when present, else the standalone `docker-compose`.
fn compose_program() -> Vec<&'static str> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker", "compose"]
    } else {
        vec!["docker-compose"]
    }
}

fn docker(args: &[&str]) -> Output {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl ComposeCluster {
    /// Starts the three nodes and waits until they form one healthy cluster.
    async fn up(name: &str) -> ComposeCluster {
        let image = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .expect("run docker");
        assert!(
            image.status.success(),
            "image {IMAGE} not found: run deploy/docker/build.sh (or docker compose build) first"
        );
        let cluster = ComposeCluster {
            project: format!("nxcache-e2e-{name}-{}", std::process::id()),
            ports: [free_port(), free_port(), free_port()],
        };
        cluster.compose(&[
            "up",
            "-d",
            "--no-build",
            "nxcache-0",
            "nxcache-1",
            "nxcache-2",
        ]);
        cluster.wait_healthy(Duration::from_secs(120)).await;
        cluster
    }

    /// `docker compose` for this project, with the test's tokens, secret and ports.
    fn command(&self, args: &[&str]) -> Command {
        let program = compose_program();
        let root = workspace_root();
        let mut cmd = Command::new(program[0]);
        // The compose file reads NXCACHE_* from this environment: only the test's own.
        nxcache_testkit::env::isolate(&mut cmd);
        cmd.args(&program[1..])
            .args(["--project-name", &self.project, "--file"])
            .arg(root.join("docker-compose.yml"))
            .args(args)
            .current_dir(&root)
            .env("NXCACHE_IMAGE", IMAGE)
            .env("NXCACHE_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN)
            .env("NXCACHE_READ_ONLY_TOKENS", RO_TOKEN)
            .env("NXCACHE_ADMIN_TOKENS", ADMIN_TOKEN)
            .env("NXCACHE_MAX_DISK_USAGE", "2GiB");
        for (i, port) in self.ports.iter().enumerate() {
            cmd.env(format!("NXCACHE_PORT_{i}"), port.to_string());
        }
        cmd
    }

    fn compose(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run docker compose");
        assert!(
            out.status.success(),
            "compose {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn url(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[node])
    }

    fn container(&self, node: usize) -> String {
        let out = self.compose(&["ps", "-q", &format!("nxcache-{node}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn network(&self) -> String {
        // Compose v1 drops dashes from project names in resource names; v2 keeps them.
        let out = docker(&["network", "ls", "--format", "{{.Name}}"]);
        let names = String::from_utf8_lossy(&out.stdout).into_owned();
        let wanted = [
            format!("{}_cluster", self.project),
            format!("{}_cluster", self.project.replace('-', "")),
        ];
        names
            .lines()
            .find(|n| wanted.iter().any(|w| w == n))
            .unwrap_or_else(|| panic!("no network {wanted:?} among {names}"))
            .to_owned()
    }

    /// Every node ready, one leader, three members all reachable.
    async fn wait_healthy(&self, timeout: Duration) {
        let urls: Vec<String> = (0..NODES).map(|i| self.url(i)).collect();
        wait_until(timeout, "three healthy nodes in one cluster", || {
            let urls = urls.clone();
            async move {
                for url in &urls {
                    let ready = nxcache_tests::http_client()
                        .get(format!("{url}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ready {
                        return false;
                    }
                }
                admin_status(&urls[0]).is_some_and(|s| {
                    s["leader_id"].as_u64().is_some()
                        && s["members"].as_array().is_some_and(|m| {
                            m.len() == NODES && m.iter().all(|m| m["reachable"] == true)
                        })
                })
            }
        })
        .await;
    }

    /// Objects each node holds on its own disk, and the hints it keeps for others.
    fn local_copies(&self, node: usize) -> Option<(u64, u64)> {
        let status = admin_status(&self.url(node))?;
        Some((
            status["data"]["objects"].as_u64()?,
            status["data"]["pending_hints"].as_u64()?,
        ))
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(out) = self
                .command(&["logs", "--no-color", "--tail", "60"])
                .output()
        {
            let logs = String::from_utf8_lossy(&out.stdout);
            eprintln!("--- compose logs ---\n{logs}");
        }
        let _ = self
            .command(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .output();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:010}")
}

#[test]
#[ignore = "needs Docker; run by .ci/run"]
fn packing_without_the_image_script_names_the_script() {
    // A checkout where deploy/docker/build.sh never ran: the Dockerfile's `prebuilt`
    // target (the one that packs a host-built binary) has nothing to pack.
    let root = workspace_root();
    let context = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(context.path().join("deploy/docker")).unwrap();
    for file in ["deploy/docker/Dockerfile", ".dockerignore"] {
        std::fs::copy(root.join(file), context.path().join(file)).unwrap();
    }
    let out = Command::new("docker")
        .args(["build", "--target", "prebuilt", "--tag"])
        .arg(format!("nxcache-unbuilt-{}", std::process::id()))
        .arg("--file")
        .arg(context.path().join("deploy/docker/Dockerfile"))
        .arg(context.path())
        .output()
        .expect("run docker");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("made-by-deploy-docker-build.sh"), "{said}");
}

#[test]
#[ignore = "needs Docker and the nxcache image; run by .ci/run"]
fn the_image_runs_unprivileged_on_a_data_volume_with_a_probe_health_check() {
    let out = docker(&["image", "inspect", "--format", "{{json .Config}}", IMAGE]);
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        config["User"], "10001:10001",
        "not the unprivileged user: {config}"
    );
    assert!(
        config["Volumes"].get("/data").is_some(),
        "/data is not a volume: {config}"
    );
    assert_eq!(
        config["Env"]
            .as_array()
            .map(|env| env.iter().any(|e| e == "NXCACHE_DATA_DIR=/data")),
        Some(true),
        "{config}"
    );
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!([
            "CMD",
            "/usr/local/bin/nxcache",
            "probe",
            "http://127.0.0.1:3000/readyz"
        ]),
        "{config}"
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/nxcache"]),
        "{config}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker, the nxcache image and node; run by .ci/run"]
async fn nx_writes_through_node_0_and_restores_through_node_2_while_a_node_is_killed() {
    let cluster = ComposeCluster::up("nx").await;
    let ws = Workspace::new(&nx_node_modules("24.0.6"));

    let first = ws.nx(&cluster.url(0), RW_TOKEN, &[]);
    assert!(first.success, "run 1 through node 0 failed");
    let built = ws.outputs();

    // Run 2 restores through node 2 while node 0, the writer, is killed under it: after
    // node 2 has served run 2's first cache request, and before the run ends. Nx talks to
    // node 2 through a gate that holds every request after the first until the kill is
    // done, so the kill falls mid-run however fast the run is.
    ws.clear_local();
    let url2 = cluster.url(2);
    let served_before = cache_requests_served(&url2).await;
    let gate = RequestGate::start(url2.clone()).await;
    let nx = std::thread::spawn({
        let through = gate.url.clone();
        move || {
            let run = ws.nx(&through, RW_TOKEN, &[("NX_PARALLEL", "1")]);
            (ws, run)
        }
    });
    wait_until(
        Duration::from_secs(120),
        "node 2 serving run 2's first cache request",
        || {
            let gate = gate.clone();
            async move { gate.answered.load(Ordering::SeqCst) >= 1 }
        },
    )
    .await;
    let served_at_kill = cache_requests_served(&url2).await;
    let ended_before_the_kill = nx.is_finished();
    docker(&["kill", &cluster.container(0)]);
    gate.open();
    let (ws, second) = nx.join().unwrap();
    assert!(
        served_at_kill > served_before,
        "node 0 was killed before run 2's first request was served"
    );
    assert!(
        !ended_before_the_kill,
        "run 2 had ended when node 0 was to be killed: not a kill mid-run"
    );
    assert!(
        gate.held.load(Ordering::SeqCst) >= 1,
        "no request of run 2 came after the kill"
    );
    assert!(second.success, "run 2 through node 2 failed");
    assert_eq!(
        restored_from_remote(&second),
        PROJECTS.len(),
        "a miss in run 2"
    );
    assert!(
        ws.outputs() == built,
        "outputs restored through node 2 differ"
    );

    // Run 3, node 0 still dead, through node 1: every hit again.
    ws.clear_local();
    let third = ws.nx(&cluster.url(1), RW_TOKEN, &[]);
    assert!(third.success, "run 3 with node 0 dead failed");
    assert_eq!(
        restored_from_remote(&third),
        PROJECTS.len(),
        "a miss in run 3"
    );
    assert!(ws.outputs() == built);
    eprintln!(
        "nx through compose: {} of {} tasks restored with node 0 killed mid-run (after \
         {} of run 2's cache requests were served), {} with it dead",
        restored_from_remote(&second),
        PROJECTS.len(),
        served_at_kill - served_before,
        restored_from_remote(&third)
    );
}

/// Cache requests (`/v1/cache/...`, any method and status) a node has answered.
async fn cache_requests_served(url: &str) -> f64 {
    match reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
    {
        Ok(response) => metric_sum(
            &response.text().await.unwrap_or_default(),
            "nxcache_http_requests_total",
            &[r#"route="cache""#],
        ),
        Err(err) => panic!("{url}/metrics: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the nxcache image; run by .ci/run"]
async fn a_node_cut_off_for_30_s_comes_back_to_full_replication_within_60_s() {
    let cluster = ComposeCluster::up("partition").await;
    let http = client();
    let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..20 {
        let (k, body) = (key("a0", i), random_bytes(64 * 1024));
        assert_eq!(put(&http, &cluster.url(0), &k, body.clone()).await, 200);
        written.insert(k, body);
    }

    let network = cluster.network();
    let cut = cluster.container(2);
    docker(&["network", "disconnect", &network, &cut]);
    let cut_at = Instant::now();
    // The two connected nodes keep serving: new writes and every earlier artifact.
    let mut i = 0;
    while cut_at.elapsed() < Duration::from_secs(30) {
        let (k, body) = (key("b0", i), random_bytes(64 * 1024));
        let via = cluster.url(i % 2);
        assert_eq!(
            put(&http, &via, &k, body.clone()).await,
            200,
            "PUT through node {} during the partition",
            i % 2
        );
        written.insert(k, body);
        for (k, body) in written.iter().step_by(7) {
            let (status, got) = get(&http, &cluster.url((i + 1) % 2), k).await;
            assert_eq!(status, 200, "GET {k} during the partition");
            assert!(&got == body, "GET {k} returned other bytes");
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = i;
    docker(&["network", "connect", &network, &cut]);
    let healed = Instant::now();

    // R = 3 on three nodes: full replication is every artifact on every disk, no hint left.
    let total = written.len() as u64;
    wait_until(PATIENCE, "full replication after the heal", || {
        let copies: Vec<_> = (0..NODES).map(|n| cluster.local_copies(n)).collect();
        async move {
            copies
                .iter()
                .all(|c| c.is_some_and(|(objects, hints)| objects == total && hints == 0))
        }
    })
    .await;
    let repaired = healed.elapsed();
    for (k, body) in &written {
        let (status, got) = get(&http, &cluster.url(2), k).await;
        assert_eq!(status, 200, "GET {k} through the healed node");
        assert!(&got == body);
    }
    eprintln!(
        "partition: {during} PUTs accepted while node 2 was cut off for 30 s; \
         {total} artifacts on all three nodes {repaired:?} after the heal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the nxcache image; run by .ci/run"]
async fn a_rolling_restart_under_load_acknowledges_every_put_and_fails_no_get() {
    let cluster = ComposeCluster::up("rolling").await;
    let urls: Arc<Vec<String>> = Arc::new((0..NODES).map(|n| cluster.url(n)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(LoadCounts::default());

    let load = tokio::spawn(run_load(urls.clone(), stop.clone(), counts.clone()));
    // Some load before the first restart.
    wait_until(PATIENCE, "load running", || {
        let n = counts.puts_ok.load(Ordering::Relaxed);
        async move { n >= 20 }
    })
    .await;
    let started = Instant::now();
    for node in 0..NODES {
        // docker restart: SIGTERM, the node drains, then starts again on its volume.
        let restarted = Instant::now();
        cluster.compose(&["restart", "--timeout", "30", &format!("nxcache-{node}")]);
        cluster.wait_healthy(Duration::from_secs(120)).await;
        eprintln!(
            "node {node} restarted and healthy in {:?}",
            restarted.elapsed()
        );
        // The restarted node takes its share of the load before the next one goes.
        let before = counts.gets_ok.load(Ordering::Relaxed);
        wait_until(PATIENCE, "load after the restart", || {
            let n = counts.gets_ok.load(Ordering::Relaxed);
            async move { n >= before + 60 }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let LoadResult { acked, failed_puts } = load.await.unwrap();

    // Afterwards every acknowledged artifact is whole through every node.
    let http = client();
    for (k, body) in &acked {
        for url in urls.iter() {
            let (status, got) = get(&http, url, k).await;
            assert_eq!(status, 200, "GET {k} through {url} after the restarts");
            assert!(&got == body, "GET {k} through {url}: other bytes");
        }
    }
    let c = &counts;
    let value = |n: &AtomicU64| n.load(Ordering::Relaxed);
    eprintln!(
        "rolling restart of {NODES} nodes in {:?}: {} PUTs, {} acknowledged, {} failed, {} PUT \
         attempts retried on the next node; {} GETs of acknowledged artifacts, {} failed, {} GET \
         attempts retried (no answer while a node restarted)",
        started.elapsed(),
        value(&c.puts_started),
        value(&c.puts_ok),
        value(&c.puts_failed),
        value(&c.puts_retried),
        value(&c.gets_ok) + value(&c.gets_failed),
        value(&c.gets_failed),
        value(&c.gets_retried),
    );
    // Every PUT has one outcome, and with two of three nodes up each one is acknowledged
    // (after retries on the next node where a restarting node did not answer).
    assert_eq!(
        value(&c.puts_ok) + value(&c.puts_failed),
        value(&c.puts_started),
        "PUTs without an outcome"
    );
    assert_eq!(acked.len() as u64, value(&c.puts_ok));
    assert!(
        failed_puts.is_empty(),
        "{} PUTs not acknowledged by any node:\n{}",
        failed_puts.len(),
        failed_puts.join("\n")
    );
    assert_eq!(
        value(&c.gets_failed),
        0,
        "GETs of acknowledged artifacts failed"
    );
}

#[derive(Default)]
struct LoadCounts {
    puts_started: AtomicU64,
    puts_ok: AtomicU64,
    puts_failed: AtomicU64,
    /// PUT attempts that got no answer, or a 503 from a node on its way down, and were
    /// sent again to the next node.
    puts_retried: AtomicU64,
    gets_ok: AtomicU64,
    gets_failed: AtomicU64,
    /// GET attempts that got no answer and were sent again to the next node.
    gets_retried: AtomicU64,
}

/// What the load saw: the acknowledged artifacts, and each PUT that was not
/// acknowledged, with the answers its attempts got.
struct LoadResult {
    acked: BTreeMap<String, Vec<u8>>,
    failed_puts: Vec<String>,
}

/// One PUT as a load balancer would send it: to node `turn`, and to the next node when
/// a node does not answer (restarting) or answers 503 (shutting down). `Ok` when it
/// was acknowledged; `Err` with the answers of every attempt otherwise. A 409 counts as
/// acknowledged only after an attempt whose answer was lost, and when the node then
/// serves exactly these bytes (that attempt stored them).
async fn put_with_retries(
    http: &reqwest::Client,
    urls: &[String],
    turn: usize,
    k: &str,
    body: &[u8],
    counts: &LoadCounts,
) -> Result<(), String> {
    let mut answers = Vec::new();
    for attempt in 0..urls.len() {
        let url = &urls[(turn + attempt) % urls.len()];
        let status = put(http, url, k, body.to_vec()).await;
        answers.push(format!("{url}: {status}"));
        match status {
            200 => return Ok(()),
            0 | 503 => {
                counts.puts_retried.fetch_add(1, Ordering::Relaxed);
            }
            409 if answers.iter().any(|a| a.ends_with(": 0")) => {
                let (status, got) = get(http, url, k).await;
                if status == 200 && got == body {
                    return Ok(());
                }
                answers.push(format!("then GET {url}: {status}, other bytes or none"));
                break;
            }
            _ => break,
        }
    }
    Err(format!("PUT {k}: {}", answers.join("; ")))
}

/// PUTs new artifacts and GETs acknowledged ones, round-robin over the nodes, like a
/// load balancer: a node that refuses the connection (restarting) is skipped for the next
/// one. Every PUT ends acknowledged or is listed as failed; any answer other than 200 to
/// a GET of an acknowledged artifact is a failure.
async fn run_load(
    urls: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    counts: Arc<LoadCounts>,
) -> LoadResult {
    let http = client();
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let mut failed_puts = Vec::new();
    let mut turn = 0usize;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let (k, body) = (key("c0", i), random_bytes(32 * 1024));
        i += 1;
        counts.puts_started.fetch_add(1, Ordering::Relaxed);
        match put_with_retries(&http, &urls, turn, &k, &body, &counts).await {
            Ok(()) => {
                counts.puts_ok.fetch_add(1, Ordering::Relaxed);
                acked.push((k, body));
            }
            Err(why) => {
                eprintln!("{why}");
                counts.puts_failed.fetch_add(1, Ordering::Relaxed);
                failed_puts.push(why);
            }
        }
        for _ in 0..3 {
            let Some((k, body)) = acked.get(rand::random_range(0..acked.len().max(1))) else {
                break;
            };
            turn += 1;
            let mut answered = false;
            for attempt in 0..urls.len() {
                let url = &urls[(turn + attempt) % urls.len()];
                let (status, got) = get(&http, url, k).await;
                if status == 0 {
                    counts.gets_retried.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                answered = true;
                if status == 200 && &got == body {
                    counts.gets_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("GET {k} through {url}: {status}");
                    counts.gets_failed.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            if !answered {
                eprintln!("GET {k}: no node answered");
                counts.gets_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    LoadResult {
        acked: acked.into_iter().collect(),
        failed_puts,
    }
}

/// An HTTP proxy in front of a node that answers the first request at once and holds
/// every later one until [`RequestGate::open`]: a test can act between two requests of a
/// client, whatever the client's pace.
#[derive(Clone)]
struct RequestGate {
    url: String,
    /// Requests answered so far.
    answered: Arc<AtomicU64>,
    /// Requests that had to wait for the gate.
    held: Arc<AtomicU64>,
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl RequestGate {
    async fn start(upstream: String) -> RequestGate {
        let (open, _) = tokio::sync::watch::channel(false);
        let gate = RequestGate {
            url: String::new(),
            answered: Arc::default(),
            held: Arc::default(),
            open: Arc::new(open),
        };
        let arrived = Arc::new(AtomicU64::new(0));
        let client = nxcache_tests::http_client();
        let handler = {
            let gate = gate.clone();
            move |request: axum::extract::Request| {
                let (gate, client, upstream, arrived) = (
                    gate.clone(),
                    client.clone(),
                    upstream.clone(),
                    arrived.clone(),
                );
                async move {
                    if arrived.fetch_add(1, Ordering::SeqCst) >= 1 {
                        gate.held.fetch_add(1, Ordering::SeqCst);
                        let mut open = gate.open.subscribe();
                        let _ = open.wait_for(|open| *open).await;
                    }
                    let (parts, body) = request.into_parts();
                    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    let mut forward = client
                        .request(parts.method, format!("{upstream}{path}"))
                        .body(body);
                    for (name, value) in &parts.headers {
                        if name != "host" && name != "connection" {
                            forward = forward.header(name, value);
                        }
                    }
                    let answer = forward.send().await.expect("node 2 answers");
                    let mut response = axum::response::Response::builder().status(answer.status());
                    for (name, value) in answer.headers() {
                        if name != "connection" && name != "transfer-encoding" {
                            response = response.header(name, value);
                        }
                    }
                    let bytes = answer.bytes().await.expect("node 2's body");
                    gate.answered.fetch_add(1, Ordering::SeqCst);
                    response.body(axum::body::Body::from(bytes)).unwrap()
                }
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, axum::Router::new().fallback(handler))
                .await
                .unwrap()
        });
        RequestGate { url, ..gate }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}
