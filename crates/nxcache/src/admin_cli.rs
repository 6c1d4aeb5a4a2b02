//! `nxcache admin`: the operator's client of the admin API.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use nxcache_http::{MemberView, NewToken, RingView, SettingsView, StatusView, TokenView};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of any node (with its --base-path, if any).
    #[arg(
        long,
        env = "NXCACHE_ADMIN_SERVER",
        default_value = "http://127.0.0.1:3000"
    )]
    pub server: String,
    /// A token with the admin scope. Prefer the variable or --token-file: flags show in
    /// `ps` [default: the first of NXCACHE_ADMIN_TOKENS, so `nxcache admin` works inside a
    /// node's container]
    #[arg(long, env = "NXCACHE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the admin token (its first line; wins over NXCACHE_ADMIN_TOKEN).
    #[arg(long, env = "NXCACHE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA (or certificate) to trust for an https:// server, besides the
    /// system's roots (a node with a self-signed --tls-cert).
    #[arg(long, env = "NXCACHE_ADMIN_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Leader, term, log indexes, ring (epoch and digest), settings and members.
    Status,
    /// Access tokens.
    #[command(subcommand)]
    Tokens(TokenCommand),
    /// Cluster members.
    #[command(subcommand)]
    Nodes(NodeCommand),
    /// Cluster settings: replication factor, write quorum, degraded policy, max voters.
    #[command(subcommand)]
    Settings(SettingsCommand),
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Prints the cluster's settings.
    Show,
    /// Changes cluster settings on every node (a Raft entry, in the audit log). Lowering
    /// the replication factor removes extra copies only once the remaining owners hold
    /// theirs.
    Set {
        /// Copies kept of each artifact (1 to 7, capped by the member count).
        #[arg(long, value_name = "N")]
        replication_factor: Option<u32>,
        /// Copies stored before a PUT is acknowledged (at most the replication factor;
        /// `majority` for a majority of it).
        #[arg(long, value_name = "N|majority", value_parser = parse_quorum)]
        write_quorum: Option<u32>,
        /// What a PUT does when fewer than the write quorum of owners can take it.
        #[arg(long, value_name = "serve|strict")]
        on_degraded: Option<String>,
        /// Voting members of the metadata log (1, 3, 5 or 7).
        #[arg(long, value_name = "N")]
        max_voters: Option<u32>,
    },
}

