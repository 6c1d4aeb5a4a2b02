//! The checker: reads a history (see `history.rs`) and names every violation of the
//! invariants of issue 14, with the evidence. It knows nothing of how the history was
//! made, so it runs on a live run's history and on a file (`nxcache-nemesis check`).
//!
//! 1. No acknowledged PUT lost: every key that got 200 is served by every member after
//!    the settle, with the bytes of a PUT that may have succeeded.
//! 2. Nothing served that was not written: every 200 GET returns the bytes of a PUT of
//!    that key.
//! 3. Agreement: outside fault windows (a fault's span plus a grace) at most one body per
//!    key is acknowledged, and a key with one acknowledged body is never read with
//!    another; after the settle every member serves one body per key and R members hold
//!    it on disk.
//! 4. Availability under `serve`: no GET answered 5xx or left unanswered by a node that
//!    was up; PUT errors only the documented ones.
//! 5. Control plane: one leader per term; after the settle every member's token table
//!    equals the leader's; a revoked token is refused by every node in contact with the
//!    leader once the revocation's bound has passed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use crate::faults::FaultKind;
use crate::history::{Op, OpKind, Outcome, Phase, Record, Settle, StatusSample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    AcknowledgedLost = 1,
    NotWritten = 2,
    Agreement = 3,
    Availability = 4,
    ControlPlane = 5,
}

impl Check {
    pub fn title(self) -> &'static str {
        match self {
            Check::AcknowledgedLost => "no acknowledged PUT lost",
            Check::NotWritten => "nothing served that was not written",
            Check::Agreement => "agreement",
            Check::Availability => "availability under serve",
            Check::ControlPlane => "control plane",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: Check,
    pub key: Option<String>,
    pub node: Option<u64>,
    pub evidence: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "check {} ({})", self.check as u8, self.check.title())?;
        if let Some(key) = &self.key {
            write!(f, " key {key}")?;
        }
        if let Some(node) = self.node {
            write!(f, " node {node}")?;
        }
        write!(f, ": {}", self.evidence)
    }
}

/// Counts for the report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// `"put 200"`, `"get 404"`, `"get no answer (timeout)"`, ...
    pub ops: BTreeMap<String, u64>,
    pub faults: BTreeMap<String, u64>,
    /// Process crashes and panics found (check 4 names each).
    pub findings: BTreeMap<String, u64>,
    pub keys_written: usize,
    pub keys_acknowledged: usize,
    /// Acknowledged keys whose only holders lost their disk or left the cluster.
    pub keys_excused: usize,
    pub status_samples: usize,
    /// From the last heal to the first moment every final-state check held.
    pub convergence_ms: Option<u64>,
    /// From the last heal to the first moment every member served every acknowledged
    /// key.
    pub served_ms: Option<u64>,
    pub run_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub figures: Figures,
    /// What could not be checked, and why.
    pub notes: Vec<String>,
}

impl Report {
    pub fn count(&self, check: Check) -> usize {
        self.violations.iter().filter(|v| v.check == check).count()
    }
}

/// The nemesis's record of a node process that ended on its own.
pub const CRASH: &str = "crash";
/// A panic found in a node's log (the process may have lived on without the panicked
/// task, e.g. its Raft core). A finding, not a fault: it opens no window.
pub const PANIC: &str = "panic";

/// Fallbacks when a history has no `run` line.
const DEFAULT_GRACE_MS: u64 = 10_000;
const DEFAULT_REVOCATION_BOUND_MS: u64 = 1_000;

/// A fault's span, from its start to its end plus the grace.
#[derive(Debug, Clone)]
struct Window {
    id: u64,
    kind: Option<FaultKind>,
    start: u64,
    /// `u64::MAX` while never healed (a removal).
    end: u64,
    nodes: Vec<u64>,
    edges: Vec<(u64, u64)>,
}

impl Window {
    fn overlaps(&self, from: u64, to: u64) -> bool {
        self.start <= to && from <= self.end
    }

    /// Like `overlaps`, but a removed node stays out of reach for good.
    fn reaches(&self, from: u64, to: u64) -> bool {
        if self.kind == Some(FaultKind::Remove) {
            self.start <= to
        } else {
            self.overlaps(from, to)
        }
    }

    /// Faults in which a healthy cluster's promises may bend (availability first).
    /// Unknown kinds count as degrading: better a missed finding than a false one.
    fn degrades(&self) -> bool {
        self.kind.is_none_or(FaultKind::degrades)
    }

