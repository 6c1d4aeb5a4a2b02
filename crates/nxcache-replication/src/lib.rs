//! The data plane: where artifacts live in a cluster and how they get there.
//!
//! - [`DataPlane`]: the coordinator every HTTP request goes through. Writes stream to
//!   the key's owners in parallel and are acknowledged once a quorum holds their bytes
//!   (first write wins: a writer whose bytes lose to another body's steps back with 409;
//!   stand-ins and hints when owners are down, the degraded policy when too few nodes
//!   answer); reads come from the best replica, verified, with bounded read repair.
//! - Copies carry the version of their write; a replica is deleted only by naming it.
//!   Owners that hold different bodies converge to one by a deterministic rule
//!   ([`winner`]).
//! - Background workers ([`DataPlane::spawn_workers`]): hinted hand-off (fair across
//!   owners), rebalancing after ring changes, anti-entropy by range digests kept up to
//!   date by the store, scrub, owners' LRU order and evictions kept in step.
//! - [`BlobService`] / [`BlobClient`]: the gRPC transfer between nodes, streaming with
//!   bounded memory; every message that grows with the data is sent in bounded batches.

mod agreement;
mod anti_entropy;
mod client;
mod copies;
mod get;
mod handoff;
mod hints;
mod metrics;
mod owner_sync;
mod pages;
mod peers;
mod plane;
mod put;
mod rebalance;
mod scrub;
mod service;
mod topology;
mod workers;

pub use agreement::winner;
pub use anti_entropy::AntiEntropyTotals;
pub use client::{BlobClient, BlobUpload, MAX_BATCH, MAX_PAGE, Purpose, PutAnswer};
pub use get::{Artifact, ArtifactBody, GetError};
pub use hints::{Hint, HintLog, MAX_HINTS};
pub use metrics::ReplicationMetrics;
pub use peers::Peers;
pub use plane::DataPlane;
pub use put::{PutError, Upload};
pub use service::BlobService;
pub use topology::{ClusterView, DegradedPolicy, FixedTopology, Topology};
pub use workers::{WorkerConfig, WorkerReport};

/// Size of the data chunks sent between nodes.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// Largest message of the Blobs service, set on its server and its clients. The largest
/// legitimate ones are a data chunk ([`CHUNK_SIZE`] and a header) and a page of
/// [`MAX_PAGE`] or a batch of [`MAX_BATCH`] keys with their metadata (a key is at most
/// 128 characters of hash and a 40-character namespace: well under 1 MiB a page), so
/// 2 MiB leaves room while a peer, or whoever holds the cluster secret, cannot make a
/// node buffer more for one message.
pub const MAX_BLOB_MESSAGE_BYTES: usize = 2 << 20;
