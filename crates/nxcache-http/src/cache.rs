//! `/v1/cache/{hash}`: the Nx remote-cache contract.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use nxcache_auth::{Access, AuthError, Principal, bearer_token};
use nxcache_replication::{ArtifactBody, GetError, PutError};
use nxcache_store::BlobKey;

use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::protocols::Protocol;
use crate::{ApiState, SlotRefusal, UploadPace, UploadSlot};

/// Bodies up to this size are read (and dropped) before an upload is refused.
const DRAIN_BEFORE_REFUSING_MAX: u64 = 64 * 1024 * 1024;

const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");

pub(crate) fn authorize(
    state: &ApiState,
    headers: &HeaderMap,
    access: Access,
) -> Result<Principal, ApiError> {
    let unauthorized = |message: &'static str| ApiError::new(StatusCode::UNAUTHORIZED, message);
    let secret = bearer_token(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .map_err(|err| match err {
            AuthError::Missing => unauthorized(
                "Missing access token. Set NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN to a token issued by this nxcache server (its operator configures them with NXCACHE_READ_WRITE_TOKENS or NXCACHE_READ_ONLY_TOKENS).",
            ),
            _ => unauthorized(
                "The Authorization header must be 'Bearer <token>'. Set NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN and Nx sends it in that form.",
            ),
        })?;
    let principal = tracing::info_span!("auth")
        .in_scope(|| state.auth.authenticate(secret))
        .ok_or_else(|| {
        unauthorized(
            "The access token is not valid for this nxcache server. Check NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN against the tokens configured on the server (NXCACHE_READ_WRITE_TOKENS, NXCACHE_READ_ONLY_TOKENS).",
        )
    })?;
    if access == Access::Admin && !principal.scope.allows(access) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "The access token '{}' has scope '{}'; the admin API needs a token with scope 'admin' (NXCACHE_ADMIN_TOKENS on the server, or one made with `nxcache admin tokens create --scope admin`).",
                principal.name,
                principal.scope.as_str()
            ),
        ));
    }
    if !principal.scope.allows(access) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "The access token '{}' has scope '{}': it may restore from the cache but not upload to it. To let this machine populate the cache, give it a read-write token (NXCACHE_READ_WRITE_TOKENS on the server).",
                principal.name,
                principal.scope.as_str()
            ),
        ));
    }
    Ok(principal)
}

fn parse_key(path: Result<Path<String>, PathRejection>) -> Result<BlobKey, ApiError> {
    let Path(raw) = path.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "The hash in the URL is not valid text. A hash is 1 to 128 characters from A-Z, a-z, 0-9, '-' and '_'.",
        )
    })?;
    BlobKey::parse_hash(&raw).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Malformed hash: {err}. A hash is 1 to 128 characters from A-Z, a-z, 0-9, '-' and '_'."
            ),
        )
    })
}

/// The stored key of `hash` in `namespace` (names were checked when the token was made).
fn namespaced(namespace: &str, hash: &BlobKey) -> Result<BlobKey, ApiError> {
    BlobKey::in_namespace(namespace, hash)
        .map_err(|err| ApiError::internal(format!("the token's namespace is unusable: {err}")))
}

pub(crate) fn content_length(headers: &HeaderMap, max: u64) -> Result<u64, ApiError> {
    let Some(raw) = headers.get(header::CONTENT_LENGTH) else {
        return Err(ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "A Content-Length header is required: uploads must announce their size (chunked uploads are not accepted).",
        ));
    };
    let len: u64 = raw
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "The Content-Length header is not a whole number of bytes.",
            )
        })?;
    if len > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The artifact is {len} bytes; this server accepts at most {max} bytes per artifact (--max-artifact-size, NXCACHE_MAX_ARTIFACT_SIZE)."
            ),
        ));
    }
    Ok(len)
}

