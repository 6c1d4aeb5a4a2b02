//! The other build tools' cache protocols, served beside the Nx API from the same store:
//! the Bazel HTTP remote cache, Gradle's HTTP build cache, ccache's HTTP storage and the
//! Turborepo remote cache API (v8).
//!
//! Each protocol keeps its keys in its own key space ([`BlobKey::in_space`]), so an
//! artifact stored through one protocol can never be read or overwritten through another,
//! while tokens, namespaces, replication, limits and metrics are the ones Nx uses.
//! Entries stay immutable: a repeated upload of a stored key succeeds without replacing
//! it (these clients turn their remote cache off on an error answer).

pub(crate) mod bazel;
pub(crate) mod ccache;
pub(crate) mod gradle;
pub(crate) mod turbo;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use nxcache_auth::{Access, Principal};
use nxcache_replication::{Artifact, ArtifactBody, GetError};
use nxcache_store::BlobKey;
use tracing::Instrument;

use crate::ApiState;
use crate::cache::{Stored, Upload, artifact_response, content_length, store_body, unavailable};
use crate::error::ApiError;

/// A client protocol: a label in metrics and traces and, but for Nx, a key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Nx,
    Bazel,
    Gradle,
    Ccache,
    Turbo,
}

impl Protocol {
    pub(crate) const ALL: [Protocol; 5] = [
        Protocol::Nx,
        Protocol::Bazel,
        Protocol::Gradle,
        Protocol::Ccache,
        Protocol::Turbo,
    ];

    /// Its `protocol` label, also its key space.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Protocol::Nx => "nx",
            Protocol::Bazel => "bazel",
            Protocol::Gradle => "gradle",
            Protocol::Ccache => "ccache",
            Protocol::Turbo => "turbo",
        }
    }

    /// The wildcard ending its route, which names the protocol in the matched path.
    pub(crate) fn capture(self) -> &'static str {
        match self {
            Protocol::Bazel => "{*bazel}",
            Protocol::Gradle => "{*gradle}",
            Protocol::Ccache => "{*ccache}",
            Protocol::Nx | Protocol::Turbo => "{hash}",
        }
    }

    /// How a person gives this client its token, for the 401 messages.
    fn credentials_hint(self) -> &'static str {
        match self {
            Protocol::Bazel => {
                "Give Bazel an nxcache token as the password of the cache URL (--remote_cache=https://user:TOKEN@host/bazel/) or as --remote_header=Authorization=Bearer TOKEN."
            }
            Protocol::Gradle => {
                "Give Gradle an nxcache token as the password of the remote build cache's credentials (buildCache { remote(HttpBuildCache) { credentials { username = \"ci\"; password = TOKEN } } })."
            }
            Protocol::Ccache => {
                "Give ccache an nxcache token as the password of the storage URL (remote_storage = http://ci:TOKEN@host/ccache/)."
            }
            Protocol::Turbo | Protocol::Nx => {
                "Set TURBO_TOKEN to an nxcache token (turbo sends it as 'Authorization: Bearer TOKEN')."
            }
        }
    }
}

/// Where each protocol is served, below the base path. `None`: not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolMounts {
    pub bazel: Option<String>,
    pub gradle: Option<String>,
    pub ccache: Option<String>,
    /// The Turborepo API, at its fixed `/v8/` paths.
    pub turbo: bool,
}

impl Default for ProtocolMounts {
    fn default() -> Self {
        ProtocolMounts {
            bazel: Some("/bazel".into()),
            gradle: Some("/gradle".into()),
            ccache: Some("/ccache".into()),
            turbo: true,
        }
    }
}

/// The routes of the protocols that `mounts` enables.
pub(crate) fn routes(mounts: &ProtocolMounts) -> axum::Router<ApiState> {
    use axum::routing::{any, get, post};
    let mut router = axum::Router::new();
    let keyed: [(&Option<String>, Protocol, ParseTarget); 3] = [
        (&mounts.bazel, Protocol::Bazel, bazel::target),
        (&mounts.gradle, Protocol::Gradle, gradle::target),
        (&mounts.ccache, Protocol::Ccache, ccache::target),
    ];
    for (mount, protocol, target) in keyed {
        if let Some(mount) = mount {
            let handler = move |State(state): State<ApiState>,
                                Path(rest): Path<String>,
                                method: Method,
                                headers: HeaderMap,
                                body: Body| async move {
                serve(&state, protocol, &method, &headers, body, || target(&rest)).await
            };
            router = router.route(&format!("{mount}/{}", protocol.capture()), any(handler));
        }
    }
    if mounts.turbo {
        router = router
            .route(
                "/v8/artifacts/status",
                get(turbo::status).fallback(turbo::method_not_allowed),
            )
            .route(
                "/v8/artifacts",
                post(turbo::query).fallback(turbo::method_not_allowed),
            )
            .route(
                "/v8/artifacts/events",
                post(turbo::events).fallback(turbo::method_not_allowed),
            )
            .route(
                "/v8/artifacts/{hash}",
                get(turbo::get)
                    .head(turbo::head)
                    .put(turbo::put)
                    .fallback(turbo::method_not_allowed),
            );
    }
    router
}

