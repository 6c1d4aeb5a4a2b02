//! `nxcache bench`: a load generator for any server of the Nx remote-cache API (nxcache,
//! or a plain WebDAV server such as nginx for a baseline). It PUTs `--count` objects of
//! `--size` bytes with `--concurrency` workers, then GETs each back, and reports
//! throughput and latency percentiles per phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use nxcache_config::ByteSize;
use rand::RngCore;
use serde::Serialize;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the cache, as given to Nx (objects go to <url>/v1/cache/<hash>).
    #[arg(long, env = "NX_SELF_HOSTED_REMOTE_CACHE_SERVER")]
    pub url: String,
    /// Bearer token.
    #[arg(
        long,
        env = "NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Size of each object, e.g. 1KiB, 1MiB.
    #[arg(long, default_value = "1MiB")]
    pub size: ByteSize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Objects to PUT (each is then read back).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// How many times each object is read in the GET phase.
    #[arg(long, default_value_t = 1)]
    pub get_rounds: usize,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Which of nxcache's protocols to load, at its default mount point below --url.
    #[arg(long, value_enum, default_value_t = Protocol::Nx)]
    pub protocol: Protocol,
}

/// The cache protocols nxcache serves; each names an object differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `/v1/cache/{hash}`
    Nx,
    /// `/bazel/ac/{sha256}` (action results: no digest check on upload)
    Bazel,
    /// `/gradle/{key}`
    Gradle,
    /// `/ccache/{key[..2]}/{key[2..]}` (the subdirs layout)
    Ccache,
    /// `/v8/artifacts/{hash}?slug=bench`
    Turbo,
}

impl Protocol {
    /// The URL of object `id` below `base`.
    fn object_url(self, base: &str, id: u64) -> String {
        match self {
            Protocol::Nx => format!("{base}/v1/cache/{id}"),
            Protocol::Bazel => format!("{base}/bazel/ac/{id:064x}"),
            Protocol::Gradle => format!("{base}/gradle/{id:032x}"),
            Protocol::Ccache => {
                let key = format!("{id:034x}");
                format!("{base}/ccache/{}/{}", &key[..2], &key[2..])
            }
            Protocol::Turbo => format!("{base}/v8/artifacts/{id:016x}?slug=bench"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub mib_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub protocol: Protocol,
    pub object_bytes: u64,
    pub concurrency: usize,
    pub put: PhaseReport,
    pub get: PhaseReport,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} objects of {} bytes, concurrency {} against {}",
            args.count, report.object_bytes, report.concurrency, report.url
        );
        println!(
            "{:<5} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9}",
            "phase", "requests", "errors", "req/s", "MiB/s", "p50 ms", "p99 ms", "max ms"
        );
        for (name, p) in [("PUT", &report.put), ("GET", &report.get)] {
            println!(
                "{:<5} {:>9} {:>7} {:>10.1} {:>10.1} {:>9.2} {:>9.2} {:>9.2}",
                name,
                p.requests,
                p.errors,
                p.requests_per_second,
                p.mib_per_second,
                p.p50_ms,
                p.p99_ms,
                p.max_ms
            );
        }
    }
    if report.put.errors + report.get.errors > 0 {
        bail!(
            "{} PUT and {} GET requests failed",
            report.put.errors,
            report.get.errors
        );
    }
    Ok(())
}

pub async fn bench(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.concurrency == 0 || args.count == 0 {
        bail!("--concurrency and --count must be at least 1");
    }
    let size = args.size.0 as usize;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(300))
        .tcp_nodelay(true)
        .build()?;
    let mut payload = vec![0u8; size];
    rand::rng().fill_bytes(&mut payload);
    let payload = Bytes::from(payload);
    // A fresh key range per run: repeated runs never hit each other's objects.
    let run_id = u64::from(rand::rng().next_u32() % 1_000_000_000);
    let base = args.url.trim_end_matches('/').to_owned();
    let urls: Arc<Vec<String>> = Arc::new(
        (0..args.count as u64)
            .map(|i| args.protocol.object_url(&base, run_id * 1_000_000_000 + i))
            .collect(),
    );
    let auth = args.token.as_ref().map(|t| format!("Bearer {t}"));

    let put = phase(args.concurrency, args.count, size, {
        let (client, urls, auth, payload) = (client.clone(), urls.clone(), auth.clone(), payload);
        move |i| {
            let mut req = client
                .put(&urls[i])
                .header("content-type", "application/octet-stream")
                .body(payload.clone());
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            async move {
                let resp = req.send().await.context("PUT")?;
                if !resp.status().is_success() {
                    bail!("PUT answered {}", resp.status());
                }
                Ok(())
            }
        }
    })
    .await;
    let total_gets = args.count * args.get_rounds.max(1);
    let get = phase(args.concurrency, total_gets, size, {
        let (client, urls, auth, count) = (client.clone(), urls.clone(), auth.clone(), args.count);
        move |i| {
            let mut req = client.get(&urls[i % count]);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            async move {
                let resp = req.send().await.context("GET")?;
                if resp.status() != reqwest::StatusCode::OK {
                    bail!("GET answered {}", resp.status());
                }
                let body = resp.bytes().await.context("GET body")?;
                if body.len() != size {
                    bail!("GET returned {} bytes, expected {size}", body.len());
                }
                Ok(())
            }
        }
    })
    .await;
    Ok(BenchReport {
        url: args.url.clone(),
        protocol: args.protocol,
        object_bytes: size as u64,
        concurrency: args.concurrency,
        put,
        get,
    })
}

/// Runs `total` requests made by `request(i)` with `concurrency` workers.
async fn phase<F, Fut>(
    concurrency: usize,
    total: usize,
    object_bytes: usize,
    request: F,
) -> PhaseReport
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, request) = (next.clone(), request.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                let mut first_error = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let t = Instant::now();
                    match request(i).await {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(err) => {
                            errors += 1;
                            first_error.get_or_insert(err);
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    let mut first_error = None;
    for worker in workers {
        let (l, e, first) = worker.await.expect("bench worker panicked");
        latencies.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    if let Some(err) = first_error {
        eprintln!("bench: {errors} requests failed; the first: {err:#}");
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1000.0
    };
    let ok = latencies.len();
    PhaseReport {
        requests: total,
        errors,
        seconds,
        requests_per_second: ok as f64 / seconds,
        mib_per_second: (ok * object_bytes) as f64 / seconds / (1024.0 * 1024.0),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    }
}

/// GETs `url` and succeeds on 200: a health check for images without curl.
pub async fn probe(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if resp.status() != reqwest::StatusCode::OK {
        bail!("{url} answered {}", resp.status());
    }
    Ok(())
}
