//! The checker on small crafted histories: each check passes a clean history and flags
//! its violation.

use super::*;
use crate::history::{
    DiskCopy, FaultEvent, FinalGet, FinalTokens, Op, OpKind, Outcome, Phase, Record, Run, Settle,
    StatusSample,
};

const A: &str = "aaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccc";

fn run() -> Record {
    Record::Run(Run {
        seed: 1,
        nodes: 3,
        started_unix_ms: 0,
        grace_ms: 1_000,
        revocation_bound_ms: 1_000,
        binary: "nxcache".into(),
        serve_args: Vec::new(),
    })
}

fn op(
    id: u64,
    kind: OpKind,
    key: &str,
    node: u64,
    digest: Option<&str>,
    span: (u64, u64),
    status: u16,
) -> Op {
    Op {
        id,
        op: kind,
        key: (!key.is_empty()).then(|| key.to_owned()),
        node,
        token: "read-write-1".into(),
        size: digest.map(|_| 10),
        digest: digest.map(str::to_owned),
        start_ms: span.0,
        end_ms: span.1,
        status,
        outcome: match (kind, status) {
            (_, 0) => Outcome::Unknown,
            (OpKind::Put, 200) | (OpKind::Get, 200 | 404) | (_, 201 | 204) => Outcome::Ok,
            _ => Outcome::Fail,
        },
        error: (status == 0).then(|| "timeout".to_owned()),
        timeout_ms: None,
        group: None,
    }
}

fn put(id: u64, key: &str, node: u64, digest: &str, span: (u64, u64), status: u16) -> Record {
    Record::Op(op(id, OpKind::Put, key, node, Some(digest), span, status))
}

fn get(
    id: u64,
    key: &str,
    node: u64,
    digest: Option<&str>,
    span: (u64, u64),
    status: u16,
) -> Record {
    Record::Op(op(id, OpKind::Get, key, node, digest, span, status))
}

fn fault(
    id: u64,
    kind: &str,
    phase: Phase,
    at: u64,
    nodes: &[u64],
    edges: &[(u64, u64)],
) -> Record {
    Record::Nemesis(FaultEvent {
        id,
        kind: kind.into(),
        phase,
        at_ms: at,
        nodes: nodes.to_vec(),
        edges: edges.to_vec(),
        detail: String::new(),
        sole_keys: Vec::new(),
    })
}

fn status(node: u64, at: u64, term: u64, leader: u64) -> Record {
    Record::Status(StatusSample {
        node,
        at_ms: at,
        term,
        leader: Some(leader),
        members: vec![1, 2, 3],
        ring_epoch: 3,
        applied_index: 10,
    })
}

/// The final state: every member serves `bodies` (key, digest) and holds 3 copies;
/// every member has the same token table.
fn final_state(bodies: &[(&str, &str)]) -> Vec<Record> {
    let mut out = Vec::new();
    for node in 1..=3 {
        for (key, digest) in bodies {
            out.push(Record::FinalGet(FinalGet {
                node,
                key: (*key).into(),
                status: 200,
                digest: Some((*digest).into()),
            }));
            out.push(Record::DiskCopy(DiskCopy {
                node,
                key: (*key).into(),
                digest: (*digest).into(),
                size: 10,
            }));
        }
        out.push(Record::FinalTokens(FinalTokens {
            node,
            tokens: Some(vec!["read-write-1 read-write 1".into()]),
        }));
    }
    out.push(Record::Settle(Settle {
        last_heal_ms: 10_000,
        converged_ms: Some(12_000),
        served_ms: Some(11_000),
        members: vec![1, 2, 3],
        replication_factor: 3,
        leader: Some(1),
        note: String::new(),
    }));
    out
}

