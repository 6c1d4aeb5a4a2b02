//! The monitoring files ship with the code they watch: every metric that an alert rule
//! or a dashboard panel queries is on the `/metrics` page of a live cluster's nodes (a
//! renamed metric would otherwise leave an alert silently empty), and the dashboard is
//! well-formed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nxcache_tests::{
    ProcessCluster, get, http_client, metrics_page, put, random_bytes, workspace_root,
};

/// Series that Prometheus itself adds to every scrape (not on a node's page).
const ADDED_BY_PROMETHEUS: &[&str] = &["up"];

/// The metric names a PromQL expression selects: identifiers that are not functions or
/// aggregations (followed by `(`, or by `by (...)` / `without (...)`), keywords, label names (in `{...}` or in the lists of
/// `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`), strings, durations
/// (`[5m]`), numbers or Grafana variables (`$job`).
fn selected_metrics(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening bracket to just past its closing one (quotes respected).
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        let mut quote = None;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some(_) if c == '\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                None => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            let end = chars[i + 1..]
                .iter()
                .position(|d| *d == c)
                .map_or(chars.len(), |p| i + 2 + p);
            i = end;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable or a number (with its exponent or unit letters).
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            // An aggregation is followed by `(`, or by its `by`/`without` list.
            let rest: String = chars[next..].iter().take(8).collect();
            let followed_by_paren = chars.get(next) == Some(&'(')
                || ["by", "without"].iter().any(|kw| {
                    rest.strip_prefix(kw)
                        .is_some_and(|after| after.trim_start().starts_with('('))
                });
            if LABEL_LISTS.contains(&word.as_str()) && followed_by_paren {
                i = skip_group(next, '(', ')');
            } else if !followed_by_paren && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The `expr` of every rule in a Prometheus rules file (plain or folded `>` scalars).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        i += 1;
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !matches!(value, ">" | ">-" | "|" | "|-") {
            exprs.push(value.to_owned());
            continue;
        }
        let mut block = Vec::new();
        while i < lines.len()
            && (lines[i].trim().is_empty() || lines[i].len() - lines[i].trim_start().len() > indent)
        {
            block.push(lines[i].trim());
            i += 1;
        }
        exprs.push(block.join(" "));
    }
    exprs
}

/// Every query of the dashboard: the panels' expressions and the variables' queries
/// (`label_values(metric, label)` names its metric first).
fn dashboard_expressions(json: &str) -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]
            .as_str()
            .or_else(|| variable["query"]["query"].as_str())
            .unwrap_or_default();
        if let Some(args) = query.strip_prefix("label_values(") {
            let metric = args.split([',', ')']).next().unwrap_or_default().trim();
            exprs.push(metric.to_owned());
        }
    }
    exprs
}

/// Each queried metric, with the file and the expression that queries it.
fn queried_metrics() -> BTreeMap<String, String> {
    let read = |file: &str| std::fs::read_to_string(workspace_root().join(file)).unwrap();
    let mut queried = BTreeMap::new();
    let files = [
        (
            "deploy/monitoring/alerts.yml",
            rule_expressions(&read("deploy/monitoring/alerts.yml")),
        ),
        (
            "deploy/monitoring/grafana-dashboard.json",
            dashboard_expressions(&read("deploy/monitoring/grafana-dashboard.json")),
        ),
    ];
    for (file, exprs) in files {
        assert!(
            exprs.len() >= 5,
            "{file}: only {} expressions found",
            exprs.len()
        );
        for expr in exprs {
            for name in selected_metrics(&expr) {
                queried
                    .entry(name)
                    .or_insert_with(|| format!("{file}: {expr}"));
            }
        }
    }
    queried
}

/// The families on a `/metrics` page, with their types (`# TYPE name type`).
fn families(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// Whether `name` is a series of one of `families`: the family itself, or a histogram's
/// or summary's `_bucket`, `_sum` or `_count` series.
fn exposed(name: &str, families: &BTreeMap<String, String>) -> bool {
    families.contains_key(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|base| {
                families.get(base).is_some_and(|kind| {
                    kind == "histogram" || (kind == "summary" && *suffix != "_bucket")
                })
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_an_alert_or_panel_queries_is_on_a_live_nodes_metrics() {
    let queried = queried_metrics();
    // A cluster (some families are only on a leader, or only where peers are called),
    // with background workers passing often, and a little traffic of every kind.
    let cluster = ProcessCluster::start_with(
        3,
        &["--replication-factor", "2", "--anti-entropy-interval", "1s"],
    );
    let first = cluster.nodes[0].url.clone();
    nxcache_tests::wait_for_reachable_members(&first, 3).await;
    let http = http_client();
    for i in 0..12u32 {
        let hash = (80_000_000 + i).to_string();
        let node = &cluster.nodes[i as usize % 3].url;
        assert_eq!(put(&http, node, &hash, random_bytes(5_000)).await, 200);
        for reader in &cluster.nodes {
            assert_eq!(get(&http, &reader.url, &hash).await.0, 200);
        }
        assert_eq!(get(&http, node, &format!("{hash}9")).await.0, 404);
    }

    // Every queried metric on at least one node's page (the workers' families appear
    // after their first pass: awaited).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = BTreeMap::new();
        for node in &cluster.nodes {
            seen.extend(families(&metrics_page(&node.url).await));
        }
        let missing: Vec<String> = queried
            .iter()
            .filter(|(name, _)| !ADDED_BY_PROMETHEUS.contains(&name.as_str()))
            .filter(|(name, _)| !exposed(name, &seen))
            .map(|(name, query)| format!("{name} (in {query})"))
            .collect();
        if missing.is_empty() {
            eprintln!("{} queried metrics, all on the live nodes", queried.len());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queried by an alert or a panel, but on no live node's /metrics:\n{}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
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
    let found = selected_metrics(
        r#"histogram_quantile(0.99, sum by (le, job) (rate(nxcache_http_request_duration_seconds_bucket{route="cache",job=~"$job"}[5m]))) / on(instance) group_left(version) process_cpu_seconds_total offset 1h > 0.5 and up == 0 or time() - nxcache_x:rate5m"#,
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [
            "nxcache_http_request_duration_seconds_bucket",
            "nxcache_x:rate5m",
            "process_cpu_seconds_total",
            "up"
        ]
    );
    let rules = rule_expressions(
        "      - alert: A\n        expr: a_total > 0\n        for: 5m\n      - alert: B\n        expr: >\n          sum(b_total)\n            / c_total\n        for: 1m\n",
    );
    assert_eq!(rules, ["a_total > 0", "sum(b_total) / c_total"]);
    let families = families("# TYPE h histogram\n# TYPE c_total counter\n# TYPE s summary\n");
    assert!(exposed("h_bucket", &families) && exposed("h_count", &families));
    assert!(exposed("s_sum", &families) && !exposed("s_bucket", &families));
    assert!(!exposed("c_total_count", &families) && !exposed("gone_total", &families));
}
