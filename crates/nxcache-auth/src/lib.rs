//! Access tokens.
//!
//! Tokens are kept only as BLAKE3 digests and compared in constant time, so neither a
//! memory dump nor response timing gives one away. A token has a name (for logs and
//! revocation; the secret itself is never logged) and a scope.

mod token_file;

pub use token_file::{generate_token, load_or_create_token};

use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Restore from the cache.
    Read,
    /// Restore and upload.
    ReadWrite,
    /// Everything, including the admin API (tokens, nodes).
    Admin,
}

impl Scope {
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => true,
            Access::Write => matches!(self, Scope::ReadWrite | Scope::Admin),
            Access::Admin => self == Scope::Admin,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::ReadWrite => "read-write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "read-write" => Some(Scope::ReadWrite),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Admin,
}

/// Who a request is, once its token is recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub scope: Scope,
    /// Where its uploads go and where its reads look first; `""` is the default
    /// namespace (tokens without one).
    pub namespace: String,
    /// Further namespaces its reads fall back to, in order (read-only for it).
    pub read_from: Vec<String>,
}

impl Principal {
    /// A principal of the default namespace.
    pub fn new(name: impl Into<String>, scope: Scope) -> Self {
        Principal {
            name: name.into(),
            scope,
            namespace: String::new(),
            read_from: Vec::new(),
        }
    }

    /// The namespaces a read looks in: its own first, then `read_from`, no repeats.
    pub fn read_namespaces(&self) -> Vec<&str> {
        let mut out: Vec<&str> = vec![self.namespace.as_str()];
        for ns in &self.read_from {
            if !out.contains(&ns.as_str()) {
                out.push(ns);
            }
        }
        out
    }
}

/// Longest namespace name.
pub const MAX_NAMESPACE_LEN: usize = 40;

/// A namespace name: 1 to 40 characters of `[a-z0-9-]` (it becomes part of file names
/// and keys; the empty default namespace is not named).
pub fn valid_namespace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAMESPACE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no Authorization header")]
    Missing,
    #[error("the Authorization header is not of the form 'Bearer <token>'")]
    Malformed,
    #[error("the token is not known")]
    Unknown,
}

/// Answers "who is this token?" from local state only: no network call per request.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, secret: &str) -> Option<Principal>;
}

/// What is kept of a token: its BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(secret: &str) -> Self {
        Digest(*blake3::hash(secret.as_bytes()).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digest(..)")
    }
}

/// A fixed set of tokens (from configuration).
#[derive(Clone, Default)]
pub struct TokenSet {
    entries: Vec<(Digest, Principal)>,
}

impl TokenSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, secret: &str, scope: Scope) {
        self.add_digest(name, Digest::of(secret), scope);
    }

    /// Adds a token known only by its digest (replicated token tables).
    pub fn add_digest(&mut self, name: impl Into<String>, digest: Digest, scope: Scope) {
        self.add_principal(digest, Principal::new(name, scope));
    }

    /// Adds a token for `principal`, namespaces included.
    pub fn add_principal(&mut self, digest: Digest, principal: Principal) {
        self.entries.push((digest, principal));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Authenticator for TokenSet {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        let presented = Digest::of(secret);
        // Visit every entry whatever matches, so the time taken says nothing about which
        // (or whether any) token matched.
        let mut found: Option<&Principal> = None;
        for (digest, principal) in &self.entries {
            let equal: bool = digest.0.ct_eq(&presented.0).into();
            if equal && found.is_none() {
                found = Some(principal);
            }
        }
        found.cloned()
    }
}

/// Extracts the token from an `Authorization` header value. The scheme is matched
/// case-insensitively, as RFC 7235 says.
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, AuthError> {
    let raw = header.ok_or(AuthError::Missing)?;
    let value = std::str::from_utf8(raw).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> TokenSet {
        let mut s = TokenSet::new();
        s.add("ci", "rw-secret", Scope::ReadWrite);
        s.add("dev", "ro-secret", Scope::Read);
        s
    }

    #[test]
    fn known_tokens_map_to_their_scope() {
        let s = set();
        assert_eq!(s.authenticate("rw-secret").unwrap().scope, Scope::ReadWrite);
        assert_eq!(s.authenticate("ro-secret").unwrap().name, "dev");
        assert!(s.authenticate("nope").is_none());
        assert!(s.authenticate("").is_none());
        assert!(s.authenticate("rw-secre").is_none());
    }

    #[test]
    fn scopes_allow_what_they_say() {
        assert!(Scope::Read.allows(Access::Read));
        assert!(!Scope::Read.allows(Access::Write));
        assert!(Scope::ReadWrite.allows(Access::Write));
        assert!(!Scope::ReadWrite.allows(Access::Admin));
        assert!(Scope::Admin.allows(Access::Write) && Scope::Admin.allows(Access::Admin));
        for s in [Scope::Read, Scope::ReadWrite, Scope::Admin] {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let d = Digest::of("x");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(Some(b"Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some(b"bearer  abc ")), Ok("abc"));
        assert_eq!(bearer_token(None), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some(b"Basic abc")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(Some(b"Bearer")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(Some(b"Bearer ")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(Some(b"\xff\xfe")), Err(AuthError::Malformed));
    }

    #[test]
    fn digests_not_secrets_are_kept() {
        let s = set();
        let debug = format!(
            "{:?}",
            s.entries.iter().map(|(d, _)| d.0).collect::<Vec<_>>()
        );
        assert!(!debug.contains("rw-secret"));
    }
}
