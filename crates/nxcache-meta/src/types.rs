//! The replicated metadata: what a command is, and the state commands build.

use std::collections::{BTreeMap, BTreeSet};

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
        SnapshotData = crate::snapshot::SnapshotFile,
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

impl ClusterSettings {
    /// The rules every cluster's settings keep; the error names what to change.
    pub fn validate(&self) -> Result<(), String> {
        let r = self.replication_factor;
        if !(1..=7).contains(&r) {
            return Err(format!("the replication factor must be 1 to 7, not {r}"));
        }
        if self.write_quorum > r {
            return Err(format!(
                "the write quorum ({}) cannot exceed the replication factor ({r}); lower the write quorum too, or make it a majority (0, or `--write-quorum majority`)",
                self.write_quorum
            ));
        }
        if !matches!(self.max_voters, 1 | 3 | 5 | 7) {
            return Err(format!(
                "max voters must be 1, 3, 5 or 7, not {}",
                self.max_voters
            ));
        }
        if self.on_degraded != "serve" && self.on_degraded != "strict" {
            return Err(format!(
                "the degraded policy must be 'serve' or 'strict', not '{}'",
                self.on_degraded
            ));
        }
        Ok(())
    }
}

/// Settings an operator changes; the others keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_quorum: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_degraded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_voters: Option<u32>,
}

