//! Helpers shared by the workspace's end-to-end tests: nodes started in process or as
//! real `nxcache` processes, and small HTTP utilities.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nxcache_config::{FileConfig, ServeArgs, ServeConfig};

pub mod nx;

pub const RW_TOKEN: &str = "test-read-write-token-0001";
pub const RO_TOKEN: &str = "test-read-only-token-0001";

/// Base configuration of a test node: loopback, random port, fsync off (speed), the two
/// test tokens, the given data dir.
pub fn test_config(data_dir: &Path) -> ServeConfig {
    // Every helper that starts a node or a client puts the calling test under the deadline.
    watchdog::arm();
    let args = ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(data_dir.to_path_buf()),
        fsync: Some(nxcache_config::OnOff::Off),
        read_write_tokens: Some(vec![nxcache_config::Secret::new(RW_TOKEN)]),
        read_only_tokens: Some(vec![nxcache_config::Secret::new(RO_TOKEN)]),
        admin_tokens: Some(vec![nxcache_config::Secret::new(ADMIN_TOKEN)]),
        ..ServeArgs::default()
    };
    ServeConfig::merge(args, FileConfig::default()).unwrap()
}

/// Waiting on conditions (with a deadline naming what was awaited) and the per-test
/// deadline: shared with the crates' own tests.
pub use nxcache_testkit::{PATIENCE, wait_for, wait_until, wait_until_blocking, watchdog};

/// How long a child process gets to exit after SIGTERM or SIGKILL before the test fails.
const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// Sends signal `signal` (`libc::SIGTERM`, `libc::SIGSTOP`, ...) to the process `pid`
/// through kill(2), no external `kill` binary; fails the test if it cannot be delivered.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) on a pid the test started; no memory is involved.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        sent,
        0,
        "signal {signal} to pid {pid} failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Waits at most `limit` for `child` to exit; `None` when it still runs.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            watchdog::release(child.id());
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command that should end by itself within `limit`, without the caller's
/// `NXCACHE_*` / `OTEL_*` variables and with no stdin; returns its output. Fails the test
/// naming the command if it is still running then (and kills it).
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = nxcache_testkit::env::isolate(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    watchdog::arm();
    watchdog::adopt(child.id());
    // Read both pipes meanwhile: a child blocked on a full pipe would never exit.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let Some(status) = exit_within(&mut child, limit) else {
        let _ = child.kill();
        let _ = exit_within(&mut child, EXIT_WITHIN);
        panic!("{command:?} was still running after {limit:?}");
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The value of an unlabelled or exactly-labelled sample in a Prometheus text page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

pub async fn metrics_page(base_url: &str) -> String {
    http_client()
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// The workspace root (where Cargo.toml and target/ are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of the `nxcache` binary, built (once per test process) if it is missing or stale.
pub fn nxcache_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(explicit) = std::env::var("NXCACHE_BIN") {
            return PathBuf::from(explicit);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Without the variables the outer `cargo test` set for this binary, which would
        // make the nested build differ from (and redo) the one that built it.
        let status = nxcache_testkit::env::isolate_cargo(&mut Command::new(cargo))
            .current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "nxcache", "--bin", "nxcache"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building the nxcache binary failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("target"));
        target.join("debug").join("nxcache")
    })
}

