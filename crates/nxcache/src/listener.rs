//! The accept loop: connection limit, optional TLS, header timeout, graceful drain.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

/// How long cut connections get to drop their requests after the shutdown timeout.
const CUT_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct ListenerConfig {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections
/// finish (up to the shutdown timeout) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    config: ListenerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slowloris: a client that dribbles its headers is cut off.
        .header_read_timeout(config.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let (cut, cut_rx) = watch::channel(false);
    loop {
        // Beyond the limit, new connections wait in the kernel's backlog instead of
        // costing memory here.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        // Requests know their client's address (failed logins are limited per address).
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(nxcache_http::ClientAddr(peer))),
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_timeout = config.header_timeout;
        let mut cut = cut_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served = async {
                match tls {
                    None => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(err)) => {
                                    tracing::debug!(%err, "TLS handshake failed");
                                    return Ok(());
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                }
            };
            tokio::select! {
                result = served => {
                    if let Err(err) = result {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                }
                // Past the shutdown timeout: dropping the connection cuts its request.
                _ = cut.wait_for(|c| *c) => {}
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(open_connections = open, "waiting for in-flight requests");
    }
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        let _ = cut.send(true);
        // Each connection holds a slot until its task ends: with every slot back, no
        // request of this listener runs any more (the store may close after this).
        let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(CUT_GRACE, slots.acquire_many(all)).await;
        tracing::warn!(
            timeout_s = config.shutdown_timeout.as_secs_f64(),
            "in-flight requests did not finish within the shutdown timeout; they were cut"
        );
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
