//! The fault model and the seeded schedule: every fault of a run is planned from the seed
//! before the run starts, so the same seed replays the same schedule. Only "isolate the
//! leader" is resolved when it happens (to whichever node leads then; the plan names a
//! fallback for when none does).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FaultKind {
    Kill,
    Pause,
    PartitionHalves,
    PartitionLeader,
    PartitionOneWay,
    PartitionBridge,
    SlowLink,
    LossyLink,
    DiskLoss,
    DiskFull,
    Join,
    Drain,
    Remove,
}

pub const ALL_KINDS: &[FaultKind] = &[
    FaultKind::Kill,
    FaultKind::Pause,
    FaultKind::PartitionHalves,
    FaultKind::PartitionLeader,
    FaultKind::PartitionOneWay,
    FaultKind::PartitionBridge,
    FaultKind::SlowLink,
    FaultKind::LossyLink,
    FaultKind::DiskLoss,
    FaultKind::DiskFull,
    FaultKind::Join,
    FaultKind::Drain,
    FaultKind::Remove,
];

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::PartitionHalves => "partition-halves",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::PartitionOneWay => "partition-one-way",
            FaultKind::PartitionBridge => "partition-bridge",
            FaultKind::SlowLink => "slow-link",
            FaultKind::LossyLink => "lossy-link",
            FaultKind::DiskLoss => "disk-loss",
            FaultKind::DiskFull => "disk-full",
            FaultKind::Join => "join",
            FaultKind::Drain => "drain",
            FaultKind::Remove => "remove",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        ALL_KINDS.iter().copied().find(|k| k.as_str() == s)
    }

    /// Kinds named by a `--faults` word: a kind, or a group (`partition`, `link`,
    /// `process`, `disk`, `membership`, `all`).
    pub fn parse_selection(word: &str) -> Option<Vec<FaultKind>> {
        use FaultKind::*;
        Some(match word {
            "all" => ALL_KINDS.to_vec(),
            "partition" => vec![
                PartitionHalves,
                PartitionLeader,
                PartitionOneWay,
                PartitionBridge,
            ],
            "link" => vec![SlowLink, LossyLink],
            "process" => vec![Kill, Pause],
            "disk" => vec![DiskLoss, DiskFull],
            "membership" => vec![Join, Drain, Remove],
            other => vec![FaultKind::parse(other)?],
        })
    }

    /// Whether the cluster may answer as a degraded one (availability first) while this
    /// fault lasts. A planned join or drain leaves it healthy.
    pub fn degrades(self) -> bool {
        !matches!(self, FaultKind::Join | FaultKind::Drain)
    }

    /// Whether the fault stops the node's process (it cannot answer or hear anyone).
    pub fn stops_process(self) -> bool {
        matches!(
            self,
            FaultKind::Kill | FaultKind::Pause | FaultKind::DiskLoss | FaultKind::Remove
        )
    }

    fn weight(self) -> u32 {
        match self {
            FaultKind::Kill | FaultKind::Remove => 3,
            FaultKind::Join | FaultKind::Drain => 2,
            FaultKind::Pause
            | FaultKind::PartitionHalves
            | FaultKind::PartitionLeader
            | FaultKind::DiskLoss => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a proxied link misbehaves (see `proxy.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRule {
    /// Added to every chunk in both directions.
    pub delay_ms: u32,
    pub jitter_ms: u32,
    /// Per chunk (and per new connection), in thousandths: the connection is reset.
    pub reset_per_mille: u32,
    /// Per chunk, in thousandths: forwarding stops for `stall_ms` (a burst of loss that
    /// TCP would retransmit through).
    pub stall_per_mille: u32,
    pub stall_ms: u32,
}

/// One planned fault, with its targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Fault {
    /// kill -9, restart after the fault's duration.
    Kill { node: u64 },
    /// SIGSTOP for the fault's duration (longer than the election timeout), SIGCONT.
    Pause { node: u64 },
    /// The minority hears nobody of the majority and the other way round.
    PartitionHalves {
        minority: Vec<u64>,
        majority: Vec<u64>,
    },
    /// Whoever leads when the fault starts is cut off from every other node.
    PartitionLeader { fallback: u64 },
    /// `node` receives nothing from the others (`deaf`) or they receive nothing from
    /// it; the other direction works.
    PartitionOneWay { node: u64, deaf: bool },
    /// `left` and `right` each see `bridge` but not each other.
    PartitionBridge {
        bridge: u64,
        left: Vec<u64>,
        right: Vec<u64>,
    },
    /// Every link of `node`: added latency through the proxies and a tc tbf rate cap.
    SlowLink {
        node: u64,
        rule: LinkRule,
        rate_kbit: u32,
    },
    /// Every link of `node`: connections reset and stalled at random.
    LossyLink { node: u64, rule: LinkRule },
    /// kill -9, data dir wiped, restarted under the same id after the duration.
    DiskLoss { node: u64 },
    /// The node's data dir (a tmpfs) shrunk to what it holds, for the duration.
    DiskFull { node: u64 },
    /// A new node joins (the duration is the time it gets to be admitted).
    Join { node: u64 },
    /// The node is drained (admin API).
    Drain { node: u64 },
    /// The node is removed (admin API) and stopped for good.
    Remove { node: u64 },
}

impl Fault {
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Kill { .. } => FaultKind::Kill,
            Fault::Pause { .. } => FaultKind::Pause,
            Fault::PartitionHalves { .. } => FaultKind::PartitionHalves,
            Fault::PartitionLeader { .. } => FaultKind::PartitionLeader,
            Fault::PartitionOneWay { .. } => FaultKind::PartitionOneWay,
            Fault::PartitionBridge { .. } => FaultKind::PartitionBridge,
            Fault::SlowLink { .. } => FaultKind::SlowLink,
            Fault::LossyLink { .. } => FaultKind::LossyLink,
            Fault::DiskLoss { .. } => FaultKind::DiskLoss,
            Fault::DiskFull { .. } => FaultKind::DiskFull,
            Fault::Join { .. } => FaultKind::Join,
            Fault::Drain { .. } => FaultKind::Drain,
            Fault::Remove { .. } => FaultKind::Remove,
        }
    }

    /// Nodes whose process or membership the fault acts on (they take no other such
    /// fault at the same time).
    fn claims(&self) -> Vec<u64> {
        match self {
            Fault::Kill { node }
            | Fault::Pause { node }
            | Fault::DiskLoss { node }
            | Fault::DiskFull { node }
            | Fault::Join { node }
            | Fault::Drain { node }
            | Fault::Remove { node } => vec![*node],
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill { node } => write!(f, "kill -9 node {node}, then restart it"),
            Fault::Pause { node } => write!(f, "SIGSTOP node {node}, then SIGCONT"),
            Fault::PartitionHalves { minority, majority } => {
                write!(f, "partition {minority:?} | {majority:?}")
            }
            Fault::PartitionLeader { fallback } => {
                write!(f, "isolate the leader (node {fallback} if none)")
            }
            Fault::PartitionOneWay { node, deaf: true } => {
                write!(f, "node {node} hears no other node (it can still send)")
            }
            Fault::PartitionOneWay { node, deaf: false } => {
                write!(f, "no node hears node {node} (it can still receive)")
            }
            Fault::PartitionBridge {
                bridge,
                left,
                right,
            } => write!(f, "bridge: {left:?} and {right:?} see only node {bridge}"),
            Fault::SlowLink {
                node,
                rule,
                rate_kbit,
            } => write!(
                f,
                "slow links of node {node}: +{}±{} ms per chunk, {rate_kbit} kbit/s",
                rule.delay_ms, rule.jitter_ms
            ),
            Fault::LossyLink { node, rule } => write!(
                f,
                "lossy links of node {node}: reset {}‰, stall {}‰ for {} ms",
                rule.reset_per_mille, rule.stall_per_mille, rule.stall_ms
            ),
            Fault::DiskLoss { node } => {
                write!(f, "kill -9 node {node}, wipe its data dir, restart it")
            }
            Fault::DiskFull { node } => write!(f, "fill the disk of node {node}"),
            Fault::Join { node } => write!(f, "node {node} joins"),
            Fault::Drain { node } => write!(f, "drain node {node}"),
            Fault::Remove { node } => write!(f, "remove node {node}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedFault {
    pub id: u64,
    pub at_ms: u64,
    pub duration_ms: u64,
    pub fault: Fault,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub initial_nodes: Vec<u64>,
    /// The node whose data dir is a tmpfs (the target of disk-full faults).
    pub tmpfs_node: Option<u64>,
    pub faults: Vec<PlannedFault>,
}

impl Schedule {
    /// Every node id the run may use (initial and joining).
    pub fn all_nodes(&self) -> BTreeSet<u64> {
        let mut ids: BTreeSet<u64> = self.initial_nodes.iter().copied().collect();
        for f in &self.faults {
            if let Fault::Join { node } = f.fault {
                ids.insert(node);
            }
        }
        ids
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "seed {}; nodes {:?}; tmpfs data dir: {}\n",
            self.seed,
            self.initial_nodes,
            self.tmpfs_node
                .map_or("none".to_owned(), |n| format!("node {n}"))
        );
        for f in &self.faults {
            out.push_str(&format!(
                "  #{:<3} at {:>7.1} s for {:>5.1} s  {:<18} {}\n",
                f.id,
                f.at_ms as f64 / 1000.0,
                f.duration_ms as f64 / 1000.0,
                f.fault.kind().as_str(),
                f.fault
            ));
        }
        out
    }
}

/// What the planner may do.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub seed: u64,
    pub nodes: usize,
    pub run_ms: u64,
    pub kinds: Vec<FaultKind>,
    /// No fault starts before this (the cluster forms, the workload warms up).
    pub warmup_ms: u64,
    /// At most this many members beyond the initial number (joins wait for removals).
    pub max_extra_nodes: usize,
}

/// Independent random streams derived from the one seed.
pub const STREAM_SCHEDULE: u64 = 0x5c4e_d01e;
pub const STREAM_WORKLOAD: u64 = 0x3031_0ad5;

pub fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The planner's model of the membership, advanced as it plans.
struct Model {
    members: Vec<u64>,
    draining: BTreeSet<u64>,
    next_id: u64,
    initial: usize,
    /// Node -> planned time until which its process or membership is claimed, and
    /// whether the claim stops its process.
    claimed: BTreeMap<u64, (u64, bool)>,
    /// Network faults (partitions, links) never overlap one another.
    network_until: u64,
    membership_until: u64,
    /// Joined nodes take faults only once admitted.
    usable_from: BTreeMap<u64, u64>,
}

impl Model {
    fn free(&self, node: u64, at: u64) -> bool {
        self.claimed.get(&node).is_none_or(|&(t, _)| t <= at)
            && self.usable_from.get(&node).is_none_or(|&t| t <= at)
    }

    fn usable(&self, at: u64) -> Vec<u64> {
        self.members
            .iter()
            .copied()
            .filter(|n| self.usable_from.get(n).is_none_or(|&t| t <= at))
            .collect()
    }

    /// Process faults at once stay a minority of the members.
    fn stopped_at(&self, at: u64) -> usize {
        self.claimed
            .values()
            .filter(|&&(t, stops)| stops && t > at)
            .count()
    }
}

pub fn plan(o: &PlanOptions) -> Schedule {
    let mut rng = rng_for(o.seed, STREAM_SCHEDULE);
    let initial: Vec<u64> = (1..=o.nodes as u64).collect();
    let tmpfs_node = o
        .kinds
        .contains(&FaultKind::DiskFull)
        .then(|| *initial.choose(&mut rng).unwrap());
    let mut m = Model {
        members: initial.clone(),
        draining: BTreeSet::new(),
        next_id: o.nodes as u64 + 1,
        initial: o.nodes,
        claimed: BTreeMap::new(),
        network_until: 0,
        membership_until: 0,
        usable_from: BTreeMap::new(),
    };
    let mut faults = Vec::new();
    let mut at = o.warmup_ms;
    // The last fault starts early enough to end before the workload stops.
    let last_start = o.run_ms.saturating_sub(15_000);
    let weights: Vec<(FaultKind, u32)> = o.kinds.iter().map(|k| (*k, k.weight())).collect();
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    while at < last_start && total > 0 {
        let mut placed = None;
        for _ in 0..20 {
            let mut pick = rng.random_range(0..total);
            let kind = weights
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap()
                .0;
            if let Some(p) = propose(kind, &mut rng, &m, at, tmpfs_node, o) {
                placed = Some(p);
                break;
            }
        }
        let Some((fault, duration_ms)) = placed else {
            at += 1_000;
            continue;
        };
        let duration_ms = duration_ms.min(o.run_ms.saturating_sub(at + 5_000));
        let end = at + duration_ms;
        let stops = fault.kind().stops_process();
        for n in fault.claims() {
            m.claimed.insert(n, (end, stops));
        }
        match &fault {
            Fault::PartitionHalves { .. }
            | Fault::PartitionLeader { .. }
            | Fault::PartitionOneWay { .. }
            | Fault::PartitionBridge { .. }
            | Fault::SlowLink { .. }
            | Fault::LossyLink { .. } => m.network_until = end,
            Fault::Join { node } => {
                m.members.push(*node);
                m.next_id += 1;
                m.usable_from.insert(*node, end);
                m.membership_until = end;
            }
            Fault::Drain { node } => {
                m.draining.insert(*node);
                m.membership_until = end;
            }
            Fault::Remove { node } => {
                m.members.retain(|n| n != node);
                m.draining.remove(node);
                m.membership_until = end;
                // Never used again.
                m.usable_from.insert(*node, u64::MAX);
            }
            _ => {}
        }
        faults.push(PlannedFault {
            id: faults.len() as u64 + 1,
            at_ms: at,
            duration_ms,
            fault,
        });
        // Sometimes the next fault starts while this one lasts.
        at = if rng.random_bool(0.25) && duration_ms > 2_000 {
            at + rng.random_range(1_000..duration_ms)
        } else {
            end + rng.random_range(3_000..20_000)
        };
    }
    Schedule {
        seed: o.seed,
        initial_nodes: initial,
        tmpfs_node,
        faults,
    }
}

/// A fault of `kind` that fits the model at `at`, with its duration; None if none fits.
fn propose(
    kind: FaultKind,
    rng: &mut ChaCha8Rng,
    m: &Model,
    at: u64,
    tmpfs_node: Option<u64>,
    o: &PlanOptions,
) -> Option<(Fault, u64)> {
    let usable = m.usable(at);
    let free: Vec<u64> = usable.iter().copied().filter(|n| m.free(*n, at)).collect();
    let network_free = m.network_until <= at;
    let minority = (usable.len().saturating_sub(1)) / 2;
    let process_ok = m.stopped_at(at) < minority.max(1);
    let secs = |rng: &mut ChaCha8Rng, lo: u64, hi: u64| rng.random_range(lo * 1000..hi * 1000);
    let fault = match kind {
        FaultKind::Kill | FaultKind::Pause | FaultKind::DiskLoss => {
            if !process_ok {
                return None;
            }
            let node = *free.choose(rng)?;
            match kind {
                FaultKind::Kill => (Fault::Kill { node }, secs(rng, 1, 15)),
                FaultKind::Pause => (Fault::Pause { node }, secs(rng, 3, 15)),
                _ => (Fault::DiskLoss { node }, secs(rng, 1, 10)),
            }
        }
        FaultKind::PartitionHalves => {
            if !network_free || usable.len() < 2 {
                return None;
            }
            let mut shuffled = usable.clone();
            shuffled.shuffle(rng);
            let size = rng.random_range(1..=minority.max(1));
            let mut minority: Vec<u64> = shuffled[..size].to_vec();
            let mut majority: Vec<u64> = shuffled[size..].to_vec();
            minority.sort();
            majority.sort();
            (
                Fault::PartitionHalves { minority, majority },
                secs(rng, 5, 30),
            )
        }
        FaultKind::PartitionLeader => {
            if !network_free || usable.len() < 2 {
                return None;
            }
            let fallback = *usable.choose(rng)?;
            (Fault::PartitionLeader { fallback }, secs(rng, 5, 30))
        }
        FaultKind::PartitionOneWay => {
            if !network_free || usable.len() < 2 {
                return None;
            }
            let node = *usable.choose(rng)?;
            let deaf = rng.random_bool(0.5);
            (Fault::PartitionOneWay { node, deaf }, secs(rng, 5, 30))
        }
        FaultKind::PartitionBridge => {
            if !network_free || usable.len() < 3 {
                return None;
            }
            let mut shuffled = usable.clone();
            shuffled.shuffle(rng);
            let bridge = shuffled[0];
            let rest = &shuffled[1..];
            let cut = rest.len() / 2;
            let mut left = rest[..cut].to_vec();
            let mut right = rest[cut..].to_vec();
            left.sort();
            right.sort();
            (
                Fault::PartitionBridge {
                    bridge,
                    left,
                    right,
                },
                secs(rng, 5, 30),
            )
        }
        FaultKind::SlowLink => {
            if !network_free {
                return None;
            }
            let node = *usable.choose(rng)?;
            let delay_ms = rng.random_range(50..500);
            let rule = LinkRule {
                delay_ms,
                jitter_ms: rng.random_range(0..=delay_ms / 2),
                ..LinkRule::default()
            };
            let rate_kbit = rng.random_range(4_000..40_000);
            (
                Fault::SlowLink {
                    node,
                    rule,
                    rate_kbit,
                },
                secs(rng, 10, 40),
            )
        }
        FaultKind::LossyLink => {
            if !network_free {
                return None;
            }
            let node = *usable.choose(rng)?;
            let rule = LinkRule {
                reset_per_mille: rng.random_range(1..20),
                stall_per_mille: rng.random_range(5..50),
                stall_ms: rng.random_range(200..3_000),
                ..LinkRule::default()
            };
            (Fault::LossyLink { node, rule }, secs(rng, 10, 30))
        }
        FaultKind::DiskFull => {
            let node = tmpfs_node?;
            if !free.contains(&node) {
                return None;
            }
            (Fault::DiskFull { node }, secs(rng, 10, 30))
        }
        FaultKind::Join => {
            if m.membership_until > at || m.members.len() >= m.initial + o.max_extra_nodes {
                return None;
            }
            (Fault::Join { node: m.next_id }, 60_000)
        }
        FaultKind::Drain => {
            let active: Vec<u64> = free
                .iter()
                .copied()
                .filter(|n| !m.draining.contains(n) && Some(*n) != tmpfs_node)
                .collect();
            let active_count = usable.iter().filter(|n| !m.draining.contains(n)).count();
            if m.membership_until > at || active_count <= m.initial {
                return None;
            }
            (
                Fault::Drain {
                    node: *active.choose(rng)?,
                },
                30_000,
            )
        }
        FaultKind::Remove => {
            if m.membership_until > at || !process_ok {
                return None;
            }
            let draining: Vec<u64> = free
                .iter()
                .copied()
                .filter(|n| m.draining.contains(n))
                .collect();
            let active_count = usable.iter().filter(|n| !m.draining.contains(n)).count();
            let node = if let Some(n) = draining.choose(rng) {
                *n
            } else if active_count > m.initial {
                let candidates: Vec<u64> = free
                    .iter()
                    .copied()
                    .filter(|n| Some(*n) != tmpfs_node)
                    .collect();
                *candidates.choose(rng)?
            } else {
                return None;
            };
            (Fault::Remove { node }, 30_000)
        }
    };
    Some(fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(seed: u64, kinds: Vec<FaultKind>) -> PlanOptions {
        PlanOptions {
            seed,
            nodes: 3,
            run_ms: 20 * 60_000,
            kinds,
            warmup_ms: 10_000,
            max_extra_nodes: 2,
        }
    }

    #[test]
    fn the_same_seed_plans_the_same_schedule_and_another_seed_another() {
        let a = plan(&options(42, ALL_KINDS.to_vec()));
        let b = plan(&options(42, ALL_KINDS.to_vec()));
        let c = plan(&options(43, ALL_KINDS.to_vec()));
        assert_eq!(a, b);
        assert_eq!(a.render(), b.render());
        assert_ne!(a.faults, c.faults);
        assert!(a.faults.len() > 20, "{}", a.render());
    }

    #[test]
    fn long_schedules_use_every_kind_and_keep_process_faults_a_minority() {
        let mut kinds: BTreeSet<FaultKind> = BTreeSet::new();
        for seed in 1..=3 {
            let s = plan(&options(seed, ALL_KINDS.to_vec()));
            kinds.extend(s.faults.iter().map(|f| f.fault.kind()));
        }
        for k in ALL_KINDS {
            assert!(kinds.contains(k), "{k} never planned in 3 schedules");
        }
        let s = plan(&options(7, ALL_KINDS.to_vec()));
        // With three nodes at most one process fault at any moment.
        for f in &s.faults {
            let stopping = |p: &PlannedFault| {
                matches!(
                    p.fault,
                    Fault::Kill { .. } | Fault::Pause { .. } | Fault::DiskLoss { .. }
                )
            };
            if !stopping(f) {
                continue;
            }
            let overlapping = s
                .faults
                .iter()
                .filter(|g| {
                    g.id != f.id
                        && stopping(g)
                        && g.at_ms < f.at_ms + f.duration_ms
                        && f.at_ms < g.at_ms + g.duration_ms
                })
                .count();
            assert_eq!(overlapping, 0, "{}", s.render());
        }
        // Faults end before the run does.
        assert!(
            s.faults
                .iter()
                .all(|f| f.at_ms + f.duration_ms <= 20 * 60_000)
        );
    }

    #[test]
    fn membership_changes_keep_the_initial_number_of_active_nodes() {
        let s = plan(&options(
            11,
            FaultKind::parse_selection("membership").unwrap(),
        ));
        let mut active: BTreeSet<u64> = s.initial_nodes.iter().copied().collect();
        let mut draining = BTreeSet::new();
        assert!(!s.faults.is_empty());
        for f in &s.faults {
            match f.fault {
                Fault::Join { node } => assert!(active.insert(node)),
                Fault::Drain { node } => {
                    assert!(active.remove(&node));
                    draining.insert(node);
                }
                Fault::Remove { node } => {
                    assert!(active.remove(&node) || draining.remove(&node));
                }
                _ => unreachable!(),
            }
            assert!(active.len() >= 3, "{}", s.render());
        }
    }

    #[test]
    fn a_selection_plans_only_its_kinds() {
        let s = plan(&options(
            5,
            FaultKind::parse_selection("partition").unwrap(),
        ));
        assert!(s.faults.iter().all(|f| matches!(
            f.fault.kind(),
            FaultKind::PartitionHalves
                | FaultKind::PartitionLeader
                | FaultKind::PartitionOneWay
                | FaultKind::PartitionBridge
        )));
        assert!(FaultKind::parse_selection("nonsense").is_none());
        assert_eq!(s.tmpfs_node, None);
    }
}
