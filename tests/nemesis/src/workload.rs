//! The workload: concurrent Nx-shaped PUTs and GETs through every node (decimal hashes,
//! gzip-headed bodies of 1 KiB to 8 MiB, mostly small), conflicting writers (one hash,
//! different bytes, different nodes, at once), re-uploads and overwrites of stored keys,
//! reads of keys never written, and tokens created, used and revoked through the admin
//! API. Every operation becomes a history record.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use reqwest::Method;
use tokio::sync::{Mutex, Semaphore, watch};

use crate::cluster::{Cluster, Node};
use crate::flags::rw_token_name;
use crate::history::{Op, OpKind, Outcome, Record, Recorder, digest};

/// Tunables of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub concurrency: usize,
    /// Data operations per second, all workers together.
    pub rate: f64,
    /// Once this many bytes were sent, new PUTs stay small (keeps disks and the tmpfs
    /// node's memory bounded on long runs).
    pub max_bytes: u64,
}

/// One PUT of a key, enough to send the same bytes again.
#[derive(Debug, Clone)]
struct Attempt {
    body_seed: u64,
    size: usize,
    outcome: Outcome,
}

#[derive(Default)]
struct KeyBook {
    keys: Vec<String>,
    known: HashSet<String>,
    attempts: HashMap<String, Vec<Attempt>>,
}

#[derive(Debug, Clone)]
struct TokenState {
    name: String,
    secret: String,
    created_ms: u64,
    state: TokenLife,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenLife {
    Live,
    Revoked,
    /// A revocation without an answer: it may or may not have happened.
    Uncertain,
}

pub struct Workload {
    cluster: Arc<Cluster>,
    rec: Recorder,
    rng: std::sync::Mutex<ChaCha8Rng>,
    keys: std::sync::Mutex<KeyBook>,
    tokens: std::sync::Mutex<Vec<TokenState>>,
    next_op: AtomicU64,
    next_group: AtomicU64,
    bytes_sent: AtomicU64,
    options: WorkloadOptions,
    stop: watch::Receiver<bool>,
    /// Serialises admin writes of tokens (one create or revoke at a time).
    token_lock: Mutex<()>,
}

/// A node to send a request to, or None while none is admitted.
fn pick_node(cluster: &Cluster, rng: &mut ChaCha8Rng) -> Option<Arc<Node>> {
    let nodes: Vec<Arc<Node>> = cluster
        .members()
        .into_iter()
        .filter(|n| n.admitted.load(Ordering::SeqCst))
        .collect();
    nodes.choose(rng).cloned()
}

/// Nx-shaped bytes: a gzip header, the body's seed, then pseudo-random bytes from it.
pub fn body(body_seed: u64, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.max(18));
    out.extend_from_slice(&[0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0x03]);
    out.extend_from_slice(&body_seed.to_le_bytes());
    let mut x = body_seed ^ 0x9e37_79b9_7f4a_7c15;
    while out.len() < size {
        // splitmix64: cheap even in a debug build.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(size.max(18));
    out
}

/// Artifact sizes: mostly small, a few up to 8 MiB.
fn artifact_size(rng: &mut ChaCha8Rng, small_only: bool) -> usize {
    const K: usize = 1024;
    let p: f64 = rng.random();
    if small_only || p < 0.60 {
        rng.random_range(K..8 * K)
    } else if p < 0.885 {
        rng.random_range(8 * K..64 * K)
    } else if p < 0.985 {
        rng.random_range(64 * K..1024 * K)
    } else {
        rng.random_range(1024 * K..=8 * 1024 * K)
    }
}

fn put_timeout(size: usize) -> Duration {
    Duration::from_secs(30 + 4 * (size as u64 >> 20))
}

const GET_TIMEOUT: Duration = Duration::from_secs(30);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

impl Workload {
    pub fn new(
        cluster: Arc<Cluster>,
        rec: Recorder,
        rng: ChaCha8Rng,
        options: WorkloadOptions,
        stop: watch::Receiver<bool>,
    ) -> Arc<Workload> {
        Arc::new(Workload {
            cluster,
            rec,
            rng: std::sync::Mutex::new(rng),
            keys: Default::default(),
            tokens: Default::default(),
            next_op: AtomicU64::new(1),
            next_group: AtomicU64::new(1),
            bytes_sent: AtomicU64::new(0),
            options,
            stop,
            token_lock: Mutex::new(()),
        })
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Every key with a PUT sent, and whether one was acknowledged (for the settle).
    pub fn key_states(&self) -> Vec<(String, bool)> {
        let book = self.keys.lock().unwrap();
        book.keys
            .iter()
            .map(|k| {
                let acked = book
                    .attempts
                    .get(k)
                    .is_some_and(|a| a.iter().any(|a| a.outcome == Outcome::Ok));
                (k.clone(), acked)
            })
            .collect()
    }

    /// Runs the workers, the token cycle and the rate limiter until `stop`.
    pub async fn run(self: Arc<Self>) {
        let permits = Arc::new(Semaphore::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        {
            let permits = permits.clone();
            let me = self.clone();
            let period = Duration::from_secs_f64(1.0 / self.options.rate.max(0.1));
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !me.stopped() {
                    tick.tick().await;
                    if permits.available_permits() < me.options.concurrency {
                        permits.add_permits(1);
                    }
                }
                permits.close();
            });
        }
        for _ in 0..self.options.concurrency {
            let me = self.clone();
            let permits = permits.clone();
            tasks.spawn(async move {
                while let Ok(p) = permits.acquire().await {
                    p.forget();
                    if me.stopped() {
                        break;
                    }
                    me.clone().one_operation().await;
                }
            });
        }
        tasks.spawn(self.clone().token_cycle());
        while tasks.join_next().await.is_some() {}
    }

