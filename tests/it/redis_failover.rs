//! Redis that fails over (`--redis-sentinel`): a primary, one replica and three `redis-server
//! --sentinel`s, each a real process the test starts on loopback ports of its own, with three
//! hubgate replicas writing through them while the primary is SIGKILLed.
//!
//! What is proved: hubgate asks the sentinels for the primary and follows the failover without a
//! restart; no proxied request fails on any replica meanwhile; writes are refused with a JSON 503
//! while there is no primary and are accepted again within a stated bound of the sentinels naming
//! the new one; with `--redis-min-replicas 1` every route answered 201 is in the table after the
//! failover (the acknowledged set against the converged table); the sentinels' own password
//! works (and a wrong one fails clearly, never logged).
//!
//! The same with a Redis Cluster (`--redis-cluster`, three primaries with a replica each, node
//! timeout 1 s) whose primary for hubgate's slot is SIGKILLed.
//!
//! The sentinels run with `down-after-milliseconds 1000` so that a failover takes about two
//! seconds and the tests stay short.

use std::{
    collections::{BTreeMap, HashMap},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use http::StatusCode;
use serde_json::json;

use crate::redis::{
    assert_json_503, converge, free_port, posted, ready, redis_server_binary, tail, targets,
    wait_ready, Posted, RedisOptions, RedisServer, Traffic, LIMIT, NOWHERE, PACE,
};
use crate::support::{eventually, Backend, Hubgate};

/// The name the sentinels know the primary by.
const MASTER: &str = "hub";
/// How long a sentinel waits before it calls a silent primary down.
const DOWN_AFTER_MS: u64 = 1000;
/// How long after the sentinels name the new primary every writer must have had a write
/// accepted: a replica that lost its connection asks the sentinels again on its next write
/// (the writers here retry at once), reads the table once from the new primary, and writes.
const RESUME_BOUND: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Sentinels

/// `n` `redis-server --sentinel` processes watching the primary on `primary` as [`MASTER`],
/// each with its own port, directory and (rewritable) configuration file; killed on drop.
struct Sentinels {
    nodes: Vec<SentinelNode>,
    password: Option<String>,
}

struct SentinelNode {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Sentinels {
    async fn start(primary: &RedisServer, n: usize, password: Option<&str>) -> Sentinels {
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(SentinelNode::start(primary, password).await);
        }
        Sentinels {
            nodes,
            password: password.map(str::to_owned),
        }
    }

    /// `--redis-sentinel`'s value.
    fn arg(&self) -> String {
        self.nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn ask<T: redis::FromRedisValue>(&self, node: usize, cmd: &redis::Cmd) -> Option<T> {
        let auth = self
            .password
            .as_deref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        let url = format!("redis://{auth}127.0.0.1:{}", self.nodes[node].port);
        let client = redis::Client::open(url).ok()?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
            .await
            .ok()?
            .ok()
    }

    /// The port of the primary the first sentinel names now.
    async fn primary_port(&self) -> Option<u16> {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("get-master-addr-by-name").arg(MASTER);
        let (_, port): (String, u16) = self.ask(0, &cmd).await?;
        Some(port)
    }

    /// Waits until every sentinel knows the others and `replicas` replicas: only then can they
    /// agree that the primary is down and elect one of them to fail over.
    async fn wait_watching(&self, replicas: usize) {
        let others = self.nodes.len() - 1;
        let deadline = Instant::now() + LIMIT;
        loop {
            let mut all = true;
            for i in 0..self.nodes.len() {
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("MASTER").arg(MASTER);
                let info: Option<HashMap<String, String>> = self.ask(i, &cmd).await;
                let count = |field: &str| {
                    info.as_ref()
                        .and_then(|m| m.get(field))
                        .and_then(|v| v.parse::<usize>().ok())
                };
                all &= count("num-other-sentinels") == Some(others)
                    && count("num-slaves") == Some(replicas);
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not all see each other and {replicas} replica(s) within \
                 {LIMIT:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|s| tail(&s.log(), 30))
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

impl SentinelNode {
    async fn start(primary: &RedisServer, password: Option<&str>) -> SentinelNode {
        for _ in 0..10 {
            if let Some(node) = SentinelNode::launch(primary, password).await {
                return node;
            }
        }
        panic!("redis-server --sentinel found every port it was given taken (10 tries)");
    }

    /// One start on a free port; `None` when someone took the port meanwhile.
    async fn launch(primary: &RedisServer, password: Option<&str>) -> Option<SentinelNode> {
        let dir = tempfile::Builder::new()
            .prefix("hubgate-sentinel-")
            .tempdir()
            .expect("temporary directory for a sentinel");
        let port = free_port();
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER} 5000\n\
             sentinel parallel-syncs {MASTER} 1\n",
            dir = dir.path().display(),
            primary = primary.port(),
        );
        if let Some(p) = password {
            // Its own password, and the one it gives the other sentinels.
            conf.push_str(&format!("requirepass {p}\nsentinel sentinel-pass {p}\n"));
        }
        let file = dir.path().join("sentinel.conf");
        std::fs::write(&file, conf).expect("write sentinel.conf");
        let out = std::fs::File::create(dir.path().join("sentinel.out")).expect("output file");
        let child = Command::new(redis_server_binary())
            .arg(&file)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone output file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server --sentinel: {e}"));
        let mut node = SentinelNode { port, dir, child };
        let deadline = Instant::now() + LIMIT;
        loop {
            let log = node.log();
            if let Some(status) = node.child.try_wait().expect("poll sentinel") {
                if log.contains("Address already in use") {
                    return None;
                }
                panic!("redis-server --sentinel exited with {status} at start; logs:\n{log}");
            }
            if log.contains("+monitor master") {
                return Some(node);
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel did not start monitoring within {LIMIT:?}; logs:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        ["sentinel.log", "sentinel.out"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect()
    }
}

impl Drop for SentinelNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The deployment

/// A primary, one replica of it, and three sentinels that watch them and see each other.
struct Deployment {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Sentinels,
}

impl Deployment {
    async fn start(sentinel_password: Option<&str>) -> Deployment {
        let primary = RedisServer::start(RedisOptions::default()).await;
        let replica = RedisServer::start(RedisOptions {
            replica_of: Some(primary.port()),
            ..RedisOptions::default()
        })
        .await;
        eventually(
            LIMIT,
            "the replica to be in sync with the primary",
            || async { replica_online(&primary).await },
        )
        .await;
        let sentinels = Sentinels::start(&primary, 3, sentinel_password).await;
        sentinels.wait_watching(1).await;
        Deployment {
            primary,
            replica,
            sentinels,
        }
    }

    fn store_args(&self, min_replicas: u32) -> Vec<String> {
        let mut args: Vec<String> = [
            "--storage-backend",
            "redis",
            "--redis-sentinel",
            &self.sentinels.arg(),
            "--redis-sentinel-master",
            MASTER,
            "--redis-min-replicas",
            &min_replicas.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(p) = &self.sentinels.password {
            args.extend(["--redis-sentinel-password".into(), p.clone()]);
        }
        args
    }

    async fn hubgates(&self, n: usize, min_replicas: u32) -> Vec<Hubgate> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let hg = Hubgate::builder()
                .args(self.store_args(min_replicas))
                .start()
                .await;
            wait_ready(&hg, &format!("hubgate {i} through the sentinels")).await;
            out.push(hg);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Writers

/// What one writer saw: every route answered 201 (with when it was asked), every route it
/// tried, and the first messages of refusals.
#[derive(Default)]
pub(crate) struct Written {
    pub(crate) acked: Vec<(Instant, String)>,
    attempted: Vec<String>,
    refused: Vec<String>,
    /// Every refusal: when the write was asked, and the message.
    pub(crate) refusals: Vec<(Instant, String)>,
    /// When the first write asked after `since` was answered 201.
    resumed: Option<Instant>,
    since: Option<Instant>,
}

/// Adds `/<name>/<i>` through `hg` one after the other, at once again after a refusal, until
/// `stop`. A write may be answered 201 or a JSON 503 (no primary, or the outcome is unknown);
/// anything else fails the test.
/// Waits (up to [`RESUME_BOUND`] after `resumed_from`, when writes could be confirmed again)
/// until every writer had a write asked after the failure accepted; returns when the last one
/// was.
async fn every_writer_resumed(logs: &[Mutex<Written>], resumed_from: Instant) -> Instant {
    eventually(
        resumed_from.elapsed() + RESUME_BOUND,
        "every writer to have a write accepted after the failover",
        || async { logs.iter().all(|l| l.lock().unwrap().resumed.is_some()) },
    )
    .await;
    logs.iter()
        .filter_map(|l| l.lock().unwrap().resumed)
        .max()
        .expect("every writer had one")
}

/// One [`writer`] on each replica, named a, b, c, ...
pub(crate) async fn writers(replicas: &[Hubgate], logs: &[Mutex<Written>], stop: &AtomicBool) {
    let names = ["a", "b", "c", "d", "e", "f"];
    join_all(
        replicas
            .iter()
            .zip(logs)
            .zip(names)
            .map(|((hg, log), name)| writer(hg, name, log, stop)),
    )
    .await;
}

pub(crate) async fn writer(hg: &Hubgate, name: &str, log: &Mutex<Written>, stop: &AtomicBool) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("/{name}/{i}");
        i += 1;
        log.lock().unwrap().attempted.push(key.clone());
        let asked = Instant::now();
        let resp = hg
            .api_post(
                &format!("/api/routes{key}"),
                &json!({ "target": NOWHERE }).to_string(),
            )
            .await;
        if resp.status == StatusCode::CREATED {
            let mut log = log.lock().unwrap();
            if log.resumed.is_none() && log.since.is_some_and(|t| asked > t) {
                log.resumed = Some(Instant::now());
            }
            log.acked.push((asked, key));
            continue;
        }
        let message = assert_json_503(&resp, &format!("{name}: POST {key}"));
        {
            let mut log = log.lock().unwrap();
            if log.refused.len() < 5 {
                log.refused.push(message.clone());
            }
            log.refusals.push((asked, message));
        }
        // No primary yet: do not spin the machine the sentinels need.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The failover scenario: three hubgate replicas write and serve while the primary is SIGKILLed.
/// With `min_replicas`, the old primary is started again once the sentinels have moved on, as
/// the new primary's replica: only then can a write be confirmed by a replica again.
async fn primary_killed_mid_traffic(min_replicas: u32) {
    let mut d = Deployment::start(None).await;
    let r = d.hubgates(3, min_replicas).await;
    let all: Vec<&Hubgate> = r.iter().collect();
    let backend = Backend::echo().await;
    let mut served = BTreeMap::new();
    for (i, hg) in r.iter().enumerate() {
        let key = format!("/app{i}");
        hg.add_route(&key, &backend.url("")).await;
        served.insert(key, backend.url(""));
    }
    converge(&all, false, "before the failover").await;
    let paths: Vec<String> = (0..3).map(|i| format!("/app{i}/ping")).collect();
    let traffic = Traffic::new();
    let stop = AtomicBool::new(false);
    let logs: Vec<Mutex<Written>> = (0..3).map(|_| Mutex::default()).collect();

    let scenario = async {
        eventually(LIMIT, "every writer to get 10 writes in", || async {
            logs.iter().all(|l| l.lock().unwrap().acked.len() >= 10)
        })
        .await;
        let killed = Instant::now();
        for log in &logs {
            log.lock().unwrap().since = Some(killed);
        }
        d.primary.kill().await;
        // Meanwhile: not ready, writes refused with a reason, reads served from memory.
        eventually(LIMIT, "a replica to notice the primary is gone", || async {
            ready(&r[0]).await.status == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        let doc = ready(&r[0]).await.json();
        assert!(
            doc["reasons"]
                .to_string()
                .contains("redis route store is unreachable"),
            "readiness names the store while there is no primary: {doc}"
        );
        eventually(LIMIT, "the sentinels to name the replica", || async {
            d.sentinels.primary_port().await == Some(d.replica.port())
        })
        .await;
        let switched = Instant::now();
        let mut resumed_from = switched;
        if min_replicas > 0 {
            // As a supervisor that asks the sentinels first would (the common Kubernetes
            // charts do): the old primary comes back as the new one's replica. (Left to the
            // sentinels, a restarted primary is converted only after about 8 s.)
            d.primary.set_replica_of(Some(d.replica.port()));
            d.primary.restart().await;
            eventually(
                LIMIT,
                "the old primary to be the new one's replica",
                || async {
                    d.sentinels.wait_watching(1).await;
                    replica_online(&d.replica).await
                },
            )
            .await;
            resumed_from = Instant::now();
        }
        let first = every_writer_resumed(&logs, resumed_from).await;
        eprintln!(
            "failover (min-replicas {min_replicas}): sentinels named the new primary {:?} after \
             the SIGKILL; every replica had a write asked after the SIGKILL accepted {:?} after \
             it ({:?} after writes could be confirmed again)",
            switched - killed,
            first - killed,
            first.saturating_duration_since(resumed_from),
        );
        let at = traffic.ok();
        traffic.passes(at, 30, "traffic after the failover").await;
        let counts: Vec<usize> = logs.iter().map(|l| l.lock().unwrap().acked.len()).collect();
        eventually(LIMIT, "5 more writes each after the failover", || async {
            logs.iter()
                .zip(&counts)
                .all(|(l, n)| l.lock().unwrap().acked.len() >= n + 5)
        })
        .await;
        stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(
        traffic.run(&all, &paths, &stop),
        scenario,
        writers(&r, &logs, &stop)
    );

    traffic.assert_none_failed("during the failover");
    let refused: Vec<String> = logs
        .iter()
        .flat_map(|l| l.lock().unwrap().refused.clone())
        .collect();
    assert!(
        !refused.is_empty(),
        "some write was refused while there was no primary"
    );
    let table = posted(&converge(&all, false, "after the failover").await);
    let attempted: Vec<String> = logs
        .iter()
        .flat_map(|l| l.lock().unwrap().attempted.clone())
        .collect();
    for key in table.keys() {
        assert!(
            served.contains_key(key) || attempted.contains(key),
            "{key} is in the table but was never written"
        );
    }
    if min_replicas > 0 {
        let lost: Vec<String> = logs
            .iter()
            .flat_map(|l| l.lock().unwrap().acked.clone())
            .map(|(_, k)| k)
            .filter(|k| !table.contains_key(k))
            .collect();
        assert!(
            lost.is_empty(),
            "{} routes answered 201 are gone after the failover: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
    assert_served_and_no_panic(&served, &table, &r);
}

/// Whether `server` (a primary) has a replica that is online.
pub(crate) async fn replica_online(server: &RedisServer) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", server.port())) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    info.contains("role:master") && info.contains("state=online")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_failover_loses_no_proxied_request_and_writes_resume_on_the_new_primary() {
    let _shared = PACE.read().await;
    primary_killed_mid_traffic(0).await;
}

#[tokio::test]
async fn with_min_replicas_every_route_answered_201_survives_the_failover() {
    let _shared = PACE.read().await;
    primary_killed_mid_traffic(1).await;
}

#[tokio::test]
async fn the_sentinels_password_is_used_and_a_wrong_one_is_refused_without_being_logged() {
    let _shared = PACE.read().await;
    let d = Deployment::start(Some("sentinel-secret")).await;
    let right = d.hubgates(1, 0).await;
    right[0].add_route("/through-sentinel", NOWHERE).await;

    let mut args = d.store_args(0);
    let at = args
        .iter()
        .position(|a| a == "sentinel-secret")
        .expect("the password is an argument");
    args[at] = "not-the-sentinel-secret".into();
    let wrong = Hubgate::builder().args(args).start().await;
    eventually(LIMIT, "a reason why the table is not loaded", || async {
        let resp = ready(&wrong).await;
        resp.status == StatusCode::SERVICE_UNAVAILABLE
            && resp.json()["reasons"].to_string().contains("sentinel")
    })
    .await;
    let doc = ready(&wrong).await.json();
    let resp = wrong.api_get("/api/routes").await;
    assert_json_503(&resp, "GET /api/routes before the first load");
    for text in [doc.to_string(), wrong.logs(), right[0].logs()] {
        assert!(
            !text.contains("sentinel-secret"),
            "a password was shown: {}",
            tail(&text, 20)
        );
    }
}

#[tokio::test]
async fn a_manual_failover_with_the_old_primary_alive_loses_no_route_answered_201() {
    let _shared = PACE.read().await;
    // `SENTINEL FAILOVER`: the replica is promoted while the old primary stays up, still a
    // primary until the sentinels reconfigure it (up to ~10 s later), and then it drops what it
    // took meanwhile. With `--redis-min-replicas 1` a write it takes after losing its replica is
    // never confirmed, so never answered 201: every 201 must be in Redis afterwards.
    let d = Deployment::start(None).await;
    let r = d.hubgates(2, 1).await;
    r[0].add_route("/before", NOWHERE).await;
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg("FAILOVER").arg(MASTER);
    let answer: Option<String> = d.sentinels.ask(0, &cmd).await;
    assert_eq!(answer.as_deref(), Some("OK"), "SENTINEL FAILOVER");
    eventually(LIMIT, "the sentinels to name the replica", || async {
        d.sentinels.primary_port().await == Some(d.replica.port())
    })
    .await;
    for (i, hg) in r.iter().enumerate() {
        // Each listens for the sentinels' `+switch-master` and leaves the old primary at once.
        eventually(
            LIMIT,
            &format!("hubgate {i} to hear of the switch"),
            || async { hg.logs().contains("Sentinel moved the Redis primary") },
        )
        .await;
    }
    for (i, hg) in r.iter().enumerate() {
        let key = format!("/after{i}");
        eventually(LIMIT, &format!("hubgate {i} to write {key}"), || async {
            let resp = hg
                .api_post(
                    &format!("/api/routes{key}"),
                    &json!({ "target": NOWHERE }).to_string(),
                )
                .await;
            if resp.status != StatusCode::CREATED {
                assert_json_503(&resp, &format!("hubgate {i}: POST {key}"));
            }
            resp.status == StatusCode::CREATED
        })
        .await;
    }
    eventually(LIMIT, "the old primary to be a replica", || async {
        let info: Option<String> =
            query(d.primary.port(), redis::cmd("INFO").arg("replication")).await;
        info.is_some_and(|i| i.contains("role:slave"))
    })
    .await;
    // What Redis holds, as a replica started now loads it, against what was answered 201.
    let late = d.hubgates(1, 1).await;
    let all = [&r[0], &r[1], &late[0]];
    let table = posted(&converge(&all, false, "after the manual failover").await);
    let keys: Vec<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(keys, ["/after0", "/after1", "/before"]);
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster

/// Six `redis-server --cluster-enabled yes` on loopback ports, made one cluster of three
/// primaries with a replica each by `redis-cli --cluster create`.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<RedisServer>,
}

/// The key whose slot holds every hubgate key (they share the hash tag `{hubgate}`).
pub(crate) const HUBGATE_KEY: &str = "{hubgate}:version";

impl Cluster {
    pub(crate) async fn start() -> Cluster {
        let mut nodes = Vec::with_capacity(6);
        for _ in 0..6 {
            let opts = RedisOptions {
                cluster: true,
                ..RedisOptions::default()
            };
            nodes.push(RedisServer::start(opts).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new(redis_cli())
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes };
        eventually(LIMIT, "every node to see the cluster ok", || async {
            let mut ok = true;
            for n in &cluster.nodes {
                let info: Option<String> = query(n.port(), redis::cmd("CLUSTER").arg("INFO")).await;
                ok &= info.is_some_and(|i| i.contains("cluster_state:ok"));
            }
            ok
        })
        .await;
        eventually(
            LIMIT,
            "hubgate's slot to have a replica in sync",
            || async {
                match cluster.primary().await {
                    Some(i) => replica_online(&cluster.nodes[i]).await,
                    None => false,
                }
            },
        )
        .await;
        cluster
    }

    /// `--redis-cluster`'s value: three of the nodes to start from.
    pub(crate) fn arg(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Which node is the primary of hubgate's slot, as the first node that answers says.
    pub(crate) async fn primary(&self) -> Option<usize> {
        for n in &self.nodes {
            let Some(slot) = query::<u16>(
                n.port(),
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(HUBGATE_KEY),
            )
            .await
            else {
                continue;
            };
            let nodes: String = query(n.port(), redis::cmd("CLUSTER").arg("NODES")).await?;
            let port = nodes.lines().find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let serves = f.len() > 8
                    && f[2].contains("master")
                    && !f[2].contains("fail")
                    && f[8..].iter().any(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                    });
                serves.then(|| f[1].split(['@', ':']).nth(1)?.parse::<u16>().ok())?
            })?;
            return self.nodes.iter().position(|n| n.port() == port);
        }
        None
    }
}

/// One command on the server at `port`; `None` when it cannot be had within 2 s.
pub(crate) async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
        .await
        .ok()?
        .ok()
}

/// `redis-cli`, which comes with Debian's redis-server (package redis-tools).
fn redis_cli() -> &'static str {
    redis_server_binary();
    if Command::new("redis-cli").arg("--version").output().is_ok() {
        "redis-cli"
    } else {
        "/usr/bin/redis-cli"
    }
}

/// A hubgate's flags for `cluster` (its `Cluster::arg`), writes confirmed by one replica.
pub(crate) fn cluster_args(cluster_arg: &str) -> [&str; 6] {
    [
        "--storage-backend",
        "redis",
        "--redis-cluster",
        cluster_arg,
        "--redis-min-replicas",
        "1",
    ]
}

/// Three hubgates on `cluster` with `--redis-min-replicas 1`, each having added a route
/// `/app<i>` to one echo backend, converged: the cluster tests' starting point. Returns them,
/// the backend (to keep alive) and the routes with their targets.
pub(crate) async fn three_writers_on(
    cluster: &Cluster,
    when: &str,
) -> (Vec<Hubgate>, Backend, BTreeMap<String, String>) {
    let cluster_arg = cluster.arg();
    let args = cluster_args(&cluster_arg);
    let mut r = Vec::new();
    for i in 0..3 {
        let hg = Hubgate::builder().args(args).start().await;
        wait_ready(&hg, &format!("hubgate {i} on the cluster")).await;
        r.push(hg);
    }
    let backend = Backend::echo().await;
    let mut served = BTreeMap::new();
    for (i, hg) in r.iter().enumerate() {
        let key = format!("/app{i}");
        hg.add_route(&key, &backend.url("")).await;
        served.insert(key, backend.url(""));
    }
    converge(&r.iter().collect::<Vec<_>>(), false, when).await;
    (r, backend, served)
}

#[tokio::test]
async fn a_cluster_whose_primary_for_the_slot_dies_keeps_every_route_answered_201() {
    let _shared = PACE.read().await;
    let mut cluster = Cluster::start().await;
    let (r, _backend, served) = three_writers_on(&cluster, "before the failover").await;
    let all: Vec<&Hubgate> = r.iter().collect();
    let paths: Vec<String> = (0..3).map(|i| format!("/app{i}/ping")).collect();
    let traffic = Traffic::new();
    let stop = AtomicBool::new(false);
    let logs: Vec<Mutex<Written>> = (0..3).map(|_| Mutex::default()).collect();
    let doomed = cluster
        .primary()
        .await
        .expect("a primary for hubgate's slot");

    let scenario = async {
        eventually(LIMIT, "every writer to get 10 writes in", || async {
            logs.iter().all(|l| l.lock().unwrap().acked.len() >= 10)
        })
        .await;
        let killed = Instant::now();
        for log in &logs {
            log.lock().unwrap().since = Some(killed);
        }
        cluster.nodes[doomed].kill().await;
        eventually(LIMIT, "the cluster to promote the replica", || async {
            cluster.primary().await.is_some_and(|p| p != doomed)
        })
        .await;
        let switched = Instant::now();
        // As a supervisor would: the node comes back, and the cluster makes it a replica.
        cluster.nodes[doomed].restart().await;
        let promoted = cluster.primary().await.expect("a primary");
        eventually(
            LIMIT,
            "the old primary to be the new one's replica",
            || async { replica_online(&cluster.nodes[promoted]).await },
        )
        .await;
        let resumed_from = Instant::now();
        let first = every_writer_resumed(&logs, resumed_from).await;
        eprintln!(
            "cluster failover (min-replicas 1): the replica was promoted {:?} after the SIGKILL; \
             every replica had a write asked after the SIGKILL accepted {:?} after it",
            switched - killed,
            first - killed,
        );
        let at = traffic.ok();
        traffic.passes(at, 30, "traffic after the failover").await;
        stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(
        traffic.run(&all, &paths, &stop),
        scenario,
        writers(&r, &logs, &stop)
    );

    traffic.assert_none_failed("during the failover");
    let table = posted(&converge(&all, false, "after the failover").await);
    assert_no_acknowledged_route_lost(&logs, &table);
    assert_served_and_no_panic(&served, &table, &r);
}

/// Every route a writer was answered 201 for is in the table after the failover.
pub(crate) fn assert_no_acknowledged_route_lost(logs: &[Mutex<Written>], table: &Posted) {
    let lost: Vec<String> = logs
        .iter()
        .flat_map(|l| l.lock().unwrap().acked.clone())
        .map(|(_, k)| k)
        .filter(|k| !table.contains_key(k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} routes answered 201 are gone after the failover: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Each route the writers meant to keep points where it was last written, and no replica
/// panicked on the way.
pub(crate) fn assert_served_and_no_panic(
    served: &BTreeMap<String, String>,
    table: &Posted,
    r: &[Hubgate],
) {
    let expected = targets(served);
    for key in served.keys() {
        assert_eq!(table.get(key), expected.get(key), "{key}");
    }
    for (i, hg) in r.iter().enumerate() {
        assert!(
            !hg.logs().contains("panicked"),
            "hubgate {i} panicked:\n{}",
            tail(&hg.logs(), 40)
        );
    }
}
