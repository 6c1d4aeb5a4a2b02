//! ccache's HTTP storage backend: `GET`/`HEAD`/`PUT {mount}/{key}` in the `flat` layout,
//! `{mount}/{key[..2]}/{key[2..]}` in the default `subdirs` layout and
//! `{mount}/ac/{sha256}` in the `bazel` layout; Basic credentials from the storage URL.
//!
//! `DELETE` is answered 405: entries are immutable and replicated, they leave the cache
//! by eviction only.

use http::StatusCode;

use super::{Target, segments};
use crate::error::ApiError;

/// The key a path names: the key itself (`flat`) or `{dir}-{rest}` (`subdirs`, `bazel`).
/// No segment contains '-', so the two forms never meet.
pub(crate) fn parse(rest: &str) -> Result<String, ApiError> {
    let segs = segments(rest);
    let bad = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{rest:?} is not a ccache storage path: ccache asks for <key> (layout=flat), <2 characters>/<rest of key> (layout=subdirs) or ac/<sha256> (layout=bazel) below the storage URL."
            ),
        )
    };
    let valid = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    match segs.as_slice() {
        [key] if valid(key) => Ok((*key).to_owned()),
        [dir, key] if dir.len() == 2 && valid(dir) && valid(key) => Ok(format!("{dir}-{key}")),
        _ => Err(bad()),
    }
}

pub(crate) fn target(rest: &str) -> Result<Target, ApiError> {
    Ok(Target {
        hash: parse(rest)?,
        sha256: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_names_one_key() {
        let key = "4b2n0vf8f4kh5nmq8bq2vj0f5g6ue2prcR";
        assert_eq!(parse(key).unwrap(), key);
        assert_eq!(
            parse(&format!("4b/{}", &key[2..])).unwrap(),
            format!("4b-{}", &key[2..])
        );
        let sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(parse(&format!("ac/{sha}")).unwrap(), format!("ac-{sha}"));
        // A flat key cannot name a subdirs key.
        assert!(parse("4b-abc").is_err());
        for bad in ["", "abc/def", "a/b/c", "a.b", "../x"] {
            assert_eq!(
                parse(bad).unwrap_err().status,
                StatusCode::NOT_FOUND,
                "{bad}"
            );
        }
    }
}