/// A history where everything held: writes, reads, a conflict resolved by 409, a
/// partition, a revocation refused in time, one leader per term.
fn clean() -> Vec<Record> {
    let mut h = vec![
        run(),
        status(1, 100, 1, 1),
        status(2, 100, 1, 1),
        put(1, "k1", 1, A, (1_000, 1_100), 200),
        get(2, "k1", 2, Some(A), (1_200, 1_300), 200),
        get(3, "k0", 3, None, (1_200, 1_300), 404),
        // Conflicting writers: one wins, the other gets 409.
        put(4, "k2", 1, B, (2_000, 2_100), 200),
        put(5, "k2", 2, C, (2_000, 2_150), 409),
        get(6, "k2", 3, Some(B), (2_200, 2_300), 200),
        // A partition: a third writer's different bytes are acknowledged inside it.
        fault(
            1,
            "partition-halves",
            Phase::Start,
            3_000,
            &[1, 2, 3],
            &[(1, 2), (2, 1)],
        ),
        put(7, "k3", 1, A, (3_100, 3_200), 200),
        put(8, "k3", 2, B, (3_100, 3_200), 200),
        fault(
            1,
            "partition-halves",
            Phase::End,
            5_000,
            &[1, 2, 3],
            &[(1, 2), (2, 1)],
        ),
        status(3, 6_000, 2, 2),
        // A token created, revoked, then refused everywhere.
        Record::Op(op(9, OpKind::TokenCreate, "", 1, None, (6_000, 6_100), 201)),
        Record::Op(op(
            10,
            OpKind::TokenRevoke,
            "",
            2,
            None,
            (7_000, 7_100),
            204,
        )),
    ];
    for (i, node) in [1, 2, 3].into_iter().enumerate() {
        let mut probe = op(
            11 + i as u64,
            OpKind::Get,
            "k1",
            node,
            None,
            (8_500, 8_600),
            401,
        );
        probe.token = "read-write-1".into();
        h.push(Record::Op(probe));
    }
    // Fix the token names: token ops name the created token.
    for r in h.iter_mut() {
        if let Record::Op(o) = r
            && matches!(o.op, OpKind::TokenCreate | OpKind::TokenRevoke)
        {
            o.token = "nem-1".into();
        }
        if let Record::Op(o) = r
            && o.status == 401
        {
            o.token = "nem-1".into();
        }
    }
    h.extend(final_state(&[("k1", A), ("k2", B), ("k3", A)]));
    h
}

fn violations(h: &[Record], check_: Check) -> Vec<Violation> {
    check(h)
        .violations
        .into_iter()
        .filter(|v| v.check == check_)
        .collect()
}

#[test]
fn a_clean_history_passes_every_check() {
    let h = clean();
    let report = check(&h);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(check_final(&h).is_empty());
    assert_eq!(report.figures.keys_acknowledged, 3);
    assert_eq!(report.figures.faults.get("partition-halves"), Some(&1));
    assert_eq!(report.figures.convergence_ms, Some(2_000));
    assert_eq!(report.figures.ops.get("put 409"), Some(&1));
}

#[test]
fn check_1_flags_an_acknowledged_key_a_member_does_not_serve() {
    let mut h = clean();
    for r in h.iter_mut() {
        if let Record::FinalGet(g) = r
            && g.key == "k1"
            && g.node == 3
        {
            g.status = 404;
            g.digest = None;
        }
    }
    let v = violations(&h, Check::AcknowledgedLost);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!((v[0].key.as_deref(), v[0].node), (Some("k1"), Some(3)));
    assert!(v[0].evidence.contains("answered 404"), "{}", v[0].evidence);
    assert!(!check_final(&h).is_empty());

    // Excused when its only holder lost its disk.
    h.push(Record::Nemesis(FaultEvent {
        id: 9,
        kind: "disk-loss".into(),
        phase: Phase::Start,
        at_ms: 9_000,
        nodes: vec![1],
        edges: Vec::new(),
        detail: String::new(),
        sole_keys: vec!["k1".into()],
    }));
    assert!(violations(&h, Check::AcknowledgedLost).is_empty());
}

