//! Every message a node decodes from a peer: the protobuf messages of every service, and
//! the JSON payloads carried in them (Raft requests, forwarded metadata writes). Bytes
//! from the network are either decoded or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nxcache_meta::{MetaCommand, NodeId, SnapshotChunkHeader, TypeConfig};
use nxcache_rpc::pb;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = pb::RaftMessage::decode(data);
    let _ = pb::SnapshotChunk::decode(data);
    let _ = pb::JoinRequest::decode(data);
    let _ = pb::JoinResponse::decode(data);
    let _ = pb::WriteRequest::decode(data);
    let _ = pb::WriteResponse::decode(data);
    let _ = pb::RemoveRequest::decode(data);
    let _ = pb::PingResponse::decode(data);
    let _ = pb::DeleteRequest::decode(data);
    let _ = pb::TouchRequest::decode(data);
    let _ = pb::RangeDigestsRequest::decode(data);
    let _ = pb::RangeDigestsResponse::decode(data);
    let _ = pb::RangeKeysRequest::decode(data);
    let _ = pb::RangeKeysResponse::decode(data);
    let _ = pb::PutChunk::decode(data);
    let _ = pb::PutResult::decode(data);
    let _ = pb::GetRequest::decode(data);
    let _ = pb::GetChunk::decode(data);
    let _ = pb::HeadRequest::decode(data);
    let _ = pb::HeadResponse::decode(data);
    let _ = serde_json::from_slice::<openraft::raft::AppendEntriesRequest<TypeConfig>>(data);
    let _ = serde_json::from_slice::<openraft::raft::VoteRequest<NodeId>>(data);
    let _ = serde_json::from_slice::<SnapshotChunkHeader>(data);
    let _ = serde_json::from_slice::<MetaCommand>(data);
});