    fn new_key(&self, rng: &mut ChaCha8Rng) -> String {
        let mut book = self.keys.lock().unwrap();
        loop {
            let key = rng.random::<u64>().to_string();
            if book.known.insert(key.clone()) {
                book.keys.push(key.clone());
                return key;
            }
        }
    }

    /// A key already written: mostly recent ones.
    fn known_key(&self, rng: &mut ChaCha8Rng) -> Option<String> {
        let book = self.keys.lock().unwrap();
        if book.keys.is_empty() {
            return None;
        }
        let n = book.keys.len();
        let i = if rng.random_bool(0.7) {
            n - 1 - rng.random_range(0..n.min(200))
        } else {
            rng.random_range(0..n)
        };
        Some(book.keys[i].clone())
    }

    /// The token for a data operation: mostly the environment's read-write token, at
    /// times one the workload created (live), rarely a revoked one (expect 401).
    fn token(&self, rng: &mut ChaCha8Rng) -> (String, String) {
        let tokens = self.tokens.lock().unwrap();
        let pick = |life: TokenLife| -> Vec<&TokenState> {
            tokens.iter().filter(|t| t.state == life).collect()
        };
        let p: f64 = rng.random();
        if p < 0.15
            && let Some(t) = pick(TokenLife::Live).choose(rng)
        {
            return (t.name.clone(), t.secret.clone());
        }
        if p > 0.98
            && let Some(t) = pick(TokenLife::Revoked).choose(rng)
        {
            return (t.name.clone(), t.secret.clone());
        }
        (
            rw_token_name(&self.cluster.secrets.read_write),
            self.cluster.secrets.read_write.clone(),
        )
    }

