//! The cluster's metadata log: openraft with its log and state machine in sled, talking
//! over tonic gRPC. It holds members, tokens and settings; artifacts never go through it.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); the
// helpers here return it as the traits do.
#![allow(clippy::result_large_err)]

mod bootstrap;
mod durable;
mod leader;
mod log_store;
mod membership;
mod metrics;
mod network;
mod node;
mod service;
mod snapshot;
mod state_machine;
mod types;
mod upkeep;

pub use bootstrap::Formation;
pub use log_store::SledLogStore;
pub use metrics::MetaMetrics;
pub use network::{
    Faults, MAX_COMMAND_BYTES, MAX_MESSAGE_BYTES, SNAPSHOT_CHUNK_BYTES, SnapshotChunkHeader,
};
pub use node::{
    ClusterStatus, MemberStatus, MetaConfig, MetaError, MetaNode, PeerServices, Placement,
    RaftTiming,
};
pub use snapshot::SnapshotFile;
pub use state_machine::{AppliedState, SledStateMachine, StateStore};
pub use types::{
    ClusterSettings, ClusterState, MemberNode, MemberState, MetaCommand, MetaResponse, NodeId,
    Raft, RingSpec, SettingsChange, TokenRecord, TokenTable, TypeConfig,
};
