use std::time::Duration;

use clap::{Args, FromArgMatches};

use super::*;

/// The flags parsed as `nxcache serve` would, except that the caller's `NXCACHE_*`
/// variables fill nothing: these tests are about the flags and the file.
fn args(list: &[&str]) -> ServeArgs {
    let mut argv = vec!["nxcache"];
    argv.extend_from_slice(list);
    let command =
        ServeArgs::augment_args(clap::Command::new("nxcache")).mut_args(|arg| arg.env(None));
    ServeArgs::from_arg_matches(&command.try_get_matches_from(argv).unwrap()).unwrap()
}

#[test]
fn defaults_are_safe_for_a_laptop() {
    let c = ServeConfig::merge(ServeArgs::default(), FileConfig::default()).unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:3000");
    assert_eq!(c.data_dir, PathBuf::from("./nxcache-data"));
    assert_eq!(c.base_path, "");
    assert!(c.fsync);
    assert_eq!(c.put_success_status, 200);
    assert_eq!(c.max_disk_usage, 10 << 30);
    assert!(c.ttl.is_none());
    assert!(c.read_write_tokens.is_empty());
}

#[test]
fn flags_override_the_file_and_the_file_overrides_defaults() {
    let file: FileConfig = toml::from_str(
        r#"
        listen = "127.0.0.1:4000"
        max-disk-usage = "1GiB"
        max-artifact-size = 1000
        ttl = "7d"
        fsync = "off"
        read-only-tokens = ["read-only-token-0001", "read-only-token-0002"]
        "#,
    )
    .unwrap();
    let c =
        ServeConfig::merge(args(&["--listen", "127.0.0.1:5000", "--fsync", "on"]), file).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
    assert!(c.fsync);
    assert_eq!(c.max_disk_usage, 1 << 30);
    assert_eq!(c.max_artifact_size, 1000);
    assert_eq!(c.ttl, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(c.read_only_tokens.len(), 2);
}

#[test]
fn unknown_keys_in_the_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "lissten = \"1.2.3.4:1\"\n").unwrap();
    let err = FileConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("lissten"), "{err}");
}

#[test]
fn token_lists_are_comma_separated_and_blank_entries_dropped() {
    let c = ServeConfig::merge(
        args(&[
            "--read-write-tokens",
            "aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbb,,",
        ]),
        FileConfig::default(),
    )
    .unwrap();
    let tokens: Vec<_> = c
        .read_write_tokens
        .iter()
        .map(|t| t.expose().to_owned())
        .collect();
    assert_eq!(tokens, ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]);
    assert!(
        !format!("{c:?}").contains("aaaaaaaaaaaaaaaa"),
        "tokens must not show in Debug"
    );
}

#[test]
fn sizes_parse_with_units() {
    let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
    assert_eq!(p("20GiB"), Ok(20 << 30));
    assert_eq!(p("20G"), Ok(20 << 30));
    assert_eq!(p("1MB"), Ok(1_000_000));
    assert_eq!(p("1.5KiB"), Ok(1536));
    assert_eq!(p("42"), Ok(42));
    assert_eq!(p(" 2 mib "), Ok(2 << 20));
    assert!(p("12parsecs").is_err());
    assert!(p("GiB").is_err());
    assert!(p("").is_err());
}

#[test]
fn base_paths_are_normalised_or_refused() {
    let n = |s: &str| normalize_base_path(s);
    assert_eq!(n("").unwrap(), "");
    assert_eq!(n("/").unwrap(), "");
    assert_eq!(n("/nx/").unwrap(), "/nx");
    assert_eq!(n("/cache/nx").unwrap(), "/cache/nx");
    for bad in ["nx", "/a//b", "/../x", "/a b", "/a?b"] {
        assert!(n(bad).is_err(), "{bad}");
    }
}