/// The nxcache token a request carries: `Authorization: Bearer TOKEN`, or Basic
/// credentials whose password is the token (the user name is free; a token given as the
/// user name with an empty password is taken too).
fn token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let secret = if password.is_empty() { user } else { password };
    (!secret.is_empty()).then(|| secret.to_owned())
}

/// The principal of a request of `protocol`, allowed `access`. A 401 carries a Basic
/// challenge: clients that send credentials only when asked (Gradle, curl) then do.
pub(crate) fn authorize(
    state: &ApiState,
    headers: &HeaderMap,
    protocol: Protocol,
    access: Access,
) -> Result<Principal, ApiError> {
    let unauthorized = |what: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("{what} {}", protocol.credentials_hint()),
        )
        .challenge()
    };
    let secret = match headers.get(header::AUTHORIZATION) {
        None => return Err(unauthorized("Missing credentials.")),
        Some(_) => token(headers).ok_or_else(|| {
            unauthorized(
                "The Authorization header must be 'Basic' with an nxcache token as the password, or 'Bearer TOKEN'.",
            )
        })?,
    };
    let principal = tracing::info_span!("auth")
        .in_scope(|| state.auth.authenticate(&secret))
        .ok_or_else(|| unauthorized("The token is not valid for this nxcache server."))?;
    if !principal.scope.allows(access) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "The access token '{}' has scope '{}': it may restore from the cache but not upload to it. Give machines that populate the cache a read-write token.",
                principal.name,
                principal.scope.as_str()
            ),
        ));
    }
    Ok(principal)
}

/// `hash` (a protocol's own key, already reduced to `[A-Za-z0-9_-]`) in `protocol`'s key
/// space of `namespace`.
pub(crate) fn key(protocol: Protocol, namespace: &str, hash: &str) -> Result<BlobKey, ApiError> {
    key_in(protocol.label(), namespace, hash)
}

/// `hash` in key space `space` of `namespace`.
pub(crate) fn key_in(space: &str, namespace: &str, hash: &str) -> Result<BlobKey, ApiError> {
    let hash = BlobKey::parse_hash(hash).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("Malformed key {hash:?}: {err}."),
        )
    })?;
    BlobKey::in_space(namespace, space, &hash)
        .map_err(|err| ApiError::internal(format!("the token's namespace is unusable: {err}")))
}

/// The first of `namespaces` holding `hash` (its index and the artifact), read through
/// the data plane (this node's store or its peers'). Store failures are logged and
/// answered as a miss: for every one of these clients a miss only costs a rebuild, an
/// error costs the build or the cache.
pub(crate) async fn find(
    state: &ApiState,
    protocol: Protocol,
    namespaces: &[&str],
    hash: &str,
    with_body: bool,
) -> Result<Option<(usize, Artifact)>, ApiError> {
    let span = tracing::info_span!("lookup", protocol = protocol.label(), hash);
    let mut found = Ok(None);
    for (i, namespace) in namespaces.iter().enumerate() {
        let key = key(protocol, namespace, hash)?;
        found = if with_body {
            state.data.get(&key).instrument(span.clone()).await
        } else {
            state
                .data
                .head(&key)
                .instrument(span.clone())
                .await
                .map(|size| {
                    size.map(|size| Artifact {
                        size,
                        body: ArtifactBody::Verified(bytes::Bytes::new()),
                        remote: false,
                    })
                })
        }
        .map(|artifact| artifact.map(|a| (i, a)));
        if !matches!(found, Ok(None)) {
            break;
        }
    }
    let found = match found {
        Ok(found) => found,
        Err(GetError::Unavailable(why)) => return Err(unavailable("answer for", why)),
        Err(GetError::Store(err)) => {
            tracing::error!(%err, protocol = protocol.label(), hash, "reading an artifact failed; answering as a miss");
            state.metrics.read_errors.inc();
            None
        }
    };
    match &found {
        Some((_, artifact)) => {
            state.metrics.hit(protocol, artifact.remote);
            if with_body {
                state.metrics.sent(protocol, artifact.size);
            }
        }
        None => state.metrics.miss(protocol),
    }
    Ok(found)
}

/// A 200 with the artifact (GET) or its size (HEAD), or a 404.
pub(crate) fn found_response(
    protocol: Protocol,
    hash: &str,
    artifact: Option<Artifact>,
) -> Response {
    match artifact {
        Some(artifact) => artifact_response(body_of(artifact.body), artifact.size),
        None => not_found(protocol, hash),
    }
}