pub(crate) async fn put_artifact(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authorize(&state, &headers, Access::Write)?;
    let hash_key = parse_key(path)?;
    let len = content_length(&headers, state.config.max_artifact_size)?;
    let hash = hash_key.to_string();
    // A token writes into its own namespace only (never where others read from it).
    let key = namespaced(&principal.namespace, &hash_key)?;
    let upload = Upload {
        key,
        len,
        name: &hash,
        token: &principal.name,
        protocol: Protocol::Nx,
        sha256: None,
    };
    if store_body(&state, upload, body).await? == Stored::Existing {
        return Err(put_error(PutError::Exists, &hash));
    }
    tracing::debug!(token = %principal.name, bytes = len, "artifact stored");
    Ok(state.config.put_success_status.into_response())
}

/// An upload, checked and ready to be stored.
pub(crate) struct Upload<'a> {
    pub key: BlobKey,
    /// Its Content-Length.
    pub len: u64,
    /// How the client names it, for messages.
    pub name: &'a str,
    /// The name of the token uploading it (uploads in progress are limited per token).
    pub token: &'a str,
    pub protocol: Protocol,
    /// The SHA-256 the body must have (content-addressed uploads); refused otherwise.
    pub sha256: Option<[u8; 32]>,
}

/// What became of an upload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    New,
    /// The key was stored already (entries are immutable): nothing was replaced.
    Existing,
}

/// Streams `body` into the store under `upload.key`: the path every protocol's upload
/// takes (slots, size, idle timeout, replication).
pub(crate) async fn store_body(
    state: &ApiState,
    upload: Upload<'_>,
    body: Body,
) -> Result<Stored, ApiError> {
    let Upload {
        key,
        len,
        name: hash,
        token,
        protocol,
        sha256,
    } = upload;
    let mut digest = sha256.map(|_| ring::digest::Context::new(&ring::digest::SHA256));
    // Held until the upload ends; refused before anything is read or written.
    let _slot = take_upload_slot(state, token, hash)?;
    let _in_progress = InProgress::new(&state.metrics.uploads_in_progress);
    let pace = Pace {
        started: Instant::now(),
        idle: state.config.body_idle_timeout,
        pace: state.config.upload_pace,
    };
    let mut frames = body.into_data_stream();
    let mut writer = match state.data.begin_put(key, len).await {
        Ok(writer) => writer,
        Err(err) => {
            // Refused before reading the body (exists, cluster degraded). A client still
            // sending when the connection closes sees a reset instead of this answer, so
            // a body of reasonable size is read and dropped first, at the pace required
            // of any upload.
            if len <= DRAIN_BEFORE_REFUSING_MAX {
                let mut drained = 0u64;
                while let Ok(Some(Ok(chunk))) =
                    tokio::time::timeout(pace.next_wait(drained).0, frames.next()).await
                {
                    drained += chunk.len() as u64;
                }
            }
            if matches!(err, PutError::Exists) {
                return Ok(Stored::Existing);
            }
            return Err(put_error(err, hash));
        }
    };
    loop {
        let (wait, cut) = pace.next_wait(writer.written());
        // The deadline or the minimum average rate is reached with bytes still owed.
        if wait.is_zero() && writer.written() < len {
            return Err(cut_upload(state, cut, &pace, writer.written(), len));
        }
        let chunk = match tokio::time::timeout(wait, frames.next()).await {
            Err(_) => return Err(cut_upload(state, cut, &pace, writer.written(), len)),
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                tracing::debug!(%err, "upload body ended with an error");
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "The upload was cut off after {} of {len} bytes; nothing was stored.",
                        writer.written()
                    ),
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        let received = chunk.len() as u64;
        if let Some(digest) = digest.as_mut() {
            digest.update(&chunk);
        }
        writer.write(chunk).await.map_err(|e| put_error(e, hash))?;
        state.metrics.received(protocol, received);
    }
    if writer.written() != len {
        // The body ended early (the connection layer normally catches this first).
        return Err(ApiError::from_store_write(
            nxcache_store::StoreError::LengthMismatch {
                expected: len,
                received: writer.written(),
            },
            hash,
        ));
    }
    if let (Some(digest), Some(expected)) = (digest, sha256) {
        let actual = digest.finish();
        if actual.as_ref() != expected {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "The body's SHA-256 is {}, not {hash}: a content-addressed upload must hash to its key. Nothing was stored.",
                    hex(actual.as_ref())
                ),
            ));
        }
    }
    match writer.commit().await {
        Ok(()) => Ok(Stored::New),
        Err(PutError::Exists) => Ok(Stored::Existing),
        Err(err) => Err(put_error(err, hash)),
    }
}