    /// Whether `a` and `b` may not hear each other during this fault.
    fn separates(&self, a: u64, b: u64) -> bool {
        let Some(kind) = self.kind else { return true };
        if kind.stops_process() || kind == FaultKind::DiskFull {
            return self.nodes.contains(&a) || self.nodes.contains(&b);
        }
        self.edges
            .iter()
            .any(|&(x, y)| (x == a && y == b) || (x == b && y == a))
    }
}

fn windows(records: &[Record], grace_ms: u64) -> Vec<Window> {
    let mut open: BTreeMap<u64, Window> = BTreeMap::new();
    let mut done = Vec::new();
    for r in records {
        let Record::Nemesis(e) = r else { continue };
        if e.kind == PANIC {
            continue;
        }
        match e.phase {
            Phase::Start => {
                open.insert(
                    e.id,
                    Window {
                        id: e.id,
                        kind: FaultKind::parse(&e.kind),
                        start: e.at_ms,
                        end: u64::MAX,
                        nodes: e.nodes.clone(),
                        edges: e.edges.clone(),
                    },
                );
            }
            Phase::End => {
                if let Some(mut w) = open.remove(&e.id) {
                    w.end = e.at_ms.saturating_add(grace_ms);
                    done.push(w);
                }
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|w| (w.start, w.id));
    done
}

fn short(digest: &Option<String>) -> &str {
    digest.as_deref().map_or("-", |d| &d[..d.len().min(12)])
}

fn describe(op: &Op) -> String {
    format!(
        "{} #{} via node {} [{}..{} ms] status {} digest {}",
        op.op.as_str(),
        op.id,
        op.node,
        op.start_ms,
        op.end_ms,
        op.status,
        short(&op.digest)
    )
}

/// Statuses a PUT may answer under `serve` (README's table): stored, exists, revoked or
/// not-yet-known token, an upload cut by its pace or deadline, one token's uploads at
/// their cap, too few replicas / too many uploads, full disk.
const PUT_DOCUMENTED: &[u16] = &[200, 202, 401, 408, 409, 429, 503, 507];
/// A node that is up answers every request within this time (check 4).
pub const ANSWER_BOUND_MS: u64 = 20_000;
/// Answers that show a token passed authentication.
const TOKEN_ACCEPTED: &[u16] = &[200, 202, 404, 409, 507];

/// A history, indexed for the checks.
struct History<'a> {
    records: &'a [Record],
    bound_ms: u64,
    windows: Vec<Window>,
    ops: Vec<&'a Op>,
    samples: Vec<&'a StatusSample>,
    settle: Option<&'a Settle>,
    puts: BTreeMap<&'a str, Vec<&'a Op>>,
    excused: HashSet<&'a str>,
}

impl<'a> History<'a> {
    fn new(records: &'a [Record]) -> History<'a> {
        let (grace_ms, bound_ms) = records
            .iter()
            .find_map(|r| match r {
                Record::Run(run) => Some((run.grace_ms, run.revocation_bound_ms)),
                _ => None,
            })
            .unwrap_or((DEFAULT_GRACE_MS, DEFAULT_REVOCATION_BOUND_MS));
        let ops: Vec<&Op> = records
            .iter()
            .filter_map(|r| match r {
                Record::Op(op) => Some(op),
                _ => None,
            })
            .collect();
        let mut puts: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in ops.iter().filter(|o| o.op == OpKind::Put) {
            if let Some(key) = &op.key {
                puts.entry(key).or_default().push(op);
            }
        }
        History {
            records,
            bound_ms,
            windows: windows(records, grace_ms),
            samples: records
                .iter()
                .filter_map(|r| match r {
                    Record::Status(s) => Some(s),
                    _ => None,
                })
                .collect(),
            settle: records.iter().find_map(|r| match r {
                Record::Settle(s) => Some(s),
                _ => None,
            }),
            // A lost disk or a removed node excuses the keys no other disk held.
            excused: records
                .iter()
                .filter_map(|r| match r {
                    Record::Nemesis(e) => Some(&e.sole_keys),
                    _ => None,
                })
                .flatten()
                .map(String::as_str)
                .collect(),
            ops,
            puts,
        }
    }
}

pub fn check(records: &[Record]) -> Report {
    let h = History::new(records);
    let mut report = Report::default();
    figures(&mut report.figures, &h);
    let v = &mut report.violations;
    reads_written(v, &h);
    final_reads_written(v, &h);
    check_agreement_during_run(v, &h);
    check_availability(v, &h);
    final_reads_answered(v, &h);
    check_control_plane(v, &h);
    match h.settle {
        Some(settle) => {
            check_final_state(v, &h, settle);
            check_final_tokens(v, &h, settle);
        }
        None => report.notes.push(
            "no settle record: the final state (checks 1, 3 and the token tables of 5) was not checked"
                .into(),
        ),
    }
    report
}

/// Only the checks of the final state (1, 3 and 5's token tables after the settle, and
/// 2 and 4 on the final reads): what the settle waits for.
pub fn check_final(records: &[Record]) -> Vec<Violation> {
    let h = History::new(records);
    let mut v = Vec::new();
    final_reads_written(&mut v, &h);
    final_reads_answered(&mut v, &h);
    if let Some(settle) = h.settle {
        check_final_state(&mut v, &h, settle);
        check_final_tokens(&mut v, &h, settle);
    }
    v
}

fn figures(f: &mut Figures, h: &History) {
    let (records, puts, excused, settle) = (h.records, &h.puts, &h.excused, h.settle);
    for op in &h.ops {
        let what = match (op.status, &op.error) {
            (0, Some(e)) => format!("{} no answer ({e})", op.op.as_str()),
            (0, None) => format!("{} no answer", op.op.as_str()),
            (s, _) => format!("{} {s}", op.op.as_str()),
        };
        *f.ops.entry(what).or_default() += 1;
    }
    for r in records {
        match r {
            Record::Nemesis(e)
                if e.phase == Phase::Start && (e.kind == CRASH || e.kind == PANIC) =>
            {
                *f.findings.entry(e.kind.clone()).or_default() += 1;
            }
            Record::Nemesis(e) if e.phase == Phase::Start => {
                *f.faults.entry(e.kind.clone()).or_default() += 1;
            }
            Record::Status(_) => f.status_samples += 1,
            _ => {}
        }
    }
    f.keys_written = puts.len();
    let acked: Vec<&str> = puts
        .iter()
        .filter(|(_, ps)| ps.iter().any(|p| p.outcome == Outcome::Ok))
        .map(|(k, _)| *k)
        .collect();
    f.keys_acknowledged = acked.len();
    f.keys_excused = acked.iter().filter(|k| excused.contains(*k)).count();
    f.run_ms = h.ops.iter().map(|o| o.end_ms).max().unwrap_or(0);
    if let Some(s) = settle {
        f.convergence_ms = s.converged_ms.map(|c| c.saturating_sub(s.last_heal_ms));
        f.served_ms = s.served_ms.map(|c| c.saturating_sub(s.last_heal_ms));
    }
}

fn written(h: &History, key: &str, digest: &Option<String>) -> bool {
    h.puts
        .get(key)
        .is_some_and(|ps| ps.iter().any(|p| p.digest == *digest))
}

/// Check 2 on the reads during the run.
fn reads_written(v: &mut Vec<Violation>, h: &History) {
    for op in h
        .ops
        .iter()
        .filter(|o| o.op == OpKind::Get && o.status == 200)
    {
        let key = op.key.as_deref().unwrap_or_default();
        if !written(h, key, &op.digest) {
            v.push(Violation {
                check: Check::NotWritten,
                key: Some(key.into()),
                node: Some(op.node),
                evidence: format!(
                    "{} returned bytes no PUT of this key sent ({} PUTs of it)",
                    describe(op),
                    h.puts.get(key).map_or(0, Vec::len)
                ),
            });
        }
    }
}

/// Check 2 on the final reads.
fn final_reads_written(v: &mut Vec<Violation>, h: &History) {
    for r in h.records {
        if let Record::FinalGet(g) = r
            && g.status == 200
            && !written(h, &g.key, &g.digest)
        {
            v.push(Violation {
                check: Check::NotWritten,
                key: Some(g.key.clone()),
                node: Some(g.node),
                evidence: format!(
                    "the final read returned bytes no PUT of this key sent (digest {})",
                    short(&g.digest)
                ),
            });
        }
    }
}

/// Check 3 during the run: one acknowledged body per key outside fault windows, and no
/// read of another body once a key's only acknowledged body is known.
fn check_agreement_during_run(v: &mut Vec<Violation>, h: &History) {
    let (ops, puts, windows) = (&h.ops, &h.puts, &h.windows);
    let degraded =
        |from: u64, to: u64| windows.iter().any(|w| w.degrades() && w.overlaps(from, to));
    let mut gets: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.op == OpKind::Get && o.status == 200)
    {
        if let Some(key) = &op.key {
            gets.entry(key).or_default().push(op);
        }
    }
    for (key, ps) in puts {
        let acked: Vec<&&Op> = ps.iter().filter(|p| p.outcome == Outcome::Ok).collect();
        let healthy: Vec<&&Op> = acked
            .iter()
            .copied()
            .filter(|p| !degraded(p.start_ms, p.end_ms))
            .collect();
        let bodies: BTreeSet<&Option<String>> = healthy.iter().map(|p| &p.digest).collect();
        if bodies.len() > 1 {
            v.push(Violation {
                check: Check::Agreement,
                key: Some((*key).into()),
                node: None,
                evidence: format!(
                    "{} different bodies acknowledged outside fault windows: {}",
                    bodies.len(),
                    healthy
                        .iter()
                        .map(|p| describe(p))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
        let acked_bodies: BTreeSet<&Option<String>> = acked.iter().map(|p| &p.digest).collect();
        if acked_bodies.len() != 1 {
            continue;
        }
        let body = acked_bodies.into_iter().next().unwrap();
        // A PUT without an answer may have stored its bytes too: those reads are fine.
        let maybe: BTreeSet<&Option<String>> = ps
            .iter()
            .filter(|p| p.outcome == Outcome::Unknown)
            .map(|p| &p.digest)
            .collect();
        let acked_at = acked.iter().map(|p| p.end_ms).min().unwrap_or(0);
        for g in gets.get(key).into_iter().flatten() {
            if g.digest != *body
                && !maybe.contains(&g.digest)
                && g.start_ms >= acked_at
                && !degraded(g.start_ms, g.end_ms)
            {
                v.push(Violation {
                    check: Check::Agreement,
                    key: Some((*key).into()),
                    node: Some(g.node),
                    evidence: format!(
                        "{} returned other bytes than the one acknowledged body (acknowledged at {acked_at} ms, digest {}), outside fault windows",
                        describe(g),
                        short(body)
                    ),
                });
            }
        }
    }
}

/// Whether a process fault (kill, pause, disk loss, removal) on `node` overlaps.
fn process_down(windows: &[Window], node: u64, from: u64, to: u64) -> bool {
    windows.iter().any(|w| {
        w.kind.is_none_or(FaultKind::stops_process)
            && w.nodes.contains(&node)
            && w.reaches(from, to)
    })
}

/// Check 4.
fn check_availability(v: &mut Vec<Violation>, h: &History) {
    let (windows, records) = (&h.windows, h.records);
    for op in &h.ops {
        // Only a wait past the bound counts (token probes give up sooner, on purpose).
        let waited = op.timeout_ms.unwrap_or(op.end_ms - op.start_ms);
        let timed_out =
            op.status == 0 && op.error.as_deref() == Some("timeout") && waited >= ANSWER_BOUND_MS;
        let up = !process_down(windows, op.node, op.start_ms, op.end_ms);
        let bad = match op.op {
            OpKind::Get => op.status >= 500 || (timed_out && up),
            OpKind::Put => {
                (op.status != 0 && !PUT_DOCUMENTED.contains(&op.status)) || (timed_out && up)
            }
            // The admin API: 503 (no leader) is its documented refusal.
            OpKind::TokenCreate | OpKind::TokenRevoke => op.status >= 500 && op.status != 503,
        };
        if bad {
            let why = if op.status == 0 {
                format!(
                    "no answer within {} s from a node that was neither killed nor paused",
                    ANSWER_BOUND_MS / 1000
                )
            } else {
                format!("answered {}", op.status)
            };
            v.push(Violation {
                check: Check::Availability,
                key: op.key.clone(),
                node: Some(op.node),
                evidence: format!("{}: {why}", describe(op)),
            });
        }
    }
    for r in records {
        if let Record::Nemesis(e) = r
            && e.phase == Phase::Start
            && (e.kind == CRASH || e.kind == PANIC)
        {
            v.push(Violation {
                check: Check::Availability,
                key: None,
                node: e.nodes.first().copied(),
                evidence: format!("at {} ms: {}", e.at_ms, e.detail),
            });
        }
    }
}

/// Check 4 on the final reads.
fn final_reads_answered(v: &mut Vec<Violation>, h: &History) {
    for r in h.records {
        if let Record::FinalGet(g) = r
            && g.status >= 500
        {
            v.push(Violation {
                check: Check::Availability,
                key: Some(g.key.clone()),
                node: Some(g.node),
                evidence: format!("the final read answered {}", g.status),
            });
        }
    }
}

/// The leader at `at`: the highest-term leader reported in the 5 s before it.
fn leader_at(samples: &[&StatusSample], at: u64) -> Option<u64> {
    samples
        .iter()
        .filter(|s| s.at_ms <= at && s.at_ms + 5_000 >= at && s.leader.is_some())
        .max_by_key(|s| (s.term, s.at_ms))
        .and_then(|s| s.leader)
}

/// Check 5 during the run: one leader per term; revocations reach every node in
/// contact with the leader within the bound.
fn check_control_plane(v: &mut Vec<Violation>, h: &History) {
    let (ops, samples, windows, bound_ms) = (&h.ops, &h.samples, &h.windows, h.bound_ms);
    let mut leaders: BTreeMap<u64, BTreeMap<u64, &StatusSample>> = BTreeMap::new();
    for s in samples {
        if let Some(l) = s.leader {
            leaders.entry(s.term).or_default().entry(l).or_insert(s);
        }
    }
    for (term, by_leader) in &leaders {
        if by_leader.len() > 1 {
            v.push(Violation {
                check: Check::ControlPlane,
                key: None,
                node: None,
                evidence: format!(
                    "{} leaders in term {term}: {}",
                    by_leader.len(),
                    by_leader
                        .iter()
                        .map(|(l, s)| format!("node {} at {} ms saw leader {l}", s.node, s.at_ms))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
    }
    for revoke in ops
        .iter()
        .filter(|o| o.op == OpKind::TokenRevoke && o.outcome == Outcome::Ok)
    {
        let at = revoke.end_ms;
        let Some(leader) = leader_at(samples, at) else {
            continue;
        };
        for use_ in ops.iter().filter(|o| {
            matches!(o.op, OpKind::Get | OpKind::Put)
                && o.token == revoke.token
                && o.start_ms >= at + bound_ms
                && TOKEN_ACCEPTED.contains(&o.status)
        }) {
            let cut_off = windows
                .iter()
                .any(|w| w.reaches(at, use_.start_ms) && w.separates(use_.node, leader));
            if !cut_off {
                v.push(Violation {
                    check: Check::ControlPlane,
                    key: use_.key.clone(),
                    node: Some(use_.node),
                    evidence: format!(
                        "token {} revoked at {at} ms ({}), still accepted {} ms later by a node in contact with leader {leader}: {}",
                        revoke.token,
                        describe(revoke),
                        use_.start_ms - at,
                        describe(use_)
                    ),
                });
            }
        }
    }
}

/// Checks 1 and 3 on the state after the settle.
fn check_final_state(v: &mut Vec<Violation>, h: &History, settle: &Settle) {
    let (records, puts, excused) = (h.records, &h.puts, &h.excused);
    let members: BTreeSet<u64> = settle.members.iter().copied().collect();
    let mut finals: HashMap<(&str, u64), (u16, &Option<String>)> = HashMap::new();
    let mut copies: HashMap<&str, Vec<(u64, &str)>> = HashMap::new();
    for r in records {
        match r {
            Record::FinalGet(g) => {
                finals.insert((&g.key, g.node), (g.status, &g.digest));
            }
            Record::DiskCopy(c) if members.contains(&c.node) => {
                copies.entry(&c.key).or_default().push((c.node, &c.digest));
            }
            _ => {}
        }
    }
    for (key, ps) in puts {
        let acked: Vec<&&Op> = ps.iter().filter(|p| p.outcome == Outcome::Ok).collect();
        let served: BTreeMap<u64, &Option<String>> = members
            .iter()
            .filter_map(|m| match finals.get(&(*key, *m)) {
                Some((200, d)) => Some((*m, *d)),
                _ => None,
            })
            .collect();
        let bodies: BTreeSet<&Option<String>> = served.values().copied().collect();
        if bodies.len() > 1 {
            v.push(Violation {
                check: Check::Agreement,
                key: Some((*key).into()),
                node: None,
                evidence: format!(
                    "after the settle the members serve {} different bodies: {}",
                    bodies.len(),
                    served
                        .iter()
                        .map(|(n, d)| format!("node {n}: {}", short(d)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        if acked.is_empty() || excused.contains(key) {
            continue;
        }
        for m in &members {
            let answer = finals.get(&(*key, *m));
            if !matches!(answer, Some((200, _))) {
                v.push(Violation {
                    check: Check::AcknowledgedLost,
                    key: Some((*key).into()),
                    node: Some(*m),
                    evidence: format!(
                        "acknowledged by {}; after the settle node {m} answered {}",
                        describe(acked[0]),
                        answer.map_or("nothing (not read)".to_owned(), |(s, _)| s.to_string())
                    ),
                });
            }
        }
        // The bytes served must be those of a PUT that may have succeeded.
        let possible: BTreeSet<&Option<String>> = ps
            .iter()
            .filter(|p| p.outcome != Outcome::Fail)
            .map(|p| &p.digest)
            .collect();
        for body in &bodies {
            if !possible.contains(body)
                && let Some(refused) = ps.iter().find(|p| p.digest == **body)
            {
                v.push(Violation {
                    check: Check::AcknowledgedLost,
                    key: Some((*key).into()),
                    node: None,
                    evidence: format!(
                        "acknowledged by {}, but after the settle the key holds the bytes of a refused {}",
                        describe(acked[0]),
                        describe(refused)
                    ),
                });
            }
        }
        if bodies.len() == 1 {
            let body = bodies.iter().next().unwrap().as_deref().unwrap_or_default();
            let held = copies.get(key).map(Vec::as_slice).unwrap_or_default();
            let good: BTreeSet<u64> = held
                .iter()
                .filter(|(_, d)| *d == body)
                .map(|(n, _)| *n)
                .collect();
            if good.len() < settle.replication_factor {
                v.push(Violation {
                    check: Check::Agreement,
                    key: Some((*key).into()),
                    node: None,
                    evidence: format!(
                        "{} durable copies on the members' disks after the settle (nodes {:?}), R = {}",
                        good.len(),
                        good,
                        settle.replication_factor
                    ),
                });
            }
            for (n, d) in held.iter().filter(|(_, d)| *d != body) {
                v.push(Violation {
                    check: Check::Agreement,
                    key: Some((*key).into()),
                    node: Some(*n),
                    evidence: format!(
                        "node {n} holds other bytes on disk ({}) than every member serves ({})",
                        &d[..d.len().min(12)],
                        &body[..body.len().min(12)]
                    ),
                });
            }
        }
    }
}

/// Check 5 after the settle: every member's token table is the leader's.
fn check_final_tokens(v: &mut Vec<Violation>, h: &History, settle: &Settle) {
    let records = h.records;
    let tables: BTreeMap<u64, &Option<Vec<String>>> = records
        .iter()
        .filter_map(|r| match r {
            Record::FinalTokens(t) => Some((t.node, &t.tokens)),
            _ => None,
        })
        .collect();
    let Some(leader) = settle.leader else {
        v.push(Violation {
            check: Check::ControlPlane,
            key: None,
            node: None,
            evidence: format!(
                "no leader all members agree on after the settle ({})",
                settle.note
            ),
        });
        return;
    };
    let Some(Some(reference)) = tables.get(&leader) else {
        v.push(Violation {
            check: Check::ControlPlane,
            key: None,
            node: Some(leader),
            evidence: "the leader did not list its tokens after the settle".into(),
        });
        return;
    };
    let reference: BTreeSet<&String> = reference.iter().collect();
    for m in &settle.members {
        match tables.get(m) {
            Some(Some(table)) => {
                let table: BTreeSet<&String> = table.iter().collect();
                if table != reference {
                    let missing: Vec<_> = reference.difference(&table).collect();
                    let extra: Vec<_> = table.difference(&reference).collect();
                    v.push(Violation {
                        check: Check::ControlPlane,
                        key: None,
                        node: Some(*m),
                        evidence: format!(
                            "token table differs from leader {leader}'s after the settle: missing {missing:?}, extra {extra:?}"
                        ),
                    });
                }
            }
            _ => v.push(Violation {
                check: Check::ControlPlane,
                key: None,
                node: Some(*m),
                evidence: "did not list its tokens after the settle".into(),
            }),
        }
    }
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