pub(crate) fn body_of(body: ArtifactBody) -> Body {
    match body {
        ArtifactBody::Verified(bytes) => Body::from(bytes),
        ArtifactBody::Stream(stream) => Body::from_stream(stream),
    }
}

pub(crate) fn not_found(protocol: Protocol, hash: &str) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("No {} artifact {hash} is stored.", protocol.label()),
    )
    .into_response()
}

/// Stores the body of a PUT under `hash` in the principal's namespace of `protocol`'s
/// key space. A key stored already counts as stored (entries are immutable, and these
/// clients take any error as a reason to stop using the cache).
pub(crate) async fn put(
    state: &ApiState,
    principal: &Principal,
    protocol: Protocol,
    hash: &str,
    headers: &HeaderMap,
    body: Body,
    sha256: Option<[u8; 32]>,
) -> Result<Stored, ApiError> {
    let len = content_length(headers, state.config.max_artifact_size)?;
    let key = key(protocol, &principal.namespace, hash)?;
    let span = tracing::info_span!("store", protocol = protocol.label(), hash, bytes = len);
    let upload = Upload {
        key,
        len,
        name: hash,
        token: &principal.name,
        protocol,
        sha256,
    };
    let stored = store_body(state, upload, body).instrument(span).await?;
    tracing::debug!(token = %principal.name, protocol = protocol.label(), bytes = len, ?stored, "artifact stored");
    Ok(stored)
}

/// What a path names: the key in the protocol's key space, and for content-addressed
/// stores the SHA-256 an upload's body must have.
pub(crate) struct Target {
    pub hash: String,
    pub sha256: Option<[u8; 32]>,
}

/// What a protocol's path (below its mount point) names.
pub(crate) type ParseTarget = fn(&str) -> Result<Target, ApiError>;

/// `GET`/`HEAD`/`PUT` on one key of `protocol`: the shape Bazel, Gradle and ccache share.
/// Credentials are checked before the path, so a stranger learns nothing from it.
pub(crate) async fn serve(
    state: &ApiState,
    protocol: Protocol,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
    target: impl FnOnce() -> Result<Target, ApiError>,
) -> Result<Response, ApiError> {
    let access = match *method {
        Method::GET | Method::HEAD => Access::Read,
        Method::PUT => Access::Write,
        Method::DELETE => {
            let mut refused = method_not_allowed(protocol, "GET, HEAD, PUT");
            *refused.body_mut() = Body::from(
                "nxcache does not delete single entries: they are immutable and replicated, and leave the cache by eviction (--ttl, --max-disk-usage).\n",
            );
            return Ok(refused);
        }
        _ => return Ok(method_not_allowed(protocol, "GET, HEAD, PUT")),
    };
    let principal = authorize(state, headers, protocol, access)?;
    let Target { hash, sha256 } = target()?;
    if access == Access::Read {
        let namespaces = principal.read_namespaces();
        let found = find(state, protocol, &namespaces, &hash, method == Method::GET).await?;
        return Ok(found_response(protocol, &hash, found.map(|(_, a)| a)));
    }
    put(state, &principal, protocol, &hash, headers, body, sha256).await?;
    Ok(StatusCode::OK.into_response())
}

/// A `405` naming the methods a protocol's paths take.
pub(crate) fn method_not_allowed(protocol: Protocol, allow: &'static str) -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "The {} API of nxcache takes {allow} here.",
            protocol.label()
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// The path segments after a protocol's mount point; empty segments (a trailing or
/// doubled slash) are dropped.
pub(crate) fn segments(rest: &str) -> Vec<&str> {
    rest.split('/').filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    fn basic(user_password: &str) -> HeaderMap {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_password);
        with_auth(&format!("Basic {encoded}"))
    }

    #[test]
    fn the_token_is_a_bearer_or_a_basic_password() {
        assert_eq!(token(&with_auth("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(token(&with_auth("bearer  abc ")).as_deref(), Some("abc"));
        assert_eq!(token(&basic("ci:abc")).as_deref(), Some("abc"));
        // A token with ':' in it stays whole; a token as the user name is taken too.
        assert_eq!(token(&basic("ci:a:b")).as_deref(), Some("a:b"));
        assert_eq!(token(&basic("abc:")).as_deref(), Some("abc"));
        for bad in ["Bearer ", "Basic !!!", "Digest abc", "abc"] {
            assert_eq!(token(&with_auth(bad)), None, "{bad}");
        }
        assert_eq!(token(&basic("no-colon")), None);
        assert_eq!(token(&basic(":")), None);
        assert_eq!(token(&HeaderMap::new()), None);
    }
}
