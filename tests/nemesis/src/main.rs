//! `nxcache-nemesis`: run the suite, check a history, remove leftovers, or (internal)
//! serve as a link proxy. `tests/nemesis/run.sh` builds and runs it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nxcache_nemesis::faults::FaultKind;
use nxcache_nemesis::runner::{RunOptions, run_one};
use nxcache_nemesis::{checker, history, hosts, proxy, report};

#[derive(Parser)]
#[command(
    name = "nxcache-nemesis",
    about = "The nemesis suite of nxcache (docs/reliability.md)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the suite (as root): one seed, or with --ci several short ones.
    Run(RunArgs),
    /// Checks a history file (history.jsonl of a run) and prints the report.
    Check { history: PathBuf },
    /// Removes what killed runs left behind (namespaces, processes, mounts, files).
    Cleanup,
    /// A link proxy (started by the suite inside a node's host).
    #[command(hide = true)]
    Proxy {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Workload and faults last this long (then heal, settle, check) [default: 5, with
    /// --ci 1 per seed]
    #[arg(long)]
    minutes: Option<f64>,
    /// The seed of the fault schedule and the workload [default: random, printed]
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes at the start (joins may add up to 2 more for a while).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Fault kinds or groups, comma-separated: kill, pause, partition-halves,
    /// partition-leader, partition-one-way, partition-bridge, slow-link, lossy-link,
    /// disk-loss, disk-full, join, drain, remove; groups partition, link, process,
    /// disk, membership, all; none for a run without faults.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Bounded mode for CI: --ci-seeds runs (seeds S, S+1, ...), each its own process.
    #[arg(long)]
    ci: bool,
    #[arg(long, default_value_t = 3)]
    ci_seeds: u64,
    /// The nxcache binary under test.
    #[arg(long, default_value = "target/debug/nxcache")]
    bin: PathBuf,
    /// An extra argument for every `nxcache serve` (repeatable), e.g.
    /// `--serve-arg=--on-degraded --serve-arg=strict`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Data dirs and logs of the nodes (removed at the end).
    #[arg(long, default_value = "/tmp/nxcache-nemesis")]
    work_dir: PathBuf,
    /// History, schedule and report of each run (kept).
    #[arg(long, default_value = "target/nemesis")]
    results_dir: PathBuf,
    /// Data operations per second.
    #[arg(long, default_value_t = 15.0)]
    rate: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Longest wait, after the last heal, for the cluster to agree [default: 120, with
    /// --ci 60]
    #[arg(long)]
    settle_secs: Option<u64>,
    /// After a fault ends, how long the cluster still counts as degraded.
    #[arg(long, default_value_t = 10_000)]
    grace_ms: u64,
    /// After this many MiB sent, new PUTs stay small.
    #[arg(long, default_value_t = 1536)]
    max_mib: u64,
}

fn kinds(words: &str) -> Result<Vec<FaultKind>, String> {
    if words == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for w in words.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        for k in FaultKind::parse_selection(w)
            .ok_or_else(|| format!("unknown fault kind {w:?}; see `nxcache-nemesis run --help`"))?
        {
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    Ok(out)
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(args) if args.ci => run_ci(args),
        Cmd::Run(args) => run(args),
        Cmd::Check { history } => check(&history),
        Cmd::Cleanup => {
            for tag in hosts::cleanup_leftovers() {
                println!("removed the leftovers of run {tag}");
            }
            0
        }
        Cmd::Proxy { listen, upstream } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            match rt.block_on(proxy::serve(listen, upstream)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("proxy: {e:#}");
                    2
                }
            }
        }
    };
    std::process::exit(code);
}

fn run(args: RunArgs) -> i32 {
    let kinds = match kinds(&args.faults) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let minutes = args.minutes.unwrap_or(5.0);
    eprintln!(
        "nemesis: seed {seed}, {} nodes, {minutes} min, faults {}",
        args.nodes, args.faults
    );
    run_one(RunOptions {
        seed,
        minutes,
        nodes: args.nodes,
        kinds,
        faults_arg: args.faults,
        bin: args.bin,
        serve_args: args.serve_args,
        work_root: args.work_dir,
        results_root: args.results_dir,
        rate: args.rate,
        concurrency: args.concurrency,
        settle: Duration::from_secs(args.settle_secs.unwrap_or(120)),
        grace_ms: args.grace_ms,
        max_bytes: args.max_mib << 20,
    })
}

static CHILD: AtomicI32 = AtomicI32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn forward(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(child, signal);
        }
    }
}

/// Several seeds, each in its own process (each run moves its process into its own
/// client host). A signal is passed on to the run in progress, which cleans up.
fn run_ci(args: RunArgs) -> i32 {
    if let Err(e) = kinds(&args.faults) {
        eprintln!("{e}");
        return 2;
    }
    let first = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let minutes = args.minutes.unwrap_or(1.0);
    // SAFETY: installing a handler that only touches atomics and calls kill(2).
    unsafe {
        libc::signal(libc::SIGINT, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
    }
    let mut worst = 0;
    let mut summary = Vec::new();
    for seed in first..first + args.ci_seeds {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.arg("run")
            .args(["--seed", &seed.to_string()])
            .args(["--minutes", &minutes.to_string()])
            .args(["--nodes", &args.nodes.to_string()])
            .args(["--faults", &args.faults])
            .arg("--bin")
            .arg(&args.bin)
            .arg("--work-dir")
            .arg(&args.work_dir)
            .arg("--results-dir")
            .arg(&args.results_dir)
            .args(["--rate", &args.rate.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--settle-secs", &args.settle_secs.unwrap_or(60).to_string()])
            .args(["--grace-ms", &args.grace_ms.to_string()])
            .args(["--max-mib", &args.max_mib.to_string()]);
        for a in &args.serve_args {
            cmd.arg(format!("--serve-arg={a}"));
        }
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let code = match cmd.spawn() {
            Ok(mut child) => {
                CHILD.store(child.id() as i32, Ordering::SeqCst);
                let status = child.wait();
                CHILD.store(0, Ordering::SeqCst);
                status.ok().and_then(|s| s.code()).unwrap_or(2)
            }
            Err(e) => {
                eprintln!("cannot start a run: {e}");
                2
            }
        };
        summary.push(format!(
            "seed {seed}: {}",
            match code {
                0 => "every check held".to_owned(),
                1 => "VIOLATIONS".to_owned(),
                c => format!("suite error (exit {c})"),
            }
        ));
        worst = worst.max(code);
    }
    println!(
        "nemesis --ci ({minutes} min per seed): {}",
        summary.join("; ")
    );
    if INTERRUPTED.load(Ordering::SeqCst) {
        return 130;
    }
    worst
}

fn check(path: &std::path::Path) -> i32 {
    let records = match history::read(path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot read {}: {e:#}", path.display());
            return 2;
        }
    };
    let checked = checker::check(&records);
    print!("{}", report::render(&checked, None));
    if checked.violations.is_empty() { 0 } else { 1 }
}
