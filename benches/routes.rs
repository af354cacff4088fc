//! Route-table figures: lookups at 10, 10 000 and 100 000 routes, path normalisation, writes
//! (and what they would cost with a copied std HashMap instead of the persistent hash trie),
//! lookups while a writer churns, and serialising `GET /api/routes` at 100 000 routes.
//!
//! Run: `cargo bench --bench routes`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hubgate::api::serialize_routes;
use hubgate::path::RequestPath;
use hubgate::routes::{Change, Route, RouteData, RouteTable};
use hubgate::target::Target;

fn route(key: &str) -> Arc<Route> {
    let t = "http://127.0.0.1:8888/";
    let mut data = RouteData::new();
    data.insert("target".into(), t.into());
    data.insert("user".into(), key.rsplit('/').next().unwrap_or("").into());
    data.insert("server_name".into(), "".into());
    data.insert("jupyterhub".into(), true.into());
    Arc::new(Route::new(
        key.into(),
        Target::parse(t).unwrap(),
        data,
        false,
    ))
}

/// A JupyterHub-shaped table: the hub at `/`, and `n - 1` user servers at `/user/<name>`.
fn table(n: usize) -> RouteTable {
    let t = RouteTable::new();
    let mut changes = vec![Change::Upsert(route("/"))];
    changes.extend((1..n).map(|i| Change::Upsert(route(&format!("/user/u{i}")))));
    t.apply(changes);
    t
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for n in [10usize, 10_000, 100_000] {
        let t = table(n);
        let mid = format!("/user/u{}/api/kernels", n / 2);
        g.bench_with_input(BenchmarkId::new("hit_depth3", n), &mid, |b, p| {
            b.iter(|| t.load().lookup(black_box(p)).map(|r| r.path_depth()))
        });
        let miss = "/nothing/here/at/all".to_owned();
        g.bench_with_input(BenchmarkId::new("fallback_to_root", n), &miss, |b, p| {
            b.iter(|| t.load().lookup(black_box(p)).map(|r| r.path_depth()))
        });
        let t_no_root = RouteTable::new();
        t_no_root.apply(
            (1..n)
                .map(|i| Change::Upsert(route(&format!("/user/u{i}"))))
                .collect(),
        );
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, p| {
            b.iter(|| t_no_root.load().lookup(black_box(p)).is_none())
        });
    }
    g.finish();
}

fn normalisation(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    for (name, p) in [
        ("plain", "/user/alice/api/kernels/1234"),
        (
            "encoded",
            "/@/space%20word/user/foo%40bar/lab/tree/a%20b.ipynb",
        ),
        ("dots", "/user/bob/../alice/./api/%2e%2e/kernels"),
    ] {
        g.bench_function(name, |b| b.iter(|| RequestPath::parse(black_box(p))));
    }
    g.finish();
}

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("write");
    g.sample_size(20);
    for n in [10_000usize, 100_000] {
        let t = table(n);
        let mut i = 0u64;
        g.bench_function(BenchmarkId::new("persistent_add_remove", n), |b| {
            b.iter(|| {
                i += 1;
                let key = format!("/user/new{i}");
                t.apply(vec![Change::Upsert(route(&key))]);
                t.apply(vec![Change::Remove(key.into())]);
            })
        });
        // The alternative design: an arc-swapped std HashMap copied on every write.
        let std_map: HashMap<Arc<str>, Arc<Route>> = (1..n)
            .map(|i| {
                let r = route(&format!("/user/u{i}"));
                (Arc::from(r.key()), r)
            })
            .collect();
        g.bench_function(BenchmarkId::new("std_clone_on_write", n), |b| {
            b.iter(|| {
                let mut next = std_map.clone();
                next.insert("/user/new".into(), route("/user/new"));
                black_box(next.len())
            })
        });
    }
    g.finish();
}

fn lookups_under_churn(c: &mut Criterion) {
    let t = Arc::new(table(100_000));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("/user/churn{}", i % 1000);
                t.apply(vec![Change::Upsert(route(&key))]);
                t.apply(vec![Change::Remove(key.into())]);
            }
        })
    };
    c.bench_function("lookup/hit_depth3_while_writing/100000", |b| {
        b.iter(|| {
            t.load()
                .lookup(black_box("/user/u50000/api/kernels"))
                .map(|r| r.path_depth())
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
}

fn listing(c: &mut Criterion) {
    let mut g = c.benchmark_group("api");
    g.sample_size(10);
    let t = table(100_000);
    let snap = t.snapshot();
    g.bench_function("get_routes_json/100000", |b| {
        b.iter(|| serialize_routes(snap.sorted().iter(), &[]).len())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = lookups, normalisation, writes, lookups_under_churn, listing
}
criterion_main!(benches);
