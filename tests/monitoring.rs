//! The monitoring files ship with the code they watch: every metric that an alert rule
//! or a dashboard panel queries is one that nxcache registers (a renamed metric would
//! otherwise leave an alert silently empty), and the dashboard is well-formed.

use std::collections::BTreeSet;
use std::path::Path;

use nxcache_tests::workspace_root;

/// Metric names (`nxcache_*`, `process_*`) in `text`, histogram suffixes removed.
fn queried_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (rest.starts_with("nxcache_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

/// Every `"nxcache_..."` string literal in the crates' sources: the registered names.
fn registered_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut sources = String::new();
    walk(&workspace_root().join("crates"), &mut sources);
    let mut names: BTreeSet<String> = sources
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("nxcache_") && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_owned)
        .collect();
    // The standard process collector's families.
    for family in nxcache_telemetry::new_registry().gather() {
        names.insert(family.name().to_owned());
    }
    names
}

#[test]
fn alerts_and_dashboard_query_only_metrics_that_exist() {
    let registered = registered_metrics();
    for file in [
        "deploy/monitoring/alerts.yml",
        "deploy/monitoring/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        let queried = queried_metrics(&text);
        assert!(queried.len() >= 5, "{file}: {queried:?}");
        let unknown: Vec<&String> = queried.difference(&registered).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries unknown metrics: {unknown:?}"
        );
    }
}

#[test]
fn the_dashboard_has_a_row_per_area_and_every_panel_a_query() {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/monitoring/grafana-dashboard.json"))
            .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(
        rows,
        [
            "Overview",
            "Traffic",
            "Latency",
            "Storage",
            "Replication",
            "Raft",
            "Protocols"
        ]
    );
    let mut ids = BTreeSet::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
}

#[test]
fn names_are_read_out_of_queries() {
    let found = queried_metrics(
        r#"histogram_quantile(0.99, rate(nxcache_http_request_duration_seconds_bucket[5m])) / process_cpu_seconds_total and not_nxcache_x"#,
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [
            "nxcache_http_request_duration_seconds",
            "process_cpu_seconds_total"
        ]
    );
}
