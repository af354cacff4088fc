//! A Redis Cluster moving hubgate's slot to another primary while three hubgate replicas write
//! routes and serve: the steps `redis-cli --cluster reshard` takes, one at a time, with writes
//! between them (the cluster of `redis_failover`: three primaries with a replica each).
//!
//! What is proved: writes go on while the slot is `MIGRATING`, while its keys are split between
//! the two nodes (scripts are refused with `TRYAGAIN` until the rest follow, and are retried),
//! while every key is on the importing node that does not own the slot yet (only an `ASK`
//! redirection leads there), and after the slot is the new node's (the old one answers
//! `MOVED`); the servers' own counters show hubgate met each of these. No proxied request fails
//! meanwhile, every route answered 201 is in every replica's final table, a replica started
//! mid-migration loads the table through `ASK`, and one started afterwards reads it whole.
//! `--redis-min-replicas 1` counts the replica of the node that took the write: with that
//! replica stopped, no write is answered 201 (a `WAIT` sent only where the client's slot map
//! points, the old node, would have confirmed them).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Instant,
};

use crate::redis::{converge, posted, wait_ready, Traffic, LIMIT, PACE};
use crate::redis_failover::{
    assert_no_acknowledged_route_lost, assert_served_and_no_panic, cluster_args, query,
    replica_online, three_writers_on, writers, Cluster, Written, HUBGATE_KEY,
};
use crate::support::{eventually, Hubgate};

/// One line of `CLUSTER NODES`.
struct Node {
    id: String,
    port: u16,
    primary: bool,
    /// The primary's id, for a replica.
    of: String,
}

/// The cluster's nodes as the first node sees them.
async fn layout(cluster: &Cluster) -> Vec<Node> {
    let text: String = query(cluster.nodes[0].port(), redis::cmd("CLUSTER").arg("NODES"))
        .await
        .expect("CLUSTER NODES");
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Node {
                id: (*f.first()?).to_owned(),
                port: f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?,
                primary: f.get(2)?.contains("master"),
                of: (*f.get(3)?).to_owned(),
            })
        })
        .collect()
}

/// A command the test gives a node; panics with Redis's answer when it fails.
async fn admin(port: u16, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
}

/// A counter of `INFO <section>` on `port`: the first number on the line `name:...`
/// (`errorstat_ASK:count=3`, `cmdstat_asking:calls=5,usec=...`); 0 when there is none.
async fn counter(port: u16, section: &str, name: &str) -> u64 {
    let info: String = query(port, redis::cmd("INFO").arg(section))
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split([',', '=']).nth(1)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The keys a node holds in `slot`, as `redis-cli --cluster reshard` asks for them.
async fn keys_in_slot(port: u16, slot: &str) -> Vec<String> {
    let keys: Vec<String> = query(
        port,
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100),
    )
    .await
    .expect("CLUSTER GETKEYSINSLOT");
    keys
}

/// `MIGRATE` of `keys` from `from` to `to`, in one command (atomic on the source).
async fn migrate(from: u16, to: u16, keys: &[String]) {
    let to = to.to_string();
    let mut args = vec!["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS"];
    args.extend(keys.iter().map(String::as_str));
    admin(from, &args).await;
}

/// How many writes each writer had answered 201 among those asked after `t`.
fn acked_since(logs: &[Mutex<Written>], t: Instant) -> Vec<usize> {
    logs.iter()
        .map(|l| {
            let log = l.lock().unwrap();
            log.acked.iter().filter(|(asked, _)| *asked > t).count()
        })
        .collect()
}

async fn writes_after(logs: &[Mutex<Written>], t: Instant, n: usize, what: &str) {
    eventually(LIMIT, what, || async {
        acked_since(logs, t).iter().all(|c| *c >= n)
    })
    .await;
}