#[test]
fn check_1_flags_acknowledged_bytes_replaced_by_a_refused_writers() {
    let mut h = clean();
    for r in h.iter_mut() {
        match r {
            Record::FinalGet(g) if g.key == "k2" => g.digest = Some(C.into()),
            Record::DiskCopy(c) if c.key == "k2" => c.digest = C.into(),
            _ => {}
        }
    }
    let v = violations(&h, Check::AcknowledgedLost);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(v[0].evidence.contains("refused"), "{}", v[0].evidence);
}

#[test]
fn check_2_flags_a_read_of_bytes_nobody_wrote() {
    let mut h = clean();
    h.push(get(50, "k1", 2, Some("ffffffffffff"), (9_000, 9_100), 200));
    h.push(get(51, "k9", 2, Some(A), (9_000, 9_100), 200));
    let v = violations(&h, Check::NotWritten);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert_eq!(v[1].key.as_deref(), Some("k9"));
}

#[test]
fn check_3_flags_two_bodies_acknowledged_outside_fault_windows_only() {
    let mut h = clean();
    h.push(put(60, "k4", 1, A, (20_000, 20_100), 200));
    h.push(put(61, "k4", 2, B, (20_000, 20_100), 200));
    let v = violations(&h, Check::Agreement);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].key.as_deref(), Some("k4"));
    assert!(
        v[0].evidence.contains("2 different bodies"),
        "{}",
        v[0].evidence
    );
    // k3 had the same shape inside the partition (and its grace): not flagged.
    assert!(v.iter().all(|v| v.key.as_deref() != Some("k3")));
}

#[test]
fn check_3_flags_a_read_of_another_body_after_the_only_acknowledged_one() {
    let mut h = clean();
    // k2's loser (409) served later, outside any fault.
    h.push(get(70, "k2", 1, Some(C), (30_000, 30_100), 200));
    let v = violations(&h, Check::Agreement);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!((v[0].key.as_deref(), v[0].node), (Some("k2"), Some(1)));
}

#[test]
fn check_3_flags_members_serving_different_bodies_and_missing_copies() {
    let mut h = clean();
    for r in h.iter_mut() {
        if let Record::FinalGet(g) = r
            && g.key == "k3"
            && g.node == 2
        {
            g.digest = Some(B.into());
        }
    }
    let v = violations(&h, Check::Agreement);
    assert!(
        v.iter()
            .any(|v| v.key.as_deref() == Some("k3") && v.evidence.contains("2 different bodies")),
        "{v:#?}"
    );

    let mut h = clean();
    h.retain(|r| !matches!(r, Record::DiskCopy(c) if c.key == "k1" && c.node == 2));
    let v = violations(&h, Check::Agreement);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(
        v[0].evidence.contains("2 durable copies"),
        "{}",
        v[0].evidence
    );

    let mut h = clean();
    for r in h.iter_mut() {
        if let Record::DiskCopy(c) = r
            && c.key == "k1"
            && c.node == 3
        {
            c.digest = B.into();
        }
    }
    let v = violations(&h, Check::Agreement);
    assert!(
        v.iter()
            .any(|v| v.node == Some(3) && v.evidence.contains("other bytes on disk")),
        "{v:#?}"
    );
}

