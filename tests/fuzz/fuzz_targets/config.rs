//! Configuration files: any TOML text is either a configuration or an error, never a
//! panic; a configuration that merges is one that validates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nxcache_config::{FileConfig, ServeArgs, ServeConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = nxcache_config::ordinal_of(text);
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        let _ = ServeConfig::merge(ServeArgs::default(), file);
    }
});