    async fn one_operation(self: Arc<Self>) {
        enum Plan {
            PutNew,
            Conflict(usize),
            Overwrite,
            Reput,
            GetKnown,
            GetUnknown,
        }
        let (plan, token) = {
            let mut rng = self.rng.lock().unwrap();
            let w: u32 = rng.random_range(0..100);
            let plan = match w {
                0..30 => Plan::PutNew,
                30..36 => Plan::Conflict(rng.random_range(2..=3)),
                36..39 => Plan::Overwrite,
                39..42 => Plan::Reput,
                42..94 => Plan::GetKnown,
                _ => Plan::GetUnknown,
            };
            (plan, self.token(&mut rng))
        };
        match plan {
            Plan::PutNew => {
                let (key, seed, size, node) = {
                    let mut rng = self.rng.lock().unwrap();
                    let small = self.bytes_sent.load(Ordering::Relaxed) > self.options.max_bytes;
                    (
                        self.new_key(&mut rng),
                        rng.next_u64(),
                        artifact_size(&mut rng, small),
                        pick_node(&self.cluster, &mut rng),
                    )
                };
                if let Some(node) = node {
                    self.put(&node, &key, seed, size, &token, None).await;
                }
            }
            Plan::Conflict(writers) => {
                let (key, plans) = {
                    let mut rng = self.rng.lock().unwrap();
                    let key = self.new_key(&mut rng);
                    let mut nodes: Vec<Arc<Node>> = self
                        .cluster
                        .members()
                        .into_iter()
                        .filter(|n| n.admitted.load(Ordering::SeqCst))
                        .collect();
                    use rand::seq::SliceRandom;
                    nodes.shuffle(&mut *rng);
                    nodes.truncate(writers);
                    // Small bodies, so the writers really overlap.
                    let plans: Vec<(Arc<Node>, u64, usize)> = nodes
                        .into_iter()
                        .map(|n| (n, rng.next_u64(), rng.random_range(1024..16 * 1024)))
                        .collect();
                    (key, plans)
                };
                let group = self.next_group.fetch_add(1, Ordering::Relaxed);
                let puts = plans.iter().map(|(node, seed, size)| {
                    self.put(node, &key, *seed, *size, &token, Some(group))
                });
                join_all(puts).await;
            }
            Plan::Overwrite | Plan::Reput => {
                let chosen = {
                    let mut rng = self.rng.lock().unwrap();
                    let key = self.known_key(&mut rng);
                    let node = pick_node(&self.cluster, &mut rng);
                    let fresh = (rng.next_u64(), rng.random_range(1024..16 * 1024));
                    key.zip(node).map(|(k, n)| (k, n, fresh))
                };
                let Some((key, node, fresh)) = chosen else {
                    return;
                };
                let (seed, size) = if matches!(plan, Plan::Reput) {
                    // The same bytes again, as Nx does when it re-uploads.
                    let book = self.keys.lock().unwrap();
                    match book.attempts.get(&key).and_then(|a| a.first()) {
                        Some(a) => (a.body_seed, a.size),
                        None => return,
                    }
                } else {
                    fresh
                };
                self.put(&node, &key, seed, size, &token, None).await;
            }
            Plan::GetKnown | Plan::GetUnknown => {
                let (key, node) = {
                    let mut rng = self.rng.lock().unwrap();
                    let key = if matches!(plan, Plan::GetKnown) {
                        self.known_key(&mut rng)
                    } else {
                        // Never PUT: only a 404 is right.
                        Some(format!("{}", rng.random::<u64>()))
                            .filter(|k| !self.keys.lock().unwrap().known.contains(k))
                    };
                    (key, pick_node(&self.cluster, &mut rng))
                };
                if let (Some(key), Some(node)) = (key, node) {
                    self.get(&node, &key, &token, GET_TIMEOUT).await;
                }
            }
        }
    }

    fn op_id(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::Relaxed)
    }

