//! The replicated metadata: what a command is, and the state commands build.

use std::collections::BTreeMap;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// How peers and clients reach a member. Stored in Raft membership entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    /// host:port of the gRPC listener as peers dial it.
    pub grpc_addr: String,
    /// Base URL of the HTTP API.
    pub http_addr: String,
    /// Failure domain; empty when unknown.
    pub zone: String,
    /// Identity of the member's data dir: random, fixed when the dir was created empty, so
    /// a member back with an empty disk has another one. Raft calls carry it and the
    /// member refuses those addressed to another. 0 in records written before it existed
    /// (not checked).
    #[serde(default)]
    pub incarnation: u64,
}

impl MemberNode {
    /// Whether a member that asks to join with `self` is the data dir `recorded` names: a
    /// joiner has no Raft state, so any other incarnation is a new (empty) disk. A joiner
    /// that sends none (an older nxcache) cannot be told apart and is taken for the same.
    pub fn same_disk_as(&self, recorded: &MemberNode) -> bool {
        self.incarnation == 0 || self.incarnation == recorded.incarnation
    }
}

openraft::declare_raft_types!(
    /// openraft's types for the nxcache metadata log.
    pub TypeConfig:
        D = MetaCommand,
        R = MetaResponse,
        NodeId = u64,
        Node = MemberNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// A member's place in the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Takes reads and writes.
    #[default]
    Active,
    /// Being emptied before removal: owns nothing in the next ring epoch.
    Draining,
}

/// A token as the cluster keeps it: never the secret, only its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// BLAKE3 of the secret, hex.
    pub digest: String,
    /// `read`, `read-write` or `admin`.
    pub scope: String,
    pub created_ms: u64,
    /// The namespace its uploads go to and its reads look in first (empty: default).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Namespaces its reads fall back to, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_from: Vec<String>,
}

/// Cluster-wide settings, changed through the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    pub replication_factor: u32,
    pub max_voters: u32,
    /// Owners that must hold a write before it is acknowledged; 0: a majority of the
    /// replicas.
    #[serde(default)]
    pub write_quorum: u32,
    /// What a write does when fewer than `write_quorum` nodes can take it: "serve"
    /// (accept it once one node holds it, repair later) or "strict" (refuse with 503).
    #[serde(default = "default_on_degraded")]
    pub on_degraded: String,
}

fn default_on_degraded() -> String {
    "serve".into()
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            replication_factor: 3,
            max_voters: 3,
            write_quorum: 0,
            on_degraded: default_on_degraded(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MetaCommand {
    /// Adds tokens whose names are not taken yet (bootstrap tokens from the
    /// environment: seeding twice, or from several nodes, changes nothing).
    SeedTokens {
        tokens: BTreeMap<String, TokenRecord>,
    },
    /// Creates a token; refused if the name is taken.
    CreateToken {
        name: String,
        token: TokenRecord,
    },
    RevokeToken {
        name: String,
    },
    SetMemberState {
        id: NodeId,
        state: MemberState,
    },
    SetSettings {
        settings: ClusterSettings,
    },
    /// Records the cluster's id when none is recorded yet (the first one wins): members
    /// that have none adopt it (clusters formed before ids existed get one this way).
    SetClusterId {
        id: String,
    },
}

/// The answer to a command, once applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum MetaResponse {
    Done,
    /// How many of the seeded tokens were new.
    Seeded {
        added: usize,
    },
    AlreadyExists,
    NotFound,
}

/// Everything the state machine holds besides openraft's own membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Names of revoked tokens: seeding never brings them back (a bootstrap token from
    /// the environment, once revoked, stays revoked across restarts).
    #[serde(default)]
    pub revoked: std::collections::BTreeSet<String>,
    /// Members' data-plane state; a member absent here is `Active`.
    pub member_states: BTreeMap<NodeId, MemberState>,
    pub settings: ClusterSettings,
    /// Bumped by every change of who owns data: membership and member states.
    pub ring_epoch: u64,
    /// The cluster's id, as recorded in the log (empty until the first leader records it).
    #[serde(default)]
    pub cluster_id: String,
}

