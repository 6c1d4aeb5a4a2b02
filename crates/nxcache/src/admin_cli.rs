//! `nxcache admin`: the operator's client of the admin API.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use nxcache_http::{MemberView, NewToken, StatusView, TokenView};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of any node (with its --base-path, if any).
    #[arg(
        long,
        env = "NXCACHE_ADMIN_SERVER",
        default_value = "http://127.0.0.1:3000"
    )]
    pub server: String,
    /// A token with the admin scope [default: the first of NXCACHE_ADMIN_TOKENS, so
    /// `nxcache admin` works inside a node's container]
    #[arg(long, env = "NXCACHE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Leader, term, log indexes, ring epoch and members.
    Status,
    /// Access tokens.
    #[command(subcommand)]
    Tokens(TokenCommand),
    /// Cluster members.
    #[command(subcommand)]
    Nodes(NodeCommand),
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

/// `--token`, else the first token of a node's own `NXCACHE_ADMIN_TOKENS`.
fn admin_token(given: Option<String>, node_tokens: Option<String>) -> anyhow::Result<String> {
    given
        .or_else(|| {
            node_tokens?
                .split(',')
                .map(str::trim)
                .find(|t| !t.is_empty())
                .map(str::to_owned)
        })
        .context("no admin token: pass --token or set NXCACHE_ADMIN_TOKEN")
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?,
        base: args.server.trim_end_matches('/').to_owned(),
        token: admin_token(args.token, std::env::var("NXCACHE_ADMIN_TOKENS").ok())?,
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
            let leader = s.leader_id.map_or("none".to_owned(), |l| l.to_string());
            println!(
                "answered by node {} of cluster {}; leader: {leader}; term {}; commit index {}; applied index {}; last log index {}; ring epoch {}",
                s.node_id,
                s.cluster_id.as_deref().unwrap_or("(none yet)"),
                s.term,
                s.commit_index,
                s.applied_index,
                s.last_log_index,
                s.ring_epoch
            );
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
    use super::admin_token;

    #[test]
    fn the_token_comes_from_the_flag_else_from_the_nodes_admin_tokens() {
        let env = Some(" , first,second".to_owned());
        assert_eq!(
            admin_token(Some("flag".into()), env.clone()).unwrap(),
            "flag"
        );
        assert_eq!(admin_token(None, env).unwrap(), "first");
        let err = admin_token(None, Some(" ,".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--token"), "{err}");
        assert!(admin_token(None, None).is_err());
    }
}
