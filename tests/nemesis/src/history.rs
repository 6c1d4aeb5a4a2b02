//! The history of a run: one JSON object per line, written as things happen, so that any
//! checker (ours in `checker.rs`, or another) can read it. Times are milliseconds since
//! the run's start (`Run::started_unix_ms` gives the wall clock of that instant).

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Run(Run),
    Op(Op),
    Nemesis(FaultEvent),
    Status(StatusSample),
    FinalGet(FinalGet),
    DiskCopy(DiskCopy),
    FinalTokens(FinalTokens),
    Settle(Settle),
}

/// The first line: what was run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub seed: u64,
    pub nodes: usize,
    pub started_unix_ms: u64,
    /// After a fault ends, how long the cluster is still counted as degraded.
    pub grace_ms: u64,
    /// How soon a revocation must reach every node in contact with the leader.
    pub revocation_bound_ms: u64,
    pub binary: String,
    /// The `nxcache serve` arguments shared by every node (see `flags.rs`).
    pub serve_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Put,
    Get,
    TokenCreate,
    TokenRevoke,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::Get => "get",
            OpKind::TokenCreate => "token_create",
            OpKind::TokenRevoke => "token_revoke",
        }
    }
}

/// Whether an operation took effect, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered with success (PUT 200/202, GET 200 or 404, token 201/204).
    Ok,
    /// Answered with a refusal or an error: it did not take effect as asked.
    Fail,
    /// No answer (timeout, connection cut): it may or may not have taken effect.
    Unknown,
}

/// A client operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub id: u64,
    pub op: OpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The node the request was sent to.
    pub node: u64,
    /// The name of the token used (not its secret).
    pub token: String,
    /// Body size: sent (PUT) or received (GET 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// BLAKE3 of the body: sent (PUT) or received (GET 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub start_ms: u64,
    pub end_ms: u64,
    /// HTTP status; 0 when there was no answer.
    pub status: u16,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The client's timeout for this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Conflicting writers of one key share a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Start,
    End,
}

/// A fault applied (`start`) or healed (`end`); both carry the fault's id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEvent {
    pub id: u64,
    pub kind: String,
    pub phase: Phase,
    pub at_ms: u64,
    /// Nodes the fault acts on (killed, paused, cut off, slowed, ...).
    #[serde(default)]
    pub nodes: Vec<u64>,
    /// Directed links affected: `[from, to]` (for a partition: packets from -> to dropped).
    #[serde(default)]
    pub edges: Vec<(u64, u64)>,
    #[serde(default)]
    pub detail: String,
    /// Keys held by no other member's disk when this node's disk was lost or the node
    /// removed: their loss is excused (invariant 1 holds only while a holder keeps its
    /// disk).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sole_keys: Vec<String>,
}

/// A node's view of the control plane, polled during the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusSample {
    pub node: u64,
    pub at_ms: u64,
    pub term: u64,
    pub leader: Option<u64>,
    pub members: Vec<u64>,
    pub ring_epoch: u64,
    pub applied_index: u64,
}

/// A read of one key from one node after the settle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalGet {
    pub node: u64,
    pub key: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A blob file on a member's disk after the settle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskCopy {
    pub node: u64,
    pub key: String,
    pub digest: String,
    pub size: u64,
}

/// A node's token table after the settle: `name scope created_ms` per token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalTokens {
    pub node: u64,
    /// None when the node did not answer.
    pub tokens: Option<Vec<String>>,
}

/// The end of the run: when the last fault was healed and when every check of the final
/// state first held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settle {
    pub last_heal_ms: u64,
    pub converged_ms: Option<u64>,
    /// When every acknowledged key was first served by every member (check 1 held),
    /// even if agreement (check 3) never came.
    #[serde(default)]
    pub served_ms: Option<u64>,
    /// Members at the end (the nodes every acknowledged key must be served by).
    pub members: Vec<u64>,
    pub replication_factor: usize,
    pub leader: Option<u64>,
    #[serde(default)]
    pub note: String,
}

/// Appends records to the history file from any task.
#[derive(Clone)]
pub struct Recorder {
    /// `None` closes the file.
    tx: mpsc::UnboundedSender<Option<Record>>,
    start: Instant,
    /// Everything recorded, for the checker during the settle.
    kept: Arc<Mutex<Vec<Record>>>,
}

impl Recorder {
    /// Starts the writer task; `finish` the returned handle to flush the file.
    pub fn create(path: &Path) -> anyhow::Result<(Recorder, RecorderTask)> {
        let file = std::fs::File::create(path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Option<Record>>();
        let task = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut out = std::io::BufWriter::new(file);
            while let Some(Some(record)) = rx.blocking_recv() {
                serde_json::to_writer(&mut out, &record)?;
                out.write_all(b"\n")?;
                if rx.is_empty() {
                    out.flush()?;
                }
            }
            out.flush()?;
            Ok(())
        });
        Ok((
            Recorder {
                tx,
                start: Instant::now(),
                kept: Arc::default(),
            },
            RecorderTask(task),
        ))
    }

    pub fn record(&self, record: Record) {
        self.kept.lock().unwrap().push(record.clone());
        // A send error means the writer failed or was closed: `RecorderTask::finish`
        // reports the first, and nothing is recorded after the second.
        let _ = self.tx.send(Some(record));
    }

    /// Ends the file after what was recorded so far (other clones may still exist).
    pub fn close(&self) {
        let _ = self.tx.send(None);
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Vec<Record> {
        self.kept.lock().unwrap().clone()
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

pub struct RecorderTask(tokio::task::JoinHandle<anyhow::Result<()>>);

impl RecorderTask {
    /// Waits until every record sent before `Recorder::close` is on disk.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.0.await?
    }
}

/// Reads a history file.
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file = std::fs::File::open(path)?;
    let mut records = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        records.push(record);
    }
    Ok(records)
}

/// Hex BLAKE3 of a body.
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
