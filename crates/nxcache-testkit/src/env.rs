//! Tests do not depend on the environment of whoever runs them: a developer's shell with
//! `NXCACHE_REPLICATION_FACTOR` or `OTEL_EXPORTER_OTLP_ENDPOINT` exported must not change
//! what a test's node does, and a `cargo build` run from inside `cargo test` must not
//! rebuild because of the variables the outer cargo set for the test binary.

use std::ffi::OsString;

/// Prefixes of the variables a node reads (its flags' `NXCACHE_*` forms, OpenTelemetry's
/// `OTEL_*`).
pub const NODE_PREFIXES: [&str; 2] = ["NXCACHE_", "OTEL_"];

/// Variables cargo sets for the test binary it runs (and for build scripts), which a
/// nested `cargo build` would otherwise inherit: `CARGO_PKG_*`, `CARGO_MANIFEST_DIR`,
/// `OUT_DIR` and the like. Cargo's own configuration (`CARGO_HOME`, `CARGO_TARGET_DIR`,
/// `CARGO_BUILD_*`, `CARGO_PROFILE_*`, ...) is kept: it says how to build.
const OUTER_CARGO_PREFIXES: [&str; 6] = [
    "CARGO_PKG_",
    "CARGO_BIN_EXE_",
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "DEP_",
    "CARGO_MANIFEST_",
];
const OUTER_CARGO_NAMES: [&str; 14] = [
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_MAKEFLAGS",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "NUM_JOBS",
    "OPT_LEVEL",
    "DEBUG",
    "PROFILE",
    "RUSTDOC",
];

/// The names, among this process's variables, that start with one of `prefixes`.
fn names_with(prefixes: &[&str]) -> Vec<OsString> {
    std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str()
                .is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p)))
        })
        .collect()
}

/// The caller's variables a node would read: every `NXCACHE_*` and `OTEL_*` set now.
pub fn node_vars() -> Vec<OsString> {
    names_with(&NODE_PREFIXES)
}

/// The variables the outer cargo set that a nested `cargo` run must not see, plus the
/// node's (a build script has no business with them either).
pub fn outer_cargo_vars() -> Vec<OsString> {
    let mut names = names_with(&OUTER_CARGO_PREFIXES);
    names.extend(
        OUTER_CARGO_NAMES
            .iter()
            .filter(|n| std::env::var_os(n).is_some())
            .map(OsString::from),
    );
    names.extend(node_vars());
    names
}

/// Starts `cmd` without the caller's `NXCACHE_*` / `OTEL_*` variables. What the test
/// passes with `cmd.env(..)`, before or after, still applies.
pub fn isolate(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for name in node_vars() {
        if !cmd.get_envs().any(|(set, _)| set == name) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// [`isolate`] for a nested `cargo` run: also drops what the outer cargo set.
pub fn isolate_cargo(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for name in outer_cargo_vars() {
        cmd.env_remove(name);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_cargo_loses_the_outer_cargos_package_variables_but_not_its_configuration() {
        // `cargo test` set these for this very binary.
        let dropped = outer_cargo_vars();
        assert!(dropped.iter().any(|n| n == "CARGO_PKG_NAME"), "{dropped:?}");
        assert!(
            dropped.iter().any(|n| n == "CARGO_MANIFEST_DIR"),
            "{dropped:?}"
        );
        assert!(!dropped.iter().any(|n| n == "CARGO_HOME" || n == "CARGO"));
        assert!(!dropped.iter().any(|n| n == "PATH"));
    }
}
