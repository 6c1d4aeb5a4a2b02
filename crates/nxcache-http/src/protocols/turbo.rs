//! The Turborepo remote cache API (v8): `PUT`/`GET`/`HEAD /v8/artifacts/{hash}`,
//! `POST /v8/artifacts` (which of these hashes are stored), `GET /v8/artifacts/status`
//! and `POST /v8/artifacts/events` (usage events, accepted and dropped); Bearer tokens.
//!
//! The team (`teamId` or `slug`) names a namespace: a token whose namespace is `web`
//! writes and reads with team `web`, and reads with a team it may read from. A token of
//! the default namespace has no other one, so its team is not looked at.
//!
//! `x-artifact-duration` and `x-artifact-tag` are stored beside the artifact, as a
//! small JSON entry of their own key space, written before the artifact (so a stored
//! artifact has them, unless eviction took them first).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use nxcache_auth::{Access, Principal};
use nxcache_replication::ArtifactBody;
use serde::{Deserialize, Serialize};

use super::{Protocol, authorize, body_of, find, key_in, not_found};
use crate::ApiState;
use crate::cache::{Stored, Upload, artifact_response, store_body};
use crate::error::ApiError;

const TURBO: Protocol = Protocol::Turbo;
/// The key space of the artifacts' headers.
const META_SPACE: &str = "turbomd";
const DURATION: &str = "x-artifact-duration";
const TAG: &str = "x-artifact-tag";
/// Longest `x-artifact-tag` kept (turbo's are an HMAC in base64, under 100 bytes).
const MAX_TAG_LEN: usize = 1024;
/// Most hashes one `POST /v8/artifacts` may ask about.
const MAX_QUERY: usize = 1000;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Team {
    #[serde(rename = "teamId")]
    team_id: Option<String>,
    slug: Option<String>,
}

/// The headers turbo stores with an artifact.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

fn team(query: Result<Query<Team>, QueryRejection>) -> Result<Option<String>, ApiError> {
    let Query(team) = query.map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("The query string is not valid: {err}. turbo sends ?teamId=... or ?slug=..."),
        )
    })?;
    Ok(team.team_id.or(team.slug).filter(|t| !t.is_empty()))
}

/// The namespaces a request of `team` reads from (`Access::Read`) or the one it writes
/// to (`Access::Write`, a single one).
fn namespaces<'p>(
    principal: &'p Principal,
    team: Option<&str>,
    access: Access,
) -> Result<Vec<&'p str>, ApiError> {
    let own = || match access {
        Access::Write => vec![principal.namespace.as_str()],
        _ => principal.read_namespaces(),
    };
    let Some(team) = team else {
        return Ok(own());
    };
    if principal.namespace.is_empty() && principal.read_from.is_empty() {
        return Ok(own());
    }
    if team == principal.namespace {
        return Ok(own());
    }
    if let Some(other) = principal.read_from.iter().find(|ns| *ns == team) {
        if access == Access::Read {
            return Ok(vec![other.as_str()]);
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "The token '{}' may read team {team:?} but uploads only to {:?}: set TURBO_TEAM to {:?} to populate the cache.",
                principal.name, principal.namespace, principal.namespace
            ),
        ));
    }
    let mut allowed = principal.read_namespaces();
    allowed.retain(|ns| !ns.is_empty());
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "The token '{}' has no access to team {team:?}. Set TURBO_TEAM to one of its namespaces: {allowed:?}.",
            principal.name
        ),
    ))
}

fn meta_from(headers: &HeaderMap) -> Result<Meta, ApiError> {
    let bad = |what: &str| ApiError::new(StatusCode::BAD_REQUEST, what.to_owned());
    let duration = match headers.get(DURATION) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    bad("x-artifact-duration must be a whole number of milliseconds.")
                })?,
        ),
    };
    let tag = match headers.get(TAG) {
        None => None,
        Some(v) => {
            let tag = v
                .to_str()
                .map_err(|_| bad("x-artifact-tag must be printable ASCII."))?;
            if tag.len() > MAX_TAG_LEN {
                return Err(bad("x-artifact-tag is longer than 1024 bytes."));
            }
            Some(tag.to_owned())
        }
    };
    Ok(Meta { duration, tag })
}

