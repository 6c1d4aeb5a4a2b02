//! The Bazel, Gradle, ccache and Turborepo protocols at the HTTP level, with the request
//! shapes their clients send, on a three-node cluster (what one node stores, another
//! serves): credentials, key spaces kept apart, the answers each client needs, limits,
//! namespaces and the per-protocol metrics.

use std::time::Duration;

use nxcache_tests::{InProcessCluster, RO_TOKEN, RW_TOKEN, create_token, metric, metrics_page};
use reqwest::{Method, StatusCode};

const EMPTY_SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a request carries its token.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Basic(&'a str),
    Bearer(&'a str),
}

async fn send(
    method: Method,
    url: &str,
    auth: Auth<'_>,
    body: Option<Vec<u8>>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = client().request(method, url);
    request = match auth {
        Auth::None => request,
        Auth::Basic(token) => request.basic_auth("ci", Some(token)),
        Auth::Bearer(token) => request.bearer_auth(token),
    };
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

async fn put(url: &str, auth: Auth<'_>, body: &[u8]) -> StatusCode {
    send(Method::PUT, url, auth, Some(body.to_vec())).await.0
}

async fn get(url: &str, auth: Auth<'_>) -> (StatusCode, Vec<u8>) {
    let (status, _, body) = send(Method::GET, url, auth, None).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_ac_and_cas_across_nodes_with_basic_or_bearer_credentials() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let (a, c) = (cluster.url(0), cluster.url(2));
    let output = b"compiled object".to_vec();
    let sha = sha256_hex(&output);
    let cas = |base: &str| format!("{base}/bazel/cas/{sha}");

    // Nothing without a token; the 401 asks for Basic credentials.
    let (status, headers, body) = send(Method::GET, &cas(&a), Auth::None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Basic realm=\"nxcache\"");
    assert!(String::from_utf8_lossy(&body).contains("--remote_header"));
    assert_eq!(
        get(&cas(&a), Auth::Basic("wrong")).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A miss, then the upload (Basic, as in the cache URL), then a hit on another node
    // (Bearer, as with --remote_header).
    assert_eq!(
        get(&cas(&c), Auth::Bearer(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        put(&cas(&a), Auth::Basic(RW_TOKEN), &output).await,
        StatusCode::OK
    );
    assert_eq!(
        get(&cas(&c), Auth::Bearer(RW_TOKEN)).await,
        (StatusCode::OK, output.clone())
    );
    let (status, headers, _) = send(Method::HEAD, &cas(&c), Auth::Bearer(RW_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], output.len().to_string().as_str());
    // Uploading it again is fine (Bazel uploads what it built whether or not it is there).
    assert_eq!(
        put(&cas(&c), Auth::Basic(RW_TOKEN), &output).await,
        StatusCode::OK
    );

    // A CAS body that does not hash to its key is refused, and nothing is stored.
    let (status, _, body) = send(
        Method::PUT,
        &format!("{a}/bazel/cas/{EMPTY_SHA}"),
        Auth::Basic(RW_TOKEN),
        Some(b"not empty".to_vec()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&body).contains("SHA-256"),
        "{body:?}"
    );
    assert_eq!(
        get(&format!("{a}/bazel/cas/{EMPTY_SHA}"), Auth::Basic(RW_TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // An action result is stored under the action's digest, whatever its body.
    let action = sha256_hex(b"action");
    let ac = format!("{a}/bazel/ac/{action}");
    assert_eq!(
        put(&ac, Auth::Basic(RW_TOKEN), b"action result").await,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{c}/bazel/ac/{action}"), Auth::Basic(RO_TOKEN)).await,
        (StatusCode::OK, b"action result".to_vec())
    );
    // AC and CAS are two stores; an instance name is a cache of its own.
    assert_eq!(
        get(&format!("{a}/bazel/cas/{action}"), Auth::Basic(RW_TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(
            &format!("{a}/bazel/team-a/linux/ac/{action}"),
            Auth::Basic(RW_TOKEN)
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let instance_ac = format!("{a}/bazel/team-a/linux/ac/{action}");
    assert_eq!(
        put(&instance_ac, Auth::Basic(RW_TOKEN), b"other").await,
        StatusCode::OK
    );
    assert_eq!(get(&instance_ac, Auth::Basic(RW_TOKEN)).await.1, b"other");
    assert_eq!(get(&ac, Auth::Basic(RW_TOKEN)).await.1, b"action result");

    // A read-only token restores but stores nothing.
    let ro_ac = format!("{a}/bazel/ac/{}", sha256_hex(b"ro"));
    assert_eq!(
        put(&ro_ac, Auth::Basic(RO_TOKEN), b"x").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&ro_ac, Auth::Basic(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );

    // Malformed digests and paths are told apart from misses.
    assert_eq!(
        put(&format!("{a}/bazel/ac/abc"), Auth::Basic(RW_TOKEN), b"x").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&format!("{a}/bazel/other/{action}"), Auth::Basic(RW_TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (status, headers, _) = send(Method::DELETE, &ac, Auth::Basic(RW_TOKEN), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, HEAD, PUT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradle_and_ccache_answer_what_their_clients_need() {
    let cluster = InProcessCluster::start(3, &["--max-artifact-size", "1KiB"]).await;
    let (a, b) = (cluster.url(0), cluster.url(1));

    // Gradle: 404 on a miss, 200 on a stored PUT and on a repeated one (a 409 would turn
    // Gradle's remote cache off), the entry from another node, 413 when too large.
    let key = "0f343b0931126a20f133d67c2b018a3b";
    let entry = format!("{a}/gradle/{key}");
    assert_eq!(
        get(&entry, Auth::Basic(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        put(&entry, Auth::Basic(RW_TOKEN), b"gradle entry").await,
        StatusCode::OK
    );
    assert_eq!(
        put(&entry, Auth::Basic(RW_TOKEN), b"gradle entry").await,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{b}/gradle/{key}"), Auth::Basic(RO_TOKEN)).await,
        (StatusCode::OK, b"gradle entry".to_vec())
    );
    let (status, _, body) = send(
        Method::PUT,
        &format!("{a}/gradle/1f343b0931126a20f133d67c2b018a3b"),
        Auth::Basic(RW_TOKEN),
        Some(vec![0; 2048]),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("--max-artifact-size"));
    assert_eq!(
        put(&format!("{a}/gradle/2f3"), Auth::Basic(RO_TOKEN), b"x").await,
        StatusCode::FORBIDDEN
    );
    let (status, headers, _) = send(Method::GET, &entry, Auth::None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));
    assert_eq!(
        get(&format!("{a}/gradle/sub/{key}"), Auth::Basic(RW_TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // ccache, default subdirs layout: HEAD (ccache asks before it uploads), PUT, GET.
    let ckey = "4b2n0vf8f4kh5nmq8bq2vj0f5g6ue2prcR";
    let subdirs = format!("{a}/ccache/{}/{}", &ckey[..2], &ckey[2..]);
    let (status, _, _) = send(Method::HEAD, &subdirs, Auth::Basic(RW_TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        put(&subdirs, Auth::Basic(RW_TOKEN), b"result").await,
        StatusCode::OK
    );
    let (status, headers, _) = send(
        Method::HEAD,
        &format!("{b}/ccache/{}/{}", &ckey[..2], &ckey[2..]),
        Auth::Basic(RW_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, &headers["content-length"]),
        (StatusCode::OK, &"6".parse().unwrap())
    );
    assert_eq!(
        get(
            &format!("{b}/ccache/{}/{}", &ckey[..2], &ckey[2..]),
            Auth::Basic(RO_TOKEN)
        )
        .await,
        (StatusCode::OK, b"result".to_vec())
    );
    // The flat and bazel layouts.
    let flat = format!("{a}/ccache/{ckey}");
    assert_eq!(
        get(&flat, Auth::Basic(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        put(&flat, Auth::Basic(RW_TOKEN), b"flat").await,
        StatusCode::OK
    );
    assert_eq!(get(&flat, Auth::Basic(RW_TOKEN)).await.1, b"flat");
    let bazel_layout = format!("{a}/ccache/ac/{EMPTY_SHA}");
    assert_eq!(
        put(&bazel_layout, Auth::Basic(RW_TOKEN), b"b").await,
        StatusCode::OK
    );
    assert_eq!(get(&bazel_layout, Auth::Basic(RW_TOKEN)).await.1, b"b");
    // Entries leave by eviction only.
    let (status, _, body) = send(Method::DELETE, &flat, Auth::Basic(RW_TOKEN), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(String::from_utf8_lossy(&body).contains("eviction"));
    assert_eq!(
        put(&format!("{a}/ccache/zz/ro"), Auth::Basic(RO_TOKEN), b"x").await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hash_in_every_protocol_is_five_different_entries() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let (a, c) = (cluster.url(0), cluster.url(2));
    let hash = "ac";
    let sha = sha256_hex(b"bazel");
    let urls = [
        (format!("{a}/v1/cache/{hash}"), b"nx".to_vec()),
        (format!("{a}/gradle/{hash}"), b"gradle".to_vec()),
        (format!("{a}/ccache/{hash}"), b"ccache".to_vec()),
        (format!("{a}/v8/artifacts/{hash}"), b"turbo".to_vec()),
        (format!("{a}/bazel/cas/{sha}"), b"bazel".to_vec()),
    ];
    for (url, body) in &urls {
        let status = put(url, Auth::Bearer(RW_TOKEN), body).await;
        assert!(status.is_success(), "{url}: {status}");
    }
    for (url, body) in &urls {
        let url = url.replace(&a, &c);
        assert_eq!(
            get(&url, Auth::Bearer(RW_TOKEN)).await,
            (StatusCode::OK, body.clone()),
            "{url}"
        );
    }
    // The same hash under ccache's bazel layout is not Bazel's entry either.
    assert_eq!(
        get(&format!("{c}/ccache/ac/{sha}"), Auth::Bearer(RW_TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // Hits, misses and bytes by protocol (summed over the nodes that answered).
    let mut hits = std::collections::HashMap::new();
    for i in 0..3 {
        let page = metrics_page(&cluster.url(i)).await;
        for protocol in ["nx", "bazel", "gradle", "ccache", "turbo"] {
            let series = format!("nxcache_protocol_hits_total{{protocol=\"{protocol}\"}}");
            *hits.entry(protocol).or_insert(0.0) +=
                metric(&page, &series).unwrap_or_else(|| panic!("{series} missing"));
        }
    }
    for protocol in ["nx", "bazel", "gradle", "turbo"] {
        assert_eq!(hits[protocol], 1.0, "{protocol} hits");
    }
    assert_eq!(hits["ccache"], 1.0, "ccache hits");
    let page = metrics_page(&a).await;
    assert_eq!(
        metric(
            &page,
            "nxcache_protocol_received_bytes_total{protocol=\"gradle\"}"
        ),
        Some(6.0)
    );
    let page = metrics_page(&c).await;
    assert_eq!(
        metric(
            &page,
            "nxcache_protocol_sent_bytes_total{protocol=\"bazel\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(&page, "nxcache_protocol_misses_total{protocol=\"ccache\"}"),
        Some(1.0)
    );
    assert!(
        metric(
            &page,
            "nxcache_http_requests_total{method=\"GET\",route=\"bazel\",status=\"200\"}"
        )
        .is_some(),
        "bazel requests are counted under their own route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turborepo_v8_artifacts_headers_queries_and_teams() {
    let cluster = InProcessCluster::start(3, &[]).await;
    let (a, c) = (cluster.url(0), cluster.url(2));
    let hash = "a1b2c3d4e5f60718";
    let artifact = format!("{a}/v8/artifacts/{hash}?teamId=team_1");

    let (status, _, body) = send(
        Method::GET,
        &format!("{a}/v8/artifacts/status"),
        Auth::Bearer(RW_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["status"],
        "enabled"
    );
    assert_eq!(get(&artifact, Auth::None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(&artifact, Auth::Bearer(RW_TOKEN)).await.0,
        StatusCode::NOT_FOUND
    );

    // turbo's upload: the artifact with its duration and signature tag.
    let response = client()
        .put(&artifact)
        .bearer_auth(RW_TOKEN)
        .header("x-artifact-duration", "1234")
        .header("x-artifact-tag", "c2lnbmF0dXJl")
        .header("content-type", "application/octet-stream")
        .body(b"tarball".to_vec())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    // Both headers come back with the artifact, on GET and HEAD, from another node.
    let there = format!("{c}/v8/artifacts/{hash}?slug=team_1");
    let (status, headers, body) = send(Method::GET, &there, Auth::Bearer(RO_TOKEN), None).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"tarball"[..]));
    assert_eq!(headers["x-artifact-duration"], "1234");
    assert_eq!(headers["x-artifact-tag"], "c2lnbmF0dXJl");
    let (status, headers, _) = send(Method::HEAD, &there, Auth::Bearer(RO_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-artifact-duration"], "1234");
    // A second upload of the hash is not an error.
    assert!(
        put(&artifact, Auth::Bearer(RW_TOKEN), b"tarball")
            .await
            .is_success()
    );
    // A read-only token stores nothing.
    let ro = format!("{a}/v8/artifacts/ffff?teamId=team_1");
    assert_eq!(
        put(&ro, Auth::Bearer(RO_TOKEN), b"x").await,
        StatusCode::FORBIDDEN
    );
    assert!(
        client()
            .put(format!("{a}/v8/artifacts/bad?teamId=team_1"))
            .bearer_auth(RW_TOKEN)
            .header("x-artifact-duration", "soon")
            .body("x")
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::BAD_REQUEST
    );

    // Which of these exist.
    let (status, _, body) = send(
        Method::POST,
        &format!("{c}/v8/artifacts?teamId=team_1"),
        Auth::Bearer(RW_TOKEN),
        Some(format!(r#"{{"hashes":["{hash}","ffff"]}}"#).into_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer[hash]["size"], 7);
    assert_eq!(answer[hash]["taskDurationMs"], 1234);
    assert_eq!(answer[hash]["tag"], "c2lnbmF0dXJl");
    assert!(answer["ffff"]["error"].is_object(), "{answer}");
    let (status, _, _) = send(
        Method::POST,
        &format!("{c}/v8/artifacts"),
        Auth::Bearer(RW_TOKEN),
        Some(b"[1,2]".to_vec()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Teams are namespaces: a namespaced token writes with its team, reads its own and
    // those it may read from, and nothing else.
    let web = create_token(
        &a,
        &[
            "--scope",
            "read-write",
            "--name",
            "web",
            "--namespace",
            "web",
        ],
    );
    let pr = create_token(
        &a,
        &[
            "--scope",
            "read-write",
            "--name",
            "pr",
            "--namespace",
            "pr-1",
            "--read-from",
            "web",
        ],
    );
    let in_team = |team: &str, h: &str| format!("{a}/v8/artifacts/{h}?teamId={team}");
    assert_eq!(
        put(&in_team("web", "0101"), Auth::Bearer(&web), b"web build").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        get(&in_team("web", "0101"), Auth::Bearer(&pr)).await.1,
        b"web build"
    );
    assert_eq!(
        get(&in_team("pr-1", "0101"), Auth::Bearer(&pr)).await.1,
        b"web build"
    );
    assert_eq!(
        put(&in_team("web", "0102"), Auth::Bearer(&pr), b"x").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&in_team("other", "0101"), Auth::Bearer(&web)).await.0,
        StatusCode::FORBIDDEN
    );
    // The default namespace's artifact is not the web team's.
    assert_eq!(
        get(&in_team("web", hash), Auth::Bearer(&web)).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_points_follow_the_base_path_and_can_be_moved_or_turned_off() {
    let cluster = InProcessCluster::start(
        1,
        &[
            "--base-path",
            "/cache",
            "--gradle-path",
            "/build-cache/gradle",
            "--ccache-path",
            "off",
            "--turborepo",
            "off",
        ],
    )
    .await;
    // The node's URL includes its base path.
    let url = cluster.url(0);
    let root = url.trim_end_matches("/cache");
    assert_ne!(root, url);
    let action = sha256_hex(b"action");
    assert_eq!(
        put(
            &format!("{root}/cache/bazel/ac/{action}"),
            Auth::Basic(RW_TOKEN),
            b"r"
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{root}/bazel/ac/{action}"), Auth::Basic(RW_TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        put(
            &format!("{root}/cache/build-cache/gradle/abc"),
            Auth::Basic(RW_TOKEN),
            b"g"
        )
        .await,
        StatusCode::OK
    );
    for off in [
        "/cache/ccache/ab/cdef",
        "/cache/v8/artifacts/abc",
        "/cache/gradle/abc",
    ] {
        let (status, _) = get(&format!("{root}{off}"), Auth::Bearer(RW_TOKEN)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{off}");
    }
}
