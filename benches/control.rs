//! Control-plane and auth figures: applying a sync of 10 000 and 100 000 routes, durable route
//! adds through the embedded store (one at a time and 16 concurrent, which share an fsync),
//! start-up with 100 000 stored routes, and the per-request cost of a cached credential check
//! (cache hit, and a session-cookie verification).
//!
//! Run: `cargo bench --bench control`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hubgate::auth::cache::Coalescing;
use hubgate::auth::session::{SessionCheck, Signer};
use hubgate::auth::Identity;
use hubgate::control::{Control, Op};
use hubgate::routes::{Change, Route, RouteData, RouteTable};
use hubgate::store::file::FileStore;
use hubgate::store::{MemoryStore, Store};
use hubgate::target::Target;

fn route(key: &str, target: &str) -> Arc<Route> {
    let mut data = RouteData::new();
    data.insert("target".into(), target.into());
    data.insert("user".into(), key.rsplit('/').next().unwrap_or("").into());
    data.insert("jupyterhub".into(), true.into());
    Arc::new(Route::new(
        key.into(),
        Target::parse(target).unwrap(),
        data,
        false,
    ))
}

fn desired(n: usize, target: &str) -> Vec<Arc<Route>> {
    (0..n)
        .map(|i| route(&format!("/user/u{i}"), target))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn syncs(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("sync");
    g.sample_size(10);
    for n in [10_000usize, 100_000] {
        // Each iteration flips every route's target, so the sync replaces all n routes.
        let table = Arc::new(RouteTable::new());
        let (control, _) = rt
            .block_on(Control::start(table, Arc::new(MemoryStore), false))
            .unwrap();
        let tables = [
            desired(n, "http://10.0.0.1:8888/"),
            desired(n, "http://10.0.0.2:8888/"),
        ];
        let mut flip = 0;
        g.bench_function(BenchmarkId::new("replace_all_memory", n), |b| {
            b.iter(|| {
                flip ^= 1;
                let desired = tables[flip].clone();
                rt.block_on(control.apply(Op::Sync {
                    desired,
                    dry_run: false,
                }))
                .unwrap()
            })
        });
    }
    g.finish();
}

fn durable_adds(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path()).unwrap());
    let (control, _) = rt
        .block_on(Control::start(Arc::new(RouteTable::new()), store, false))
        .unwrap();
    let mut g = c.benchmark_group("durable_add");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut i = 0u64;
    g.bench_function("one_at_a_time", |b| {
        b.iter(|| {
            i += 1;
            let r = route(&format!("/user/d{i}"), "http://10.0.0.1:8888/");
            rt.block_on(control.apply(Op::Batch(vec![Change::Upsert(r)])))
                .unwrap()
        })
    });
    g.bench_function("16_concurrent_clients", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..16 {
                    i += 1;
                    let r = route(&format!("/user/d{i}"), "http://10.0.0.1:8888/");
                    let control = control.clone();
                    tasks.push(tokio::spawn(async move {
                        control.apply(Op::Batch(vec![Change::Upsert(r)])).await
                    }));
                }
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            })
        })
    });
    g.finish();
}

fn startup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    {
        // A runtime of its own: dropping it stops the writer task, which releases the store's
        // directory lock for the iterations below.
        let rt = runtime();
        let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path()).unwrap());
        let (control, _) = rt
            .block_on(Control::start(Arc::new(RouteTable::new()), store, false))
            .unwrap();
        let desired = desired(100_000, "http://10.0.0.1:8888/");
        rt.block_on(control.apply(Op::Sync {
            desired,
            dry_run: false,
        }))
        .unwrap();
    }
    let mut g = c.benchmark_group("startup");
    g.sample_size(10);
    g.bench_function("load_100000_stored_routes", |b| {
        b.iter(|| {
            // Opening needs the directory lock, which the previous iteration's writer task
            // holds until its runtime drops; a runtime per iteration keeps them apart.
            let rt = runtime();
            let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path()).unwrap());
            let table = Arc::new(RouteTable::new());
            rt.block_on(Control::start(table.clone(), store, false))
                .unwrap();
            let n = table.load().len();
            drop(rt);
            n
        })
    });
    g.finish();
}

fn auth_checks(c: &mut Criterion) {
    let rt = runtime();
    let cache: Coalescing<[u8; 32], Arc<Identity>, String> = Coalescing::new(
        100_000,
        Duration::from_secs(300),
        Duration::from_secs(10),
        Duration::from_secs(300),
    );
    let alice = Arc::new(Identity {
        name: "alice".into(),
        admin: false,
        groups: vec![],
        scopes: Some(vec!["access:servers!user=alice".into()]),
    });
    let key = [7u8; 32];
    let a = alice.clone();
    rt.block_on(cache.get(key, move || async move { Ok(Some(a)) }))
        .unwrap();
    let mut g = c.benchmark_group("auth");
    g.bench_function("cache_hit", |b| {
        b.iter(|| {
            rt.block_on(cache.get(key, || async { Ok(None) }))
                .unwrap()
                .1
        })
    });
    let signer = Signer::new(&[b"0123456789abcdef0123456789abcdef".to_vec()]);
    let jwt = signer.session(&alice, 300, Some("hub-token")).unwrap();
    g.bench_function("session_cookie_verify", |b| {
        b.iter(|| matches!(signer.check_session(&jwt), SessionCheck::Valid { .. }))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = syncs, durable_adds, startup, auth_checks
}
criterion_main!(benches);
