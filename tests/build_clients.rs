//! The real build tools against a three-node cluster: ccache (4.7), Gradle (4.4) and
//! Bazel (bazel-bootstrap 4.2), from Debian's packages. Each builds a tiny project through
//! one node, then again with an empty local cache through another node, and must be
//! served from the remote cache the second time; a read-only token restores but stores
//! nothing.
//!
//! The clients are Debian packages, so these tests are `#[ignore]`d in the plain
//! `cargo test` and run by `.ci/run` (which installs the packages) with `--ignored`. A
//! missing client fails the test with the command that installs it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nxcache_tests::{InProcessCluster, RO_TOKEN, RW_TOKEN};

/// Runs `command` to completion within `limit` (killed after it); its exit status must
/// be success. Returns stdout and stderr together.
fn run(mut command: Command, limit: Duration) -> String {
    let program = command.get_program().to_string_lossy().into_owned();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} did not finish within {limit:?}; its output:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "{program} failed ({status}):\n{output}");
    output
}

/// Fails the test, with the way to install it, when `program` is not on the PATH.
fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is not installed: this test needs the real client. Install it with \
         `apt-get install -y --no-install-recommends {package}` (.ci/run does)."
    );
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A `host:port` of a node's URL (`http://127.0.0.1:1234`).
fn authority(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

// ---- ccache ----------------------------------------------------------------------

/// ccache's counters after one compilation (`--print-stats`), e.g. `remote_storage_hit`.
fn ccache_build(src: &Path, cache_dir: &Path, node: &str, token: &str) -> String {
    let storage = format!("http://ci:{token}@{}/ccache/", authority(node));
    let mut compile = Command::new("ccache");
    compile
        .current_dir(src)
        .env("CCACHE_DIR", cache_dir)
        .env("CCACHE_REMOTE_STORAGE", storage)
        .args(["gcc", "-c", "lib.c", "-o", "lib.o"]);
    run(compile, Duration::from_secs(60));
    let mut stats = Command::new("ccache");
    stats.env("CCACHE_DIR", cache_dir).arg("--print-stats");
    run(stats, Duration::from_secs(30))
}

fn counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix('\t')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's ccache; run by .ci/run"]
async fn ccache_second_build_is_served_from_the_cluster() {
    require("ccache", "ccache");
    require("gcc", "gcc");
    let cluster = InProcessCluster::start(3, &[]).await;
    let (a, b, c) = (cluster.url(0), cluster.url(1), cluster.url(2));
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(
        src.join("lib.c"),
        "int add(int a, int b) { return a + b; }\n",
    )
    .unwrap();
    let root = work.path().to_path_buf();

    blocking(move || {
        let first = ccache_build(&src, &root.join("local-1"), &a, RW_TOKEN);
        assert_eq!(counter(&first, "remote_storage_hit"), 0, "{first}");
        assert!(
            counter(&first, "remote_storage_write") >= 1,
            "nothing uploaded:\n{first}"
        );
        let built = std::fs::read(src.join("lib.o")).unwrap();

        // An empty local cache, another node: served from the cluster.
        std::fs::remove_file(src.join("lib.o")).unwrap();
        let second = ccache_build(&src, &root.join("local-2"), &c, RW_TOKEN);
        assert_eq!(counter(&second, "remote_storage_hit"), 1, "{second}");
        assert_eq!(std::fs::read(src.join("lib.o")).unwrap(), built);

        // A read-only token restores...
        let restored = ccache_build(&src, &root.join("local-3"), &b, RO_TOKEN);
        assert_eq!(counter(&restored, "remote_storage_hit"), 1, "{restored}");
        // ...but what it compiles is not stored: built again from nothing, a miss.
        std::fs::write(
            src.join("lib.c"),
            "int sub(int a, int b) { return a - b; }\n",
        )
        .unwrap();
        let ro = ccache_build(&src, &root.join("local-4"), &b, RO_TOKEN);
        assert_eq!(counter(&ro, "remote_storage_hit"), 0, "{ro}");
        let again = ccache_build(&src, &root.join("local-5"), &a, RW_TOKEN);
        assert_eq!(
            counter(&again, "remote_storage_hit"),
            0,
            "a read-only build was stored:\n{again}"
        );
        assert_eq!(counter(&again, "remote_storage_miss"), 1, "{again}");
    })
    .await;
}

// ---- Gradle ----------------------------------------------------------------------

fn gradle_project(dir: &Path, node: &str, token: &str, body: &str) {
    let java = dir.join("src/main/java/demo");
    std::fs::create_dir_all(&java).unwrap();
    std::fs::write(
        dir.join("settings.gradle"),
        format!(
            "rootProject.name = 'demo'\n\
             buildCache {{\n\
             \x20   local {{ enabled = false }}\n\
             \x20   remote(HttpBuildCache) {{\n\
             \x20       url = '{node}/gradle/'\n\
             \x20       push = true\n\
             \x20       credentials {{ username = 'ci'; password = '{token}' }}\n\
             \x20   }}\n\
             }}\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("build.gradle"), "apply plugin: 'java'\n").unwrap();
    std::fs::write(
        java.join("Hello.java"),
        format!("package demo;\npublic class Hello {{ {body} }}\n"),
    )
    .unwrap();
}

/// Builds `compileJava` in a fresh project directory and Gradle user home (no local
/// state at all); Gradle's console output.
fn gradle_build(work: &Path, name: &str, node: &str, token: &str, body: &str) -> String {
    let dir = work.join(name);
    gradle_project(&dir, node, token, body);
    let mut gradle = Command::new("gradle");
    gradle
        .current_dir(&dir)
        .env("GRADLE_USER_HOME", work.join(format!("{name}-home")))
        .args([
            "--no-daemon",
            "--build-cache",
            "--console=plain",
            "compileJava",
        ]);
    run(gradle, Duration::from_secs(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's gradle; run by .ci/run"]
async fn gradle_second_build_is_served_from_the_cluster() {
    require("gradle", "gradle");
    let cluster = InProcessCluster::start(3, &[]).await;
    let (a, b, c) = (cluster.url(0), cluster.url(1), cluster.url(2));
    let work = tempfile::tempdir().unwrap();
    let root = work.path().to_path_buf();
    blocking(move || {
        let add = "public static int add(int a, int b) { return a + b; }";
        let first = gradle_build(&root, "first", &a, RW_TOKEN, add);
        assert!(first.contains(":compileJava\n"), "{first}");
        assert!(!first.contains("FROM-CACHE"), "{first}");
        assert!(
            !first.contains("remote build cache"),
            "the cache was turned off:\n{first}"
        );

        let second = gradle_build(&root, "second", &c, RW_TOKEN, add);
        assert!(second.contains(":compileJava FROM-CACHE"), "{second}");

        // A read-only token restores but stores nothing (Gradle reports the refused
        // upload and goes on).
        let restored = gradle_build(&root, "restored", &b, RO_TOKEN, add);
        assert!(restored.contains(":compileJava FROM-CACHE"), "{restored}");
        let sub = "public static int sub(int a, int b) { return a - b; }";
        let ro = gradle_build(&root, "ro", &b, RO_TOKEN, sub);
        assert!(!ro.contains("FROM-CACHE"), "{ro}");
        let again = gradle_build(&root, "again", &a, RW_TOKEN, sub);
        assert!(
            !again.contains("FROM-CACHE"),
            "a read-only build was stored:\n{again}"
        );
    })
    .await;
}

// ---- Bazel -----------------------------------------------------------------------

/// Builds `//:out` with its own output root (no local state); Bazel's output.
fn bazel_build(workspace: &Path, output_root: &Path, node: &str, token: &str) -> String {
    let mut bazel = Command::new("bazel");
    bazel
        .current_dir(workspace)
        .arg(format!("--output_user_root={}", output_root.display()))
        .args(["--batch", "--nohome_rc", "build", "//:out"])
        .arg("--spawn_strategy=local")
        .arg(format!(
            "--remote_cache=http://ci:{token}@{}/bazel/",
            authority(node)
        ));
    run(bazel, Duration::from_secs(300))
}

fn bazel_workspace(dir: &Path, input: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("WORKSPACE"), "").unwrap();
    std::fs::write(
        dir.join("BUILD"),
        "genrule(name = \"out\", srcs = [\"in.txt\"], outs = [\"out.txt\"], cmd = \"tr a-z A-Z < $< > $@\")\n",
    )
    .unwrap();
    std::fs::write(dir.join("in.txt"), input).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's bazel-bootstrap; run by .ci/run"]
async fn bazel_second_build_is_served_from_the_cluster() {
    require("bazel", "bazel-bootstrap");
    let cluster = InProcessCluster::start(3, &[]).await;
    let (a, b, c) = (cluster.url(0), cluster.url(1), cluster.url(2));
    let work = tempfile::tempdir().unwrap();
    let root = work.path().to_path_buf();
    blocking(move || {
        let ws = root.join("ws");
        bazel_workspace(&ws, "hello\n");
        let first = bazel_build(&ws, &root.join("out-1"), &a, RW_TOKEN);
        assert!(!first.contains("remote cache hit"), "{first}");
        let second = bazel_build(&ws, &root.join("out-2"), &c, RW_TOKEN);
        assert!(second.contains("1 remote cache hit"), "{second}");
        assert_eq!(
            std::fs::read_to_string(ws.join("bazel-bin/out.txt")).unwrap(),
            "HELLO\n"
        );

        // A read-only token restores but stores nothing.
        let restored = bazel_build(&ws, &root.join("out-3"), &b, RO_TOKEN);
        assert!(restored.contains("1 remote cache hit"), "{restored}");
        let ro_ws = root.join("ro");
        bazel_workspace(&ro_ws, "read only\n");
        let ro = bazel_build(&ro_ws, &root.join("out-4"), &b, RO_TOKEN);
        assert!(!ro.contains("remote cache hit"), "{ro}");
        let again = bazel_build(&ro_ws, &root.join("out-5"), &a, RW_TOKEN);
        assert!(
            !again.contains("remote cache hit"),
            "a read-only build was stored:\n{again}"
        );
    })
    .await;
}
