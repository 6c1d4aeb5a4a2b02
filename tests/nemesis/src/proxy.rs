//! The link proxy: netem is not in every kernel, so slow and lossy links are made in user
//! space. Each node's peers reach its gRPC port through a proxy in the node's own
//! namespace (the node advertises the proxy's address and listens on loopback only); the
//! proxy knows each connection's peer by its source address and applies that link's
//! rule to every chunk, both ways: added latency (chunks keep their order, throughput
//! is not capped), stalls, resets.
//!
//! It runs as `nxcache-nemesis proxy --listen A --upstream B` and takes rules as JSON
//! lines on stdin (`{"peer": "198.18.0.12", "rule": {...}}`, `"rule": null` to clear),
//! answering `ok` per line; it exits when stdin closes (its runner is gone).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::faults::LinkRule;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Control {
    pub peer: IpAddr,
    pub rule: Option<LinkRule>,
}

/// The rule of each peer's link, by the peer's address.
pub type Rules = Arc<RwLock<HashMap<IpAddr, LinkRule>>>;

fn rule_for(rules: &Rules, peer: IpAddr) -> LinkRule {
    rules
        .read()
        .unwrap()
        .get(&peer)
        .copied()
        .unwrap_or_default()
}

fn roll(per_mille: u32) -> bool {
    per_mille > 0 && rand::rng().random_range(0..1000) < per_mille
}

pub async fn serve(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let rules: Rules = Arc::default();
    let listener = TcpListener::bind(listen).await?;
    let control_rules = rules.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut out = tokio::io::stdout();
        while let Ok(Some(line)) = lines.next_line().await {
            let answer = match serde_json::from_str::<Control>(&line) {
                Ok(c) => {
                    let mut r = control_rules.write().unwrap();
                    match c.rule {
                        Some(rule) => r.insert(c.peer, rule),
                        None => r.remove(&c.peer),
                    };
                    "ok\n".to_owned()
                }
                Err(e) => format!("error {e}\n"),
            };
            let _ = out.write_all(answer.as_bytes()).await;
            let _ = out.flush().await;
        }
        // The runner is gone: so is the proxy.
        std::process::exit(0);
    });
    relay_all(listener, upstream, rules).await
}

/// Accepts connections on `listener` and relays each to `upstream` under its peer's
/// rule in `rules`.
pub async fn relay_all(listener: TcpListener, upstream: SocketAddr, rules: Rules) -> ! {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if roll(rule_for(&rules, peer.ip()).reset_per_mille) {
            let _ = client.set_zero_linger();
            continue;
        }
        tokio::spawn(relay(client, peer.ip(), upstream, rules.clone()));
    }
}

async fn relay(client: TcpStream, peer: IpAddr, upstream: SocketAddr, rules: Rules) {
    let Ok(Ok(server)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
    else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = tokio::spawn(pump(client_read, server_write, peer, rules.clone()));
    let down = tokio::spawn(pump(server_read, client_write, peer, rules));
    let (up_abort, down_abort) = (up.abort_handle(), down.abort_handle());
    // A reset on either side resets both (the other pump still holds both sockets, so
    // the descriptors are open); an end of stream travels on its own.
    let other = tokio::select! {
        r = up => (!matches!(r, Ok(Ok(())))).then_some(down_abort),
        r = down => (!matches!(r, Ok(Ok(())))).then_some(up_abort),
    };
    if let Some(other) = other {
        for fd in fds {
            zero_linger(fd);
        }
        other.abort();
    }
}

/// SO_LINGER 0: the close sends RST.
fn zero_linger(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a correctly sized value on a descriptor we keep open.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Copies one direction with the link's rule; Err when the link (or an end) reset the
/// connection.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    peer: IpAddr,
    rules: Rules,
) -> Result<(), ()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return Err(());
            }
        }
        let _ = to.shutdown().await;
        Ok(())
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => {
                writer.abort();
                return Err(());
            }
        };
        let rule = rule_for(&rules, peer);
        if roll(rule.reset_per_mille) {
            writer.abort();
            return Err(());
        }
        if roll(rule.stall_per_mille) {
            tokio::time::sleep(Duration::from_millis(rule.stall_ms as u64)).await;
        }
        let jitter = if rule.jitter_ms > 0 {
            rand::rng().random_range(0..=rule.jitter_ms)
        } else {
            0
        };
        let due = Instant::now() + Duration::from_millis((rule.delay_ms + jitter) as u64);
        if tx.send((due, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    writer.await.unwrap_or(Err(()))
}
