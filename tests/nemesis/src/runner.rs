//! One run: hosts, cluster, workload, nemesis, settle, check, report; and everything it
//! made removed at the end, also when it is interrupted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use tokio::sync::watch;

use crate::cluster::{CLIENT_ADDR, Cluster};
use crate::faults::{self, FaultKind, PlanOptions, STREAM_WORKLOAD};
use crate::history::{self, FaultEvent, Phase, Record, Recorder, Run};
use crate::hosts::{self, HostSet};
use crate::nemesis::Nemesis;
use crate::workload::{Workload, WorkloadOptions};
use crate::{checker, report, settle};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub seed: u64,
    pub minutes: f64,
    pub nodes: usize,
    pub kinds: Vec<FaultKind>,
    /// The `--faults` words as given (for the replay line).
    pub faults_arg: String,
    pub bin: PathBuf,
    pub serve_args: Vec<String>,
    pub work_root: PathBuf,
    pub results_root: PathBuf,
    pub rate: f64,
    pub concurrency: usize,
    pub settle: Duration,
    pub grace_ms: u64,
    pub max_bytes: u64,
}

impl RunOptions {
    pub fn replay_command(&self) -> String {
        format!(
            "tests/nemesis/run.sh --minutes {} --seed {} --nodes {} --faults {}",
            self.minutes, self.seed, self.nodes, self.faults_arg
        )
    }
}

/// Exit codes: 0 every check held, 1 violations, 2 the suite itself failed, 130/143
/// interrupted.
pub fn run_one(o: RunOptions) -> i32 {
    if !hosts::is_root() {
        eprintln!(
            "the nemesis suite needs root (network namespaces, nft, tc, mount): run it as root, e.g. `sudo tests/nemesis/run.sh ...`"
        );
        return 2;
    }
    for tag in hosts::cleanup_leftovers() {
        eprintln!("removed what an earlier run (tag {tag}) left behind");
    }
    let tag = format!("{:06x}", rand::rng().random::<u32>() & 0xff_ffff);
    let work_dir = o.work_root.join(&tag);
    let results = o.results_root.join(format!("seed-{}-{tag}", o.seed));
    let hosts = match set_up(&tag, &work_dir, &results) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            eprintln!("setting up the test hosts failed: {e:#}");
            hosts::cleanup_leftovers();
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            hosts.teardown(&work_dir);
            return 2;
        }
    };
    let code = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return 2;
        };
        tokio::select! {
            code = run_async(&o, hosts.clone(), &work_dir, &results) => code,
            _ = int.recv() => interrupted(&results, 130),
            _ = term.recv() => interrupted(&results, 143),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    hosts.teardown(&work_dir);
    code
}

fn interrupted(results: &Path, code: i32) -> i32 {
    eprintln!(
        "interrupted: removing the test hosts; the partial history is {}",
        results.join("history.jsonl").display()
    );
    code
}

/// The switch, the client host, and this process moved into the client host (every
/// thread started later inherits it, so every client socket lives there).
fn set_up(tag: &str, work_dir: &Path, results: &Path) -> anyhow::Result<HostSet> {
    std::fs::create_dir_all(work_dir)?;
    std::fs::create_dir_all(results)?;
    let hosts = HostSet::create(tag, work_dir)?;
    let client = hosts.add_host("c", CLIENT_ADDR);
    let entered = client.and_then(|c| hosts::enter(&c.netns));
    if let Err(e) = entered {
        hosts.teardown(work_dir);
        return Err(e);
    }
    Ok(hosts)
}

async fn run_async(o: &RunOptions, hosts: Arc<HostSet>, work_dir: &Path, results: &Path) -> i32 {
    match run_checked(o, hosts, work_dir, results).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("the suite failed: {e:#}");
            copy_logs(work_dir, results);
            eprintln!(
                "seed {}; history {}; node logs {}",
                o.seed,
                results.join("history.jsonl").display(),
                results.join("logs").display()
            );
            2
        }
    }
}