#[test]
fn check_4_flags_5xx_gets_undocumented_put_errors_hangs_and_crashes() {
    let mut h = clean();
    h.push(get(80, "k1", 1, None, (40_000, 40_100), 500));
    h.push(put(81, "k5", 1, A, (40_000, 40_100), 500));
    h.push(put(82, "k6", 1, A, (40_000, 40_100), 507));
    h.push(put(83, "k7", 1, A, (40_000, 40_100), 503));
    // No answer from a node that was up: flagged; from a killed one: not.
    h.push(get(84, "k1", 2, None, (41_000, 71_000), 0));
    h.push(fault(5, "kill", Phase::Start, 80_000, &[3], &[]));
    h.push(get(85, "k1", 3, None, (80_100, 110_000), 0));
    h.push(fault(5, "kill", Phase::End, 90_000, &[3], &[]));
    // A probe that gives up after 5 s is no evidence of a hang.
    let mut probe = op(86, OpKind::Get, "k1", 2, None, (100_000, 105_000), 0);
    probe.timeout_ms = Some(5_000);
    h.push(Record::Op(probe));
    h.push(Record::Nemesis(FaultEvent {
        id: 1_000_001,
        kind: CRASH.into(),
        phase: Phase::Start,
        at_ms: 120_000,
        nodes: vec![2],
        edges: Vec::new(),
        detail: "node 2 exited on its own: signal 6".into(),
        sole_keys: Vec::new(),
    }));
    let report = check(&h);
    assert_eq!(report.figures.findings.get(CRASH), Some(&1));
    assert_eq!(
        report.figures.faults.get(CRASH),
        None,
        "a crash is no injected fault"
    );
    let v = violations(&h, Check::Availability);
    let ids: Vec<String> = v.iter().map(|v| v.evidence.clone()).collect();
    assert_eq!(v.len(), 4, "{ids:#?}");
    assert!(ids[0].contains("#80") && ids[1].contains("#81") && ids[2].contains("#84"));
    assert!(ids[3].contains("exited on its own"));
}

#[test]
fn check_5_flags_two_leaders_in_one_term() {
    let mut h = clean();
    h.push(status(3, 50_000, 1, 3));
    let v = violations(&h, Check::ControlPlane);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(
        v[0].evidence.contains("2 leaders in term 1"),
        "{}",
        v[0].evidence
    );
}

#[test]
fn check_5_flags_a_token_table_that_differs_from_the_leaders() {
    let mut h = clean();
    for r in h.iter_mut() {
        if let Record::FinalTokens(t) = r
            && t.node == 2
        {
            t.tokens = Some(vec![
                "read-write-1 read-write 1".into(),
                "nem-1 read-write 5".into(),
            ]);
        }
    }
    let v = violations(&h, Check::ControlPlane);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].node, Some(2));
    assert!(v[0].evidence.contains("nem-1"), "{}", v[0].evidence);
}

#[test]
fn check_5_flags_a_revoked_token_accepted_past_the_bound_by_a_node_in_contact() {
    let accepted = |node: u64, at: u64| {
        let mut o = op(90, OpKind::Get, "k1", node, Some(A), (at, at + 50), 200);
        o.token = "nem-1".into();
        Record::Op(o)
    };
    // Revoked at 7 100 ms; leader 2 (the latest status samples).
    let mut h = clean();
    h.push(accepted(3, 7_500)); // within the bound
    assert!(violations(&h, Check::ControlPlane).is_empty());
    h.push(accepted(3, 9_000)); // 1.9 s later
    let v = violations(&h, Check::ControlPlane);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].node, Some(3));

    // Node 3 cut off from the leader (node 2 since term 2) meanwhile: it cannot know.
    let mut h = clean();
    h.push(fault(
        7,
        "partition-halves",
        Phase::Start,
        6_900,
        &[2, 3],
        &[(2, 3), (3, 2)],
    ));
    h.push(accepted(3, 9_000));
    h.push(fault(
        7,
        "partition-halves",
        Phase::End,
        20_000,
        &[2, 3],
        &[(2, 3), (3, 2)],
    ));
    assert!(violations(&h, Check::ControlPlane).is_empty());
}

#[test]
fn the_history_format_round_trips_through_a_file() {
    let h = clean();
    let dir = std::env::temp_dir().join(format!("nemesis-history-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("history.jsonl");
    let text: String = h
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    let back = crate::history::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(back, h);
    // Lines are self-describing for other checkers.
    let line = serde_json::to_string(&h[3]).unwrap();
    assert!(
        line.starts_with(r#"{"type":"op","id":1,"op":"put","key":"k1""#),
        "{line}"
    );
}
