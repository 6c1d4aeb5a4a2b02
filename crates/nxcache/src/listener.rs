//! The accept loop: connection limit with shedding, first-byte and send timeouts, optional
//! TLS, HTTP/1 and HTTP/2 limits, graceful drain.
//!
//! At `--max-connections`, a new connection makes room by closing the oldest one that is
//! not serving a request (never sent one, or idle between requests): connections that
//! cost a client nothing to open cannot lock real clients out. Only when every
//! connection is serving a request does a new one wait (in the kernel's backlog).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long cut connections get to drop their requests after the shutdown timeout.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// HTTP/2 streams a client may open at once on one connection.
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Largest header list of a request (HTTP/2; it also bounds a CONTINUATION flood, which
/// h2 counts against it).
const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Streams reset by the client before the server saw them (the "rapid reset" attack):
/// beyond this, the connection is closed.
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for protocol errors before it closes the connection.
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Bytes buffered per HTTP/2 stream waiting for the client's flow-control window.
const H2_MAX_SEND_BUF_SIZE: usize = 256 * 1024;
/// A ping every interval; a client that does not answer within the timeout is gone.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Read buffer (request head) and write queue of an HTTP/1 connection.
const H1_MAX_BUF_SIZE: usize = 64 * 1024;

pub(crate) struct ListenerConfig {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub send_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Metrics of the accept loop.
#[derive(Clone)]
pub(crate) struct ListenerMetrics {
    open: IntGauge,
    shed: IntCounterVec,
    closed: IntCounterVec,
}

impl ListenerMetrics {
    pub(crate) fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let open = IntGauge::new(
            "nxcache_http_connections_open",
            "Client connections open (at most --max-connections).",
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "nxcache_http_connections_shed_total",
                "Connections closed at --max-connections to make room for a new one, by state: never_requested (no request yet) or idle (between requests).",
            ),
            &["state"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "nxcache_http_connections_cut_total",
                "Connections closed by a timeout, by reason: first_byte (--first-byte-timeout), send (--send-timeout: the client stopped reading), tls_handshake.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        Ok(ListenerMetrics { open, shed, closed })
    }

    fn cut(&self, reason: &str) {
        self.closed.with_label_values(&[reason]).inc();
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections
/// finish (up to the shutdown timeout) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    config: ListenerConfig,
    metrics: ListenerMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slowloris: a client that dribbles its headers is cut off.
        .header_read_timeout(config.header_timeout)
        .max_buf_size(H1_MAX_BUF_SIZE);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let tracker = Tracker::default();
    let (cut, cut_rx) = watch::channel(false);
    'accept: loop {
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
        // At the limit: close the oldest connection not serving a request; when every
        // one is serving, wait for one to end or to fall idle.
        let permit = loop {
            if let Ok(permit) = slots.clone().try_acquire_owned() {
                break permit;
            }
            if let Some(state) = tracker.shed_oldest() {
                metrics.shed.with_label_values(&[state]).inc();
            }
            tokio::select! {
                permit = slots.clone().acquire_owned() => break permit.expect("semaphore never closed"),
                _ = tracker.changed.notified() => {}
                _ = stopped(&mut stop) => break 'accept,
            }
        };
        let _ = stream.set_nodelay(true);
        let (id, shed) = tracker.open();
        // Requests know their client's address (failed logins are limited per address).
        let service = tracked_service(
            router
                .clone()
                .layer(axum::Extension(nxcache_http::ClientAddr(peer))),
            tracker.clone(),
            id,
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let (handshake_timeout, first_byte_timeout, send_timeout) = (
            config.header_timeout,
            config.first_byte_timeout,
            config.send_timeout,
        );
        let (mut cut, tracker, metrics) = (cut_rx.clone(), tracker.clone(), metrics.clone());
        metrics.open.inc();
        tokio::spawn(async move {
            let _permit = permit;
            let served = async {
                // A client that connects and sends nothing is closed (hyper would wait
                // for its first bytes forever to tell HTTP/1 from HTTP/2).
                match tokio::time::timeout(first_byte_timeout, stream.peek(&mut [0u8; 1])).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return Ok(()),
                    Err(_) => {
                        metrics.cut("first_byte");
                        return Ok(());
                    }
                }
                match tls {
                    None => {
                        let io = SendTimeout::new(stream, send_timeout, metrics.clone());
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(io), service);
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
                                    metrics.cut("tls_handshake");
                                    tracing::debug!("TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                        let io = SendTimeout::new(stream, send_timeout, metrics.clone());
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(io), service);
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
                // Shed to make room for a new connection.
                _ = shed => {}
                // Past the shutdown timeout: dropping the connection cuts its request.
                _ = cut.wait_for(|c| *c) => {}
            }
            tracker.close(id);
            metrics.open.dec();
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

/// The router, with each request counted on its connection from its head to the end of
/// its response body (a response still being sent keeps the connection busy).
fn tracked_service(
    router: Router,
    tracker: Tracker,
    id: u64,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = axum::response::Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static,
> {
    let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let busy = tracker.request_started(id);
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await?;
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _busy = &busy;
                    frame
                }))
            }))
        }
    });
    hyper_util::service::TowerToHyperService::new(service)
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The open connections: whether each is serving a request, and since when it is not.
#[derive(Clone, Default)]
struct Tracker {
    inner: Arc<Mutex<TrackerState>>,
    /// Told when a connection stops serving requests (it may then be shed).
    changed: Arc<Notify>,
}

