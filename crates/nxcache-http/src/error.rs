use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use nxcache_store::StoreError;

/// An answer other than success: a status and a message for a person.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: Cow<'static, str>,
    pub retry_after_secs: Option<u32>,
    /// Sends `WWW-Authenticate: Basic` (a 401 to clients that answer a challenge).
    pub challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after_secs: None,
            challenge: false,
        }
    }

    /// Asks for Basic credentials (`WWW-Authenticate`).
    pub fn challenge(mut self) -> Self {
        self.challenge = true;
        self
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Maps a store failure of an upload to the status the client should see.
    pub fn from_store_write(err: StoreError, hash: &str) -> Self {
        match err {
            StoreError::Exists => ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "An artifact with hash {hash} is already stored. Entries are immutable, so it was not replaced."
                ),
            ),
            StoreError::LargerThanBudget { size, budget } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "The artifact ({size} bytes) is larger than the server's whole disk budget ({budget} bytes); nothing was stored. Raise --max-disk-usage (NXCACHE_MAX_DISK_USAGE) on the server."
                ),
            ),
            StoreError::BudgetExhausted { budget } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "The server's disk budget ({budget} bytes) is taken by uploads in progress; nothing was stored. Retry later, or raise --max-disk-usage."
                ),
            )
            .retry_after(5),
            StoreError::DiskFull => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "The disk holding the cache is full; nothing was stored. Free space on the server's data volume or lower --max-disk-usage below its size.",
            ),
            StoreError::LengthMismatch { expected, received } => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "The body did not match its Content-Length ({expected} bytes announced, {received} received); nothing was stored."
                ),
            ),
            other => ApiError::internal(other),
        }
    }

    /// A failure that is ours, not the client's: logged in full, summarised to the client.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The cache server hit an internal error; nothing was stored. The server log has the details.",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.message.into_owned();
        body.push('\n');
        let mut response = (self.status, body).into_response();
        // Exactly "text/plain": the Nx CLI shows a 401 body only with this content type.
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"nxcache\""),
            );
        }
        response
    }
}

/// A plain-text success answer (health endpoints) with the same exact content type.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response {
    ApiError::new(status, text).into_response()
}