/// The stored headers of `hash` in `namespace`; none when they were never sent or are
/// unreadable (the artifact is still served).
async fn load_meta(state: &ApiState, namespace: &str, hash: &str) -> Meta {
    let Ok(key) = key_in(META_SPACE, namespace, hash) else {
        return Meta::default();
    };
    let bytes = match state.data.get(&key).await {
        Ok(Some(artifact)) => match artifact.body {
            ArtifactBody::Verified(bytes) => Ok(bytes.to_vec()),
            ArtifactBody::Stream(mut stream) => {
                let mut out = Vec::new();
                let mut result = Ok(());
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => out.extend_from_slice(&chunk),
                        Err(err) => {
                            result = Err(err);
                            break;
                        }
                    }
                }
                result.map(|()| out)
            }
        },
        Ok(None) => return Meta::default(),
        Err(err) => {
            tracing::warn!(?err, hash, "reading an artifact's turbo headers failed");
            return Meta::default();
        }
    };
    match bytes.map(|b| serde_json::from_slice::<Meta>(&b)) {
        Ok(Ok(meta)) => meta,
        other => {
            tracing::warn!(?other, hash, "an artifact's turbo headers are unreadable");
            Meta::default()
        }
    }
}

fn with_meta(mut response: Response, meta: &Meta) -> Response {
    let h = response.headers_mut();
    if let Some(duration) = meta.duration {
        h.insert(DURATION, HeaderValue::from(duration));
    }
    if let Some(tag) = meta
        .tag
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        h.insert(TAG, tag);
    }
    response
}

/// Finds `hash` in the namespaces of the request; `Some((namespace, artifact))`.
async fn lookup(
    state: &ApiState,
    principal: &Principal,
    team: Option<&str>,
    hash: &str,
    with_body: bool,
) -> Result<Option<(String, nxcache_replication::Artifact)>, ApiError> {
    let namespaces = namespaces(principal, team, Access::Read)?;
    let found = find(state, TURBO, &namespaces, hash, with_body).await?;
    Ok(found.map(|(i, artifact)| (namespaces[i].to_owned(), artifact)))
}

pub(crate) async fn get(
    State(state): State<ApiState>,
    Path(hash): Path<String>,
    query: Result<Query<Team>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    read(state, hash, query, headers, true).await
}

pub(crate) async fn head(
    State(state): State<ApiState>,
    Path(hash): Path<String>,
    query: Result<Query<Team>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    read(state, hash, query, headers, false).await
}

async fn read(
    state: ApiState,
    hash: String,
    query: Result<Query<Team>, QueryRejection>,
    headers: HeaderMap,
    with_body: bool,
) -> Result<Response, ApiError> {
    let principal = authorize(&state, &headers, TURBO, Access::Read)?;
    let team = team(query)?;
    match lookup(&state, &principal, team.as_deref(), &hash, with_body).await? {
        Some((namespace, artifact)) => {
            let meta = load_meta(&state, &namespace, &hash).await;
            let response = artifact_response(body_of(artifact.body), artifact.size);
            Ok(with_meta(response, &meta))
        }
        None => Ok(not_found(TURBO, &hash)),
    }
}

