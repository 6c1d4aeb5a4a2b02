//! The nxcache node: wires configuration, the blob store, tokens, the HTTP API and
//! telemetry together. `main.rs` is only the command line; tests start nodes in process
//! through [`start`].

pub mod admin_cli;
mod cluster;
mod listener;
mod node;
mod reserve;
mod tls;
mod topology;

pub use node::{RunningNode, start};
