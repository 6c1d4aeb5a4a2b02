//! The cluster under test: one `nxcache serve` process per test host, each behind its
//! link proxy; starting, killing, pausing and re-imaging nodes; the admin API.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::faults::LinkRule;
use crate::flags::{self, Secrets};
use crate::hosts::{self, Host, HostSet};
use crate::proxy::Control;

/// The load generator's host.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

pub fn node_addr(id: u64) -> Ipv4Addr {
    assert!(id < 240, "node ids up to 239");
    Ipv4Addr::new(198, 18, 0, 10 + id as u8)
}

struct Proxy {
    child: Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

pub struct Node {
    pub id: u64,
    pub addr: Ipv4Addr,
    pub host: Host,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Mounted tmpfs of this size (bytes) when the data dir is one.
    pub tmpfs_size: Option<u64>,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
    proxy: tokio::sync::Mutex<Proxy>,
    /// False while the suite keeps the process down on purpose (kill, disk loss,
    /// removal): an exit then is no crash.
    pub expected_up: AtomicBool,
    /// A member the workload sends requests to (initial nodes, and joined ones once
    /// the cluster admitted them).
    pub admitted: AtomicBool,
    pub removed: AtomicBool,
}

impl Node {
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.addr, flags::HTTP_PORT)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    /// Exit status if the process ended (reaped here).
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut guard = self.child.lock().unwrap();
        let status = guard.as_mut()?.try_wait().ok()??;
        *guard = None;
        Some(status)
    }

    pub fn running(&self) -> bool {
        let mut guard = self.child.lock().unwrap();
        match guard.as_mut() {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    *guard = None;
                    false
                }
            },
        }
    }
}

pub struct Cluster {
    pub hosts: Arc<HostSet>,
    pub work_dir: PathBuf,
    pub bin: PathBuf,
    pub extra_args: Vec<String>,
    pub secrets: Secrets,
    pub http: reqwest::Client,
    nodes: Mutex<BTreeMap<u64, Arc<Node>>>,
    seeds: Vec<String>,
}