    async fn put(
        &self,
        node: &Node,
        key: &str,
        body_seed: u64,
        size: usize,
        token: &(String, String),
        group: Option<u64>,
    ) -> Outcome {
        let bytes = body(body_seed, size);
        let sent_digest = digest(&bytes);
        self.bytes_sent.fetch_add(size as u64, Ordering::Relaxed);
        let id = self.op_id();
        let start_ms = self.rec.now_ms();
        let timeout = put_timeout(size);
        let answer = self
            .cluster
            .http
            .put(format!("{}/v1/cache/{key}", node.url()))
            .bearer_auth(&token.1)
            .header("content-type", "application/octet-stream")
            .timeout(timeout)
            .body(bytes)
            .send()
            .await;
        let (status, error) = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                // Read the answer's body so the connection can be reused.
                let _ = r.bytes().await;
                (status, None)
            }
            Err(e) => (0, Some(error_kind(&e))),
        };
        let outcome = match status {
            200 | 202 => Outcome::Ok,
            0 => Outcome::Unknown,
            _ => Outcome::Fail,
        };
        {
            let mut book = self.keys.lock().unwrap();
            book.attempts
                .entry(key.to_owned())
                .or_default()
                .push(Attempt {
                    body_seed,
                    size,
                    outcome,
                });
        }
        self.rec.record(Record::Op(Op {
            id,
            op: OpKind::Put,
            key: Some(key.to_owned()),
            node: node.id,
            token: token.0.clone(),
            size: Some(size as u64),
            digest: Some(sent_digest),
            start_ms,
            end_ms: self.rec.now_ms(),
            status,
            outcome,
            error,
            timeout_ms: Some(timeout.as_millis() as u64),
            group,
        }));
        outcome
    }

    async fn get(&self, node: &Node, key: &str, token: &(String, String), timeout: Duration) {
        let id = self.op_id();
        let start_ms = self.rec.now_ms();
        let answer = self
            .cluster
            .http
            .get(format!("{}/v1/cache/{key}", node.url()))
            .bearer_auth(&token.1)
            .timeout(timeout)
            .send()
            .await;
        let (status, body, error) = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(b) => (status, Some(b), None),
                    // A cut transfer: the answer is incomplete, not a 200.
                    Err(e) => (0, None, Some(format!("body: {}", error_kind(&e)))),
                }
            }
            Err(e) => (0, None, Some(error_kind(&e))),
        };
        let outcome = match status {
            200 | 404 => Outcome::Ok,
            0 => Outcome::Unknown,
            _ => Outcome::Fail,
        };
        let (size, digest) = match (&body, status) {
            (Some(b), 200) => (Some(b.len() as u64), Some(digest(b))),
            _ => (None, None),
        };
        self.rec.record(Record::Op(Op {
            id,
            op: OpKind::Get,
            key: Some(key.to_owned()),
            node: node.id,
            token: token.0.clone(),
            size,
            digest,
            start_ms,
            end_ms: self.rec.now_ms(),
            status,
            outcome,
            error,
            timeout_ms: Some(timeout.as_millis() as u64),
            group: None,
        }));
    }

    /// Creates a token every 10 to 30 s, revokes each 10 to 30 s after its creation,
    /// and right after a revocation asks every node with it for 3 s.
    async fn token_cycle(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut n = 0u64;
        loop {
            let wait = {
                let mut rng = self.rng.lock().unwrap();
                Duration::from_millis(rng.random_range(10_000..30_000))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let _one = self.token_lock.lock().await;
            n += 1;
            self.create_token(&format!("nem-{n}")).await;
            let due: Vec<String> = {
                let now = self.rec.now_ms();
                let mut rng = self.rng.lock().unwrap();
                let life = rng.random_range(10_000..30_000);
                self.tokens
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|t| t.state == TokenLife::Live && t.created_ms + life <= now)
                    .map(|t| t.name.clone())
                    .collect()
            };
            for name in due {
                if self.revoke_token(&name).await {
                    self.probe_revoked(&name).await;
                }
            }
        }
    }

    async fn admin_op(
        &self,
        op: OpKind,
        name: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, String) {
        let node = {
            let mut rng = self.rng.lock().unwrap();
            pick_node(&self.cluster, &mut rng)
        };
        let Some(node) = node else {
            return (0, String::new());
        };
        let id = self.op_id();
        let start_ms = self.rec.now_ms();
        let (status, text) = self
            .cluster
            .admin(&node, method, path, body, ADMIN_TIMEOUT)
            .await;
        let outcome = match status {
            201 | 204 => Outcome::Ok,
            0 => Outcome::Unknown,
            _ => Outcome::Fail,
        };
        self.rec.record(Record::Op(Op {
            id,
            op,
            key: None,
            node: node.id,
            token: name.to_owned(),
            size: None,
            digest: None,
            start_ms,
            end_ms: self.rec.now_ms(),
            status,
            outcome,
            error: (status == 0).then(|| "timeout".to_owned()),
            timeout_ms: Some(ADMIN_TIMEOUT.as_millis() as u64),
            group: None,
        }));
        (status, text)
    }

    async fn create_token(&self, name: &str) {
        let (status, text) = self
            .admin_op(
                OpKind::TokenCreate,
                name,
                Method::POST,
                "tokens",
                Some(serde_json::json!({"name": name, "scope": "read-write"})),
            )
            .await;
        if status != 201 {
            return;
        }
        let Some(secret) = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
        else {
            return;
        };
        self.tokens.lock().unwrap().push(TokenState {
            name: name.to_owned(),
            secret,
            created_ms: self.rec.now_ms(),
            state: TokenLife::Live,
        });
    }

    /// True when the revocation was answered 204.
    async fn revoke_token(&self, name: &str) -> bool {
        let (status, _) = self
            .admin_op(
                OpKind::TokenRevoke,
                name,
                Method::DELETE,
                &format!("tokens/{name}"),
                None,
            )
            .await;
        let life = match status {
            204 => TokenLife::Revoked,
            // Not there: an earlier revocation without an answer did happen.
            404 => TokenLife::Uncertain,
            0 => TokenLife::Uncertain,
            _ => return false,
        };
        if let Some(t) = self
            .tokens
            .lock()
            .unwrap()
            .iter_mut()
            .find(|t| t.name == name)
        {
            t.state = life;
        }
        status == 204
    }

    /// Every 100 ms for 3 s, a GET with the revoked token through every admitted node.
    async fn probe_revoked(&self, name: &str) {
        let Some(secret) = self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.secret.clone())
        else {
            return;
        };
        let token = (name.to_owned(), secret);
        for _ in 0..30 {
            let key = {
                let mut rng = self.rng.lock().unwrap();
                self.known_key(&mut rng)
            };
            let Some(key) = key else { return };
            let nodes: Vec<Arc<Node>> = self
                .cluster
                .members()
                .into_iter()
                .filter(|n| n.admitted.load(Ordering::SeqCst))
                .collect();
            let probes = nodes
                .iter()
                .map(|n| self.get(n, &key, &token, Duration::from_secs(5)));
            let sleep = tokio::time::sleep(Duration::from_millis(100));
            let (_, ()) = tokio::join!(join_all(probes), sleep);
        }
    }
}

fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        // Connection reset or closed mid-request.
        "connection".into()
    }
}
