//! Gradle's HTTP build cache: `GET`/`PUT {mount}/{key}` with Basic credentials.
//!
//! Gradle turns its remote cache off for the rest of a build on any answer it does not
//! expect, so the answers are exactly: 200 with the entry or 404 on `GET`; 200 on a
//! `PUT` that is stored, also when the key was stored already (entries are immutable,
//! and an equal key means an equal build output); 413 when the entry is larger than
//! the server takes (Gradle skips that entry and keeps the cache).

use http::StatusCode;

use super::{Target, segments};
use crate::error::ApiError;

pub(crate) fn parse(rest: &str) -> Result<&str, ApiError> {
    match segments(rest).as_slice() {
        [key] => Ok(key),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{rest:?} is not a Gradle cache path: set the remote build cache URL to the mount point itself (https://host/gradle/), Gradle appends the cache key."
            ),
        )),
    }
}

pub(crate) fn target(rest: &str) -> Result<Target, ApiError> {
    Ok(Target {
        hash: parse(rest)?.to_owned(),
        sha256: None,
    })
}