impl ClusterState {
    pub fn apply(&mut self, command: &MetaCommand) -> MetaResponse {
        match command {
            MetaCommand::SeedTokens { tokens } => {
                let mut added = 0;
                for (name, token) in tokens {
                    if !self.tokens.contains_key(name) && !self.revoked.contains(name) {
                        self.tokens.insert(name.clone(), token.clone());
                        added += 1;
                    }
                }
                MetaResponse::Seeded { added }
            }
            MetaCommand::CreateToken { name, token } => {
                if self.tokens.contains_key(name) {
                    return MetaResponse::AlreadyExists;
                }
                self.tokens.insert(name.clone(), token.clone());
                self.revoked.remove(name);
                MetaResponse::Done
            }
            MetaCommand::RevokeToken { name } => match self.tokens.remove(name) {
                Some(_) => {
                    self.revoked.insert(name.clone());
                    MetaResponse::Done
                }
                None => MetaResponse::NotFound,
            },
            MetaCommand::SetMemberState { id, state } => {
                let previous = self.member_states.insert(*id, *state).unwrap_or_default();
                if previous != *state {
                    self.ring_epoch += 1;
                }
                MetaResponse::Done
            }
            MetaCommand::SetSettings { settings } => {
                self.settings = settings.clone();
                MetaResponse::Done
            }
            MetaCommand::SetClusterId { id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = id.clone();
                    MetaResponse::Done
                } else if self.cluster_id == *id {
                    MetaResponse::Done
                } else {
                    MetaResponse::AlreadyExists
                }
            }
        }
    }

    /// A membership entry was applied: members changed.
    pub fn membership_changed(&mut self, members: impl Iterator<Item = NodeId>) {
        let members: Vec<NodeId> = members.collect();
        self.member_states.retain(|id, _| members.contains(id));
        self.ring_epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(scope: &str) -> TokenRecord {
        TokenRecord {
            digest: "00".repeat(32),
            scope: scope.into(),
            created_ms: 1,
            namespace: String::new(),
            read_from: Vec::new(),
        }
    }

    #[test]
    fn tokens_are_created_once_and_revoked() {
        let mut s = ClusterState::default();
        let create = MetaCommand::CreateToken {
            name: "ci".into(),
            token: token("read-write"),
        };
        assert_eq!(s.apply(&create), MetaResponse::Done);
        assert_eq!(s.apply(&create), MetaResponse::AlreadyExists);
        let revoke = MetaCommand::RevokeToken { name: "ci".into() };
        assert_eq!(s.apply(&revoke), MetaResponse::Done);
        assert_eq!(s.apply(&revoke), MetaResponse::NotFound);
    }

    #[test]
    fn seeding_is_idempotent_and_never_overrides() {
        let mut s = ClusterState::default();
        s.apply(&MetaCommand::CreateToken {
            name: "env-admin-1".into(),
            token: token("admin"),
        });
        let seed = MetaCommand::SeedTokens {
            tokens: [
                ("env-admin-1".to_string(), token("read")),
                ("env-read-1".to_string(), token("read")),
            ]
            .into(),
        };
        assert_eq!(s.apply(&seed), MetaResponse::Seeded { added: 1 });
        assert_eq!(s.apply(&seed), MetaResponse::Seeded { added: 0 });
        assert_eq!(s.tokens["env-admin-1"].scope, "admin");
        // Revoked: a later seeding (a restart with the same environment) keeps it revoked.
        s.apply(&MetaCommand::RevokeToken {
            name: "env-read-1".into(),
        });
        assert_eq!(s.apply(&seed), MetaResponse::Seeded { added: 0 });
        assert!(!s.tokens.contains_key("env-read-1"));
    }

    #[test]
    fn ring_epoch_moves_with_ownership_changes_only() {
        let mut s = ClusterState::default();
        s.membership_changed([1, 2].into_iter());
        assert_eq!(s.ring_epoch, 1);
        s.apply(&MetaCommand::SetMemberState {
            id: 2,
            state: MemberState::Draining,
        });
        assert_eq!(s.ring_epoch, 2);
        s.apply(&MetaCommand::SetMemberState {
            id: 2,
            state: MemberState::Draining,
        });
        assert_eq!(s.ring_epoch, 2);
        s.membership_changed([1].into_iter());
        assert!(s.member_states.is_empty());
    }

    #[test]
    fn the_first_cluster_id_recorded_stays() {
        let mut s = ClusterState::default();
        let set = |id: &str| MetaCommand::SetClusterId { id: id.into() };
        assert_eq!(s.apply(&set("a1")), MetaResponse::Done);
        assert_eq!(s.apply(&set("a1")), MetaResponse::Done);
        assert_eq!(s.apply(&set("b2")), MetaResponse::AlreadyExists);
        assert_eq!(s.cluster_id, "a1");
    }

    #[test]
    fn a_joiner_with_another_incarnation_is_another_disk() {
        let recorded = MemberNode {
            incarnation: 7,
            ..MemberNode::default()
        };
        let joiner = |incarnation| MemberNode {
            incarnation,
            ..MemberNode::default()
        };
        assert!(joiner(7).same_disk_as(&recorded));
        assert!(!joiner(8).same_disk_as(&recorded));
        // A record from before incarnations: a joiner with one has a new, empty disk.
        assert!(!joiner(8).same_disk_as(&MemberNode::default()));
        // A joiner from before incarnations cannot be told apart.
        assert!(joiner(0).same_disk_as(&recorded));
        // Records written before the field existed still read.
        let old: MemberNode =
            serde_json::from_str(r#"{"grpc_addr":"a:1","http_addr":"","zone":""}"#).unwrap();
        assert_eq!(old.incarnation, 0);
    }

    #[test]
    fn commands_have_a_stable_json_form() {
        let json = serde_json::to_string(&MetaCommand::RevokeToken { name: "x".into() }).unwrap();
        assert_eq!(json, r#"{"op":"revoke_token","name":"x"}"#);
    }
}
