//! The data plane: where artifacts live in a cluster and how they get there.
//!
//! - [`DataPlane`]: the coordinator every HTTP request goes through. Writes stream to
//!   the key's owners in parallel and are acknowledged at the write quorum (stand-ins
//!   and hints when owners are down, the degraded policy when too few nodes answer);
//!   reads come from the best replica, verified, with read repair.
//! - Background workers ([`DataPlane::spawn_workers`]): hinted hand-off, rebalancing
//!   after ring changes, anti-entropy by range digests, scrub, owners kept in step.
//! - [`BlobService`] / [`BlobClient`]: the gRPC transfer between nodes, streaming with
//!   bounded memory.

mod client;
mod digests;
mod hints;
mod metrics;
mod peers;
mod plane;
mod service;
mod topology;
mod workers;

pub use client::{BlobClient, BlobUpload, PeerBlob};
pub use digests::RangeDigests;
pub use hints::{Hint, HintLog};
pub use metrics::ReplicationMetrics;
pub use peers::Peers;
pub use plane::{Artifact, ArtifactBody, DataPlane, GetError, PutError, Upload, WorkerReport};
pub use service::BlobService;
pub use topology::{ClusterView, DegradedPolicy, FixedTopology, Topology};
pub use workers::WorkerConfig;

/// Size of the data chunks sent between nodes.
pub const CHUNK_SIZE: usize = 256 * 1024;