/// A real `nxcache serve` process, started without the caller's `NXCACHE_*` / `OTEL_*`
/// variables (only the ones the test passes). Killed on drop.
pub struct NodeProcess {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub url: String,
    pub stdout: PathBuf,
    /// Everything the process wrote on stderr (its log), across restarts.
    pub log: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl NodeProcess {
    /// Starts `nxcache serve` with `args` (plus JSON logs and the data dir) and waits for
    /// it to report the URL it serves on.
    pub fn start(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut node = NodeProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            url: String::new(),
            stdout: data_dir.with_extension("stdout"),
            log: data_dir.with_extension("log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let stdout = std::fs::File::create(&self.stdout).unwrap();
        let mut cmd = Command::new(nxcache_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--log-format", "json"])
            .args(&self.args)
            .args(
                // Parallel tests must not fight over the default peer port.
                if self.args.iter().any(|a| a == "--grpc-listen") {
                    &[][..]
                } else {
                    &["--grpc-listen", "127.0.0.1:0"][..]
                },
            )
            .env_remove("RUST_LOG")
            .stdout(stdout)
            .stderr(Stdio::piped());
        nxcache_testkit::env::isolate(&mut cmd);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        watchdog::arm();
        let mut child = cmd.spawn().expect("spawn nxcache");
        watchdog::adopt(child.id());
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // Forward the log to the test's output (and its file) and pick out the serving URL.
        std::thread::spawn(move || {
            use std::io::Write;
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[node] {line}");
                let _ = writeln!(log, "{line}");
                if !sent
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "nxcache is serving"
                {
                    let _ = tx.send(v["url"].as_str().unwrap_or_default().to_owned());
                    sent = true;
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(why) => {
                let _ = child.kill();
                let exited = exit_within(&mut child, EXIT_WITHIN);
                let what = match why {
                    std::sync::mpsc::RecvTimeoutError::Timeout => "within a minute".to_owned(),
                    std::sync::mpsc::RecvTimeoutError::Disconnected => {
                        format!("before it closed its log (exit: {exited:?})")
                    }
                };
                panic!(
                    "nxcache did not report that it is serving {what}; its log: {}",
                    self.log.display()
                );
            }
        };
        self.url = url;
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if exit_within(&mut child, EXIT_WITHIN).is_none() {
                // Only a process stuck in the kernel survives SIGKILL for a minute; in a
                // drop (the test already failing) say so rather than panic again.
                eprintln!("pid {} survived SIGKILL for {EXIT_WITHIN:?}", child.id());
            }
        }
    }

    /// SIGTERM, then waits for the exit (a minute at most, or the test fails); returns
    /// the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        match self.terminate_within(EXIT_WITHIN) {
            Some(status) => status,
            None => panic!(
                "nxcache (pid {}) did not exit within {EXIT_WITHIN:?} of SIGTERM",
                self.pid()
            ),
        }
    }

    /// Starts the process again with the same arguments and data dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub const CLUSTER_SECRET: &str = "process-test-cluster-secret";
pub const ADMIN_TOKEN: &str = "test-admin-token-0001";

/// A free TCP port on 127.0.0.1 for a node to bind later (see `nxcache_testkit`).
pub use nxcache_testkit::free_port;

/// Three (or more) `nxcache serve` processes forming one cluster: node 1 bootstraps,
/// the others join through it. Fixed ports, so a killed node restarts where it was.
pub struct ProcessCluster {
    pub nodes: Vec<NodeProcess>,
    pub grpc_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl ProcessCluster {
    pub fn start(size: usize) -> Self {
        Self::start_inner(size, &[], &[])
    }

    /// Like [`ProcessCluster::start`], every node also given `extra` arguments and `env`.
    pub fn start_with_env(size: usize, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_inner(size, extra, env)
    }

    fn start_inner(size: usize, extra: &[&str], extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let grpc_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let seed = format!("127.0.0.1:{}", grpc_ports[0]);
        let mut nodes = Vec::new();
        for (i, grpc) in grpc_ports.iter().enumerate() {
            let id = (i + 1).to_string();
            let http = format!("127.0.0.1:{}", free_port());
            let grpc_addr = format!("127.0.0.1:{grpc}");
            let mut args = vec![
                "--node-id".to_string(),
                id,
                "--listen".into(),
                http,
                "--grpc-listen".into(),
                grpc_addr.clone(),
                "--advertise".into(),
                grpc_addr,
            ];
            if i == 0 {
                args.push("--bootstrap".into());
            } else {
                args.extend(["--join".into(), seed.clone()]);
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            let mut env = vec![
                ("NXCACHE_CLUSTER_SECRET", CLUSTER_SECRET),
                ("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN),
                ("NXCACHE_READ_ONLY_TOKENS", RO_TOKEN),
                ("NXCACHE_ADMIN_TOKENS", ADMIN_TOKEN),
            ];
            env.extend_from_slice(extra_env);
            nodes.push(NodeProcess::start(
                &dir.path().join(format!("node-{}", i + 1)),
                &args,
                &env,
            ));
        }
        ProcessCluster {
            nodes,
            grpc_ports,
            _dir: dir,
        }
    }
}

/// Runs `nxcache admin --server URL ARGS...` with ADMIN_TOKEN in `NXCACHE_ADMIN_TOKEN`;
/// returns (success, stdout+stderr).
pub fn admin(server: &str, args: &[&str]) -> (bool, String) {
    let out = output_within(
        Command::new(nxcache_bin())
            .arg("admin")
            .args(["--server", server])
            .env("NXCACHE_ADMIN_TOKEN", ADMIN_TOKEN)
            .args(args),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `nxcache admin status --json` of one node, parsed; None while it does not answer.
/// Waits until the node at `url` lists `count` members, every one reachable.
pub async fn wait_for_reachable_members(url: &str, count: usize) {
    let url = url.to_owned();
    wait_until(PATIENCE, &format!("{count} reachable members"), || {
        let url = url.clone();
        async move {
            admin_status(&url).is_some_and(|s| {
                s["members"]
                    .as_array()
                    .is_some_and(|m| m.len() == count && m.iter().all(|m| m["reachable"] == true))
            })
        }
    })
    .await;
}

/// Makes a token through the admin CLI (`tokens create --json` and `args`); its secret.
pub fn create_token(server: &str, args: &[&str]) -> String {
    let mut all = vec!["tokens", "create", "--json"];
    all.extend_from_slice(args);
    let (ok, out) = admin(server, &all);
    assert!(ok, "{out}");
    let created: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    created["token"].as_str().unwrap().to_owned()
}

pub fn admin_status(server: &str) -> Option<serde_json::Value> {
    let (ok, text) = admin(server, &["status", "--json"]);
    if !ok {
        return None;
    }
    serde_json::from_str(text.trim()).ok()
}

impl ProcessCluster {
    /// Like [`ProcessCluster::start`], every node also given `extra` arguments.
    pub fn start_with(size: usize, extra: &[&str]) -> Self {
        Self::start_inner(size, extra, &[])
    }
}

impl ProcessCluster {
    /// `size` nodes (ids 1..=size) sharing one configuration, as in a StatefulSet or the
    /// compose file: every node gets the whole seed list and `formation` (the flags that
    /// say how a cluster is formed), and all are started at once.
    pub fn start_shared(size: usize, formation: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let grpc_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let seeds = grpc_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = std::thread::scope(|scope| {
            let starting: Vec<_> = grpc_ports
                .iter()
                .enumerate()
                .map(|(i, grpc)| {
                    let grpc_addr = format!("127.0.0.1:{grpc}");
                    let mut args = vec![
                        "--node-id".to_string(),
                        (i + 1).to_string(),
                        "--listen".into(),
                        format!("127.0.0.1:{}", free_port()),
                        "--grpc-listen".into(),
                        grpc_addr.clone(),
                        "--advertise".into(),
                        grpc_addr,
                        "--join".into(),
                        seeds.clone(),
                    ];
                    args.extend(formation.iter().map(|s| s.to_string()));
                    let data_dir = dir.path().join(format!("node-{}", i + 1));
                    scope.spawn(move || {
                        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                        NodeProcess::start(
                            &data_dir,
                            &args,
                            &[
                                ("NXCACHE_CLUSTER_SECRET", CLUSTER_SECRET),
                                ("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN),
                                ("NXCACHE_READ_ONLY_TOKENS", RO_TOKEN),
                                ("NXCACHE_ADMIN_TOKENS", ADMIN_TOKEN),
                            ],
                        )
                    })
                })
                .collect();
            starting
                .into_iter()
                .map(|s| s.join().expect("a node failed to start"))
                .collect()
        });
        ProcessCluster {
            nodes,
            grpc_ports,
            _dir: dir,
        }
    }
}

/// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`) to a process.
pub fn signal(pid: u32, name: &str) {
    let signal = match name {
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        other => panic!("no signal named {other} in the test helpers"),
    };
    send_signal(pid, signal);
}

/// `nxcache serve`'s flags parsed as the binary would (`argv[0]` is the program name),
/// except that no `NXCACHE_*` variable of the caller fills a flag the test did not give:
/// an in-process node is configured by its test alone.
pub fn parse_serve_flags(argv: &[String]) -> ServeArgs {
    use clap::{Args, FromArgMatches};
    let command =
        ServeArgs::augment_args(clap::Command::new("nxcache-serve")).mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| panic!("test flags {argv:?}: {e}"));
    ServeArgs::from_arg_matches(&matches).unwrap()
}

/// Nodes of one cluster in this test process, on fixed loopback ports (so a stopped node
/// restarts where it was). Node 0 bootstraps; the others join through it.
pub struct InProcessCluster {
    pub nodes: Vec<Option<nxcache::RunningNode>>,
    configs: Vec<ServeConfig>,
    _dir: tempfile::TempDir,
}

impl InProcessCluster {
    /// `size` nodes, each given `extra` flags (e.g. `--on-degraded strict`). With
    /// `NXCACHE_TEST_LOG` set (a filter such as `debug`), the nodes log to stderr.
    pub async fn start(size: usize, extra: &[&str]) -> Self {
        watchdog::arm();
        if let Ok(filter) = std::env::var("NXCACHE_TEST_LOG") {
            let _ = nxcache_telemetry::init_logging(nxcache_telemetry::LogFormat::Text, &filter);
        }
        let dir = tempfile::tempdir().unwrap();
        let seed_port = free_port();
        let mut cluster = InProcessCluster {
            nodes: Vec::new(),
            configs: Vec::new(),
            _dir: dir,
        };
        for i in 0..size {
            let grpc = if i == 0 { seed_port } else { free_port() };
            let config = cluster.config_for(i, grpc, seed_port, extra);
            cluster.configs.push(config.clone());
            cluster
                .nodes
                .push(Some(nxcache::start(config).await.unwrap()));
        }
        cluster.wait_members(size).await;
        cluster
    }

    fn config_for(&self, i: usize, grpc: u16, seed: u16, extra: &[&str]) -> ServeConfig {
        let data = self._dir.path().join(format!("node-{i}"));
        let listen = format!("127.0.0.1:{}", free_port());
        let grpc_addr = format!("127.0.0.1:{grpc}");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--node-id".into(),
            i.to_string(),
            "--listen".into(),
            listen,
            "--grpc-listen".into(),
            grpc_addr.clone(),
            "--advertise".into(),
            grpc_addr,
            "--data-dir".into(),
            data.display().to_string(),
            "--fsync".into(),
            "off".into(),
            "--read-write-tokens".into(),
            RW_TOKEN.into(),
            "--read-only-tokens".into(),
            RO_TOKEN.into(),
            "--admin-tokens".into(),
            ADMIN_TOKEN.into(),
            "--cluster-secret".into(),
            CLUSTER_SECRET.into(),
            "--anti-entropy-interval".into(),
            "2s".into(),
        ];
        if i == 0 {
            args.push("--bootstrap".into());
        } else {
            args.extend(["--join".into(), format!("127.0.0.1:{seed}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        ServeConfig::merge(parse_serve_flags(&args), FileConfig::default()).unwrap()
    }

    /// Adds a node that joins through node 0.
    pub async fn add_node(&mut self, extra: &[&str]) -> usize {
        let i = self.nodes.len();
        let seed = self.configs[0]
            .cluster
            .advertise
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap();
        let config = self.config_for(i, free_port(), seed, extra);
        self.configs.push(config.clone());
        self.nodes.push(Some(nxcache::start(config).await.unwrap()));
        self.wait_members(self.nodes.len()).await;
        i
    }

    pub fn node(&self, i: usize) -> &nxcache::RunningNode {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn url(&self, i: usize) -> String {
        self.node(i).base_url()
    }

    /// Stops a node (in-flight requests finish; nothing more is answered).
    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await.unwrap();
        }
    }

    /// Starts a stopped node again, same id, ports and data.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        let config = self.configs[i].clone();
        self.nodes[i] = Some(nxcache::start(config).await.unwrap());
    }

    /// Cuts the data-plane links between the nodes in `a` and those in `b`, both ways: a
    /// partition for artifacts (Raft traffic still flows, so membership stays as it is).
    pub fn partition_data(&self, a: &[usize], b: &[usize]) {
        for (from, to) in [(a, b), (b, a)] {
            for i in from {
                if let Some(node) = &self.nodes[*i] {
                    node.data().cut_peers(to.iter().map(|j| *j as u64));
                }
            }
        }
    }

    /// Undoes every [`InProcessCluster::partition_data`].
    pub fn heal_data(&self) {
        for node in self.nodes.iter().flatten() {
            node.data().heal_peers();
        }
    }

    /// Waits until every running node sees `n` members and the same ring epoch.
    pub async fn wait_members(&self, n: usize) {
        wait_until(Duration::from_secs(60), "membership settled", || async {
            let views: Vec<_> = self
                .nodes
                .iter()
                .flatten()
                .map(|node| node.data().view())
                .collect();
            views
                .iter()
                .all(|v| v.addrs.len() == n && v.epoch() == views[0].epoch())
        })
        .await;
    }
}

/// PUT `body` under `hash` at `base`; returns the status.
pub async fn put(client: &reqwest::Client, base: &str, hash: &str, body: Vec<u8>) -> u16 {
    client
        .put(format!("{base}/v1/cache/{hash}"))
        .bearer_auth(RW_TOKEN)
        // A test fails rather than hangs when a node never answers.
        .timeout(Duration::from_secs(120))
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// GET `hash` at `base`: the status and the body.
pub async fn get(client: &reqwest::Client, base: &str, hash: &str) -> (u16, Vec<u8>) {
    match client
        .get(format!("{base}/v1/cache/{hash}"))
        .bearer_auth(RW_TOKEN)
        .timeout(Duration::from_secs(120))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (
                status,
                r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
            )
        }
        Err(_) => (0, Vec::new()),
    }
}

// ---- Shared by the operations, peer TLS and limits tests ----------------------------

/// An HTTP client whose every request gives up after a minute: a node that never
/// answers fails the test instead of hanging it.
pub fn http_client() -> reqwest::Client {
    watchdog::arm();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

/// A plain-text gRPC channel to `addr` (host:port) whose connection attempt and every
/// call give up after a minute: a node that never answers fails the test, not hangs it.
pub async fn grpc_channel(addr: &str) -> tonic::transport::Channel {
    watchdog::arm();
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a gRPC address")
        .connect_timeout(Duration::from_secs(60))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the gRPC server at {addr}: {e}"))
}

/// Whether a node's data dir holds the committed blob `key` (for the default namespace,
/// the hash itself): blobs live in `blobs/<shard>/<key>`, uploads in progress under a
/// hidden name, so only a complete artifact counts.
pub fn holds_on_disk(data_dir: &Path, key: &str) -> bool {
    let Ok(shards) = std::fs::read_dir(data_dir.join("blobs")) else {
        return false;
    };
    shards
        .flatten()
        .any(|shard| shard.path().join(key).is_file())
}

/// The sum of every sample of `name` (a counter or gauge family) whose label set
/// contains each of `labels` (e.g. `method="Blobs/Head"`); 0 when the family has samples
/// but none with those labels.
///
/// Panics, naming the metric, when the page has no sample of `name` at all: a renamed or
/// unregistered metric must fail the assertion made on it, not read as 0. (A labelled
/// family appears with its first sample; to wait for that, use [`metric_sum_if_present`].)
pub fn metric_sum(page: &str, name: &str, labels: &[&str]) -> f64 {
    metric_sum_if_present(page, name, labels).unwrap_or_else(|| {
        let families: std::collections::BTreeSet<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        panic!(
            "the metric {name} is not on the /metrics page (renamed, or never registered?); \
             the page has these families: {families:?}"
        )
    })
}

/// Like [`metric_sum`], `None` when the page has no sample of the family `name` yet.
pub fn metric_sum_if_present(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut family_seen = false;
    let mut sum = 0.0;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (family, label_set) = match series.split_once('{') {
            Some((family, rest)) => (family, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if family != name {
            continue;
        }
        family_seen = true;
        let wanted = labels
            .iter()
            .all(|want| label_set.split(',').any(|have| have == *want));
        if wanted && let Ok(value) = value.parse::<f64>() {
            sum += value;
        }
    }
    family_seen.then_some(sum)
}

#[cfg(test)]
#[test]
fn metric_sum_fails_loudly_on_a_missing_family() {
    let page = "# TYPE nxcache_x_total counter\n\
                nxcache_x_total{method=\"a\",result=\"ok\"} 2\n\
                nxcache_x_total{method=\"b\",result=\"ok\"} 3\n";
    assert_eq!(metric_sum(page, "nxcache_x_total", &[]), 5.0);
    assert_eq!(metric_sum(page, "nxcache_x_total", &[r#"method="b""#]), 3.0);
    assert_eq!(metric_sum(page, "nxcache_x_total", &[r#"method="c""#]), 0.0);
    assert_eq!(metric_sum_if_present(page, "nxcache_y_total", &[]), None);
    let renamed = std::panic::catch_unwind(|| metric_sum(page, "nxcache_y_total", &[]));
    let message = renamed.expect_err("a missing family read as a value");
    let message = message.downcast_ref::<String>().unwrap();
    assert!(message.contains("nxcache_y_total"), "{message}");
}

impl NodeProcess {
    /// SIGTERM, then waits at most `limit` for the process to exit. `None` when it is
    /// still running then (it is killed when the `NodeProcess` is dropped).
    pub fn terminate_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.sigterm();
        self.wait_exit_within(limit)
    }

    /// Sends SIGTERM (a graceful shutdown) without waiting.
    pub fn sigterm(&self) {
        send_signal(self.pid(), libc::SIGTERM);
    }

    /// Waits at most `limit` for the process to exit; `None` when it still runs.
    pub fn wait_exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = exit_within(self.child.as_mut().expect("running"), limit)?;
        self.child = None;
        Some(status)
    }
}

/// A self-signed certificate for 127.0.0.1 (`cert.pem`, `key.pem` in `dir`), made with
/// openssl, for nodes serving HTTPS.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = output_within(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            // A server certificate, not a CA (rustls refuses a CA as the server's own).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        PATIENCE,
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    (cert, key)
}