#[tokio::test]
async fn the_slot_moving_to_another_primary_mid_traffic_loses_no_route_and_no_request() {
    let _shared = PACE.read().await;
    let cluster = Cluster::start().await;
    let cluster_arg = cluster.arg();
    let args = cluster_args(&cluster_arg);
    let (r, _backend, served) = three_writers_on(&cluster, "before the migration").await;
    let all: Vec<&Hubgate> = r.iter().collect();

    let source = cluster
        .primary()
        .await
        .expect("a primary for hubgate's slot");
    let nodes = layout(&cluster).await;
    let src = nodes
        .iter()
        .find(|n| n.port == cluster.nodes[source].port())
        .expect("the source in CLUSTER NODES");
    let dst = nodes
        .iter()
        .find(|n| n.primary && n.id != src.id)
        .expect("another primary");
    let dst_replica = nodes
        .iter()
        .find(|n| !n.primary && n.of == dst.id)
        .and_then(|n| cluster.nodes.iter().position(|c| c.port() == n.port))
        .expect("the target's replica");
    let target = cluster
        .nodes
        .iter()
        .position(|c| c.port() == dst.port)
        .expect("the target");
    let slot: u16 = query(
        src.port,
        redis::cmd("CLUSTER").arg("KEYSLOT").arg(HUBGATE_KEY),
    )
    .await
    .expect("CLUSTER KEYSLOT");
    let slot = slot.to_string();

    let paths: Vec<String> = (0..3).map(|i| format!("/app{i}/ping")).collect();
    let traffic = Traffic::new();
    let stop = AtomicBool::new(false);
    let logs: Vec<Mutex<Written>> = (0..3).map(|_| Mutex::default()).collect();

    let scenario = async {
        eventually(LIMIT, "every writer to get 5 writes in", || async {
            logs.iter().all(|l| l.lock().unwrap().acked.len() >= 5)
        })
        .await;

        // As `redis-cli --cluster reshard` starts: the target imports, the source migrates.
        admin(
            dst.port,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src.id],
        )
        .await;
        admin(
            src.port,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst.id],
        )
        .await;
        let migrating = Instant::now();
        writes_after(&logs, migrating, 3, "writes with the slot MIGRATING").await;

        // One key moves alone: a script naming keys on both nodes gets TRYAGAIN meanwhile.
        let keys = keys_in_slot(src.port, &slot).await;
        assert!(keys.len() >= 4, "hubgate's keys in the slot: {keys:?}");
        let tryagain = counter(src.port, "errorstats", "errorstat_TRYAGAIN").await;
        migrate(src.port, dst.port, &keys[..1]).await;
        eventually(
            LIMIT,
            "a hubgate script to meet the keys split between two nodes (TRYAGAIN)",
            || async { counter(src.port, "errorstats", "errorstat_TRYAGAIN").await > tryagain },
        )
        .await;

        // The rest follow: every key is on the target, which does not own the slot yet.
        let ask = counter(src.port, "errorstats", "errorstat_ASK").await;
        let asking = counter(dst.port, "commandstats", "cmdstat_asking").await;
        migrate(src.port, dst.port, &keys_in_slot(src.port, &slot).await).await;
        assert_eq!(keys_in_slot(src.port, &slot).await, Vec::<String>::new());
        let moved_keys = Instant::now();
        writes_after(&logs, moved_keys, 3, "writes through ASK redirections").await;
        assert!(
            counter(src.port, "errorstats", "errorstat_ASK").await > ask,
            "the source sent no ASK redirection"
        );
        assert!(
            counter(dst.port, "commandstats", "cmdstat_asking").await > asking,
            "no ASKING reached the target"
        );
        // A replica started now loads the table from the target too.
        let mid = Hubgate::builder().args(args).start().await;
        wait_ready(&mid, "a hubgate started mid-migration").await;

        // The writes are on the target now: with its only replica stopped, none is confirmed.
        cluster.nodes[dst_replica].signal("STOP");
        let stopped = Instant::now();
        eventually(
            LIMIT,
            "every writer to have a write refused for want of a confirming replica",
            || async {
                logs.iter().all(|l| {
                    l.lock()
                        .unwrap()
                        .refusals
                        .iter()
                        .any(|(asked, m)| *asked > stopped && m.contains("confirmed"))
                })
            },
        )
        .await;
        let confirmed = acked_since(&logs, stopped);
        cluster.nodes[dst_replica].signal("CONT");
        assert!(
            confirmed.iter().all(|c| *c == 0),
            "writes were answered 201 while the one replica that could have them was stopped: \
             {confirmed:?}"
        );
        eventually(LIMIT, "the target's replica to be back", || async {
            replica_online(&cluster.nodes[target]).await
        })
        .await;

        // The slot is the target's, on every primary (as reshard ends); the source now answers
        // MOVED to whoever still thinks it has the slot.
        let moved = counter(src.port, "errorstats", "errorstat_MOVED").await;
        for n in nodes.iter().filter(|n| n.primary) {
            admin(n.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &dst.id]).await;
        }
        let owned = Instant::now();
        writes_after(&logs, owned, 3, "writes after the slot moved").await;
        assert!(
            counter(src.port, "errorstats", "errorstat_MOVED").await > moved,
            "the source sent no MOVED redirection"
        );
        eventually(
            LIMIT,
            "every node to name the target for the slot",
            || async { cluster.primary().await == Some(target) },
        )
        .await;
        let at = traffic.ok();
        traffic.passes(at, 30, "traffic after the migration").await;
        stop.store(true, Ordering::Relaxed);
        mid
    };
    let (_, mid, _) = tokio::join!(
        traffic.run(&all, &paths, &stop),
        scenario,
        writers(&r, &logs, &stop)
    );

    traffic.assert_none_failed("during the migration");
    let late = Hubgate::builder().args(args).start().await;
    wait_ready(&late, "a hubgate started after the migration").await;
    let every: Vec<&Hubgate> = r.iter().chain([&mid, &late]).collect();
    let table = posted(&converge(&every, false, "after the migration").await);
    assert_no_acknowledged_route_lost(&logs, &table);
    assert_served_and_no_panic(&served, &table, &r);
}
