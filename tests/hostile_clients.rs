//! Clients that try to wipe, starve or exhaust a node (issue 15): uploads that announce
//! what they never send, trickle, or hold slots; connections that never speak, never
//! finish a request or never read; floods of probes. Each test checks the defence and
//! that a real client is still served during the attack (every client has a timeout;
//! nothing asserts on elapsed time).

use std::time::Duration;

use nxcache::RunningNode;
use nxcache_tests::{
    RW_TOKEN, get, http_client, metric_sum, metrics_page, put, random_bytes, test_config,
    wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

async fn start(
    adjust: impl FnOnce(&mut nxcache_config::ServeConfig),
) -> (RunningNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    adjust(&mut config);
    (nxcache::start(config).await.unwrap(), dir)
}

/// Opens a connection and sends the head of a PUT announcing `len` bytes.
async fn put_head(node: &RunningNode, hash: &str, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(node.http_addr()).await.unwrap();
    s.write_all(
        format!(
            "PUT /v1/cache/{hash} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RW_TOKEN}\r\nContent-Length: {len}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s
}

async fn reserved_bytes(url: &str) -> f64 {
    metric_sum(
        &metrics_page(url).await,
        "nxcache_store_reserved_bytes",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_announces_the_budget_and_sends_nothing_evicts_nothing() {
    let (node, _dir) = start(|c| c.max_disk_usage = 10 * MIB as u64).await;
    let url = node.base_url();
    let client = http_client();
    let bodies: Vec<Vec<u8>> = (0..8).map(|_| random_bytes(MIB)).collect();
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            put(&client, &url, &format!("{}", 800 + i), body.clone()).await,
            200
        );
    }
    // 9 MiB announced, nothing sent, then the client disconnects.
    let attack = put_head(&node, "999", 9 * MIB).await;
    wait_until(
        Duration::from_secs(30),
        "the announced upload in progress",
        || {
            let url = url.clone();
            async move {
                metric_sum(
                    &metrics_page(&url).await,
                    "nxcache_http_uploads_in_progress",
                    &[],
                ) == 1.0
            }
        },
    )
    .await;
    assert_eq!(
        reserved_bytes(&url).await,
        0.0,
        "an announced size reserved budget"
    );
    drop(attack);
    // A second one that sends a little and gives up: its bytes are given back.
    let mut partial = put_head(&node, "998", 9 * MIB).await;
    partial.write_all(&[1u8; 1000]).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the partial upload's bytes reserved",
        || {
            let url = url.clone();
            async move { reserved_bytes(&url).await == 1000.0 }
        },
    )
    .await;
    drop(partial);
    wait_until(
        Duration::from_secs(30),
        "the abandoned upload's reservation released",
        || {
            let url = url.clone();
            async move { reserved_bytes(&url).await == 0.0 }
        },
    )
    .await;
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            get(&client, &url, &format!("{}", 800 + i)).await,
            (200, body.clone()),
            "artifact {i} was evicted by an upload that sent (almost) nothing"
        );
    }
    let page = metrics_page(&url).await;
    assert_eq!(metric_sum(&page, "nxcache_store_evictions_total", &[]), 0.0);
    // A size that can never fit is still refused before its body is read.
    let mut s = put_head(&node, "997", 11 * MIB).await;
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut answer))
        .await
        .expect("no answer to an upload larger than the budget")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");
    node.shutdown().await.unwrap();
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_preface_only_connections_cannot_lock_a_real_client_out() {
    const MAX: usize = 8;
    let (node, _dir) = start(|c| {
        c.max_connections = MAX;
        // The sockets below would be closed by these in time: the test is about shedding.
        c.first_byte_timeout = Duration::from_secs(600);
        c.header_timeout = Duration::from_secs(600);
    })
    .await;
    let url = node.base_url();
    let client = http_client();
    let body = random_bytes(4096);
    assert_eq!(put(&client, &url, "4242", body.clone()).await, 200);
    // Twice the limit of sockets that never send a byte, and as many again that send
    // only the HTTP/2 preface.
    let mut attackers = Vec::new();
    for _ in 0..2 * MAX {
        attackers.push(TcpStream::connect(node.http_addr()).await.unwrap());
    }
    for _ in 0..MAX {
        let mut s = TcpStream::connect(node.http_addr()).await.unwrap();
        s.write_all(H2_PREFACE).await.unwrap();
        attackers.push(s);
    }
    // A real client, with a generous timeout: answered while every attacker is open.
    let real = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let answer = real
        .get(format!("{url}/v1/cache/4242"))
        .bearer_auth(RW_TOKEN)
        .send()
        .await
        .expect("the real client was not served during the connection flood");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.bytes().await.unwrap().to_vec(), body);
    let page = metrics_page(&url).await;
    let shed = metric_sum(&page, "nxcache_http_connections_shed_total", &[]);
    assert!(shed >= (2 * MAX) as f64, "only {shed} connections shed");
    let open = metric_sum(&page, "nxcache_http_connections_open", &[]);
    assert!(open <= MAX as f64, "{open} connections open over the limit");
    drop(attackers);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_first_byte_timeout() {
    let (node, _dir) = start(|c| c.first_byte_timeout = Duration::from_millis(500)).await;
    let mut silent = TcpStream::connect(node.http_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf))
        .await
        .expect("a silent connection was kept open");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let page = metrics_page(&node.base_url()).await;
    assert_eq!(
        metric_sum(
            &page,
            "nxcache_http_connections_cut_total",
            &[r#"reason="first_byte""#]
        ),
        1.0
    );
    node.shutdown().await.unwrap();
}