#[derive(Default)]
struct TrackerState {
    next_id: u64,
    connections: HashMap<u64, Connection>,
}

struct Connection {
    /// Requests whose response is not fully sent.
    busy: u32,
    served: u64,
    /// Since when it serves no request (its opening, or the end of its last response).
    free_since: Instant,
    /// Closes it; taken when it is shed.
    shed: Option<oneshot::Sender<()>>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.connections.insert(
            id,
            Connection {
                busy: 0,
                served: 0,
                free_since: Instant::now(),
                shed: Some(tx),
            },
        );
        (id, rx)
    }

    fn close(&self, id: u64) {
        self.lock().connections.remove(&id);
    }

    fn request_started(&self, id: u64) -> Busy {
        if let Some(c) = self.lock().connections.get_mut(&id) {
            c.busy += 1;
        }
        Busy {
            tracker: self.clone(),
            id,
        }
    }

    /// Closes the connection that has been free of requests the longest, if any; returns
    /// its state (`never_requested` or `idle`).
    fn shed_oldest(&self) -> Option<&'static str> {
        let mut state = self.lock();
        let victim = state
            .connections
            .iter_mut()
            .filter(|(_, c)| c.busy == 0 && c.shed.is_some())
            .min_by_key(|(_, c)| c.free_since)?
            .1;
        let _ = victim.shed.take()?.send(());
        Some(if victim.served == 0 {
            "never_requested"
        } else {
            "idle"
        })
    }
}

/// A request in progress on a connection; dropped with its response body.
struct Busy {
    tracker: Tracker,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.tracker.lock();
        if let Some(c) = state.connections.get_mut(&self.id) {
            c.busy = c.busy.saturating_sub(1);
            c.served += 1;
            if c.busy == 0 {
                c.free_since = Instant::now();
                drop(state);
                self.tracker.changed.notify_one();
            }
        }
    }
}

/// A connection whose writes fail once one makes no progress for `limit`: a client that
/// stops reading its response cannot hold the connection (and the response's memory).
struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: ListenerMetrics,
}

impl<S> SendTimeout<S> {
    fn new(inner: S, limit: Duration, metrics: ListenerMetrics) -> Self {
        SendTimeout {
            inner,
            limit,
            stalled: None,
            metrics,
        }
    }

    /// Turns a pending write into an error once it has been pending for the limit.
    fn pending<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            self.metrics.cut("send");
            tracing::debug!(
                limit_s = limit.as_secs(),
                "client stopped reading; connection closed"
            );
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the send timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.pending(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.pending(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.pending(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
