//! Access tokens.
//!
//! Tokens are kept only as BLAKE3 digests, so a memory dump gives none away, and a
//! presented token is found by its digest, so neither the time a check takes nor its cost
//! grows with the number of tokens. A token has a name (for logs and revocation; the
//! secret itself is never logged) and a scope.

mod token_file;

pub use token_file::{generate_token, load_or_create_token};

use std::collections::HashMap;

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
#[derive(Clone, Copy)]
pub struct Digest(pub [u8; 32]);

/// Constant-time, although nothing depends on it: see [`TokenSet`].
impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Digest {}

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

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

/// The tokens a node accepts, keyed by digest.
///
/// A presented token is hashed and its digest looked up in a map: one hash and one
/// lookup whatever the number of tokens (a linear scan in constant time cost 7 ms per
/// request with 20,000 tokens). Looking digests up, rather than comparing every one in
/// constant time, gives nothing away: the map's hashing and bucket comparisons depend
/// only on BLAKE3 digests, and learning anything about the digest of a guessed token, or
/// even a stored digest itself, does not help to find a secret that hashes to it (that
/// would take a BLAKE3 preimage), while a server only ever accepts the secret.
#[derive(Clone, Default)]
pub struct TokenSet {
    /// Usually one principal per digest; two names for one secret (the same value in two
    /// environment lists) are kept sorted by name, and the first one answers.
    by_digest: HashMap<Digest, Vec<Principal>>,
    len: usize,
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

    /// Adds a token for `principal`, namespaces included; replaces the token of the same
    /// name under the same digest.
    pub fn add_principal(&mut self, digest: Digest, principal: Principal) {
        let names = self.by_digest.entry(digest).or_default();
        match names.binary_search_by(|p| p.name.cmp(&principal.name)) {
            Ok(i) => names[i] = principal,
            Err(i) => {
                names.insert(i, principal);
                self.len += 1;
            }
        }
    }

    /// Removes the token `name` stored under `digest`; false if there was none.
    pub fn remove(&mut self, digest: &Digest, name: &str) -> bool {
        let Some(names) = self.by_digest.get_mut(digest) else {
            return false;
        };
        let Ok(i) = names.binary_search_by(|p| p.name.as_str().cmp(name)) else {
            return false;
        };
        names.remove(i);
        if names.is_empty() {
            self.by_digest.remove(digest);
        }
        self.len -= 1;
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Authenticator for TokenSet {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        self.by_digest
            .get(&Digest::of(secret))
            .and_then(|names| names.first())
            .cloned()
    }
}

/// Name of the read-write token a node generates on a first start with none configured.
pub const GENERATED_TOKEN_NAME: &str = "generated";

/// Hex digits of a token's digest in the name of an environment token.
const ENV_NAME_DIGEST_HEX: usize = 12;

/// The name of a token from `NXCACHE_READ_WRITE_TOKENS`, `NXCACHE_READ_ONLY_TOKENS` or
/// `NXCACHE_ADMIN_TOKENS`: its list (`read-write`, `read-only`, `admin`) and the start of
/// its digest, e.g. `read-write-3fa2b1c9d0e4`. A name follows from the value, so a
/// changed value is a new token (the old one is revoked with the rest of what left the
/// environment), and the names give nothing of the secrets away.
pub fn env_token_name(scope: Scope, digest: &Digest) -> String {
    let list = match scope {
        Scope::Read => "read-only",
        Scope::ReadWrite => "read-write",
        Scope::Admin => "admin",
    };
    format!("{list}-{}", &digest.to_hex()[..ENV_NAME_DIGEST_HEX])
}

/// Whether `name` is one the server gives the environment's tokens: the names of
/// [`env_token_name`], the positional `read-write-1`, `read-only-2`, `admin-3` of
/// earlier versions, and the generated first-start token. Such tokens follow the
/// environment (a token created through the admin API never has such a name).
pub fn is_env_token_name(name: &str) -> bool {
    if name == GENERATED_TOKEN_NAME {
        return true;
    }
    let Some(tail) = ["read-write-", "read-only-", "admin-"]
        .iter()
        .find_map(|list| name.strip_prefix(list))
    else {
        return false;
    };
    let digest_part = tail.len() == ENV_NAME_DIGEST_HEX
        && tail
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let positional = (1..=6).contains(&tail.len()) && tail.bytes().all(|b| b.is_ascii_digit());
    digest_part || positional
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
        let debug = format!("{:?}", s.by_digest.keys().map(|d| d.0).collect::<Vec<_>>());
        assert!(!debug.contains("rw-secret"));
    }

    #[test]
    fn tokens_are_found_by_digest_among_a_hundred_thousand() {
        let mut s = TokenSet::new();
        for i in 0..100_000 {
            s.add(format!("t{i}"), &format!("secret-{i}"), Scope::Read);
        }
        assert_eq!(s.len(), 100_000);
        for i in [0, 1, 49_999, 99_999] {
            assert_eq!(
                s.authenticate(&format!("secret-{i}")).unwrap().name,
                format!("t{i}")
            );
        }
        assert!(s.authenticate("secret-100000").is_none());
        assert!(s.remove(&Digest::of("secret-7"), "t7"));
        assert!(!s.remove(&Digest::of("secret-7"), "t7"));
        assert!(s.authenticate("secret-7").is_none());
        assert_eq!(s.len(), 99_999);
    }

    #[test]
    fn environment_token_names_follow_the_value_and_are_recognised() {
        let a = env_token_name(Scope::ReadWrite, &Digest::of("first-secret-value"));
        let b = env_token_name(Scope::ReadWrite, &Digest::of("other-secret-value"));
        assert!(a.starts_with("read-write-") && a.len() == "read-write-".len() + 12);
        assert_ne!(a, b, "another value is another token");
        assert!(!a.contains("first"));
        let admin = env_token_name(Scope::Admin, &Digest::of("first-secret-value"));
        for name in [
            a.as_str(),
            &b,
            &admin,
            "read-only-2",
            "admin-1",
            "generated",
        ] {
            assert!(is_env_token_name(name), "{name}");
        }
        for name in [
            "ci",
            "read-write",
            "read-write-",
            "admin-x1",
            "admin-1234567",
            "laptop-1",
        ] {
            assert!(!is_env_token_name(name), "{name}");
        }
    }

    #[test]
    fn one_secret_under_two_names_answers_as_the_first_until_it_goes() {
        let mut s = TokenSet::new();
        s.add("read-write-1", "same", Scope::ReadWrite);
        s.add("admin-1", "same", Scope::Admin);
        assert_eq!(s.len(), 2);
        assert_eq!(s.authenticate("same").unwrap().name, "admin-1");
        // Re-adding a name replaces it, it does not count twice.
        s.add("admin-1", "same", Scope::Read);
        assert_eq!(s.len(), 2);
        assert_eq!(s.authenticate("same").unwrap().scope, Scope::Read);
        assert!(s.remove(&Digest::of("same"), "admin-1"));
        assert_eq!(s.authenticate("same").unwrap().name, "read-write-1");
        assert!(s.remove(&Digest::of("same"), "read-write-1"));
        assert!(s.is_empty() && s.authenticate("same").is_none());
    }
}
