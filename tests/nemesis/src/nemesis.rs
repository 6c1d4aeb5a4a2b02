//! The nemesis: applies the planned faults at their times, heals each after its
//! duration, and records both in the history. Also watches the nodes: an exit the suite
//! did not cause is recorded as a `crash` (a finding) and the node restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::Method;
use tokio::sync::{Mutex, watch};

use crate::cluster::{Cluster, Node, blob_files};
use crate::faults::{Fault, FaultKind, LinkRule, PlannedFault};
use crate::history::{FaultEvent, Phase, Record, Recorder, StatusSample};

/// Faults acting on the network, by fault id; applied as their union.
#[derive(Default)]
struct NetState {
    /// Directed links cut: packets `from -> to` dropped (at `to`).
    drops: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Node whose every link follows the rule (and its bandwidth cap).
    links: BTreeMap<u64, (u64, LinkRule, Option<u32>)>,
    /// What each node drops now (to skip unchanged nft updates).
    applied_drops: BTreeMap<u64, BTreeSet<u64>>,
    /// Proxy rules set now: (node, peer).
    applied_links: BTreeSet<(u64, u64)>,
    applied_caps: BTreeSet<u64>,
}

pub struct Nemesis {
    cluster: Arc<Cluster>,
    rec: Recorder,
    net: Mutex<NetState>,
}

/// What an applied fault needs to be healed.
enum Applied {
    Restart(Arc<Node>),
    Resume(Arc<Node>),
    Network,
    DiskFull(Arc<Node>),
    /// Membership changes are done when applied.
    Done,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[nemesis] {}", msg.as_ref());
}

impl Nemesis {
    pub fn new(cluster: Arc<Cluster>, rec: Recorder) -> Arc<Nemesis> {
        Arc::new(Nemesis {
            cluster,
            rec,
            net: Mutex::new(NetState::default()),
        })
    }

    /// Runs every planned fault; returns once each has ended (at its time, or at once
    /// when `stop` turns true: pending ones are dropped, active ones healed).
    pub async fn run(self: Arc<Self>, faults: Vec<PlannedFault>, stop: watch::Receiver<bool>) {
        let mut set = tokio::task::JoinSet::new();
        for f in faults {
            set.spawn(self.clone().one(f, stop.clone()));
        }
        while set.join_next().await.is_some() {}
    }

    async fn one(self: Arc<Self>, planned: PlannedFault, mut stop: watch::Receiver<bool>) {
        let wait = planned.at_ms.saturating_sub(self.rec.now_ms());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if *stop.borrow() {
            return;
        }
        let kind = planned.fault.kind();
        let mut event = FaultEvent {
            id: planned.id,
            kind: kind.as_str().into(),
            phase: Phase::Start,
            at_ms: self.rec.now_ms(),
            nodes: Vec::new(),
            edges: Vec::new(),
            detail: planned.fault.to_string(),
            sole_keys: Vec::new(),
        };
        let applied = match self.apply(&planned, &mut event, planned.duration_ms).await {
            Ok(a) => a,
            Err(why) => {
                log(format!("#{} {kind} not applied: {why}", planned.id));
                return;
            }
        };
        log(format!(
            "#{} {kind} at {} ms: {}",
            planned.id, event.at_ms, event.detail
        ));
        if matches!(applied, Applied::Done) {
            // Membership changes record their own start and end.
            return;
        }
        self.rec.record(Record::Nemesis(event.clone()));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(planned.duration_ms)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        let healed = self.heal(planned.id, applied).await;
        event.phase = Phase::End;
        event.at_ms = self.rec.now_ms();
        event.sole_keys.clear();
        if let Err(e) = healed {
            event.detail = format!("heal failed: {e}");
            log(format!("#{} {kind}: heal failed: {e}", planned.id));
        }
        self.rec.record(Record::Nemesis(event));
    }

    fn node(&self, id: u64) -> Result<Arc<Node>, String> {
        let node = self
            .cluster
            .node(id)
            .ok_or_else(|| format!("node {id} does not exist"))?;
        if node.removed.load(Ordering::SeqCst) || !node.admitted.load(Ordering::SeqCst) {
            return Err(format!("node {id} is not a member"));
        }
        Ok(node)
    }

