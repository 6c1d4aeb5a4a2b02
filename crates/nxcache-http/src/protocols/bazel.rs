//! The Bazel HTTP remote cache: `GET`/`HEAD`/`PUT {mount}[/{instance}]/ac/{sha256}` (action
//! results) and `.../cas/{sha256}` (content-addressed outputs).
//!
//! A CAS upload whose body does not hash to its key is refused. An instance name (any
//! path before `ac/` or `cas/`) is a cache of its own: it becomes part of the key.

use http::StatusCode;

use super::{Target, segments};
use crate::cache::hex;
use crate::error::ApiError;

/// Where a request points: the store (`ac` or `cas`), the digest and the instance.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BazelPath {
    pub cas: bool,
    pub sha256: [u8; 32],
    /// The key in the bazel key space: `ac-{sha}`, `cas-{sha}`, or with an instance name
    /// `ac-{instance digest}-{sha}`.
    pub hash: String,
}

pub(crate) fn parse(rest: &str) -> Result<BazelPath, ApiError> {
    let segs = segments(rest);
    let bad = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{rest:?} is not a Bazel cache path: Bazel asks for [instance/]ac/<sha256> or [instance/]cas/<sha256> below the cache URL."
            ),
        )
    };
    let [instance @ .., kind, digest] = segs.as_slice() else {
        return Err(bad());
    };
    let cas = match *kind {
        "ac" => false,
        "cas" => true,
        _ => return Err(bad()),
    };
    let sha256 = parse_sha256(digest).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{digest:?} is not a SHA-256 digest (64 lower-case hexadecimal digits)."),
        )
    })?;
    let hash = if instance.is_empty() {
        format!("{kind}-{digest}")
    } else {
        let name = instance.join("/");
        let digest_of_name = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        format!("{kind}-{}-{digest}", hex(&digest_of_name.as_ref()[..8]))
    };
    Ok(BazelPath { cas, sha256, hash })
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub(crate) fn target(rest: &str) -> Result<Target, ApiError> {
    let path = parse(rest)?;
    Ok(Target {
        hash: path.hash,
        sha256: path.cas.then_some(path.sha256),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn paths_name_the_store_digest_and_instance() {
        let ac = parse(&format!("ac/{SHA}")).unwrap();
        assert!(!ac.cas);
        assert_eq!(ac.hash, format!("ac-{SHA}"));
        let cas = parse(&format!("cas/{SHA}")).unwrap();
        assert!(cas.cas);
        assert_eq!(hex(&cas.sha256), SHA);
        let one = parse(&format!("team/one/cas/{SHA}")).unwrap();
        let two = parse(&format!("team/two/cas/{SHA}")).unwrap();
        assert_ne!(one.hash, two.hash);
        assert_ne!(one.hash, cas.hash);
        assert!(one.hash.len() <= 128);
    }

    #[test]
    fn other_paths_and_digests_are_refused() {
        for bad in ["", "ac", &format!("xx/{SHA}"), &format!("ac/{SHA}/x")] {
            assert_eq!(
                parse(bad).unwrap_err().status,
                StatusCode::NOT_FOUND,
                "{bad}"
            );
        }
        for bad in [
            "ac/abc",
            &format!("ac/{}", SHA.to_uppercase()),
            &format!("cas/{SHA}0"),
        ] {
            assert_eq!(
                parse(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }
}