pub(crate) async fn put(
    State(state): State<ApiState>,
    Path(hash): Path<String>,
    query: Result<Query<Team>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authorize(&state, &headers, TURBO, Access::Write)?;
    let team = team(query)?;
    let namespace = namespaces(&principal, team.as_deref(), Access::Write)?[0];
    let meta = meta_from(&headers)?;
    if meta != Meta::default() {
        // First, so that a stored artifact has its headers.
        let json = serde_json::to_vec(&meta).map_err(ApiError::internal)?;
        let upload = Upload {
            key: key_in(META_SPACE, namespace, &hash)?,
            len: json.len() as u64,
            name: &hash,
            token: &principal.name,
            protocol: TURBO,
            sha256: None,
        };
        store_body(&state, upload, Body::from(json)).await?;
    }
    let writer = Principal {
        namespace: namespace.to_owned(),
        ..principal
    };
    let stored = super::put(&state, &writer, TURBO, &hash, &headers, body, None).await?;
    let status = match stored {
        Stored::New => StatusCode::ACCEPTED,
        Stored::Existing => StatusCode::OK,
    };
    let urls =
        serde_json::json!({ "urls": [format!("{}/v8/artifacts/{hash}", state.config.base_path)] });
    Ok((status, Json(urls)).into_response())
}

#[derive(Deserialize)]
struct HashQuery {
    hashes: Vec<String>,
}

/// `POST /v8/artifacts`: for each hash asked about, its size, duration and tag, or an
/// error entry when it is not stored.
pub(crate) async fn query(
    State(state): State<ApiState>,
    query: Result<Query<Team>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let principal = authorize(&state, &headers, TURBO, Access::Read)?;
    let team = team(query)?;
    let asked: HashQuery = serde_json::from_slice(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("The body must be JSON like {{\"hashes\": [\"...\"]}}: {err}."),
        )
    })?;
    if asked.hashes.len() > MAX_QUERY {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{} hashes asked about at once; at most {MAX_QUERY} are answered per request.",
                asked.hashes.len()
            ),
        ));
    }
    let mut answer = serde_json::Map::new();
    for hash in asked.hashes {
        let entry = match lookup(&state, &principal, team.as_deref(), &hash, false).await? {
            Some((namespace, artifact)) => {
                let meta = load_meta(&state, &namespace, &hash).await;
                let mut info = serde_json::json!({
                    "size": artifact.size,
                    "taskDurationMs": meta.duration.unwrap_or(0),
                });
                if let Some(tag) = meta.tag {
                    info["tag"] = tag.into();
                }
                info
            }
            None => serde_json::json!({ "error": { "message": "Artifact not found" } }),
        };
        answer.insert(hash, entry);
    }
    Ok(Json(serde_json::Value::Object(answer)).into_response())
}

/// `GET /v8/artifacts/status`: caching is on (for a token that may read).
pub(crate) async fn status(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, TURBO, Access::Read)?;
    Ok(Json(serde_json::json!({ "status": "enabled" })).into_response())
}

/// `POST /v8/artifacts/events`: turbo's usage events; nxcache has its own metrics.
pub(crate) async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, TURBO, Access::Read)?;
    Ok(StatusCode::OK.into_response())
}

pub(crate) async fn method_not_allowed() -> Response {
    super::method_not_allowed(TURBO, "GET, HEAD, PUT, POST")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nxcache_auth::Scope;

    fn principal(namespace: &str, read_from: &[&str]) -> Principal {
        Principal {
            namespace: namespace.into(),
            read_from: read_from.iter().map(|s| s.to_string()).collect(),
            ..Principal::new("t", Scope::ReadWrite)
        }
    }

    #[test]
    fn teams_name_the_tokens_namespaces() {
        let web = principal("web", &["shared"]);
        assert_eq!(namespaces(&web, None, Access::Write).unwrap(), ["web"]);
        assert_eq!(
            namespaces(&web, Some("web"), Access::Read).unwrap(),
            ["web", "shared"]
        );
        assert_eq!(
            namespaces(&web, Some("shared"), Access::Read).unwrap(),
            ["shared"]
        );
        assert_eq!(
            namespaces(&web, Some("shared"), Access::Write)
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            namespaces(&web, Some("other"), Access::Read)
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        let default = principal("", &[]);
        assert_eq!(
            namespaces(&default, Some("any"), Access::Write).unwrap(),
            [""]
        );
    }
}
