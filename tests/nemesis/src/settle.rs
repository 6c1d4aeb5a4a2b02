//! After the last heal: wait until the cluster agrees (or the settle time is up), then
//! record the final state: every key read from every member, the blob files on the
//! members' disks, every member's token table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::checker;
use crate::cluster::{Cluster, Node, blob_files};
use crate::history::{DiskCopy, FinalGet, FinalTokens, Record, Recorder, Settle, digest};

/// A key and whether some PUT of it was acknowledged.
pub type KeyState = (String, bool);

/// Digests of blob files, kept while a file is unchanged.
#[derive(Default)]
struct DiskCache(HashMap<PathBuf, (u64, std::time::SystemTime, String)>);

impl DiskCache {
    fn scan(&mut self, node: &Node) -> Vec<DiskCopy> {
        let mut out = Vec::new();
        for (key, path) in blob_files(&node.data_dir) {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            let cached = self
                .0
                .get(&path)
                .filter(|(len, t, _)| *len == meta.len() && *t == mtime)
                .map(|(_, _, d)| d.clone());
            let d = match cached {
                Some(d) => d,
                None => match std::fs::read(&path) {
                    Ok(bytes) => {
                        let d = digest(&bytes);
                        self.0.insert(path.clone(), (meta.len(), mtime, d.clone()));
                        d
                    }
                    Err(_) => continue,
                },
            };
            out.push(DiskCopy {
                node: node.id,
                key,
                digest: d,
                size: meta.len(),
            });
        }
        out
    }
}

/// One look at the cluster: the control plane and the disks (cheap), or also every key
/// read through every member (only once the cheap part agrees).
struct Round {
    leader: Option<u64>,
    members: Vec<u64>,
    replication_factor: usize,
    copies: Vec<DiskCopy>,
    tokens: Vec<FinalTokens>,
    reads: Vec<FinalGet>,
    /// Why the cheap part does not agree yet (empty: it does).
    disagreement: Vec<String>,
    /// Whether a full read is worth it: a leader, and R copies of every acknowledged key
    /// on disk (differing bodies or not).
    complete: bool,
    /// Changes whenever anything looked at changes.
    fingerprint: u64,
}

