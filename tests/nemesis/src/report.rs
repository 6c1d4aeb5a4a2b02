//! The human-readable report of a checked history.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::checker::{Check, Report};

const CHECKS: [Check; 5] = [
    Check::AcknowledgedLost,
    Check::NotWritten,
    Check::Agreement,
    Check::Availability,
    Check::ControlPlane,
];

/// The report: figures, one line per check, then the violations (at most `per_check`
/// of each check; all when None).
pub fn render(report: &Report, per_check: Option<usize>) -> String {
    let f = &report.figures;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "operations: {} (run {:.1} s)",
        f.ops.values().sum::<u64>(),
        f.run_ms as f64 / 1000.0
    );
    let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (what, n) in &f.ops {
        let (op, rest) = what.split_once(' ').unwrap_or((what, ""));
        by_op.entry(op).or_default().push(format!("{rest}: {n}"));
    }
    for (op, parts) in by_op {
        let _ = writeln!(out, "  {op:<13} {}", parts.join(", "));
    }
    let _ = writeln!(
        out,
        "faults injected: {}",
        if f.faults.is_empty() {
            "none".to_owned()
        } else {
            f.faults
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if !f.findings.is_empty() {
        let _ = writeln!(
            out,
            "nodes that crashed or panicked: {}",
            f.findings
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        out,
        "keys: {} written, {} acknowledged, {} excused (their only holders lost their disk or left)",
        f.keys_written, f.keys_acknowledged, f.keys_excused
    );
    let _ = writeln!(out, "control-plane samples: {}", f.status_samples);
    let _ = writeln!(
        out,
        "from the last heal to every acknowledged key served by every member: {}",
        f.served_ms
            .map_or("never (within the settle time)".to_owned(), |ms| format!(
                "{:.1} s",
                ms as f64 / 1000.0
            ))
    );
    let _ = writeln!(
        out,
        "from the last heal to full agreement: {}",
        f.convergence_ms
            .map_or("never (within the settle time)".to_owned(), |ms| format!(
                "{:.1} s",
                ms as f64 / 1000.0
            ))
    );
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(out, "checks:");
    for c in CHECKS {
        let n = report.count(c);
        let _ = writeln!(
            out,
            "  {} {:<38} {}",
            c as u8,
            c.title(),
            if n == 0 {
                "held".to_owned()
            } else {
                format!("{n} violations")
            }
        );
    }
    if !report.violations.is_empty() {
        let _ = writeln!(out, "violations:");
        for c in CHECKS {
            let all: Vec<_> = report.violations.iter().filter(|v| v.check == c).collect();
            let shown = per_check.unwrap_or(all.len()).min(all.len());
            for v in &all[..shown] {
                let _ = writeln!(out, "  {v}");
            }
            if shown < all.len() {
                let _ = writeln!(
                    out,
                    "  ... and {} more of check {} (see report.txt)",
                    all.len() - shown,
                    c as u8
                );
            }
        }
    }
    out
}
