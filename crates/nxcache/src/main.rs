use clap::{Parser, Subcommand};

// Artifact buffers are around a MiB each; glibc's malloc maps and unmaps such blocks on
// every request (page faults and zeroing showed up at the top of GET profiles), where
// mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use nxcache_config::{ServeArgs, ServeConfig};

/// nxcache: a clustered, replicated remote cache for the Nx build system.
#[derive(Parser)]
#[command(name = "nxcache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: the Nx remote-cache API on --listen.
    Serve(Box<ServeArgs>),
    /// Load-test any Nx remote-cache server: PUT then GET, throughput and latency.
    Bench(nxcache_bench::BenchArgs),
    /// Operate a cluster through any node's admin API (needs an admin token).
    Admin(nxcache::admin_cli::AdminArgs),
    /// Probe a node's /readyz (or /healthz) and exit 0 when it answers 200. For container
    /// health checks, where there is no curl.
    Probe {
        /// URL to probe.
        #[arg(default_value = "http://127.0.0.1:3000/readyz")]
        url: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("nxcache: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Bench(args) => nxcache_bench::run(args).await,
            Command::Probe { url } => nxcache_bench::probe(&url).await,
            Command::Admin(args) => nxcache::admin_cli::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nxcache: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::resolve(&args)?;
    let format = match config.log_format {
        nxcache_config::LogFormat::Text => nxcache_telemetry::LogFormat::Text,
        nxcache_config::LogFormat::Json => nxcache_telemetry::LogFormat::Json,
    };
    // Spans go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard OTEL_*
    // variables configure it); the node id tells nodes apart in the traces.
    let export = nxcache_telemetry::TraceExport::from_env(&config.cluster.node_id.to_string())
        .map_err(anyhow::Error::msg)?;
    nxcache_telemetry::init(format, &config.log_level, export.as_ref())
        .map_err(anyhow::Error::msg)?;
    if export.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    let node = nxcache::start(config).await?;
    let meta = node.meta().clone();
    let failed = tokio::select! {
        _ = shutdown_signal() => None,
        why = meta.core_failed() => Some(why),
    };
    let stopped = match failed {
        None => {
            tracing::info!("shutdown requested: draining");
            node.shutdown().await
        }
        Some(why) => {
            // Serving on with a dead control plane would miss every revocation and
            // membership change: exit, so that the supervisor starts the node again (a
            // restart reopens the log; the other nodes bring it up to date).
            tracing::error!(
                error = %why,
                "the metadata log (Raft) has stopped; draining and exiting so that the supervisor restarts this node"
            );
            let _ = node.shutdown().await;
            Err(anyhow::anyhow!(
                "the metadata log (Raft) stopped ({why}); exited for a restart"
            ))
        }
    };
    if let Some(export) = export {
        // Flushes the last spans; the exporter's own timeout bounds it.
        tokio::task::spawn_blocking(move || export.shutdown()).await?;
    }
    stopped
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
