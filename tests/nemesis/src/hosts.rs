//! Test hosts: one network namespace per host, each with a veth pair to a bridge that
//! lives in a namespace of its own, so a run adds nothing to the machine's own network
//! (no address, route or rule in the root namespace) and two runs never see each other.
//!
//! Names: `nxnem-<tag>-sw` (the bridge), `nxnem-<tag>-<host>` (a host); `<tag>` is
//! per run. `/run/nxcache-nemesis/<tag>/owner` names the runner process and its work
//! dir, so that a later run can remove what a killed one left (`cleanup_leftovers`).
//!
//! A host can drop packets from chosen peers (nft, in its own namespace: partitions of
//! any shape) and cap its bandwidth (tc tbf on both ends of its veth). Processes start
//! inside a host with `spawn_in`, and die with the runner (PR_SET_PDEATHSIG).
//!
//! Reused by benchmarks: `HostSet::create`, `add_host`, `spawn_in`, `cap_bandwidth`,
//! `teardown`.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub const PREFIX: &str = "nxnem-";
pub const STATE_ROOT: &str = "/run/nxcache-nemesis";
/// The hosts' subnet, inside the benchmarking range 198.18.0.0/15.
pub const SUBNET_PREFIX_LEN: u8 = 24;

/// Runs a command to completion; its stderr becomes the error.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    run_with_input(args, None)
}