impl Cluster {
    pub fn new(
        hosts: Arc<HostSet>,
        work_dir: &Path,
        bin: &Path,
        extra_args: Vec<String>,
        initial: &[u64],
    ) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            hosts,
            work_dir: work_dir.to_owned(),
            bin: bin.to_owned(),
            extra_args,
            secrets: Secrets::generate(),
            http: reqwest::Client::builder()
                // Test hosts are never behind the machine's HTTP proxy.
                .no_proxy()
                .connect_timeout(Duration::from_secs(3))
                .pool_idle_timeout(Duration::from_secs(10))
                .build()?,
            nodes: Mutex::new(BTreeMap::new()),
            seeds: initial
                .iter()
                .map(|id| flags::advertise(node_addr(*id)))
                .collect(),
        })
    }

    pub fn node(&self, id: u64) -> Option<Arc<Node>> {
        self.nodes.lock().unwrap().get(&id).cloned()
    }

    /// Nodes not removed, by id.
    pub fn members(&self) -> Vec<Arc<Node>> {
        self.nodes
            .lock()
            .unwrap()
            .values()
            .filter(|n| !n.removed.load(Ordering::SeqCst))
            .cloned()
            .collect()
    }

    pub fn all_nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.lock().unwrap().values().cloned().collect()
    }

    /// The arguments every node gets (for the history's header).
    pub fn common_args(&self) -> Vec<String> {
        flags::serve_args(
            0,
            node_addr(0),
            Path::new("<data-dir>"),
            &self.seeds,
            flags::Formation::Expect(self.seeds.len()),
            &self.extra_args,
        )
    }

    /// Creates node `id`'s host, data dir (a tmpfs when `tmpfs`) and proxy; does not
    /// start the node.
    pub async fn add_node(&self, id: u64, tmpfs: bool) -> anyhow::Result<Arc<Node>> {
        let addr = node_addr(id);
        let hosts = self.hosts.clone();
        let host =
            tokio::task::spawn_blocking(move || hosts.add_host(&format!("n{id}"), addr)).await??;
        let dir = self.work_dir.join(format!("n{id}"));
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)?;
        let tmpfs_size = if tmpfs {
            let target = data_dir.display().to_string();
            let source = format!("{}{}", hosts::PREFIX, self.hosts.tag);
            hosts::run(&["mount", "-t", "tmpfs", &source, &target])?;
            Some(fs_size(&data_dir)?.0)
        } else {
            None
        };
        let mut seeds = self.seeds.clone();
        let own = flags::advertise(addr);
        let formation = if seeds.contains(&own) {
            flags::Formation::Expect(self.seeds.len())
        } else {
            flags::Formation::Join
        };
        if formation == flags::Formation::Join {
            // A joining node: the seeds and the nodes that joined before it.
            for n in self.members() {
                let a = flags::advertise(n.addr);
                if !seeds.contains(&a) {
                    seeds.push(a);
                }
            }
        }
        let args = flags::serve_args(id, addr, &data_dir, &seeds, formation, &self.extra_args);
        let proxy = self.start_proxy(&host).await?;
        let node = Arc::new(Node {
            id,
            addr,
            host,
            log: dir.join("node.log"),
            data_dir,
            tmpfs_size,
            args,
            child: Mutex::new(None),
            proxy: tokio::sync::Mutex::new(proxy),
            expected_up: AtomicBool::new(false),
            admitted: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        });
        self.nodes.lock().unwrap().insert(id, node.clone());
        Ok(node)
    }

    async fn start_proxy(&self, host: &Host) -> anyhow::Result<Proxy> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "proxy",
            "--listen",
            &format!("{}:{}", host.addr, flags::PROXY_PORT),
            "--upstream",
            &format!("127.0.0.1:{}", flags::GRPC_PORT),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = hosts::spawn_in(&host.netns, cmd)?;
        let stdin = tokio::process::ChildStdin::from_std(child.stdin.take().unwrap())?;
        let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap())?;
        let mut proxy = Proxy {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout).lines(),
        };
        // A first (empty) rule proves it reads its control channel.
        proxy_send(
            &mut proxy,
            &Control {
                peer: CLIENT_ADDR.into(),
                rule: None,
            },
        )
        .await
        .context("the link proxy did not answer")?;
        Ok(proxy)
    }

    /// Sets (or clears) the rule of the link from `peer` into `node`.
    pub async fn set_link(
        &self,
        node: &Node,
        peer: Ipv4Addr,
        rule: Option<LinkRule>,
    ) -> anyhow::Result<()> {
        let mut proxy = node.proxy.lock().await;
        proxy_send(
            &mut proxy,
            &Control {
                peer: peer.into(),
                rule,
            },
        )
        .await
    }

    /// Starts the node's process (again), same id, addresses and data dir.
    pub fn start(&self, node: &Node) -> anyhow::Result<()> {
        let mut guard = node.child.lock().unwrap();
        if let Some(c) = guard.as_mut()
            && c.try_wait()?.is_none()
        {
            bail!("node {} is running", node.id);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&node.args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Only what the suite sets: none of the caller's NXCACHE_* / OTEL_* variables.
        nxcache_testkit::env::isolate(&mut cmd);
        for (k, v) in flags::serve_env(&self.secrets) {
            cmd.env(k, v);
        }
        *guard = Some(hosts::spawn_in(&node.host.netns, cmd)?);
        node.expected_up.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// kill -9 and reap.
    pub async fn kill(&self, node: &Node) {
        node.expected_up.store(false, Ordering::SeqCst);
        let child = node.child.lock().unwrap().take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    pub fn pause(&self, node: &Node, stop: bool) -> anyhow::Result<()> {
        let pid = node
            .pid()
            .with_context(|| format!("node {} is not running", node.id))?;
        hosts::signal(pid, if stop { libc::SIGSTOP } else { libc::SIGCONT })?;
        Ok(())
    }

    /// Waits until the node answers /healthz.
    pub async fn wait_healthy(&self, node: &Node, within: Duration) -> bool {
        self.wait_path(node, "/healthz", within).await
    }

    /// Waits until the node answers /readyz with 200.
    pub async fn wait_ready(&self, node: &Node, within: Duration) -> bool {
        self.wait_path(node, "/readyz", within).await
    }

    async fn wait_path(&self, node: &Node, path: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .http
                .get(format!("{}{path}", node.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Shrinks the node's tmpfs to what it holds (plus `slack`), or restores its size.
    pub fn set_disk_full(&self, node: &Node, full: bool) -> anyhow::Result<()> {
        let original = node
            .tmpfs_size
            .with_context(|| format!("node {}'s data dir is not a tmpfs", node.id))?;
        let target = node.data_dir.display().to_string();
        if !full {
            hosts::run(&["mount", "-o", &format!("remount,size={original}"), &target])?;
            return Ok(());
        }
        // Writes go on while we shrink it: retry with a fresh figure.
        let mut last = None;
        for _ in 0..10 {
            let (_, used) = fs_size(&node.data_dir)?;
            let size = used + 512 * 1024;
            match hosts::run(&["mount", "-o", &format!("remount,size={size}"), &target]) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap())
    }

    /// Deletes everything in the node's data dir (the dir itself, or its mount, stays).
    pub fn wipe(&self, node: &Node) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&node.data_dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Stops everything: nodes (SIGCONT first is not needed for SIGKILL) and proxies.
    pub async fn stop_all(&self) {
        for node in self.all_nodes() {
            self.kill(&node).await;
            let mut proxy = node.proxy.lock().await;
            let _ = proxy.child.kill();
            let _ = proxy.child.wait();
        }
    }

    /// An admin API call: (status, body); status 0 when there was no answer.
    pub async fn admin(
        &self,
        node: &Node,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> (u16, String) {
        let mut req = self
            .http
            .request(method, format!("{}/admin/v1/{path}", node.url()))
            .bearer_auth(&self.secrets.admin)
            .timeout(timeout);
        if let Some(body) = body {
            req = req.json(&body);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    pub async fn status(&self, node: &Node, timeout: Duration) -> Option<Value> {
        let (status, text) = self
            .admin(node, reqwest::Method::GET, "status", None, timeout)
            .await;
        (status == 200)
            .then(|| serde_json::from_str(&text).ok())
            .flatten()
    }

    /// The node's token table as `name scope created_ms` lines, sorted.
    pub async fn tokens(&self, node: &Node) -> Option<Vec<String>> {
        let (status, text) = self
            .admin(
                node,
                reqwest::Method::GET,
                "tokens",
                None,
                Duration::from_secs(5),
            )
            .await;
        if status != 200 {
            return None;
        }
        let list: Vec<Value> = serde_json::from_str(&text).ok()?;
        let mut out: Vec<String> = list
            .iter()
            .map(|t| {
                format!(
                    "{} {} {}",
                    t["name"].as_str().unwrap_or_default(),
                    t["scope"].as_str().unwrap_or_default(),
                    t["created_ms"]
                )
            })
            .collect();
        out.sort();
        Some(out)
    }

    /// The leader as the first answering member sees it, with that status.
    pub async fn leader(&self) -> Option<(u64, Value)> {
        for node in self.members() {
            if let Some(s) = self.status(&node, Duration::from_secs(2)).await
                && let Some(l) = s["leader_id"].as_u64()
            {
                return Some((l, s));
            }
        }
        None
    }
}

async fn proxy_send(proxy: &mut Proxy, control: &Control) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(control)?;
    line.push('\n');
    proxy.stdin.write_all(line.as_bytes()).await?;
    proxy.stdin.flush().await?;
    let answer = tokio::time::timeout(Duration::from_secs(5), proxy.stdout.next_line())
        .await
        .context("the link proxy did not answer within 5 s")??
        .context("the link proxy exited")?;
    anyhow::ensure!(answer == "ok", "the link proxy answered {answer:?}");
    Ok(())
}

/// (size, used) of the file system holding `path`, in bytes.
pub fn fs_size(path: &Path) -> anyhow::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs fills the zeroed struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let size = st.f_blocks * st.f_frsize;
    let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
    Ok((size, used))
}

/// Keys (file names) of the committed blobs in a node's data dir (see
/// docs/architecture.md, "Local storage": `blobs/<xx>/<key>`; dot files are uploads in
/// progress).
pub fn blob_files(data_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(data_dir.join("blobs")) else {
        return out;
    };
    for shard in shards.flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                out.push((name, f.path()));
            }
        }
    }
    out
}