async fn run_checked(
    o: &RunOptions,
    hosts: Arc<HostSet>,
    work_dir: &Path,
    results: &Path,
) -> anyhow::Result<i32> {
    let run_ms = (o.minutes * 60_000.0) as u64;
    let schedule = faults::plan(&PlanOptions {
        seed: o.seed,
        nodes: o.nodes,
        run_ms,
        kinds: o.kinds.clone(),
        warmup_ms: 10_000,
        max_extra_nodes: 2,
    });
    std::fs::write(results.join("schedule.txt"), schedule.render())?;
    eprintln!("schedule:\n{}", schedule.render());
    let history_path = results.join("history.jsonl");
    let (rec, writer) = Recorder::create(&history_path)?;
    let cluster = Arc::new(Cluster::new(
        hosts,
        work_dir,
        &o.bin,
        o.serve_args.clone(),
        &schedule.initial_nodes,
    )?);
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        - rec.now_ms();
    rec.record(Record::Run(Run {
        seed: o.seed,
        nodes: o.nodes,
        started_unix_ms,
        grace_ms: o.grace_ms,
        revocation_bound_ms: 1_000,
        binary: o.bin.display().to_string(),
        serve_args: cluster.common_args(),
    }));

    form_cluster(&cluster, &schedule.initial_nodes, schedule.tmpfs_node).await?;
    eprintln!(
        "[runner] cluster of {} formed at {} ms",
        o.nodes,
        rec.now_ms()
    );

    let (stop_workload, workload_stopped) = watch::channel(false);
    let (stop_nemesis, nemesis_stopped) = watch::channel(false);
    let (stop_watch, watch_stopped) = watch::channel(false);
    let nemesis = Nemesis::new(cluster.clone(), rec.clone());
    let watcher = tokio::spawn(nemesis.clone().watch(watch_stopped));
    let workload = Workload::new(
        cluster.clone(),
        rec.clone(),
        faults::rng_for(o.seed, STREAM_WORKLOAD),
        WorkloadOptions {
            concurrency: o.concurrency,
            rate: o.rate,
            max_bytes: o.max_bytes,
        },
        workload_stopped,
    );
    let load = tokio::spawn(workload.clone().run());
    let faults = tokio::spawn(
        nemesis
            .clone()
            .run(schedule.faults.clone(), nemesis_stopped),
    );

    tokio::time::sleep(Duration::from_millis(run_ms.saturating_sub(rec.now_ms()))).await;
    eprintln!("[runner] stopping the workload at {} ms", rec.now_ms());
    let _ = stop_workload.send(true);
    // Every operation has a client timeout; this bounds a hung one.
    if tokio::time::timeout(Duration::from_secs(120), load)
        .await
        .is_err()
    {
        eprintln!("[runner] the workload did not stop within 120 s");
    }
    let _ = stop_nemesis.send(true);
    let _ = faults.await;
    nemesis
        .heal_all()
        .await
        .context("healing every fault after the run")?;
    let last_heal_ms = rec.now_ms();
    eprintln!("[runner] every fault healed at {last_heal_ms} ms; settling");
    let outcome = settle::settle(
        &cluster,
        &rec,
        || rec.snapshot(),
        workload.key_states(),
        last_heal_ms,
        o.settle,
    )
    .await;
    let _ = stop_watch.send(true);
    let _ = watcher.await;
    record_panics(&cluster, &rec, started_unix_ms);
    rec.close();
    writer.finish().await?;

    // The checker reads the file, as any other checker would.
    let records = history::read(&history_path)?;
    let checked = checker::check(&records);
    std::fs::write(results.join("report.txt"), report::render(&checked, None))?;
    println!(
        "nemesis run: seed {}, {} nodes, {} min, faults {}",
        o.seed, o.nodes, o.minutes, o.faults_arg
    );
    print!("{}", report::render(&checked, Some(10)));
    println!("results: {}", results.display());
    let failed = !checked.violations.is_empty() || outcome.converged_ms.is_none();
    if failed {
        copy_logs(work_dir, results);
        println!("FAILED: seed {}", o.seed);
        print!("{}", schedule.render());
        println!("  schedule: {}", results.join("schedule.txt").display());
        println!("  history:  {}", history_path.display());
        println!("  report:   {}", results.join("report.txt").display());
        println!("  node logs: {}", results.join("logs").display());
        println!("  replay:   {}", o.replay_command());
    }
    cluster.stop_all().await;
    Ok(if failed { 1 } else { 0 })
}