/// Lower-case hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A slot for an upload by the token named `token`, or the answer refusing it (503 when the node is
/// full, 429 when the token has its share in progress).
fn take_upload_slot(state: &ApiState, token: &str, hash: &str) -> Result<UploadSlot, ApiError> {
    state.uploads.try_take(token).map_err(|refusal| {
        let (reason, error) = match refusal {
            SlotRefusal::Node => (
                "node_limit",
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "This node is taking {} uploads at once (--max-concurrent-uploads); artifact {hash} was not stored. Retry in a moment.",
                        state.uploads.limit()
                    ),
                ),
            ),
            SlotRefusal::Token => (
                "token_limit",
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "The token '{}' already has {} uploads in progress on this node (--max-uploads-per-token); artifact {hash} was not stored. Retry when one has finished.",
                        token,
                        state.uploads.per_token()
                    ),
                ),
            ),
        };
        state
            .metrics
            .uploads_refused
            .with_label_values(&[reason])
            .inc();
        error.retry_after(1)
    })
}

/// Counts an upload in progress while it lives.
struct InProgress(prometheus::IntGauge);

impl InProgress {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InProgress(gauge.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why an upload body is cut before it is complete.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Nothing arrived for the body idle timeout.
    Stalled,
    /// Under the minimum average rate once the grace period is over.
    TooSlow,
    /// The overall upload deadline passed.
    Deadline,
}

/// The clock of one upload body.
struct Pace {
    started: Instant,
    idle: Duration,
    pace: UploadPace,
}

impl Pace {
    /// How long the next chunk may take to arrive with `received` bytes in, and why the
    /// upload is cut if it does not.
    fn next_wait(&self, received: u64) -> (Duration, Cut) {
        let elapsed = self.started.elapsed();
        let mut wait = (self.idle, Cut::Stalled);
        let to_deadline = self.pace.deadline.saturating_sub(elapsed);
        if to_deadline < wait.0 {
            wait = (to_deadline, Cut::Deadline);
        }
        if self.pace.min_rate > 0 {
            // The average since the start stays at the minimum until this instant.
            let earned = Duration::from_secs_f64(received as f64 / self.pace.min_rate as f64);
            let until = self.pace.grace.max(earned).saturating_sub(elapsed);
            if until < wait.0 {
                wait = (until, Cut::TooSlow);
            }
        }
        wait
    }
}

/// 408 for an upload cut by its pace; its slot and its reserved bytes are given back as
/// the handler returns (the writer is dropped with it).
fn cut_upload(state: &ApiState, cut: Cut, pace: &Pace, written: u64, len: u64) -> ApiError {
    let elapsed = pace.started.elapsed().as_secs();
    let (reason, why) = match cut {
        Cut::Stalled => (
            "stalled",
            format!(
                "No upload data arrived for {} s (--body-idle-timeout)",
                pace.idle.as_secs()
            ),
        ),
        Cut::TooSlow => (
            "too_slow",
            format!(
                "The upload ran under the minimum average rate of {} bytes/s after its {} s grace (--upload-min-rate, --upload-rate-grace)",
                pace.pace.min_rate,
                pace.pace.grace.as_secs()
            ),
        ),
        Cut::Deadline => (
            "deadline",
            format!(
                "The upload did not finish within {} s (--upload-deadline)",
                pace.pace.deadline.as_secs()
            ),
        ),
    };
    state.metrics.uploads_cut.with_label_values(&[reason]).inc();
    tracing::info!(reason, written, len, elapsed_s = elapsed, "upload cut");
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!("{why}: {written} of {len} bytes arrived in {elapsed} s; nothing was stored."),
    )
}

