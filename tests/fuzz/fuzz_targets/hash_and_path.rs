//! Keys from URLs, peers and file names: whatever is accepted can never leave its
//! directory, and parsing is stable (a key's text parses back to the same key).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nxcache_store::BlobKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(hash) = BlobKey::parse_hash(text) {
        let s = hash.as_str();
        assert!(!s.is_empty() && s.len() <= 128);
        assert!(!s.contains(['/', '\\', '\0', '.']));
        assert_eq!(BlobKey::parse(s).as_ref(), Ok(&hash));
        // Any namespace that is accepted keeps the key a single, safe path component.
        let (ns, _) = text.split_at(text.len() / 2);
        // So does a protocol's key space (`ns_space.hash`), and it never equals an Nx key.
        let (space, _) = ns.split_at(ns.len().min(7));
        let spaced = BlobKey::in_space(ns, space, &hash);
        for key in [BlobKey::in_namespace(ns, &hash), spaced.clone()]
            .into_iter()
            .flatten()
        {
            assert!(!key.as_str().contains(['/', '\\', '\0']));
            assert!(!key.as_str().contains(".."));
            assert_eq!(BlobKey::parse(key.as_str()).as_ref(), Ok(&key));
        }
        if let (Ok(spaced), Ok(nx)) = (spaced, BlobKey::in_namespace(ns, &hash)) {
            assert_ne!(spaced, nx);
        }
    }
    if let Ok(key) = BlobKey::parse(text) {
        let s = key.as_str();
        assert!(!s.contains(['/', '\\', '\0']) && !s.contains("..") && !s.starts_with('.'));
        assert_eq!(BlobKey::parse(s).as_ref(), Ok(&key));
    }
    let _ = nxcache_auth::bearer_token(Some(data));
    let _ = nxcache_auth::valid_namespace(text);
});