    fn running(&self, id: u64) -> Result<Arc<Node>, String> {
        let node = self.node(id)?;
        if !node.running() {
            return Err(format!("node {id} is not running"));
        }
        Ok(node)
    }

    /// Member ids the workload uses.
    fn member_ids(&self) -> Vec<u64> {
        self.cluster
            .members()
            .iter()
            .filter(|n| n.admitted.load(Ordering::SeqCst))
            .map(|n| n.id)
            .collect()
    }

    async fn apply(
        &self,
        planned: &PlannedFault,
        event: &mut FaultEvent,
        duration_ms: u64,
    ) -> Result<Applied, String> {
        let members = self.member_ids();
        let present = |ids: &[u64]| -> Vec<u64> {
            ids.iter()
                .copied()
                .filter(|i| members.contains(i))
                .collect()
        };
        let both_ways = |a: &[u64], b: &[u64]| -> Vec<(u64, u64)> {
            let mut e = Vec::new();
            for x in a {
                for y in b {
                    e.push((*x, *y));
                    e.push((*y, *x));
                }
            }
            e
        };
        match &planned.fault {
            Fault::Kill { node } => {
                let n = self.running(*node)?;
                self.cluster.kill(&n).await;
                event.nodes = vec![*node];
                Ok(Applied::Restart(n))
            }
            Fault::Pause { node } => {
                let n = self.running(*node)?;
                self.cluster.pause(&n, true).map_err(|e| e.to_string())?;
                event.nodes = vec![*node];
                Ok(Applied::Resume(n))
            }
            Fault::DiskLoss { node } => {
                let n = self.running(*node)?;
                self.cluster.kill(&n).await;
                event.sole_keys = self.sole_keys(&n);
                self.cluster.wipe(&n).map_err(|e| e.to_string())?;
                event.nodes = vec![*node];
                event.detail = format!(
                    "{}; {} keys were on no other disk",
                    event.detail,
                    event.sole_keys.len()
                );
                Ok(Applied::Restart(n))
            }
            Fault::DiskFull { node } => {
                let n = self.node(*node)?;
                self.cluster
                    .set_disk_full(&n, true)
                    .map_err(|e| e.to_string())?;
                event.nodes = vec![*node];
                Ok(Applied::DiskFull(n))
            }
            Fault::PartitionHalves { minority, majority } => {
                let (a, b) = (present(minority), present(majority));
                if a.is_empty() || b.is_empty() {
                    return Err("a side has no member".into());
                }
                event.detail = format!("partition {a:?} | {b:?}");
                self.cut(planned.id, event, both_ways(&a, &b)).await
            }
            Fault::PartitionLeader { fallback } => {
                let leader = match self.cluster.leader().await {
                    Some((l, _)) if members.contains(&l) => l,
                    _ => *fallback,
                };
                if !members.contains(&leader) {
                    return Err(format!("node {leader} is not a member"));
                }
                let others: Vec<u64> = members.iter().copied().filter(|m| *m != leader).collect();
                event.detail = format!("isolate the leader, node {leader}");
                self.cut(planned.id, event, both_ways(&[leader], &others))
                    .await
            }
            Fault::PartitionOneWay { node, deaf } => {
                if !members.contains(node) {
                    return Err(format!("node {node} is not a member"));
                }
                let edges = members
                    .iter()
                    .filter(|m| *m != node)
                    .map(|m| if *deaf { (*m, *node) } else { (*node, *m) })
                    .collect();
                self.cut(planned.id, event, edges).await
            }
            Fault::PartitionBridge {
                bridge,
                left,
                right,
            } => {
                let (l, r) = (present(left), present(right));
                if l.is_empty() || r.is_empty() || !members.contains(bridge) {
                    return Err("the bridge's sides are not all members".into());
                }
                event.detail = format!("bridge: {l:?} and {r:?} see only node {bridge}");
                self.cut(planned.id, event, both_ways(&l, &r)).await
            }
            Fault::SlowLink {
                node,
                rule,
                rate_kbit,
            } => {
                self.link(planned.id, event, *node, *rule, Some(*rate_kbit))
                    .await
            }
            Fault::LossyLink { node, rule } => {
                self.link(planned.id, event, *node, *rule, None).await
            }
            Fault::Join { node } => {
                self.join(planned.id, *node, duration_ms).await;
                Ok(Applied::Done)
            }
            Fault::Drain { node } => {
                self.node(*node)?;
                self.drain(planned.id, *node, duration_ms).await;
                Ok(Applied::Done)
            }
            Fault::Remove { node } => {
                self.node(*node)?;
                self.remove(planned.id, *node, duration_ms).await;
                Ok(Applied::Done)
            }
        }
    }

