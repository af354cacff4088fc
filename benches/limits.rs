//! Fair-use limits: the cost of one check per request (a user's bucket, a client address's
//! bucket and concurrency count, everything at once, and the login path), with the state already
//! there, and the memory the state takes for 100 000 distinct client addresses.
//!
//! Run: `cargo bench --bench limits`. With limits off the proxy does not call them at all (one
//! `Option` check), so there is no "off" row to measure here.

use std::alloc::System;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method};
use hubgate::limits::{Ask, Limits, LimitsFile, Settings};
use hubgate::routes::RouteKind;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn limits(table: &str) -> Limits {
    let file: LimitsFile = toml::from_str(table).expect("a limits table");
    Limits::new(
        Settings::from_file(&file)
            .expect("valid")
            .expect("some limit"),
    )
}

fn ask<'a>(headers: &'a HeaderMap, peer: IpAddr, user: Option<&'a str>) -> Ask<'a> {
    Ask {
        method: &Method::GET,
        path: "/user/alice/api/contents",
        headers,
        peer: Some(peer),
        user: user.map(|u| (u, false)),
        kind: RouteKind::User,
        websocket: false,
    }
}

/// Rates so high that nothing is ever refused: the figure is the check, not the refusal path.
const USER: &str = "user = { rate = 1e9, burst = 1000 }";
const CLIENT: &str = "client = { rate = 1e9, burst = 1000, concurrent = 1000 }";
const ALL: &str = "user = { rate = 1e9, burst = 1000, concurrent = 1000 }\n\
                   client = { rate = 1e9, burst = 1000, concurrent = 1000 }\n\
                   login = { rate = 1e9, burst = 1000 }";

/// A runtime with time enabled: the limits read tokio's clock.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

fn per_check(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let headers = HeaderMap::new();
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let mut group = c.benchmark_group("limits/check");
    for (name, table, user) in [
        ("user_bucket", USER, Some("alice")),
        ("client_bucket_and_concurrency", CLIENT, None),
        ("user_and_client_all", ALL, Some("alice")),
    ] {
        let limits = limits(table);
        group.bench_function(name, |b| {
            b.iter(|| drop(limits.admit(&ask(&headers, peer, user))))
        });
    }
    let limits = limits(ALL);
    group.bench_function("login_post", |b| {
        b.iter(|| {
            let login = Ask {
                method: &Method::POST,
                path: "/hub/login",
                ..ask(&headers, peer, None)
            };
            drop(limits.admit(&login))
        })
    });
    group.finish();
}

/// Not a timing: prints the heap the state of 100 000 client addresses holds.
fn memory(_c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let headers = HeaderMap::new();
    let region = Region::new(GLOBAL);
    let limits = limits(CLIENT);
    for i in 0..100_000u32 {
        let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        drop(limits.admit(&ask(&headers, peer, None)));
    }
    let change = region.change();
    let held = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    println!(
        "limits/memory: 100000 client addresses hold {:.1} MiB ({} bytes per address)",
        held as f64 / (1024.0 * 1024.0),
        held / 100_000
    );
    drop(limits);
}

criterion_group!(benches, per_check, memory);
criterion_main!(benches);
