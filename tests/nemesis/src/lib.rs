//! The nemesis suite of nxcache (issue 14): real nodes, each on its own test host (a
//! network namespace), a seeded random schedule of faults, a concurrent workload whose
//! every operation is recorded, and a checker that reads the history and the final state
//! and names every violation. See docs/reliability.md.

pub mod checker;
pub mod cluster;
pub mod faults;
pub mod flags;
pub mod history;
pub mod hosts;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod settle;
pub mod workload;