pub(crate) fn put_error(err: PutError, hash: &str) -> ApiError {
    match err {
        PutError::Exists => ApiError::from_store_write(nxcache_store::StoreError::Exists, hash),
        PutError::Store(err) => ApiError::from_store_write(err, hash),
        PutError::Unavailable(why) => unavailable("store", why),
    }
}

/// 503: too few nodes reachable for what the cluster's policy requires (`what`: "store"
/// or "answer for").
pub(crate) fn unavailable(what: &str, why: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("The cache cluster cannot {what} this artifact now: {why}. Retry when the nodes are back."),
    )
    .retry_after(5)
}

fn miss(state: &ApiState, hash: &BlobKey) -> Response {
    state.metrics.miss(Protocol::Nx);
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("No artifact with hash {hash} is stored."),
    )
    .into_response()
}

pub(crate) async fn get_artifact(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authorize(&state, &headers, Access::Read)?;
    let key = parse_key(path)?;
    // Its own namespace first, then those it may read from, in order.
    let mut found = Ok(None);
    for namespace in principal.read_namespaces() {
        found = state.data.get(&namespaced(namespace, &key)?).await;
        if !matches!(found, Ok(None)) {
            break;
        }
    }
    let artifact = match found {
        Ok(Some(artifact)) => artifact,
        Ok(None) => return Ok(miss(&state, &key)),
        Err(GetError::Unavailable(why)) => return Err(unavailable("answer for", why)),
        // Nx stops the whole run on any answer but 200 or 404, while a miss only costs
        // a rebuild: a read failure is logged, counted and answered as a miss.
        Err(GetError::Store(err)) => {
            tracing::error!(%err, key = %key, "reading an artifact failed; answering as a miss");
            state.metrics.read_errors.inc();
            return Ok(miss(&state, &key));
        }
    };
    hit(&state, artifact.remote);
    state.metrics.sent(Protocol::Nx, artifact.size);
    let body = match artifact.body {
        ArtifactBody::Verified(bytes) => Body::from(bytes),
        ArtifactBody::Stream(stream) => Body::from_stream(stream),
    };
    Ok(artifact_response(body, artifact.size))
}

pub(crate) async fn head_artifact(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authorize(&state, &headers, Access::Read)?;
    let key = parse_key(path)?;
    let mut found = Ok(None);
    for namespace in principal.read_namespaces() {
        found = state.data.head(&namespaced(namespace, &key)?).await;
        if !matches!(found, Ok(None)) {
            break;
        }
    }
    match found {
        Ok(Some(size)) => {
            hit(&state, false);
            Ok(artifact_response(Body::empty(), size))
        }
        Ok(None) => Ok(miss(&state, &key)),
        Err(GetError::Unavailable(why)) => Err(unavailable("answer for", why)),
        Err(GetError::Store(err)) => {
            tracing::error!(%err, key = %key, "index lookup failed; answering as a miss");
            state.metrics.read_errors.inc();
            Ok(miss(&state, &key))
        }
    }
}

/// A hit; `remote`: answered from another member's store.
fn hit(state: &ApiState, remote: bool) {
    state.metrics.hit(Protocol::Nx, remote);
}

/// A 200 carrying (or, for HEAD, describing) an artifact of `size` bytes.
pub(crate) fn artifact_response(body: Body, size: u64) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, OCTET_STREAM);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    response
}

pub(crate) async fn method_not_allowed() -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Only GET, HEAD and PUT are supported on /v1/cache/{hash}.",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, PUT"));
    response
}
