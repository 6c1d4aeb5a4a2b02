//! The real Nx CLI in a throw-away workspace: unpacking the bundled clients, running
//! `nx run-many`, and reading what it restored from the remote cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::workspace_root;

pub const PROJECTS: [&str; 3] = ["alpha", "beta", "gamma"];

/// How long unpacking Nx or one `nx run-many` may take before the test fails (both take
/// seconds normally).
const NX_WITHIN: std::time::Duration = std::time::Duration::from_secs(300);

/// Unpacks the bundled Nx once per checkout (under target/) and returns its node_modules.
///
/// The tests that call this run in parallel, and `install.sh` only checks for the `nx`
/// binary, which exists long before the rest of the tree is unpacked: a second caller
/// could run a half-written client ("Permission denied"). So one install at a time,
/// into a staging directory that is renamed into place once complete.
pub fn nx_node_modules(version: &str) -> PathBuf {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _installing = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dest = workspace_root().join("target/nx-client").join(version);
    let complete = dest.join(".complete");
    if !complete.exists() {
        let client_dir = std::env::var("NXCACHE_NX_CLIENT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("../shared/nx-client"));
        let staging = dest.with_file_name(format!(".{version}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let out = crate::output_within(
            Command::new("bash")
                .arg(client_dir.join("install.sh"))
                .arg(version)
                .arg(&staging),
            NX_WITHIN,
        );
        assert!(
            out.status.success(),
            "installing Nx {version} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(staging.join(".complete"), version).unwrap();
        // What is left at `dest` is a tree an older run left unfinished.
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&staging, &dest).expect("move the unpacked Nx client into place");
    }
    dest.join("node_modules")
}

/// A throw-away Nx workspace with three cacheable projects whose build writes random
/// bytes: a restored output can only equal the original if it came from the cache.
pub struct Workspace {
    dir: tempfile::TempDir,
}

pub struct Run {
    pub success: bool,
    pub output: String,
}

impl Workspace {
    pub fn new(node_modules: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink(node_modules, root.join("node_modules")).unwrap();
        std::fs::write(
            root.join("package.json"),
            r#"{ "name": "nxcache-e2e", "version": "0.0.0", "private": true }"#,
        )
        .unwrap();
        std::fs::write(
            root.join("nx.json"),
            r#"{ "targetDefaults": { "build": { "cache": true, "outputs": ["{projectRoot}/dist"] } } }"#,
        )
        .unwrap();
        for p in PROJECTS {
            let proj = root.join("libs").join(p);
            std::fs::create_dir_all(&proj).unwrap();
            let script = format!(
                "const fs=require('fs'),c=require('crypto');fs.mkdirSync('libs/{p}/dist',{{recursive:true}});\
                 fs.writeFileSync('libs/{p}/dist/out.bin',c.randomBytes(200000));\
                 fs.writeFileSync('libs/{p}/dist/id.txt','{p} '+c.randomBytes(8).toString('hex'));"
            );
            let project = serde_json::json!({
                "name": p,
                "root": format!("libs/{p}"),
                "targets": { "build": {
                    "executor": "nx:run-commands",
                    "options": { "command": format!("node -e \"{script}\"") }
                }}
            });
            std::fs::write(proj.join("project.json"), project.to_string()).unwrap();
            std::fs::write(proj.join("index.js"), format!("module.exports = '{p}';\n")).unwrap();
        }
        Workspace { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn nx(&self, server: &str, token: &str, extra_env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(self.root().join("node_modules/.bin/nx"));
        cmd.current_dir(self.root())
            .args(["run-many", "-t", "build", "--output-style=static"])
            .env("NX_SELF_HOSTED_REMOTE_CACHE_SERVER", server)
            .env("NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN", token)
            .env("NX_DAEMON", "false")
            .env("NX_NO_CLOUD", "true")
            .env("NX_TUI", "false")
            .env("NX_SKIP_LOG_GROUPING", "true")
            // CI runners may force colours on; the parser below strips them anyway.
            .env("FORCE_COLOR", "0")
            .env("NO_COLOR", "1")
            .env_remove("NODE_TLS_REJECT_UNAUTHORIZED");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        // Without the caller's NXCACHE_* / OTEL_* variables (output_within drops them).
        let out = crate::output_within(&mut cmd, NX_WITHIN);
        let output = strip_ansi(&format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        eprintln!("--- nx output ---\n{output}\n-----------------");
        Run {
            success: out.status.success(),
            output,
        }
    }

    /// Forgets everything local: Nx's own cache and the build outputs.
    pub fn clear_local(&self) {
        let _ = std::fs::remove_dir_all(self.root().join(".nx"));
        for p in PROJECTS {
            let _ = std::fs::remove_dir_all(self.root().join("libs").join(p).join("dist"));
        }
    }

    pub fn outputs(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for p in PROJECTS {
            for f in ["out.bin", "id.txt"] {
                let path = self.root().join("libs").join(p).join("dist").join(f);
                out.insert(format!("{p}/{f}"), std::fs::read(&path).unwrap_or_default());
            }
        }
        out
    }
}

/// Removes terminal escape sequences (`ESC [ ... letter`), which Nx emits between the
/// words this test looks for whenever it decides the output is a colour terminal.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[test]
fn strip_ansi_leaves_the_words() {
    let coloured = "\u{1b}[2m> \u{1b}[22m\u{1b}[2mnx run\u{1b}[22m alpha:build  \u{1b}[2m[remote cache]\u{1b}[22m";
    assert_eq!(strip_ansi(coloured), "> nx run alpha:build  [remote cache]");
}

pub fn restored_from_remote(run: &Run) -> usize {
    PROJECTS
        .iter()
        .filter(|p| {
            run.output
                .lines()
                .any(|l| l.contains(&format!("nx run {p}:build")) && l.contains("[remote cache]"))
        })
        .count()
}