fn parse_quorum(raw: &str) -> Result<u32, String> {
    match raw {
        "majority" => Ok(0),
        n => match n.parse() {
            Ok(0) | Err(_) => Err(format!(
                "expected a number from 1, or 'majority', not {n:?}"
            )),
            Ok(w) => Ok(w),
        },
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints it once.
    Create {
        /// read, read-write or admin.
        #[arg(long)]
        scope: String,
        #[arg(long)]
        name: String,
        /// The namespace its uploads go to and its reads look in first [default: the
        /// default namespace]
        #[arg(long, value_name = "NS")]
        namespace: Option<String>,
        /// Namespaces its reads fall back to, in order (e.g. `main` for pull requests).
        #[arg(long, value_name = "NS,NS", value_delimiter = ',')]
        read_from: Vec<String>,
    },
    List,
    /// Revokes a token on every node.
    Revoke {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    List,
    /// Marks a node as draining (it stops owning data in the next ring epoch).
    Drain {
        id: u64,
    },
    /// Removes a node from the cluster for good.
    Remove {
        id: u64,
    },
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        let url = format!("{}/admin/v1/{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{} answered {status}: {}", self.base, text.trim());
        }
        Ok(text)
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn ring_line(label: &str, ring: &RingView) -> String {
    format!(
        "{label} epoch {}, digest {}, copies per artifact {}, members {}",
        ring.epoch,
        ring.digest,
        ring.replicas,
        ring.members
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn print_settings(s: &SettingsView) {
    let quorum = match s.write_quorum {
        0 => "a majority".to_owned(),
        w => w.to_string(),
    };
    println!(
        "replication factor {}; write quorum {quorum}; on degraded: {}; max voters {}",
        s.replication_factor, s.on_degraded, s.max_voters
    );
}

fn print_members(members: &[MemberView]) {
    println!(
        "{:<6} {:<8} {:<9} {:<10} {:<24} HTTP",
        "ID", "ROLE", "STATE", "REACHABLE", "GRPC"
    );
    for m in members {
        println!(
            "{:<6} {:<8} {:<9} {:<10} {:<24} {}",
            m.id,
            m.role,
            m.state,
            yes_no(m.reachable),
            m.grpc_addr,
            m.http_addr
        );
    }
}

/// The token in `--token-file`, else `--token` (NXCACHE_ADMIN_TOKEN), else the first token
/// of a node's own `NXCACHE_ADMIN_TOKENS`.
fn admin_token(
    file: Option<&std::path::Path>,
    given: Option<String>,
    node_tokens: Option<String>,
) -> anyhow::Result<String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let token = text.lines().next().unwrap_or_default().trim();
        if token.is_empty() {
            bail!("the token file {} is empty", path.display());
        }
        return Ok(token.to_owned());
    }
    given
        .or_else(|| {
            node_tokens?
                .split(',')
                .map(str::trim)
                .find(|t| !t.is_empty())
                .map(str::to_owned)
        })
        .context("no admin token: set NXCACHE_ADMIN_TOKEN or pass --token-file FILE")
}

/// The HTTP client: HTTPS with the system's roots, plus `--ca-cert`'s.
fn http_client(ca_cert: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .use_rustls_tls()
        .https_only(false);
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}

/// A warning when the token would cross the network in clear text.
fn cleartext_warning(server: &str) -> Option<String> {
    let url = reqwest::Url::parse(server).ok()?;
    let host = url.host_str()?;
    let local = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (url.scheme() == "http" && !local).then(|| {
        format!(
            "warning: {server} is plain HTTP: the admin token crosses the network unencrypted (serve HTTPS with --tls-cert and use https://, with --ca-cert for a private CA)"
        )
    })
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    if let Some(warning) = cleartext_warning(&args.server) {
        eprintln!("{warning}");
    }
    let client = Client {
        http: http_client(args.ca_cert.as_deref())?,
        base: args.server.trim_end_matches('/').to_owned(),
        token: admin_token(
            args.token_file.as_deref(),
            args.token,
            std::env::var("NXCACHE_ADMIN_TOKENS").ok(),
        )?,
    };
    use reqwest::Method;
    match args.command {
        AdminCommand::Status => {
            let text = client.send(Method::GET, "status", None).await?;
            if args.json {
                println!("{text}");
                return Ok(());
            }
            let s: StatusView = serde_json::from_str(&text)?;
            let leader = match (s.leader_id, s.leaderless_ms) {
                (Some(l), _) => l.to_string(),
                (None, Some(ms)) => format!(
                    "none for {} s (this node serves from its own tokens and data; revocations reach it when it reconnects)",
                    ms / 1000
                ),
                (None, None) => "none".to_owned(),
            };
            println!(
                "answered by node {} of cluster {}; leader: {leader}; term {}; commit index {}; applied index {}; last log index {}; {} tokens; snapshot {} bytes",
                s.node_id,
                s.cluster_id.as_deref().unwrap_or("(none yet)"),
                s.term,
                s.commit_index,
                s.applied_index,
                s.last_log_index,
                s.tokens,
                s.snapshot_bytes
            );
            match &s.ring {
                Some(ring) => println!("{}", ring_line("ring:", ring)),
                None => println!("ring: epoch {}", s.ring_epoch),
            }
            if let Some(previous) = &s.previous_ring {
                println!("{}", ring_line("previous ring:", previous));
            }
            if let Some(settings) = &s.settings {
                print_settings(settings);
            }
            print_members(&s.members);
        }
        AdminCommand::Nodes(NodeCommand::List) => {
            let text = client.send(Method::GET, "nodes", None).await?;
            if args.json {
                println!("{text}");
            } else {
                print_members(&serde_json::from_str::<Vec<MemberView>>(&text)?);
            }
        }
        AdminCommand::Nodes(NodeCommand::Drain { id }) => {
            client
                .send(Method::POST, &format!("nodes/{id}/drain"), None)
                .await?;
            println!("node {id} is draining");
        }
        AdminCommand::Nodes(NodeCommand::Remove { id }) => {
            client
                .send(Method::DELETE, &format!("nodes/{id}"), None)
                .await?;
            println!("node {id} removed from the cluster");
        }
        AdminCommand::Tokens(TokenCommand::List) => {
            let text = client.send(Method::GET, "tokens", None).await?;
            if args.json {
                println!("{text}");
            } else {
                println!(
                    "{:<32} {:<11} {:<16} {:<24} CREATED (ms since epoch)",
                    "NAME", "SCOPE", "NAMESPACE", "READS FROM"
                );
                for t in serde_json::from_str::<Vec<TokenView>>(&text)? {
                    let namespace = if t.namespace.is_empty() {
                        "(default)".to_owned()
                    } else {
                        t.namespace
                    };
                    println!(
                        "{:<32} {:<11} {:<16} {:<24} {}",
                        t.name,
                        t.scope,
                        namespace,
                        t.read_from.join(","),
                        t.created_ms
                    );
                }
            }
        }
        AdminCommand::Tokens(TokenCommand::Create {
            scope,
            name,
            namespace,
            read_from,
        }) => {
            let body = serde_json::json!({
                "name": name,
                "scope": scope,
                "namespace": namespace.unwrap_or_default(),
                "read_from": read_from,
            });
            let text = client.send(Method::POST, "tokens", Some(body)).await?;
            if args.json {
                println!("{text}");
            } else {
                let t: NewToken = serde_json::from_str(&text)?;
                println!(
                    "created token {} with scope {}; it is shown only now:\n{}",
                    t.name, t.scope, t.token
                );
            }
        }
        AdminCommand::Settings(SettingsCommand::Show) => {
            let text = client.send(Method::GET, "settings", None).await?;
            if args.json {
                println!("{text}");
            } else {
                print_settings(&serde_json::from_str(&text)?);
            }
        }
        AdminCommand::Settings(SettingsCommand::Set {
            replication_factor,
            write_quorum,
            on_degraded,
            max_voters,
        }) => {
            let update = nxcache_http::SettingsUpdate {
                replication_factor,
                write_quorum,
                on_degraded,
                max_voters,
            };
            if update == nxcache_http::SettingsUpdate::default() {
                bail!(
                    "nothing to change: give --replication-factor, --write-quorum, --on-degraded or --max-voters"
                );
            }
            let text = client
                .send(
                    Method::PUT,
                    "settings",
                    Some(serde_json::to_value(&update)?),
                )
                .await?;
            if args.json {
                println!("{text}");
            } else {
                print!("cluster settings now: ");
                print_settings(&serde_json::from_str(&text)?);
            }
        }
        AdminCommand::Tokens(TokenCommand::Revoke { name }) => {
            client
                .send(Method::DELETE, &format!("tokens/{name}"), None)
                .await?;
            println!("token {name} revoked on every node");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{admin_token, cleartext_warning, parse_quorum};

    #[test]
    fn a_write_quorum_is_a_number_or_majority() {
        assert_eq!(parse_quorum("2"), Ok(2));
        assert_eq!(parse_quorum("majority"), Ok(0));
        assert!(parse_quorum("0").is_err());
        assert!(parse_quorum("most").is_err());
    }

    #[test]
    fn the_token_comes_from_the_flag_else_from_the_nodes_admin_tokens() {
        let env = Some(" , first,second".to_owned());
        assert_eq!(
            admin_token(None, Some("flag".into()), env.clone()).unwrap(),
            "flag"
        );
        assert_eq!(admin_token(None, None, env.clone()).unwrap(), "first");
        let err = admin_token(None, None, Some(" ,".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("NXCACHE_ADMIN_TOKEN"), "{err}");
        assert!(err.contains("--token-file"), "{err}");
        assert!(admin_token(None, None, None).is_err());
        // A token file wins, its first line trimmed; an empty one is an error.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file-token \nignored\n").unwrap();
        assert_eq!(
            admin_token(Some(&file), Some("flag".into()), env.clone()).unwrap(),
            "from-file-token"
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(admin_token(Some(&file), None, env).is_err());
    }

    #[test]
    fn plain_http_to_another_host_is_warned_about() {
        assert!(cleartext_warning("http://cache.example.com:3000").is_some());
        assert!(cleartext_warning("http://10.0.0.5:3000").is_some());
        for quiet in [
            "https://cache.example.com",
            "http://127.0.0.1:3000",
            "http://localhost:3000",
            "http://[::1]:3000",
        ] {
            assert!(cleartext_warning(quiet).is_none(), "{quiet}");
        }
    }
}