    async fn cut(
        &self,
        id: u64,
        event: &mut FaultEvent,
        edges: Vec<(u64, u64)>,
    ) -> Result<Applied, String> {
        let mut nodes: BTreeSet<u64> = BTreeSet::new();
        for (a, b) in &edges {
            nodes.insert(*a);
            nodes.insert(*b);
        }
        event.nodes = nodes.into_iter().collect();
        event.edges = edges.clone();
        let mut net = self.net.lock().await;
        net.drops.insert(id, edges);
        self.apply_net(&mut net).await.map_err(|e| e.to_string())?;
        Ok(Applied::Network)
    }

    async fn link(
        &self,
        id: u64,
        event: &mut FaultEvent,
        node: u64,
        rule: LinkRule,
        cap: Option<u32>,
    ) -> Result<Applied, String> {
        let members = self.member_ids();
        if !members.contains(&node) {
            return Err(format!("node {node} is not a member"));
        }
        event.nodes = vec![node];
        event.edges = members
            .iter()
            .filter(|m| **m != node)
            .flat_map(|m| [(node, *m), (*m, node)])
            .collect();
        let mut net = self.net.lock().await;
        net.links.insert(id, (node, rule, cap));
        self.apply_net(&mut net).await.map_err(|e| e.to_string())?;
        Ok(Applied::Network)
    }

    /// Brings nft drops, proxy rules and bandwidth caps in line with the active faults.
    async fn apply_net(&self, net: &mut NetState) -> anyhow::Result<()> {
        let nodes = self.cluster.all_nodes();
        let addr_of: BTreeMap<u64, Ipv4Addr> = nodes.iter().map(|n| (n.id, n.addr)).collect();
        let mut want: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for edges in net.drops.values() {
            for (from, to) in edges {
                want.entry(*to).or_default().insert(*from);
            }
        }
        for node in &nodes {
            let wanted = want.remove(&node.id).unwrap_or_default();
            let current = net.applied_drops.get(&node.id).cloned().unwrap_or_default();
            if wanted != current {
                let from: Vec<Ipv4Addr> = wanted
                    .iter()
                    .filter_map(|i| addr_of.get(i))
                    .copied()
                    .collect();
                let hosts = self.cluster.hosts.clone();
                let host = node.host.clone();
                tokio::task::spawn_blocking(move || hosts.drop_from(&host, &from)).await??;
                net.applied_drops.insert(node.id, wanted);
            }
        }
        // Proxy rules: every link touching a slowed node, both directions.
        let mut rules: BTreeMap<(u64, u64), LinkRule> = BTreeMap::new();
        let mut caps: BTreeMap<u64, u32> = BTreeMap::new();
        for (node, rule, cap) in net.links.values() {
            for other in &nodes {
                if other.id != *node {
                    rules.insert((*node, other.id), *rule);
                    rules.insert((other.id, *node), *rule);
                }
            }
            if let Some(c) = cap {
                caps.insert(*node, *c);
            }
        }
        let stale: Vec<(u64, u64)> = net
            .applied_links
            .iter()
            .filter(|k| !rules.contains_key(k))
            .copied()
            .collect();
        for (at, peer) in stale {
            if let (Some(n), Some(p)) = (self.cluster.node(at), addr_of.get(&peer)) {
                self.cluster.set_link(&n, *p, None).await?;
            }
            net.applied_links.remove(&(at, peer));
        }
        for ((at, peer), rule) in &rules {
            if let (Some(n), Some(p)) = (self.cluster.node(*at), addr_of.get(peer)) {
                self.cluster.set_link(&n, *p, Some(*rule)).await?;
                net.applied_links.insert((*at, *peer));
            }
        }
        let capped: Vec<u64> = net.applied_caps.iter().copied().collect();
        for id in capped {
            if !caps.contains_key(&id)
                && let Some(n) = self.cluster.node(id)
            {
                self.cluster.hosts.cap_bandwidth(&n.host, None)?;
                net.applied_caps.remove(&id);
            }
        }
        for (id, rate) in caps {
            if let Some(n) = self.cluster.node(id) {
                self.cluster.hosts.cap_bandwidth(&n.host, Some(rate))?;
                net.applied_caps.insert(id);
            }
        }
        Ok(())
    }

