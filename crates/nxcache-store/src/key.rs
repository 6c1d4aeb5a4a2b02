use std::fmt;

/// Longest key accepted. Nx hashes are at most 20 decimal digits today; the head-room lets
/// a future hash format through while keeping file names short.
pub const MAX_KEY_LEN: usize = 128;

/// Longest namespace name in a key.
pub const MAX_NAMESPACE_LEN: usize = 40;

/// Longest key-space name (the protocol a key belongs to, see [`BlobKey::in_space`]).
pub const MAX_SPACE_LEN: usize = 7;

/// A validated artifact key: a hash of 1 to 128 characters from `[A-Za-z0-9_-]`, in the
/// default namespace as it is, or in a named one as `namespace.hash` (the namespace 1 to
/// 40 characters of `[a-z0-9-]`). A hash never contains `.`, so a client naming a hash
/// cannot name another namespace's key.
///
/// Other protocols than Nx's keep their keys in their own key space: the namespace part
/// becomes `namespace_space` (`_space` in the default namespace), see
/// [`BlobKey::in_space`]. A namespace name never contains `_`, so no key of one space
/// (nor an Nx key) can name a key of another.
///
/// The key becomes a file name and an index key, so anything that could step outside a
/// directory (`/`, `..`, NUL, percent-decoded separators) is refused before it gets near
/// the file system.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidKey {
    #[error("the hash is empty")]
    Empty,
    #[error("the hash is {0} characters long; at most 128 are accepted")]
    TooLong(usize),
    #[error("the hash may only contain letters, digits, '-' and '_'")]
    BadCharacter,
    #[error("a namespace is 1 to 40 characters from a-z, 0-9 and '-'")]
    BadNamespace,
    #[error("a key space is 1 to 7 characters from a-z")]
    BadSpace,
}

impl BlobKey {
    /// A stored key, namespaced or not (keys from peers, file names, the index).
    pub fn parse(raw: &str) -> Result<Self, InvalidKey> {
        match raw.split_once('.') {
            Some(("", _)) => Err(InvalidKey::BadNamespace),
            Some((prefix, hash)) => {
                let hash = Self::parse_hash(hash)?;
                match prefix.split_once('_') {
                    Some((namespace, space)) => Self::in_space(namespace, space, &hash),
                    None => Self::in_namespace(prefix, &hash),
                }
            }
            None => Self::parse_hash(raw),
        }
    }

    /// `hash` in `namespace` (the default namespace when empty).
    pub fn in_namespace(namespace: &str, hash: &BlobKey) -> Result<Self, InvalidKey> {
        if namespace.is_empty() {
            return Ok(hash.clone());
        }
        if hash.0.contains('.') {
            return Err(InvalidKey::BadCharacter);
        }
        check_namespace(namespace)?;
        Ok(BlobKey(format!("{namespace}.{}", hash.0)))
    }

    /// `hash` in key space `space` (a protocol: `bazel`, `gradle`, ...) of `namespace`
    /// (the default namespace when empty): `namespace_space.hash`.
    pub fn in_space(namespace: &str, space: &str, hash: &BlobKey) -> Result<Self, InvalidKey> {
        if hash.0.contains('.') {
            return Err(InvalidKey::BadCharacter);
        }
        if !namespace.is_empty() {
            check_namespace(namespace)?;
        }
        if space.is_empty()
            || space.len() > MAX_SPACE_LEN
            || !space.bytes().all(|b| b.is_ascii_lowercase())
        {
            return Err(InvalidKey::BadSpace);
        }
        Ok(BlobKey(format!("{namespace}_{space}.{}", hash.0)))
    }

    /// A hash as a client names it (in a URL): no namespace part.
    pub fn parse_hash(raw: &str) -> Result<Self, InvalidKey> {
        if raw.is_empty() {
            return Err(InvalidKey::Empty);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(InvalidKey::TooLong(raw.len()));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(InvalidKey::BadCharacter);
        }
        Ok(BlobKey(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Spreads keys over 256 directories so no directory grows huge.
    pub(crate) fn shard(&self) -> u8 {
        (crate::checksum::key_hash(self.0.as_bytes()) >> 56) as u8
    }
}

fn check_namespace(namespace: &str) -> Result<(), InvalidKey> {
    if namespace.is_empty()
        || namespace.len() > MAX_NAMESPACE_LEN
        || !namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(InvalidKey::BadNamespace);
    }
    Ok(())
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobKey({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_nx_hashes_and_future_formats() {
        for ok in ["13661868522198395722", "0", "abc-DEF_09", &"a".repeat(128)] {
            assert!(BlobKey::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_path_tricks_and_oversized_keys() {
        assert_eq!(BlobKey::parse(""), Err(InvalidKey::Empty));
        assert_eq!(
            BlobKey::parse(&"1".repeat(129)),
            Err(InvalidKey::TooLong(129))
        );
        for bad in [
            "..", "a/b", "a\\b", "a\0b", "%2F", "é", " 1", "1\n", "ns.a.b", "ns./x",
        ] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?}");
            assert_eq!(
                BlobKey::parse_hash(bad),
                Err(InvalidKey::BadCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn namespaced_keys_never_mix_with_hashes() {
        let hash = BlobKey::parse_hash("1234").unwrap();
        let main = BlobKey::in_namespace("main", &hash).unwrap();
        assert_eq!(main.as_str(), "main.1234");
        assert_eq!(BlobKey::parse("main.1234").unwrap(), main);
        assert_eq!(BlobKey::in_namespace("", &hash).unwrap(), hash);
        // A client's hash cannot carry a namespace.
        assert_eq!(
            BlobKey::parse_hash("main.1234"),
            Err(InvalidKey::BadCharacter)
        );
        for bad in ["Main", "a_b", "a/b", "..", &"n".repeat(41)] {
            assert_eq!(
                BlobKey::in_namespace(bad, &hash),
                Err(InvalidKey::BadNamespace),
                "{bad:?}"
            );
        }
        assert!(BlobKey::parse(".1234").is_err());
        assert!(BlobKey::parse("main.").is_err());
    }

    #[test]
    fn key_spaces_are_apart_from_namespaces_and_each_other() {
        let hash = BlobKey::parse_hash("ab12").unwrap();
        let default_bazel = BlobKey::in_space("", "bazel", &hash).unwrap();
        let team_bazel = BlobKey::in_space("team", "bazel", &hash).unwrap();
        let team_gradle = BlobKey::in_space("team", "gradle", &hash).unwrap();
        assert_eq!(default_bazel.as_str(), "_bazel.ab12");
        assert_eq!(team_bazel.as_str(), "team_bazel.ab12");
        // Stored keys come back as they were (file names, peers, the index).
        for key in [&default_bazel, &team_bazel, &team_gradle] {
            assert_eq!(&BlobKey::parse(key.as_str()).unwrap(), key);
        }
        let nx = BlobKey::in_namespace("team", &hash).unwrap();
        let all = [&hash, &nx, &default_bazel, &team_bazel, &team_gradle];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Namespaces never contain '_', so none can name a key space.
        assert_eq!(
            BlobKey::in_namespace("team_bazel", &hash),
            Err(InvalidKey::BadNamespace)
        );
        for bad in ["", "Bazel", "ba-zel", "toolongx", "a_b"] {
            assert_eq!(
                BlobKey::in_space("team", bad, &hash),
                Err(InvalidKey::BadSpace),
                "{bad:?}"
            );
        }
        for bad in ["_bazel.", "team__bazel.x", "Team_bazel.x", "team_.x", "_.x"] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?}");
        }
    }
}
