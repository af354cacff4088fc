//! What a big route table costs in memory, piece by piece: keys, parsed targets, the posted
//! data, whole routes, the table's map, the sorted listing cache, and the transient cost of a
//! sync body. Each line gives the live heap bytes (from a counting allocator) and allocations per
//! route, and the process's RSS growth, for `--routes N` routes (default 100 000).
//!
//! Run: `cargo run --release --example routemem [-- --routes N]`. Figures, not assertions: the
//! memory targets are checked on the whole process by `benches/load/memory.sh`.

use std::sync::Arc;

use hubgate::routes::{Change, Route, RouteData, RouteTable};
use hubgate::target::Target;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const TARGET: &str = "http://127.0.0.1:8888/";

fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Measures what `f` leaves allocated (its result is kept alive until the line is printed).
fn measure<T>(what: &str, n: usize, f: impl FnOnce() -> T) -> T {
    let rss = rss_kb();
    let region = Region::new(GLOBAL);
    let kept = f();
    let s = region.change();
    let live = s.bytes_allocated as i64 - s.bytes_deallocated as i64;
    let allocs = s.allocations as i64 - s.deallocations as i64;
    println!(
        "{what:<58} {:>7.1} B/route live, {:>5.2} allocs/route, RSS {:>+7.1} MiB",
        live as f64 / n as f64,
        allocs as f64 / n as f64,
        (rss_kb() - rss) as f64 / 1024.0,
    );
    kept
}

fn data(i: usize, hub_shaped: bool) -> RouteData {
    let mut d = RouteData::new();
    d.insert("target".into(), TARGET.into());
    if hub_shaped {
        d.insert("user".into(), format!("u{i}").into());
        d.insert("server_name".into(), "".into());
    }
    d
}

fn main() {
    let n: usize = std::env::args()
        .skip_while(|a| a != "--routes")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!("{n} routes; target {TARGET:?}; keys /user/u<i>");
    let keys: Vec<Arc<str>> = measure("keys (Arc<str>)", n, || {
        (0..n).map(|i| format!("/user/u{i}").into()).collect()
    });
    let targets = measure("targets (Target::parse)", n, || {
        (0..n)
            .map(|_| Target::parse(TARGET).unwrap())
            .collect::<Vec<_>>()
    });
    drop(targets);
    let d = measure("data {target}", n, || {
        (0..n).map(|i| data(i, false)).collect::<Vec<_>>()
    });
    drop(d);
    let d = measure("data {target, user, server_name}", n, || {
        (0..n).map(|i| data(i, true)).collect::<Vec<_>>()
    });
    drop(d);
    for hub_shaped in [false, true] {
        let label = if hub_shaped {
            "{target, user, server_name}"
        } else {
            "{target}"
        };
        let routes: Vec<Arc<Route>> = measure(&format!("routes {label} (key shared)"), n, || {
            keys.iter()
                .enumerate()
                .map(|(i, k)| {
                    Arc::new(Route::new(
                        k.clone(),
                        Target::parse(TARGET).unwrap(),
                        data(i, hub_shaped),
                        false,
                    ))
                })
                .collect()
        });
        let table = measure("  + the table's map (routes shared)", n, || {
            let t = RouteTable::new();
            t.apply(routes.iter().cloned().map(Change::Upsert).collect());
            t
        });
        let snap = table.snapshot();
        measure("  + the sorted listing cache", n, || snap.sorted());
        drop((snap, table, routes));
    }

    // The transient cost of a sync: its body, and the body parsed.
    let body = measure("sync body (JSON text)", n, || {
        let obj: serde_json::Map<String, serde_json::Value> = (0..n)
            .map(|i| {
                (
                    format!("/user/u{i}"),
                    serde_json::json!({ "target": TARGET }),
                )
            })
            .collect();
        serde_json::to_vec(&obj).unwrap()
    });
    let _value = measure("sync body parsed as serde_json::Value", n, || {
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    });
}
