//! Tests do not depend on the environment of whoever runs them. This binary sets, in its
//! own process, the variables a developer's shell or a CI job might export, bogus ones,
//! and shows that neither a child `nxcache` process, nor any other child the helpers run,
//! nor the flags of an in-process node see them.
//!
//! One test in its own binary: it changes the process environment, which no other test
//! may be reading at the same time.

use std::process::Command;

use nxcache_tests::{NodeProcess, PATIENCE, RW_TOKEN, output_within};

/// What the caller exported; each would change or break a node that read it.
const LEAKED: [(&str, &str); 5] = [
    // Not a number: a node that reads it refuses to start.
    ("NXCACHE_REPLICATION_FACTOR", "not-a-number"),
    // Text logs: the helpers could not read the JSON "serving" line.
    ("NXCACHE_LOG_FORMAT", "text"),
    // A token the test never gave its node.
    ("NXCACHE_READ_WRITE_TOKENS", "leaked-token"),
    // Trace export to nowhere: a node that reads it says "exporting traces over OTLP".
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
    ("OTEL_SERVICE_NAME", "leaked-service"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_children_ignore_the_callers_nxcache_and_otel_variables() {
    for (name, value) in LEAKED {
        // SAFETY: the only test of this binary, and it sets them before it starts any
        // thread or child: nothing reads the environment concurrently.
        unsafe { std::env::set_var(name, value) };
    }

    // A child process started by the helpers sees none of them, only what the test
    // gave it.
    let env = output_within(
        Command::new("env").env("NXCACHE_READ_WRITE_TOKENS", "given"),
        PATIENCE,
    );
    let seen = String::from_utf8_lossy(&env.stdout);
    for (name, _) in LEAKED {
        let given = (name == "NXCACHE_READ_WRITE_TOKENS").then_some("given");
        let got = seen
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")));
        assert_eq!(got, given, "what a child saw of {name}");
    }

    // A real node starts (it would refuse the replication factor, and its log would not
    // be JSON), exports no traces, and knows only the token the test gave it.
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &["--listen", "127.0.0.1:0"],
        &[("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN)],
    );
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(
        !log.contains("exporting traces over OTLP"),
        "the node read OTEL_EXPORTER_OTLP_ENDPOINT: {log}"
    );
    let client = nxcache_tests::http_client();
    let put = |token: &'static str| {
        client
            .put(format!("{}/v1/cache/4711", node.url))
            .bearer_auth(token)
            .body(&b"isolated"[..])
            .send()
    };
    assert_eq!(put("leaked-token").await.unwrap().status(), 401);
    assert_eq!(put(RW_TOKEN).await.unwrap().status(), 200);

    // An in-process node's flags: nothing filled in from the environment.
    let args = nxcache_tests::parse_serve_flags(&["serve".to_owned()]);
    assert!(args.read_write_tokens.is_none());
    assert!(args.replication_factor.is_none());
    assert!(args.log_format.is_none());
}