    async fn heal(&self, id: u64, applied: Applied) -> anyhow::Result<()> {
        match applied {
            Applied::Restart(n) => {
                if n.removed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                self.cluster.start(&n)?;
                Ok(())
            }
            Applied::Resume(n) => self.cluster.pause(&n, false),
            Applied::DiskFull(n) => self.cluster.set_disk_full(&n, false),
            Applied::Network => {
                let mut net = self.net.lock().await;
                net.drops.remove(&id);
                net.links.remove(&id);
                self.apply_net(&mut net).await
            }
            Applied::Done => Ok(()),
        }
    }

    /// After the last fault: no rule, cap or pause left, every member running, every
    /// tmpfs at its size.
    pub async fn heal_all(&self) -> anyhow::Result<()> {
        {
            let mut net = self.net.lock().await;
            net.drops.clear();
            net.links.clear();
            self.apply_net(&mut net).await?;
        }
        for n in self.cluster.members() {
            if n.tmpfs_size.is_some() {
                self.cluster.set_disk_full(&n, false)?;
            }
            if n.running() {
                let _ = self.cluster.pause(&n, false);
            } else {
                self.cluster.start(&n)?;
            }
        }
        Ok(())
    }

    /// Keys on `node`'s disk and on no other member's.
    fn sole_keys(&self, node: &Node) -> Vec<String> {
        let mut elsewhere: BTreeSet<String> = BTreeSet::new();
        for other in self.cluster.members() {
            if other.id != node.id {
                elsewhere.extend(blob_files(&other.data_dir).into_iter().map(|(k, _)| k));
            }
        }
        let mut keys: Vec<String> = blob_files(&node.data_dir)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !elsewhere.contains(k))
            .collect();
        keys.sort();
        keys
    }

    fn start_event(&self, id: u64, kind: FaultKind, node: u64, detail: String) -> FaultEvent {
        let event = FaultEvent {
            id,
            kind: kind.as_str().into(),
            phase: Phase::Start,
            at_ms: self.rec.now_ms(),
            nodes: vec![node],
            edges: Vec::new(),
            detail,
            sole_keys: Vec::new(),
        };
        self.rec.record(Record::Nemesis(event.clone()));
        event
    }

    fn end_event(&self, mut event: FaultEvent, detail: String) {
        log(format!("#{} {}: {detail}", event.id, event.kind));
        event.phase = Phase::End;
        event.at_ms = self.rec.now_ms();
        event.detail = detail;
        self.rec.record(Record::Nemesis(event));
    }

    /// A member (other than `not`) to send an admin request through.
    fn via(&self, not: u64) -> Option<Arc<Node>> {
        self.cluster
            .members()
            .into_iter()
            .find(|n| n.id != not && n.admitted.load(Ordering::SeqCst) && n.running())
    }

    async fn join(&self, id: u64, node_id: u64, within_ms: u64) {
        let event = self.start_event(
            id,
            FaultKind::Join,
            node_id,
            format!("node {node_id} joins"),
        );
        let node = match self.cluster.add_node(node_id, false).await {
            Ok(n) => n,
            Err(e) => return self.end_event(event, format!("host not created: {e:#}")),
        };
        if let Err(e) = self.cluster.start(&node) {
            return self.end_event(event, format!("not started: {e:#}"));
        }
        let started = self.rec.now_ms();
        let deadline = started + within_ms;
        while self.rec.now_ms() < deadline {
            if let Some((_, status)) = self.cluster.leader().await {
                let member = status["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["id"] == node_id));
                if member && self.cluster.wait_ready(&node, Duration::from_secs(1)).await {
                    node.admitted.store(true, Ordering::SeqCst);
                    let took = self.rec.now_ms() - started;
                    return self.end_event(event, format!("admitted after {took} ms"));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.end_event(event, format!("not admitted within {within_ms} ms"));
    }

    /// Sends an admin request through some other member until it is answered 204 or
    /// the time is up; returns the last status.
    async fn admin_until_done(&self, not: u64, method: Method, path: &str, within_ms: u64) -> u16 {
        let deadline = self.rec.now_ms() + within_ms;
        let mut last = 0;
        while self.rec.now_ms() < deadline {
            if let Some(via) = self.via(not) {
                let (status, _) = self
                    .cluster
                    .admin(&via, method.clone(), path, None, Duration::from_secs(15))
                    .await;
                last = status;
                if status == 204 {
                    return status;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        last
    }

    async fn drain(&self, id: u64, node: u64, within_ms: u64) {
        let event = self.start_event(id, FaultKind::Drain, node, format!("drain node {node}"));
        let status = self
            .admin_until_done(
                node,
                Method::POST,
                &format!("nodes/{node}/drain"),
                within_ms,
            )
            .await;
        self.end_event(event, format!("drain answered {status}"));
    }

    async fn remove(&self, id: u64, node_id: u64, within_ms: u64) {
        let event = self.start_event(
            id,
            FaultKind::Remove,
            node_id,
            format!("remove node {node_id}"),
        );
        let Some(node) = self.cluster.node(node_id) else {
            return self.end_event(event, "no such node".into());
        };
        // An operator lets a drain finish first (deploy/kubernetes/scale-down.sh).
        let drained = self.wait_drained(&node, 60_000).await;
        let status = self
            .admin_until_done(
                node_id,
                Method::DELETE,
                &format!("nodes/{node_id}"),
                within_ms,
            )
            .await;
        if status != 204 {
            return self.end_event(event, format!("not removed: the last answer was {status}"));
        }
        node.admitted.store(false, Ordering::SeqCst);
        node.removed.store(true, Ordering::SeqCst);
        self.cluster.kill(&node).await;
        let mut end = event.clone();
        end.sole_keys = self.sole_keys(&node);
        let detail = format!(
            "removed{}; {} keys were on no other disk",
            if drained { " after its drain" } else { "" },
            end.sole_keys.len()
        );
        self.end_event(end, detail);
    }

    /// Whether a draining node handed all its data over (its store is empty).
    async fn wait_drained(&self, node: &Node, within_ms: u64) -> bool {
        let deadline = self.rec.now_ms() + within_ms;
        loop {
            if let Some(s) = self.cluster.status(node, Duration::from_secs(2)).await {
                let draining = s["members"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["id"] == node.id && m["state"] == "draining")
                });
                if !draining {
                    return false;
                }
                if s["data"]["objects"].as_u64() == Some(0) {
                    return true;
                }
            }
            if self.rec.now_ms() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Polls every member's admin status each second (a history record per answer) and
    /// restarts a node whose process ended on its own (recorded as a `crash`).
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut crash_id = 1_000_000;
        loop {
            for node in self.cluster.members() {
                if node.expected_up.load(Ordering::SeqCst)
                    && let Some(status) = node.exited()
                {
                    crash_id += 1;
                    let event = FaultEvent {
                        id: crash_id,
                        kind: "crash".into(),
                        phase: Phase::Start,
                        at_ms: self.rec.now_ms(),
                        nodes: vec![node.id],
                        edges: Vec::new(),
                        detail: format!("node {} exited on its own: {status}", node.id),
                        sole_keys: Vec::new(),
                    };
                    log(&event.detail);
                    self.rec.record(Record::Nemesis(event.clone()));
                    let restarted = self.cluster.start(&node);
                    self.end_event(event, format!("restarted: {restarted:?}"));
                }
            }
            let polls = self.cluster.members().into_iter().map(|node| {
                let me = self.clone();
                async move {
                    let status = me.cluster.status(&node, Duration::from_secs(2)).await?;
                    Some(StatusSample {
                        node: node.id,
                        at_ms: me.rec.now_ms(),
                        term: status["term"].as_u64()?,
                        leader: status["leader_id"].as_u64(),
                        members: status["members"]
                            .as_array()
                            .map(|m| m.iter().filter_map(|m| m["id"].as_u64()).collect())
                            .unwrap_or_default(),
                        ring_epoch: status["ring_epoch"].as_u64().unwrap_or_default(),
                        applied_index: status["applied_index"].as_u64().unwrap_or_default(),
                    })
                }
            });
            for sample in futures_util::future::join_all(polls)
                .await
                .into_iter()
                .flatten()
            {
                self.rec.record(Record::Status(sample));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