/// Resident memory of a process, from /proc (KiB).
fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Slow readers: thousands of connections that each ask for a 1 MiB artifact and never
/// read a byte of it (their receive window kept tiny, so the kernel absorbs little).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_hold_bounded_memory_and_are_cut_by_the_send_timeout() {
    const READERS: usize = 2000;
    const ARTIFACTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let node = nxcache_tests::NodeProcess::start(
        &dir.path().join("node"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--send-timeout",
            "15s",
            "--fsync",
            "off",
        ],
        &[("NXCACHE_READ_WRITE_TOKENS", RW_TOKEN)],
    );
    let url = node.url.clone();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let client = http_client();
    for i in 0..ARTIFACTS {
        assert_eq!(
            put(&client, &url, &format!("{}", 5000 + i), random_bytes(MIB)).await,
            200
        );
    }
    let before = rss_kib(node.pid(), "VmRSS:");
    let mut readers = Vec::with_capacity(READERS);
    for i in 0..READERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        s.write_all(
            format!(
                "GET /v1/cache/{} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {RW_TOKEN}\r\n\r\n",
                5000 + i % ARTIFACTS
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        readers.push(s);
    }
    let answered = |page: &str| {
        metric_sum(
            page,
            "nxcache_http_requests_total",
            &[r#"route="cache""#, r#"method="GET""#, r#"status="200""#],
        )
    };
    wait_until(
        Duration::from_secs(120),
        "every slow reader's GET answered",
        || {
            let url = url.clone();
            async move { answered(&metrics_page(&url).await) >= READERS as f64 }
        },
    )
    .await;
    // Every response is now held for a client that reads nothing.
    let held = rss_kib(node.pid(), "VmRSS:");
    // A real client is served meanwhile.
    let (status, body) = get(&client, &url, "5000").await;
    assert_eq!((status, body.len()), (200, MIB));
    eprintln!(
        "slow readers: {READERS} connections holding 1 MiB responses; node RSS {before} KiB before, {held} KiB while held"
    );
    // The bound: far under the 2 GiB the responses add up to.
    const BOUND_KIB: u64 = 768 * 1024;
    assert!(
        held < BOUND_KIB,
        "RSS {held} KiB with {READERS} slow readers"
    );
    // The send timeout closes them.
    wait_until(
        Duration::from_secs(120),
        "slow readers cut by the send timeout",
        || {
            let url = url.clone();
            async move {
                let page = metrics_page(&url).await;
                metric_sum(
                    &page,
                    "nxcache_http_connections_cut_total",
                    &[r#"reason="send""#],
                ) >= 1.0
                    && metric_sum(&page, "nxcache_http_connections_open", &[]) <= 2.0
            }
        },
    )
    .await;
    let page = metrics_page(&url).await;
    eprintln!(
        "slow readers cut by the send timeout: {}; RSS after: {} KiB (peak {} KiB)",
        metric_sum(
            &page,
            "nxcache_http_connections_cut_total",
            &[r#"reason="send""#]
        ),
        rss_kib(node.pid(), "VmRSS:"),
        rss_kib(node.pid(), "VmHWM:")
    );
    drop(readers);
}