#[test]
fn invalid_combinations_are_explained() {
    let err = ServeConfig::merge(args(&["--tls-cert", "c.pem"]), FileConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--tls-key"), "{err}");
    let err = ServeConfig::merge(
        args(&["--put-success-status", "201"]),
        FileConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("200 or 202"), "{err}");
    let err = ServeConfig::merge(args(&["--ttl", "0s"]), FileConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--ttl"), "{err}");
}

#[test]
fn cluster_settings_are_checked_and_left_unset_unless_given() {
    let plain = ServeConfig::merge(args(&[]), FileConfig::default()).unwrap();
    let c = &plain.cluster;
    assert_eq!(
        (
            c.max_voters,
            c.replication_factor,
            c.write_quorum,
            c.on_degraded.as_deref()
        ),
        (None, None, None, None)
    );
    for (flags, expected) in [
        (&["--max-voters", "4"][..], "--max-voters"),
        (&["--replication-factor", "9"][..], "--replication-factor"),
        (&["--write-quorum", "4"][..], "--write-quorum"),
        (
            &["--replication-factor", "2", "--write-quorum", "3"][..],
            "--write-quorum",
        ),
        (&["--on-degraded", "maybe"][..], "--on-degraded"),
    ] {
        let err = ServeConfig::merge(args(flags), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
}

#[test]
fn a_lone_node_bootstraps_and_a_joining_one_needs_the_secret() {
    let c = ServeConfig::merge(args(&["--node-id", "4"]), FileConfig::default()).unwrap();
    assert_eq!(c.cluster.formation, Formation::Found);
    assert_eq!(c.cluster.node_id, 4);
    assert_eq!(c.cluster.advertise, "127.0.0.1:3001");
    assert_eq!(c.cluster.advertise_http, "http://127.0.0.1:3000");

    let err = ServeConfig::merge(args(&["--join", "a:3001"]), FileConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("NXCACHE_CLUSTER_SECRET"), "{err}");
    let c = ServeConfig::merge(
        args(&[
            "--join",
            "nxcache-0.nxcache-headless:3001, nxcache-1.nxcache-headless:3001",
            "--cluster-secret",
            "0123456789abcdef",
            "--advertise",
            "nxcache-2.nxcache-headless:3001",
        ]),
        FileConfig::default(),
    )
    .unwrap();
    assert_eq!(c.cluster.formation, Formation::Join);
    assert_eq!(c.cluster.join.len(), 2);
    assert_eq!(
        c.cluster.advertise_http,
        "http://nxcache-2.nxcache-headless:3000"
    );
}

#[test]
fn nodes_with_seeds_found_a_cluster_only_together() {
    let shared = |extra: &[&str]| {
        let mut flags = vec![
            "--node-id",
            "1",
            "--join",
            "nxcache-0:3001,nxcache-1:3001,nxcache-2:3001",
            "--cluster-secret",
            "0123456789abcdef",
        ];
        flags.extend_from_slice(extra);
        ServeConfig::merge(args(&flags), FileConfig::default()).map(|c| c.cluster.formation)
    };
    assert_eq!(
        shared(&["--bootstrap-expect", "3"]).unwrap(),
        Formation::Expect {
            expect: 3,
            founder: None
        }
    );
    // The older shared configuration names the founder; it too waits for every seed.
    assert_eq!(
        shared(&["--bootstrap-node", "0"]).unwrap(),
        Formation::Expect {
            expect: 1,
            founder: Some(0)
        }
    );
    // Founding alone while seeds may hold a cluster is refused, with what to use instead.
    let err = shared(&["--bootstrap"]).unwrap_err().to_string();
    assert!(err.contains("--bootstrap-expect"), "{err}");
    let err = shared(&["--bootstrap-expect", "0"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 1"), "{err}");
    // Without seeds: alone, or an error when more nodes are expected.
    let alone = |extra: &[&str]| {
        let mut flags = vec!["--node-id", "1"];
        flags.extend_from_slice(extra);
        ServeConfig::merge(args(&flags), FileConfig::default()).map(|c| c.cluster.formation)
    };
    assert_eq!(alone(&["--bootstrap"]).unwrap(), Formation::Found);
    assert_eq!(
        alone(&["--bootstrap-expect", "1"]).unwrap(),
        Formation::Found
    );
    assert_eq!(alone(&["--bootstrap-node", "1"]).unwrap(), Formation::Found);
    let err = alone(&["--bootstrap-expect", "3"]).unwrap_err().to_string();
    assert!(err.contains("--join"), "{err}");
    let err = alone(&["--bootstrap-node", "0"]).unwrap_err().to_string();
    assert!(err.contains("--join"), "{err}");
}

#[test]
fn statefulset_host_names_give_the_node_id() {
    assert_eq!(ordinal_of("nxcache-2"), Some(2));
    assert_eq!(ordinal_of("my-cache-x"), None);
    assert_eq!(ordinal_of("nxcache-1\n"), Some(1));
    assert_eq!(ordinal_of("my-cache-13"), Some(13));
    assert_eq!(ordinal_of("laptop"), None);
}

#[test]
fn shipped_placeholders_and_short_secrets_are_refused_naming_the_variable() {
    let long = "0123456789abcdef0123";
    let cases: [(&[&str], &str); 6] = [
        (
            &["--read-write-tokens", "change-me-read-write-token"],
            "NXCACHE_READ_WRITE_TOKENS",
        ),
        (
            &[
                "--read-only-tokens",
                &format!("{long},change-me-read-only-token"),
            ],
            "NXCACHE_READ_ONLY_TOKENS (--read-only-tokens): token 2 of 2",
        ),
        (
            &["--admin-tokens", "CHANGE-ME-admin-token"],
            "NXCACHE_ADMIN_TOKENS",
        ),
        (
            &[
                "--cluster-secret",
                "change-me-to-a-long-random-cluster-secret",
            ],
            "NXCACHE_CLUSTER_SECRET",
        ),
        (
            &["--read-write-tokens", "fifteen-chars.."],
            "NXCACHE_READ_WRITE_TOKENS",
        ),
        (&["--cluster-secret", "short"], "NXCACHE_CLUSTER_SECRET"),
    ];
    for (flags, variable) in cases {
        let err = ServeConfig::merge(args(flags), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(variable), "{flags:?}: {err}");
        assert!(err.contains("openssl rand -hex 32"), "{flags:?}: {err}");
        // The refused value is never echoed.
        assert!(!err.contains(flags[1]), "{flags:?}: {err}");
    }
    // Sixteen characters are enough.
    let c = ServeConfig::merge(
        args(&["--read-write-tokens", "sixteen-chars..."]),
        FileConfig::default(),
    )
    .unwrap();
    assert_eq!(c.read_write_tokens.len(), 1);
}

#[test]
fn the_shipped_example_files_do_not_start_a_node() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let examples = [
        std::fs::read_to_string(root.join(".env.example")).unwrap(),
        std::fs::read_to_string(root.join("deploy/kubernetes/secret.yaml")).unwrap(),
    ];
    for text in examples {
        let mut checked = 0;
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some((key, value)) = line.split_once(['=', ':']) else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            let flag = match key.trim() {
                "NXCACHE_CLUSTER_SECRET" => "--cluster-secret",
                "NXCACHE_READ_WRITE_TOKENS" => "--read-write-tokens",
                "NXCACHE_READ_ONLY_TOKENS" => "--read-only-tokens",
                "NXCACHE_ADMIN_TOKENS" => "--admin-tokens",
                _ => continue,
            };
            let err = ServeConfig::merge(args(&[flag, value]), FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key.trim()), "{err}");
            checked += 1;
        }
        assert_eq!(checked, 4, "every secret of {text}");
    }
}

#[test]
fn protocol_mount_points_default_move_and_turn_off() {
    let parse = |list: &[&str]| ServeConfig::merge(args(list), FileConfig::default());
    let defaults = parse(&[]).unwrap();
    assert_eq!(defaults.bazel_path.as_deref(), Some("/bazel"));
    assert_eq!(defaults.gradle_path.as_deref(), Some("/gradle"));
    assert_eq!(defaults.ccache_path.as_deref(), Some("/ccache"));
    assert!(defaults.turborepo);
    let moved = parse(&[
        "--bazel-path",
        "/tools/bazel/",
        "--ccache-path",
        "off",
        "--turborepo",
        "off",
    ])
    .unwrap();
    assert_eq!(moved.bazel_path.as_deref(), Some("/tools/bazel"));
    assert_eq!(moved.ccache_path, None);
    assert!(!moved.turborepo);
    for bad in [
        &["--gradle-path", "gradle"][..],
        &["--gradle-path", "/v1/x"],
        &["--gradle-path", "/"],
        &["--gradle-path", "/bazel/g"],
        &["--bazel-path", "/c", "--ccache-path", "/c"],
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}