/// Starts the initial nodes and waits until they form one cluster with every node
/// ready.
async fn form_cluster(
    cluster: &Arc<Cluster>,
    initial: &[u64],
    tmpfs_node: Option<u64>,
) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for id in initial {
        nodes.push(cluster.add_node(*id, tmpfs_node == Some(*id)).await?);
    }
    for n in &nodes {
        cluster.start(n)?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut formed = false;
        if let Some((_, status)) = cluster.leader().await {
            let members: Vec<u64> = status["members"]
                .as_array()
                .map(|m| m.iter().filter_map(|m| m["id"].as_u64()).collect())
                .unwrap_or_default();
            formed = initial.iter().all(|id| members.contains(id));
        }
        if formed {
            let mut ready = true;
            for n in &nodes {
                ready &= cluster.wait_ready(n, Duration::from_secs(1)).await;
            }
            if ready {
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the {} initial nodes did not form one ready cluster within 120 s",
                initial.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for n in &nodes {
        n.admitted.store(true, Ordering::SeqCst);
    }
    Ok(())
}

/// Every panic in the nodes' logs becomes a `panic` record: a task can die while its
/// process lives on (a Raft core that panicked leaves a node that serves data but can
/// never again take part in the control plane).
fn record_panics(cluster: &Cluster, rec: &Recorder, started_unix_ms: u64) {
    let mut id = 2_000_000;
    for node in cluster.all_nodes() {
        let Ok(text) = std::fs::read_to_string(&node.log) else {
            continue;
        };
        let mut at_ms = 0;
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(ms) = line
                .strip_prefix("{\"timestamp\":\"")
                .and_then(|rest| rest.get(..23))
                .and_then(unix_ms)
            {
                at_ms = ms.saturating_sub(started_unix_ms);
            }
            if line.starts_with("thread '") && line.contains(" panicked at ") {
                let location = line.split(" panicked at ").nth(1).unwrap_or_default();
                let message = lines.peek().copied().unwrap_or_default();
                id += 1;
                rec.record(Record::Nemesis(FaultEvent {
                    id,
                    kind: checker::PANIC.into(),
                    phase: Phase::Start,
                    at_ms,
                    nodes: vec![node.id],
                    edges: Vec::new(),
                    detail: format!(
                        "node {} panicked at {location} {message} (near {at_ms} ms; see its log)",
                        node.id
                    ),
                    sole_keys: Vec::new(),
                }));
            }
        }
    }
}

/// Unix milliseconds of a log timestamp `2026-11-27T11:04:20.898067` (UTC).
fn unix_ms(ts: &str) -> Option<u64> {
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms).ok()
}

fn copy_logs(work_dir: &Path, results: &Path) {
    let logs = results.join("logs");
    let _ = std::fs::create_dir_all(&logs);
    let Ok(dirs) = std::fs::read_dir(work_dir) else {
        return;
    };
    for d in dirs.flatten() {
        let log = d.path().join("node.log");
        if log.exists() {
            let name = format!("{}.log", d.file_name().to_string_lossy());
            let _ = std::fs::copy(&log, logs.join(name));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_timestamps_become_unix_milliseconds() {
        assert_eq!(super::unix_ms("1970-01-01T00:00:01.250000"), Some(1_250));
        // date -u -d 2026-11-27T11:04:20.898Z +%s%3N
        assert_eq!(
            super::unix_ms("2026-11-27T11:04:20.898067"),
            Some(1_795_777_460_898)
        );
        assert_eq!(super::unix_ms("not a time"), None);
    }
}
