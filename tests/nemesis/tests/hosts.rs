//! The reusable pieces on their own: the link proxy (loopback, any user) and the test
//! hosts (network namespaces: root only, skipped with a message otherwise).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nxcache_nemesis::faults::LinkRule;
use nxcache_nemesis::hosts::{self, HostSet};
use nxcache_nemesis::proxy;

/// An echo server on loopback; its address.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `ping` through the proxy and reads the echo, waiting at most `patience` for it.
fn round_trip(proxy: SocketAddr, patience: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(patience))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

/// Far above a round trip on any machine, however loaded.
const PATIENCE: Duration = Duration::from_secs(60);

#[test]
fn the_link_proxy_relays_delays_and_resets_by_peer() {
    let upstream = echo_server();
    let rules = proxy::Rules::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let relay_rules = rules.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            proxy::relay_all(listener, upstream, relay_rules).await
        })
    });
    round_trip(proxy_addr, PATIENCE).expect("no rule: relayed as is");

    let me = std::net::IpAddr::from(Ipv4Addr::LOCALHOST);
    // A delay of an hour: the echo is held, so a read that gives up after a second finds
    // nothing (whatever the machine's load, the proxy cannot be early by an hour).
    let delay = LinkRule {
        delay_ms: 3_600_000,
        ..LinkRule::default()
    };
    rules.write().unwrap().insert(me, delay);
    let held = round_trip(proxy_addr, Duration::from_secs(1)).expect_err("the echo is delayed");
    assert!(
        matches!(
            held.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{held:?}"
    );

    let reset = LinkRule {
        reset_per_mille: 1000,
        ..LinkRule::default()
    };
    rules.write().unwrap().insert(me, reset);
    let err = round_trip(proxy_addr, PATIENCE).expect_err("every connection is reset");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
        ),
        "{err:?}"
    );
    rules.write().unwrap().remove(&me);
    round_trip(proxy_addr, PATIENCE).expect("rule cleared: relayed again");
}

fn needs_root(test: &str) -> bool {
    if hosts::is_root() {
        return true;
    }
    eprintln!("{test}: SKIPPED, network namespaces need root (CI runs as root)");
    false
}

/// Connects from inside `from` to `to:port` (the thread enters the namespace).
fn connects(from: &hosts::Host, to: Ipv4Addr, port: u16) -> bool {
    let netns = from.netns.clone();
    std::thread::spawn(move || {
        hosts::enter(&netns).unwrap();
        TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_millis(700))
            .and_then(|mut s| {
                let mut b = [0u8; 2];
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.read_exact(&mut b)
            })
            .is_ok()
    })
    .join()
    .unwrap()
}

/// Tears the hosts down even when an assertion fails.
struct Teardown(Arc<HostSet>, std::path::PathBuf);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0.teardown(&self.1);
    }
}

fn our_namespaces(tag: &str) -> Vec<String> {
    hosts::run(&["ip", "netns", "list"])
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("{}{tag}-", hosts::PREFIX)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn hosts_talk_over_the_bridge_partition_on_demand_and_leave_nothing() {
    if !needs_root("hosts_talk_over_the_bridge_partition_on_demand_and_leave_nothing") {
        return;
    }
    let tag = format!("t{:05x}", std::process::id() & 0xfffff);
    let work = std::env::temp_dir().join(format!("nemesis-hosts-test-{tag}"));
    std::fs::create_dir_all(&work).unwrap();
    let set = Arc::new(HostSet::create(&tag, &work).unwrap());
    let _teardown = Teardown(set.clone(), work.clone());
    let (a_addr, b_addr) = (
        Ipv4Addr::new(198, 18, 0, 201),
        Ipv4Addr::new(198, 18, 0, 202),
    );
    let a = set.add_host("a", a_addr).unwrap();
    let b = set.add_host("b", b_addr).unwrap();
    assert_eq!(our_namespaces(&tag).len(), 3, "switch and two hosts");

    // A server inside b.
    let b_ns = b.netns.clone();
    std::thread::spawn(move || {
        hosts::enter(&b_ns).unwrap();
        let listener = TcpListener::bind((b_addr, 5000)).unwrap();
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"ok");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connects(&a, b_addr, 5000) {
        assert!(
            Instant::now() < deadline,
            "a never reached b over the bridge"
        );
    }

    set.drop_from(&b, &[a_addr]).unwrap();
    assert!(!connects(&a, b_addr, 5000), "b drops a's packets");
    set.drop_from(&b, &[]).unwrap();
    assert!(connects(&a, b_addr, 5000), "healed");
    set.cap_bandwidth(&a, Some(8_000)).unwrap();
    assert!(connects(&a, b_addr, 5000), "capped, not cut");
    set.cap_bandwidth(&a, None).unwrap();

    // A process inside a dies with the hosts.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let mut child = hosts::spawn_in(&a.netns, sleeper).unwrap();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let its = std::fs::read_link(format!("/proc/{}/ns/net", child.id())).unwrap();
    assert_ne!(ours, its, "the child runs in host a's namespace");

    let pid = child.id();
    set.teardown(&work);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the process in the host was killed: {stat}"
    );
    let _ = child.wait();
    assert!(
        our_namespaces(&tag).is_empty(),
        "{:?}",
        our_namespaces(&tag)
    );
    assert!(!work.exists(), "work dir removed");
}

#[test]
fn leftovers_of_a_dead_run_are_removed_and_a_live_runs_are_not() {
    if !needs_root("leftovers_of_a_dead_run_are_removed_and_a_live_runs_are_not") {
        return;
    }
    let tag = format!("d{:05x}", std::process::id() & 0xfffff);
    let work = std::env::temp_dir().join(format!("nemesis-leftover-test-{tag}"));
    std::fs::create_dir_all(&work).unwrap();
    let set = Arc::new(HostSet::create(&tag, &work).unwrap());
    let _teardown = Teardown(set.clone(), work.clone());
    set.add_host("x", Ipv4Addr::new(198, 18, 0, 203)).unwrap();
    // Owned by this (live) process: left alone.
    assert!(!hosts::cleanup_leftovers().contains(&tag));
    assert_eq!(our_namespaces(&tag).len(), 2);
    // The owner is gone (a pid that cannot exist): removed.
    let owner = std::path::Path::new(hosts::STATE_ROOT)
        .join(&tag)
        .join("owner");
    let text = std::fs::read_to_string(&owner).unwrap();
    let dead: String = text
        .lines()
        .map(|l| {
            if l.starts_with("pid=") {
                "pid=4194305".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&owner, dead).unwrap();
    assert!(hosts::cleanup_leftovers().contains(&tag));
    assert!(our_namespaces(&tag).is_empty());
    assert!(!work.exists());
}