impl SettingsChange {
    pub fn applied_to(&self, current: &ClusterSettings) -> ClusterSettings {
        ClusterSettings {
            replication_factor: self
                .replication_factor
                .unwrap_or(current.replication_factor),
            write_quorum: self.write_quorum.unwrap_or(current.write_quorum),
            on_degraded: self
                .on_degraded
                .clone()
                .unwrap_or_else(|| current.on_degraded.clone()),
            max_voters: self.max_voters.unwrap_or(current.max_voters),
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
    /// Removes the environment's tokens (and the generated first-start token) that are
    /// not in `keep`: written after a node seeded its environment's tokens, `keep` being
    /// their names, so the environment a node starts with is the cluster's set of
    /// environment tokens. Tokens created through the admin API are never touched.
    PruneEnvTokens {
        keep: BTreeSet<String>,
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
    /// Replaces every setting. Written only by nodes from before `UpdateSettings`; kept
    /// so that their logs still apply.
    SetSettings {
        settings: ClusterSettings,
    },
    /// The settings of a new cluster (its first node's flags): applied only while the
    /// cluster has none, so a node started later with other flags changes nothing.
    InitSettings {
        settings: ClusterSettings,
    },
    /// An operator's change (`nxcache admin settings set`), validated on the merged result.
    UpdateSettings {
        change: SettingsChange,
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
    /// How many environment tokens a prune removed.
    Pruned {
        removed: usize,
    },
    AlreadyExists,
    NotFound,
    /// The cluster's settings after the command, and whether it changed them.
    Settings {
        settings: ClusterSettings,
        changed: bool,
    },
    /// The command was refused; nothing changed.
    Invalid {
        reason: String,
    },
}

/// What a placement ring is built from, as the state machine applied it, so one epoch
/// is one ring on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSpec {
    pub epoch: u64,
    /// The configured factor (a ring caps it by its member count).
    pub replication_factor: u32,
    /// The members that own data, with their zones: the active members, or every member
    /// while none is active.
    pub members: BTreeMap<NodeId, String>,
}

/// The token table that commands read and change. The state machine's implementation
/// reads the stored table and collects a batch's changes; tests use a map.
pub trait TokenTable {
    type Error;
    fn token(&self, name: &str) -> Result<Option<TokenRecord>, Self::Error>;
    /// The names of the tokens held, in order.
    fn token_names(&self) -> Result<Vec<String>, Self::Error>;
    fn is_revoked(&self, name: &str) -> Result<bool, Self::Error>;
    fn put_token(&mut self, name: &str, token: TokenRecord);
    fn remove_token(&mut self, name: &str);
    fn set_revoked(&mut self, name: &str, revoked: bool);
}

/// Everything the state machine holds besides openraft's membership and the token table
/// (which is stored token by token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members' data-plane state; a member absent here is `Active`.
    pub member_states: BTreeMap<NodeId, MemberState>,
    /// Every member of the applied membership, with its zone.
    #[serde(default)]
    pub zones: BTreeMap<NodeId, String>,
    pub settings: ClusterSettings,
    /// The cluster's settings were set (by its first node, or by an older node's flags).
    #[serde(default)]
    pub settings_initialized: bool,
    /// The ring placement uses now.
    #[serde(default)]
    pub ring: RingSpec,
    /// The ring before the last change: reads fall back to its owners while data moves.
    /// Kept in the applied state, so it survives restarts and snapshots.
    #[serde(default)]
    pub previous_ring: Option<RingSpec>,
    /// The cluster's id, as recorded in the log (empty until the first leader records it).
    #[serde(default)]
    pub cluster_id: String,
}

impl ClusterState {
    pub fn ring_epoch(&self) -> u64 {
        self.ring.epoch
    }

    pub fn apply<T: TokenTable>(
        &mut self,
        command: &MetaCommand,
        tokens: &mut T,
    ) -> Result<MetaResponse, T::Error> {
        Ok(match command {
            MetaCommand::SeedTokens { tokens: seeds } => {
                let mut added = 0;
                for (name, token) in seeds {
                    if tokens.token(name)?.is_none() && !tokens.is_revoked(name)? {
                        tokens.put_token(name, token.clone());
                        added += 1;
                    }
                }
                MetaResponse::Seeded { added }
            }
            MetaCommand::PruneEnvTokens { keep } => {
                let mut removed = 0;
                for name in tokens.token_names()? {
                    if nxcache_auth::is_env_token_name(&name) && !keep.contains(&name) {
                        // Not marked revoked: the value may come back to the environment.
                        tokens.remove_token(&name);
                        removed += 1;
                    }
                }
                MetaResponse::Pruned { removed }
            }
            MetaCommand::CreateToken { name, token } => {
                if tokens.token(name)?.is_some() {
                    return Ok(MetaResponse::AlreadyExists);
                }
                tokens.put_token(name, token.clone());
                tokens.set_revoked(name, false);
                MetaResponse::Done
            }
            MetaCommand::RevokeToken { name } => {
                if tokens.token(name)?.is_none() {
                    return Ok(MetaResponse::NotFound);
                }
                tokens.remove_token(name);
                tokens.set_revoked(name, true);
                MetaResponse::Done
            }
            MetaCommand::SetMemberState { id, state } => {
                self.member_states.insert(*id, *state);
                self.update_ring();
                MetaResponse::Done
            }
            MetaCommand::SetSettings { settings } => self.set_settings(settings.clone()),
            MetaCommand::InitSettings { settings } => {
                if self.settings_initialized {
                    MetaResponse::Settings {
                        settings: self.settings.clone(),
                        changed: false,
                    }
                } else {
                    self.set_settings(settings.clone())
                }
            }
            MetaCommand::UpdateSettings { change } => {
                self.set_settings(change.applied_to(&self.settings))
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
        })
    }

    fn set_settings(&mut self, settings: ClusterSettings) -> MetaResponse {
        if let Err(reason) = settings.validate() {
            return MetaResponse::Invalid { reason };
        }
        let changed = settings != self.settings;
        self.settings = settings;
        self.settings_initialized = true;
        self.update_ring();
        MetaResponse::Settings {
            settings: self.settings.clone(),
            changed,
        }
    }

    /// A membership entry was applied: `members` are the members now.
    pub fn membership_changed<'a>(&mut self, members: impl Iterator<Item = (NodeId, &'a str)>) {
        self.zones = members.map(|(id, zone)| (id, zone.to_owned())).collect();
        let zones = &self.zones;
        self.member_states.retain(|id, _| zones.contains_key(id));
        self.update_ring();
    }

    /// Starts a new ring epoch when what the ring is built from changed.
    fn update_ring(&mut self) {
        let active: BTreeMap<NodeId, String> = self
            .zones
            .iter()
            .filter(|(id, _)| {
                self.member_states.get(id).copied().unwrap_or_default() == MemberState::Active
            })
            .map(|(id, zone)| (*id, zone.clone()))
            .collect();
        let members = if active.is_empty() {
            self.zones.clone()
        } else {
            active
        };
        let replication_factor = self.settings.replication_factor;
        if members == self.ring.members && replication_factor == self.ring.replication_factor {
            return;
        }
        let next = RingSpec {
            epoch: self.ring.epoch + 1,
            replication_factor,
            members,
        };
        self.previous_ring = Some(std::mem::replace(&mut self.ring, next));
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[derive(Default)]
    struct MemoryTokens {
        tokens: BTreeMap<String, TokenRecord>,
        revoked: BTreeSet<String>,
    }

    impl TokenTable for MemoryTokens {
        type Error = Infallible;
        fn token(&self, name: &str) -> Result<Option<TokenRecord>, Infallible> {
            Ok(self.tokens.get(name).cloned())
        }
        fn token_names(&self) -> Result<Vec<String>, Infallible> {
            Ok(self.tokens.keys().cloned().collect())
        }
        fn is_revoked(&self, name: &str) -> Result<bool, Infallible> {
            Ok(self.revoked.contains(name))
        }
        fn put_token(&mut self, name: &str, token: TokenRecord) {
            self.tokens.insert(name.into(), token);
        }
        fn remove_token(&mut self, name: &str) {
            self.tokens.remove(name);
        }
        fn set_revoked(&mut self, name: &str, revoked: bool) {
            if revoked {
                self.revoked.insert(name.into());
            } else {
                self.revoked.remove(name);
            }
        }
    }

    fn token(scope: &str) -> TokenRecord {
        TokenRecord {
            digest: "00".repeat(32),
            scope: scope.into(),
            created_ms: 1,
            namespace: String::new(),
            read_from: Vec::new(),
        }
    }

    fn apply(s: &mut ClusterState, t: &mut MemoryTokens, c: MetaCommand) -> MetaResponse {
        match s.apply(&c, t) {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    #[test]
    fn tokens_are_created_once_and_revoked() {
        let (mut s, mut t) = (ClusterState::default(), MemoryTokens::default());
        let create = MetaCommand::CreateToken {
            name: "ci".into(),
            token: token("read-write"),
        };
        assert_eq!(apply(&mut s, &mut t, create.clone()), MetaResponse::Done);
        assert_eq!(apply(&mut s, &mut t, create), MetaResponse::AlreadyExists);
        let revoke = MetaCommand::RevokeToken { name: "ci".into() };
        assert_eq!(apply(&mut s, &mut t, revoke.clone()), MetaResponse::Done);
        assert_eq!(apply(&mut s, &mut t, revoke), MetaResponse::NotFound);
        assert!(t.tokens.is_empty() && t.revoked.contains("ci"));
    }

    #[test]
    fn a_prune_removes_the_environment_tokens_left_out_and_nothing_else() {
        let (mut s, mut t) = (ClusterState::default(), MemoryTokens::default());
        let kept = "read-write-0123456789ab";
        let gone = "read-only-ba9876543210";
        let seed = MetaCommand::SeedTokens {
            tokens: [
                (kept.to_string(), token("read-write")),
                (gone.to_string(), token("read")),
                ("read-write-1".to_string(), token("read-write")),
                ("generated".to_string(), token("read-write")),
            ]
            .into(),
        };
        apply(&mut s, &mut t, seed);
        let create = MetaCommand::CreateToken {
            name: "laptop".into(),
            token: token("read"),
        };
        assert_eq!(apply(&mut s, &mut t, create), MetaResponse::Done);
        let prune = MetaCommand::PruneEnvTokens {
            keep: [kept.to_string()].into(),
        };
        assert_eq!(
            apply(&mut s, &mut t, prune.clone()),
            MetaResponse::Pruned { removed: 3 }
        );
        let names: Vec<&str> = t.tokens.keys().map(String::as_str).collect();
        assert_eq!(names, ["laptop", kept]);
        // Pruned, not revoked: the value may be configured again.
        assert!(t.revoked.is_empty());
        assert_eq!(
            apply(&mut s, &mut t, prune),
            MetaResponse::Pruned { removed: 0 }
        );
    }

    #[test]
    fn seeding_is_idempotent_and_never_overrides() {
        let (mut s, mut t) = (ClusterState::default(), MemoryTokens::default());
        apply(
            &mut s,
            &mut t,
            MetaCommand::CreateToken {
                name: "env-admin-1".into(),
                token: token("admin"),
            },
        );
        let seed = MetaCommand::SeedTokens {
            tokens: [
                ("env-admin-1".to_string(), token("read")),
                ("env-read-1".to_string(), token("read")),
            ]
            .into(),
        };
        assert_eq!(
            apply(&mut s, &mut t, seed.clone()),
            MetaResponse::Seeded { added: 1 }
        );
        assert_eq!(
            apply(&mut s, &mut t, seed.clone()),
            MetaResponse::Seeded { added: 0 }
        );
        assert_eq!(t.tokens["env-admin-1"].scope, "admin");
        // Revoked: a later seeding (a restart with the same environment) keeps it revoked.
        apply(
            &mut s,
            &mut t,
            MetaCommand::RevokeToken {
                name: "env-read-1".into(),
            },
        );
        assert_eq!(
            apply(&mut s, &mut t, seed),
            MetaResponse::Seeded { added: 0 }
        );
        assert!(!t.tokens.contains_key("env-read-1"));
    }

    fn members(ids: &[NodeId]) -> Vec<(NodeId, &'static str)> {
        ids.iter().map(|id| (*id, "")).collect()
    }

    #[test]
    fn the_ring_moves_to_a_new_epoch_only_when_what_it_is_built_from_changes() {
        let (mut s, mut t) = (ClusterState::default(), MemoryTokens::default());
        s.membership_changed(members(&[1, 2]).into_iter());
        assert_eq!(s.ring_epoch(), 1);
        // A voter promotion (same members) is no new ring.
        s.membership_changed(members(&[1, 2]).into_iter());
        assert_eq!(s.ring_epoch(), 1);
        let drain = MetaCommand::SetMemberState {
            id: 2,
            state: MemberState::Draining,
        };
        apply(&mut s, &mut t, drain.clone());
        assert_eq!(s.ring_epoch(), 2);
        assert_eq!(s.ring.members.keys().copied().collect::<Vec<_>>(), [1]);
        let previous = s.previous_ring.clone().unwrap();
        assert_eq!((previous.epoch, previous.members.len()), (1, 2));
        apply(&mut s, &mut t, drain);
        assert_eq!(s.ring_epoch(), 2);
        // Fewer copies: the owners change, so it is a new ring.
        apply(
            &mut s,
            &mut t,
            MetaCommand::UpdateSettings {
                change: SettingsChange {
                    replication_factor: Some(2),
                    ..Default::default()
                },
            },
        );
        assert_eq!((s.ring_epoch(), s.ring.replication_factor), (3, 2));
        // The write quorum and the policy do not place anything.
        apply(
            &mut s,
            &mut t,
            MetaCommand::UpdateSettings {
                change: SettingsChange {
                    on_degraded: Some("strict".into()),
                    ..Default::default()
                },
            },
        );
        assert_eq!(s.ring_epoch(), 3);
        s.membership_changed(members(&[1]).into_iter());
        assert!(s.member_states.is_empty());
        assert_eq!(s.ring_epoch(), 3, "node 2 owned nothing already");
    }

    #[test]
    fn settings_are_set_once_at_creation_then_only_changed_on_purpose() {
        let (mut s, mut t) = (ClusterState::default(), MemoryTokens::default());
        let first = ClusterSettings {
            replication_factor: 2,
            ..ClusterSettings::default()
        };
        let init = |settings| MetaCommand::InitSettings { settings };
        assert_eq!(
            apply(&mut s, &mut t, init(first.clone())),
            MetaResponse::Settings {
                settings: first.clone(),
                changed: true
            }
        );
        // A later node's flags change nothing.
        let other = ClusterSettings {
            replication_factor: 5,
            ..ClusterSettings::default()
        };
        assert_eq!(
            apply(&mut s, &mut t, init(other)),
            MetaResponse::Settings {
                settings: first.clone(),
                changed: false
            }
        );
        // An operator's change is validated on the merged settings.
        let update = |change| MetaCommand::UpdateSettings { change };
        let refused = apply(
            &mut s,
            &mut t,
            update(SettingsChange {
                write_quorum: Some(3),
                ..Default::default()
            }),
        );
        assert!(
            matches!(&refused, MetaResponse::Invalid { reason } if reason.contains("write quorum (3)")),
            "{refused:?}"
        );
        assert_eq!(s.settings, first);
        for bad in [
            SettingsChange {
                replication_factor: Some(0),
                ..Default::default()
            },
            SettingsChange {
                on_degraded: Some("maybe".into()),
                ..Default::default()
            },
            SettingsChange {
                max_voters: Some(4),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                apply(&mut s, &mut t, update(bad)),
                MetaResponse::Invalid { .. }
            ));
        }
        let done = apply(
            &mut s,
            &mut t,
            update(SettingsChange {
                replication_factor: Some(3),
                write_quorum: Some(3),
                ..Default::default()
            }),
        );
        assert!(matches!(done, MetaResponse::Settings { changed: true, .. }));
        assert_eq!(
            (s.settings.replication_factor, s.settings.write_quorum),
            (3, 3)
        );
    }

    #[test]
    fn the_first_cluster_id_recorded_stays() {
        let (mut s, mut t) = (ClusterState::default(), MemoryTokens::default());
        let set = |id: &str| MetaCommand::SetClusterId { id: id.into() };
        assert_eq!(apply(&mut s, &mut t, set("a1")), MetaResponse::Done);
        assert_eq!(apply(&mut s, &mut t, set("a1")), MetaResponse::Done);
        assert_eq!(
            apply(&mut s, &mut t, set("b2")),
            MetaResponse::AlreadyExists
        );
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