pub fn run_with_input(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if let Some(input) = input {
        child.stdin.take().unwrap().write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace the suite made.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// Namespace name (`nxnem-<tag>-<name>`).
    pub netns: String,
    pub addr: Ipv4Addr,
    /// The bridge-side end of its veth (in the switch namespace).
    switch_port: String,
}

/// The hosts of one run and their bridge.
pub struct HostSet {
    pub tag: String,
    switch: String,
    hosts: Mutex<BTreeMap<String, Host>>,
    state_dir: PathBuf,
}

impl HostSet {
    /// Creates the switch namespace and its bridge, and records this process as the
    /// owner of `tag` (with `work_dir`, removed with the hosts).
    pub fn create(tag: &str, work_dir: &Path) -> anyhow::Result<HostSet> {
        let state_dir = Path::new(STATE_ROOT).join(tag);
        std::fs::create_dir_all(&state_dir)?;
        std::fs::write(
            state_dir.join("owner"),
            format!(
                "pid={}\nstart={}\nwork={}\n",
                std::process::id(),
                process_start_time(std::process::id()).unwrap_or_default(),
                work_dir.display()
            ),
        )?;
        let set = HostSet {
            tag: tag.to_owned(),
            switch: format!("{PREFIX}{tag}-sw"),
            hosts: Mutex::new(BTreeMap::new()),
            state_dir,
        };
        run(&["ip", "netns", "add", &set.switch])?;
        let sw = set.switch.as_str();
        run(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", sw, "link", "set", "br0", "up"])?;
        run(&["ip", "-n", sw, "link", "set", "lo", "up"])?;
        Ok(set)
    }

    /// A new host `name` (a few letters: it names a link, 15 characters at most with
    /// its prefix) at `addr`, plugged into the bridge.
    pub fn add_host(&self, name: &str, addr: Ipv4Addr) -> anyhow::Result<Host> {
        anyhow::ensure!(
            name.len() <= 10 && name.bytes().all(|b| b.is_ascii_alphanumeric()),
            "host name {name:?}: up to 10 letters and digits"
        );
        let host = Host {
            name: name.to_owned(),
            netns: format!("{PREFIX}{}-{name}", self.tag),
            addr,
            switch_port: format!("p-{name}"),
        };
        let (ns, sw) = (host.netns.as_str(), self.switch.as_str());
        run(&["ip", "netns", "add", ns])?;
        run(&[
            "ip",
            "-n",
            sw,
            "link",
            "add",
            &host.switch_port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        run(&[
            "ip",
            "-n",
            sw,
            "link",
            "set",
            &host.switch_port,
            "master",
            "br0",
            "up",
        ])?;
        let cidr = format!("{addr}/{SUBNET_PREFIX_LEN}");
        run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        self.hosts
            .lock()
            .unwrap()
            .insert(name.to_owned(), host.clone());
        Ok(host)
    }

    pub fn host(&self, name: &str) -> Option<Host> {
        self.hosts.lock().unwrap().get(name).cloned()
    }

    /// Makes `host` drop every packet from `from` (replacing what it dropped before);
    /// an empty list restores it.
    pub fn drop_from(&self, host: &Host, from: &[Ipv4Addr]) -> anyhow::Result<()> {
        let mut rules = String::from("table inet nxnemesis\ndelete table inet nxnemesis\n");
        rules.push_str(
            "table inet nxnemesis {\n  chain input {\n    type filter hook input priority 0; policy accept;\n",
        );
        if !from.is_empty() {
            let list: Vec<String> = from.iter().map(|a| a.to_string()).collect();
            rules.push_str(&format!("    ip saddr {{ {} }} drop\n", list.join(", ")));
        }
        rules.push_str("  }\n}\n");
        run_with_input(
            &["ip", "netns", "exec", &host.netns, "nft", "-f", "-"],
            Some(&rules),
        )?;
        Ok(())
    }

    /// Caps the host's bandwidth both ways (tc tbf), or lifts the cap.
    pub fn cap_bandwidth(&self, host: &Host, rate_kbit: Option<u32>) -> anyhow::Result<()> {
        for (ns, dev) in [
            (host.netns.as_str(), "eth0"),
            (self.switch.as_str(), host.switch_port.as_str()),
        ] {
            match rate_kbit {
                Some(rate) => {
                    // The bucket holds at least 10 ms of traffic (and a few packets).
                    let burst = (rate as u64 * 1000 / 8 / 100).max(16 * 1024);
                    run(&[
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{rate}kbit"),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        "400ms",
                    ])?;
                }
                None => {
                    // Absent already is fine.
                    let _ = run(&[
                        "ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
                    ]);
                }
            }
        }
        Ok(())
    }

    /// Kills every process left in the hosts, removes the namespaces, unmounts and
    /// deletes the work dir, and the owner record.
    pub fn teardown(&self, work_dir: &Path) {
        let mut names: Vec<String> = self
            .hosts
            .lock()
            .unwrap()
            .values()
            .map(|h| h.netns.clone())
            .collect();
        names.push(self.switch.clone());
        remove_run(&names, Some(work_dir), &self.state_dir);
    }
}

/// Start time of a process in clock ticks since boot (tells a live owner from a reused
/// pid).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Kills every process in `namespaces` (but this one), unmounts what is mounted under
/// `work_dir`, deletes the namespaces, the work dir and `state_dir`.
fn remove_run(namespaces: &[String], work_dir: Option<&Path>, state_dir: &Path) {
    let me = std::process::id();
    let mut pids = Vec::new();
    for ns in namespaces {
        if let Ok(out) = run(&["ip", "netns", "pids", ns]) {
            pids.extend(
                out.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .filter(|p| *p != me),
            );
        }
    }
    for pid in &pids {
        // SAFETY: plain kill(2) of a pid found in our own namespaces.
        unsafe {
            libc::kill(*pid as i32, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        reap_children();
        std::thread::sleep(Duration::from_millis(20));
    }
    reap_children();
    if let Some(dir) = work_dir {
        unmount_under(dir);
    }
    for ns in namespaces {
        let _ = run(&["ip", "netns", "del", ns]);
    }
    if let Some(dir) = work_dir {
        let _ = std::fs::remove_dir_all(dir);
        // The common parent too, once no run uses it (remove_dir leaves a full one).
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    let _ = std::fs::remove_dir_all(state_dir);
    let _ = std::fs::remove_dir(STATE_ROOT);
}

/// Collects exit statuses of this process's dead children (our killed nodes), so they
/// do not linger as zombies.
fn reap_children() {
    loop {
        // SAFETY: waitpid with WNOHANG on any child; no memory is shared.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 on a NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Removes what runs whose runner is gone left behind (namespaces, processes in them,
/// mounts, work dirs). Runs of live runners are left alone. Returns the tags removed.
pub fn cleanup_leftovers() -> Vec<String> {
    let mut by_tag: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(rest) = name.strip_prefix(PREFIX)
                && let Some((tag, _)) = rest.split_once('-')
            {
                by_tag
                    .entry(tag.to_owned())
                    .or_default()
                    .push(name.to_owned());
            }
        }
    }
    if let Ok(dirs) = std::fs::read_dir(STATE_ROOT) {
        for d in dirs.flatten() {
            by_tag
                .entry(d.file_name().to_string_lossy().into_owned())
                .or_default();
        }
    }
    let mut removed = Vec::new();
    for (tag, namespaces) in by_tag {
        let state_dir = Path::new(STATE_ROOT).join(&tag);
        let owner = std::fs::read_to_string(state_dir.join("owner")).unwrap_or_default();
        let field = |k: &str| {
            owner
                .lines()
                .find_map(|l| l.strip_prefix(k).map(str::to_owned))
        };
        let pid: Option<u32> = field("pid=").and_then(|p| p.parse().ok());
        let start: Option<u64> = field("start=").and_then(|p| p.parse().ok());
        if let (Some(pid), Some(start)) = (pid, start)
            && alive(pid)
            && process_start_time(pid) == Some(start)
        {
            continue;
        }
        let work = field("work=").map(PathBuf::from);
        remove_run(&namespaces, work.as_deref(), &state_dir);
        removed.push(tag);
    }
    removed
}

/// Moves the calling thread into `netns`. Called on the main thread before any other
/// thread exists, it moves the whole process (threads inherit it).
pub fn enter(netns: &str) -> anyhow::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("namespace {netns}"))?;
    // SAFETY: setns on a namespace file descriptor we hold open.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Every child is forked by one long-lived thread: PR_SET_PDEATHSIG fires when the
/// thread that forked a child ends, so short-lived pool threads must not fork.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("nemesis-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    })
}

/// Starts `cmd` inside `netns`; the child is killed if this process dies.
pub fn spawn_in(netns: &str, mut cmd: Command) -> anyhow::Result<Child> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("namespace {netns}"))?;
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls (setns, prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                // The runner died between fork and prctl.
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap()
        .send((cmd, tx))
        .map_err(|_| anyhow::anyhow!("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| anyhow::anyhow!("the spawner thread is gone"))?
        .context("spawn")
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2).
    if unsafe { libc::kill(pid as i32, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may create namespaces (runs as root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