async fn look(cluster: &Cluster, keys: &[KeyState], cache: &mut DiskCache) -> Round {
    let mut round = Round {
        leader: None,
        members: Vec::new(),
        replication_factor: 0,
        copies: Vec::new(),
        tokens: Vec::new(),
        reads: Vec::new(),
        disagreement: Vec::new(),
        complete: false,
        fingerprint: 0,
    };
    let nodes = cluster.members();
    let mut views = BTreeMap::new();
    for n in &nodes {
        if let Some(s) = cluster.status(n, Duration::from_secs(3)).await {
            views.insert(n.id, s);
        }
    }
    let leaders: BTreeSet<Option<u64>> = views.values().map(|s| s["leader_id"].as_u64()).collect();
    if leaders.len() == 1 && views.len() == nodes.len() {
        round.leader = leaders.into_iter().next().flatten();
    }
    let Some(leader) = round.leader else {
        let seen: Vec<String> = views
            .iter()
            .map(|(id, s)| format!("node {id}: leader {} in term {}", s["leader_id"], s["term"]))
            .collect();
        round.disagreement.push(format!(
            "members disagree on the leader ({}; {} of {} answered)",
            seen.join(", "),
            views.len(),
            nodes.len()
        ));
        return round;
    };
    let Some(lview) = views.get(&leader) else {
        round
            .disagreement
            .push(format!("leader {leader} is not one of our members"));
        return round;
    };
    round.members = lview["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["id"].as_u64()).collect())
        .unwrap_or_default();
    round.replication_factor = lview["data"]["replication_factor"].as_u64().unwrap_or(0) as usize;
    let ours: BTreeSet<u64> = nodes.iter().map(|n| n.id).collect();
    let theirs: BTreeSet<u64> = round.members.iter().copied().collect();
    if ours != theirs {
        round.disagreement.push(format!(
            "the leader's members {theirs:?} are not the suite's {ours:?}"
        ));
    }
    for (id, s) in &views {
        if s["ring_epoch"] != lview["ring_epoch"] {
            round.disagreement.push(format!(
                "node {id} is at ring epoch {}, the leader at {}",
                s["ring_epoch"], lview["ring_epoch"]
            ));
        }
    }
    let member_nodes: Vec<Arc<Node>> = nodes
        .iter()
        .filter(|n| theirs.contains(&n.id))
        .cloned()
        .collect();
    for n in &member_nodes {
        round.tokens.push(FinalTokens {
            node: n.id,
            tokens: cluster.tokens(n).await,
        });
    }
    let reference = round
        .tokens
        .iter()
        .find(|t| t.node == leader)
        .map(|t| t.tokens.clone());
    for t in &round.tokens {
        if Some(&t.tokens) != reference.as_ref() {
            round.disagreement.push(format!(
                "node {}'s token table differs from the leader's",
                t.node
            ));
        }
    }
    for n in &member_nodes {
        round.copies.extend(cache.scan(n));
    }
    let mut by_key: HashMap<&str, Vec<&DiskCopy>> = HashMap::new();
    for c in &round.copies {
        by_key.entry(&c.key).or_default().push(c);
    }
    let mut short = 0;
    let mut split = 0;
    for (key, acked) in keys {
        let copies = by_key
            .get(key.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let bodies: BTreeSet<&str> = copies.iter().map(|c| c.digest.as_str()).collect();
        if bodies.len() > 1 {
            split += 1;
        } else if *acked && copies.len() < round.replication_factor {
            short += 1;
        }
    }
    round.complete = short == 0;
    round.fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut copies: Vec<(u64, &str, &str)> = round
            .copies
            .iter()
            .map(|c| (c.node, c.key.as_str(), c.digest.as_str()))
            .collect();
        copies.sort();
        copies.hash(&mut h);
        round.tokens.iter().for_each(|t| t.tokens.hash(&mut h));
        (round.leader, &round.members, lview["ring_epoch"].as_u64()).hash(&mut h);
        h.finish()
    };
    if short + split > 0 {
        round.disagreement.push(format!(
            "{short} acknowledged keys with fewer than R copies on disk, {split} keys with different bodies on disk"
        ));
    }
    round
}

/// Reads every key through every member.
async fn read_all(cluster: &Cluster, members: &[Arc<Node>], keys: &[KeyState]) -> Vec<FinalGet> {
    let token = cluster.secrets.read_write.clone();
    let jobs = members
        .iter()
        .flat_map(|n| keys.iter().map(move |(k, _)| (n.clone(), k.clone())));
    futures_util::stream::iter(jobs)
        .map(|(node, key)| {
            let token = token.clone();
            async move {
                let answer = cluster
                    .http
                    .get(format!("{}/v1/cache/{key}", node.url()))
                    .bearer_auth(&token)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let (status, digest) = match answer {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        match r.bytes().await {
                            Ok(b) if status == 200 => (200, Some(digest(&b))),
                            Ok(_) => (status, None),
                            Err(_) => (0, None),
                        }
                    }
                    Err(_) => (0, None),
                };
                FinalGet {
                    node: node.id,
                    key,
                    status,
                    digest,
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// How long nothing may change before the settle stops waiting for agreement: several
/// anti-entropy intervals of the nodes (`flags.rs`).
const STABLE: Duration = Duration::from_secs(30);

/// Waits for agreement (at most `within`, or until nothing changed for `STABLE`), then
/// records the final state and the `settle` line. `history` gives everything recorded
/// so far (the checker judges each round with it).
pub async fn settle(
    cluster: &Cluster,
    rec: &Recorder,
    history: impl Fn() -> Vec<Record>,
    keys: Vec<KeyState>,
    last_heal_ms: u64,
    within: Duration,
) -> Settle {
    let deadline = rec.now_ms() + within.as_millis() as u64;
    let mut cache = DiskCache::default();
    let (mut converged_ms, mut served_ms) = (None, None);
    let mut last_note = String::new();
    let mut same_since = (0u64, rec.now_ms());
    let round = loop {
        let mut round = look(cluster, &keys, &mut cache).await;
        let now = rec.now_ms();
        if round.fingerprint != same_since.0 {
            same_since = (round.fingerprint, now);
        }
        let stable = now - same_since.1 >= STABLE.as_millis() as u64;
        let timed_out = now >= deadline;
        let mut read = false;
        if (round.complete && round.leader.is_some()) || timed_out || stable {
            let members: Vec<Arc<Node>> = cluster
                .members()
                .into_iter()
                .filter(|n| round.members.contains(&n.id) || round.members.is_empty())
                .collect();
            round.reads = read_all(cluster, &members, &keys).await;
            read = true;
            let violations =
                checker::check_final(&with_round(history(), &round, last_heal_ms, None));
            if served_ms.is_none()
                && !violations
                    .iter()
                    .any(|v| v.check == checker::Check::AcknowledgedLost)
            {
                served_ms = Some(rec.now_ms());
            }
            if violations.is_empty() && round.disagreement.is_empty() {
                converged_ms = Some(rec.now_ms());
                break round;
            }
            // What the members disagree on says more than the checker's view of it.
            last_note = match violations.first() {
                Some(v) if round.disagreement.is_empty() => {
                    format!("{} final-state violations, e.g. {v}", violations.len())
                }
                _ => round.disagreement.join("; "),
            };
        } else {
            last_note = round.disagreement.join("; ");
        }
        if timed_out || (stable && read) {
            if stable && !timed_out {
                last_note = format!("nothing changed for {} s: {last_note}", STABLE.as_secs());
            }
            break round;
        }
        eprintln!("[settle] at {} ms: {last_note}", rec.now_ms());
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    let members = if round.members.is_empty() {
        cluster.members().iter().map(|n| n.id).collect()
    } else {
        round.members.clone()
    };
    let settle = Settle {
        last_heal_ms,
        converged_ms,
        served_ms,
        members,
        replication_factor: round.replication_factor,
        leader: round.leader,
        note: if converged_ms.is_some() {
            String::new()
        } else {
            last_note
        },
    };
    for r in with_round(Vec::new(), &round, last_heal_ms, Some(settle.clone())) {
        rec.record(r);
    }
    settle
}

/// `history` plus a round's final records and a settle line.
fn with_round(
    mut history: Vec<Record>,
    round: &Round,
    last_heal_ms: u64,
    settle: Option<Settle>,
) -> Vec<Record> {
    history.extend(round.reads.iter().cloned().map(Record::FinalGet));
    history.extend(round.copies.iter().cloned().map(Record::DiskCopy));
    history.extend(round.tokens.iter().cloned().map(Record::FinalTokens));
    history.push(Record::Settle(settle.unwrap_or_else(|| Settle {
        last_heal_ms,
        converged_ms: None,
        served_ms: None,
        members: round.members.clone(),
        replication_factor: round.replication_factor,
        leader: round.leader,
        note: String::new(),
    })));
    history
}
