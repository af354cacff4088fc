//! Property tests against simple models, through the library's public API.
//!
//! - The route table and its real writer ([`Control`] on a [`MemoryStore`]) against a
//!   `BTreeMap` and a naive longest-prefix search, under random adds, removes, syncs (some dry)
//!   and lookups; and with readers running during the writes, which must only ever see a table
//!   equal to the model at some version (whole batches, never a part of one).
//! - The authorization check and the router agree: the real proxy, in-process with a fake hub
//!   and a recording backend, is sent paths built from dangerous pieces (`..`, `%2e`, `%2f`,
//!   `%5c`, `//`, `;`, `%00`, mixed case, non-UTF-8 bytes) with one user's token; whether it is
//!   let through, and to which target, must both follow from the one route a naive model picks
//!   for the decoded, dot-resolved path; the target must receive a path that routes there too,
//!   and a browser bringing the token in its URL must be redirected to an address on the same
//!   site that routes there as well.
//!
//! Case counts are fixed and the generators small, so the whole module runs in seconds.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hubgate::auth::{Auth, AuthSettings};
use hubgate::control::{Control, Op};
use hubgate::hub::Hub;
use hubgate::path::{self, RequestPath};
use hubgate::proxy::ErrorPages;
use hubgate::proxy::{ForwardOptions, Proxy};
use hubgate::routes::{Change, Route, RouteData, RouteTable, Snapshot};
use hubgate::server::Listen;
use hubgate::server::{self, ConnSettings, Listener};
use hubgate::store::MemoryStore;
use hubgate::target::Target;
use hubgate::upstream::Pool;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// (a) The route table against a model.

/// Segments that collide often: keys share prefixes, differ only in case, hold empty segments.
const SEGMENTS: [&str; 6] = ["a", "b", "A", "user", "", "x y"];

/// A route key as posted (may be un-canonical: trailing slashes, empty segments).
fn raw_key() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&SEGMENTS[..]), 0..4).prop_map(|segs| {
        let mut s = String::new();
        for seg in segs {
            s.push('/');
            s.push_str(seg);
        }
        s
    })
}

#[derive(Debug, Clone)]
enum TableOp {
    /// A batch of upserts (with a target id) and removes.
    Batch(Vec<(String, Option<u32>)>),
    Sync(Vec<(String, u32)>, bool),
    Lookup(String),
}

fn table_op() -> impl Strategy<Value = TableOp> {
    prop_oneof![
        4 => prop::collection::vec((raw_key(), prop::option::of(0u32..4)), 1..5)
            .prop_map(TableOp::Batch),
        1 => (prop::collection::vec((raw_key(), 0u32..4), 0..6), any::<bool>())
            .prop_map(|(routes, dry)| TableOp::Sync(routes, dry)),
        3 => (raw_key(), raw_key()).prop_map(|(a, b)| TableOp::Lookup(format!("{a}{b}"))),
    ]
}

/// The model: canonical key -> target id.
type Model = BTreeMap<String, u32>;

/// The naive lookup: every whole-segment prefix, longest first, then `/`.
fn model_lookup<'a, V>(model: &'a BTreeMap<String, V>, lookup: &str) -> Option<&'a str> {
    let segments: Vec<&str> = lookup[1..].split('/').collect();
    (1..=segments.len())
        .rev()
        .map(|k| format!("/{}", segments[..k].join("/")))
        .chain(["/".to_owned()])
        .find_map(|prefix| model.get_key_value(&prefix).map(|(k, _)| k.as_str()))
}

fn route(key: &str, id: u32) -> Arc<Route> {
    let target = format!("http://127.0.0.1:1/{id}");
    let mut data = RouteData::new();
    data.insert("target".into(), target.clone().into());
    Arc::new(Route::new(
        key.into(),
        Target::parse(&target).unwrap(),
        data,
        false,
    ))
}

fn contents(snap: &Snapshot) -> Model {
    snap.iter()
        .map(|r| {
            let id = r.target().path()[1..].parse().unwrap();
            (r.key().to_owned(), id)
        })
        .collect()
}

/// Applies one op to the model; returns whether it changes the table.
fn apply_model(model: &mut Model, op: &TableOp) -> bool {
    let before = model.clone();
    match op {
        TableOp::Batch(changes) => {
            for (raw, id) in changes {
                let key = path::route_key(raw).unwrap();
                match id {
                    Some(id) => {
                        model.insert(key, *id);
                    }
                    None => {
                        model.remove(&key);
                    }
                }
            }
            // Replacing a route with an equal one is still a change (a new route object).
            changes.iter().any(|(_, id)| id.is_some()) || *model != before
        }
        TableOp::Sync(routes, dry) => {
            if !*dry {
                *model = routes
                    .iter()
                    .map(|(raw, id)| (path::route_key(raw).unwrap(), *id))
                    .collect();
            }
            *model != before
        }
        TableOp::Lookup(_) => false,
    }
}

/// The op as the control plane takes it. Syncs keep the last entry per key, as the API does
/// after refusing duplicates (the model collapses them the same way).
fn to_control(op: &TableOp) -> Option<Op> {
    match op {
        TableOp::Batch(changes) => Some(Op::Batch(
            changes
                .iter()
                .map(|(raw, id)| {
                    let key = path::route_key(raw).unwrap();
                    match id {
                        Some(id) => Change::Upsert(route(&key, *id)),
                        None => Change::Remove(key.into()),
                    }
                })
                .collect(),
        )),
        TableOp::Sync(routes, dry_run) => {
            let unique: Model = routes
                .iter()
                .map(|(raw, id)| (path::route_key(raw).unwrap(), *id))
                .collect();
            Some(Op::Sync {
                desired: unique.iter().map(|(k, id)| route(k, *id)).collect(),
                dry_run: *dry_run,
            })
        }
        TableOp::Lookup(_) => None,
    }
}

/// A runner configuration: this many cases, and no regression files (a failure prints its
/// shrunk input; turn it into a unit test beside the code).
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Syncs in the model collapse duplicate keys to their last entry; so does `to_control`.
fn collapse(op: TableOp) -> TableOp {
    match op {
        TableOp::Sync(routes, dry) => {
            let unique: Model = routes
                .into_iter()
                .map(|(raw, id)| (path::route_key(&raw).unwrap(), id))
                .collect();
            TableOp::Sync(unique.into_iter().collect(), dry)
        }
        other => other,
    }
}

#[test]
fn route_table_follows_the_model() {
    let rt = runtime();
    let mut runner = TestRunner::new(cases(256));
    let ops = prop::collection::vec(table_op().prop_map(collapse), 1..24);
    runner
        .run(&ops, |ops| {
            rt.block_on(async {
                let table = Arc::new(RouteTable::new());
                let (control, _) = Control::start(table.clone(), Arc::new(MemoryStore), false)
                    .await
                    .unwrap();
                let mut model = Model::new();
                for op in &ops {
                    let version = table.load().version();
                    let changes = apply_model(&mut model, op);
                    if let Some(cop) = to_control(op) {
                        let applied = control.apply(cop).await.unwrap();
                        let want = version + u64::from(changes);
                        prop_assert_eq!(applied.version, want, "version after {:?}", op);
                    }
                    let snap = table.snapshot();
                    prop_assert_eq!(snap.version(), table.load().version());
                    prop_assert_eq!(&contents(&snap), &model, "after {:?}", op);
                    if let TableOp::Lookup(raw) = op {
                        let lookup = path::canonical(raw);
                        let got = snap.lookup(&lookup).map(|r| r.key());
                        prop_assert_eq!(got, model_lookup(&model, &lookup), "lookup {}", lookup);
                    }
                    for key in model.keys() {
                        let got = snap.lookup(key).map(|r| r.key());
                        prop_assert_eq!(got, Some(key.as_str()), "a key matches itself");
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn readers_see_only_whole_batches() {
    let rt = runtime();
    let mut runner = TestRunner::new(cases(256));
    let ops = prop::collection::vec(
        table_op()
            .prop_filter("writes only", |op| !matches!(op, TableOp::Lookup(_)))
            .prop_map(collapse),
        1..16,
    );
    runner
        .run(&(ops, 1usize..4), |(ops, group)| {
            let table = Arc::new(RouteTable::new());
            let stop = Arc::new(AtomicBool::new(false));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (table, stop) = (table.clone(), stop.clone());
                    std::thread::spawn(move || {
                        // Every distinct snapshot seen, by version, and the order versions came.
                        let mut seen: HashMap<u64, Arc<Snapshot>> = HashMap::new();
                        let mut last = 0;
                        loop {
                            let done = stop.load(Ordering::Acquire);
                            let snap = table.snapshot();
                            assert!(snap.version() >= last, "versions went backwards");
                            last = snap.version();
                            match seen.get(&snap.version()) {
                                Some(old) if Arc::ptr_eq(old, &snap) => {}
                                Some(old) => assert_eq!(contents(old), contents(&snap)),
                                None => {
                                    seen.insert(snap.version(), snap);
                                }
                            }
                            if done {
                                return seen;
                            }
                            std::thread::yield_now();
                        }
                    })
                })
                .collect();
            // The model's table at every version the writer reports.
            let mut at: BTreeMap<u64, Model> = BTreeMap::from([(0, Model::new())]);
            rt.block_on(async {
                let (control, _) = Control::start(table.clone(), Arc::new(MemoryStore), false)
                    .await
                    .unwrap();
                let mut model = Model::new();
                // Ops go to the writer `group` at a time, so it also commits several together.
                for chunk in ops.chunks(group) {
                    let sent = chunk
                        .iter()
                        .filter_map(to_control)
                        .map(|op| control.apply(op));
                    let results = futures_util::future::join_all(sent).await;
                    for (op, applied) in chunk.iter().zip(results) {
                        let applied = applied.unwrap();
                        apply_model(&mut model, op);
                        let previous = at.insert(applied.version, model.clone());
                        if let Some(previous) = previous {
                            assert_eq!(previous, model, "one version, two tables");
                        }
                    }
                }
            });
            stop.store(true, Ordering::Release);
            let last = table.load().version();
            for reader in readers {
                let seen = reader.join().expect("a reader panicked");
                prop_assert!(
                    seen.contains_key(&last),
                    "a reader never saw the final table"
                );
                for (version, snap) in seen {
                    let want = at.get(&version);
                    prop_assert!(
                        want.is_some(),
                        "a reader saw version {} never published",
                        version
                    );
                    prop_assert_eq!(&contents(&snap), want.unwrap(), "version {}", version);
                }
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// (b) The authorization check and the router agree.

/// The routes, by key: (backend tag, owner or `None` for an open route).
const ROUTES: [RouteSpec; 7] = [
    ("/", "hub", None),
    ("/user/alice", "alice", Some("alice")),
    ("/user/bob", "bob", Some("bob")),
    ("/user/alice/shared", "nested", Some("bob")),
    ("/user/Alice", "upper", Some("bob")),
    ("/user/al/ice", "split", Some("bob")),
    ("/user/alice;x", "semi", Some("bob")),
];

/// Pieces of a request path, the names of the routes' segments more often than the rest.
const PIECES: [&[u8]; 36] = [
    b"user",
    b"user",
    b"user",
    b"alice",
    b"alice",
    b"alice",
    b"bob",
    b"Alice",
    b"ALICE",
    b"shared",
    b"al",
    b"ice",
    b"..",
    b"..",
    b".",
    b"%2e",
    b"%2E%2e",
    b".%2e",
    b"%2f",
    b"%2F",
    b"%5c",
    b"\\",
    b";",
    b";x",
    b"%3B",
    b"%00",
    b"%",
    b"%zz",
    b"%ff",
    b"\xff",
    b"\xc3\xa9",
    b"%61lice",
    b"al%69ce",
    b"x",
    b"",
    b"user/alice",
];

/// How pieces are joined: mostly `/`, sometimes nothing (so pieces merge) or `//`.
const SEPARATORS: [&[u8]; 6] = [b"/", b"/", b"/", b"/", b"", b"//"];

fn dangerous_path() -> impl Strategy<Value = Vec<u8>> {
    let parts = prop::collection::vec((0..PIECES.len(), 0..SEPARATORS.len()), 0..7);
    (parts, any::<bool>()).prop_map(|(parts, double)| {
        let mut p = if double { b"/".to_vec() } else { Vec::new() };
        for (piece, sep) in parts {
            p.extend_from_slice(SEPARATORS[sep]);
            p.extend_from_slice(PIECES[piece]);
        }
        if !p.starts_with(b"/") {
            p.insert(0, b'/');
        }
        p
    })
}

/// One in-process server that plays both the hub (`/hub/api/user`: alice's token is alice) and
/// every target (echoes the path it received).
async fn hub_and_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let resp = if path == "/hub/api/user" {
                        let alice = req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .is_some_and(|v| v == "token alice-token");
                        if alice {
                            let user = json!({"name": "alice", "admin": false, "groups": [],
                                "scopes": ["access:servers!user=alice"]});
                            Response::new(Full::new(Bytes::from(user.to_string())))
                        } else {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::FORBIDDEN;
                            r
                        }
                    } else {
                        Response::new(Full::new(Bytes::from(path)))
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Keeps the in-process proxy serving (it stops when these senders are dropped).
struct Running {
    _stop: tokio::sync::watch::Sender<bool>,
    _close: tokio::sync::watch::Sender<bool>,
}

/// hubgate's proxy, in-process, with authentication on and the routes of [`ROUTES`].
async fn start_proxy(upstream: SocketAddr) -> (SocketAddr, Running) {
    let table = Arc::new(RouteTable::new());
    table.apply(
        ROUTES
            .iter()
            .map(|(key, tag, owner)| {
                let target = format!("http://{upstream}/t/{tag}");
                let mut data = RouteData::new();
                data.insert("target".into(), target.clone().into());
                match owner {
                    Some(owner) => {
                        data.insert("user".into(), (*owner).into());
                        data.insert("server_name".into(), "".into());
                    }
                    None => {
                        data.insert("hub".into(), true.into());
                    }
                }
                let route = Route::new((*key).into(), Target::parse(&target).unwrap(), data, false);
                Change::Upsert(Arc::new(route))
            })
            .collect(),
    );
    let tls = hubgate::tls::client_config(&Default::default(), true).unwrap();
    let client = hubgate::upstream::client(tls.clone());
    let hub_api = Target::parse(&format!("http://{upstream}/hub/api")).unwrap();
    let hub = Arc::new(Hub::new(
        hub_api,
        Some("hubgate-token".into()),
        client.clone(),
        None,
    ));
    let auth = Arc::new(Auth::new(
        hub,
        AuthSettings {
            cache_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(10),
            cache_size: 1000,
            grace: Duration::from_secs(300),
            allow_token_in_url: true,
            legacy_token_endpoint: false,
            hub_login_cookie: None,
            oauth: None,
            session_secrets: vec![b"model-test-secret-of-at-least-32-bytes".to_vec()],
            ephemeral_secret: false,
            identity_header: None,
            cookie_path: "/".into(),
            cookie_secure: false,
        },
    ));
    let (close, closing) = tokio::sync::watch::channel(false);
    let proxy = Arc::new(Proxy::new(
        table,
        Pool::new(Arc::new(tls), Default::default()),
        ForwardOptions {
            host_routing: false,
            x_forward: true,
            prepend_path: true,
            include_prefix: true,
            custom_headers: Vec::new(),
            proxy_timeout: Some(Duration::from_secs(10)),
            error_pages: ErrorPages::Builtin,
            access_log: false,
        },
        Some(auth),
        closing,
    ));
    let listener = Listener::bind(&Listen::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    })
    .await
    .unwrap();
    let Listener::Tcp(tcp) = &listener else {
        unreachable!("a TCP listen address")
    };
    let addr = tcp.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let settings = ConnSettings {
        idle_timeout: None,
        keep_alive_timeout: Duration::from_secs(5),
        max_header_size: 32 * 1024,
        max_connections: 1000,
        tls: None,
    };
    tokio::spawn(server::serve(
        server::Intake::of(listener, "proxy", settings),
        move |req, info| proxy.clone().handle(req, info),
        stopped,
        Duration::from_secs(1),
    ));
    let running = Running {
        _stop: stop,
        _close: close,
    };
    (addr, running)
}

/// An answer: status, `Location` (if any) and body.
type Answer = (u16, Option<String>, Vec<u8>);

/// Sends one GET with alice's token, the path written byte for byte: in the `Authorization`
/// header, or as a browser that brings it in the URL (`?token=`, `Accept: text/html`). Returns
/// `None` when the connection closed without a response.
async fn raw_get(proxy: SocketAddr, path: &[u8], in_url: bool) -> Option<Answer> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(path);
    if in_url {
        req.extend_from_slice(b"?token=alice-token HTTP/1.1\r\nAccept: text/html\r\n");
    } else {
        req.extend_from_slice(b" HTTP/1.1\r\nAuthorization: token alice-token\r\n");
    }
    req.extend_from_slice(b"Host: hub.example\r\nConnection: close\r\n\r\n");
    stream.write_all(&req).await.unwrap();
    let mut resp = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut resp)).await;
    read.expect("the proxy answers within 10 s").ok()?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let at = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let location = String::from_utf8_lossy(&resp[..at]).lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("location")
            .then(|| value.trim().to_owned())
    });
    Some((status, location, resp[at + 4..].to_vec()))
}

/// A route of [`ROUTES`]: key, backend tag, owner.
type RouteSpec = (&'static str, &'static str, Option<&'static str>);

/// What must happen to a request for `path`: `None` for a 400 (hyper or hubgate refuses the
/// path), else the route the model matches and the path hubgate must forward.
fn expected(path: &[u8]) -> Option<(&'static RouteSpec, String)> {
    let text = std::str::from_utf8(path).ok()?;
    let uri = http::Uri::try_from(text).ok()?;
    let parsed = RequestPath::parse(uri.path()).ok()?;
    let keys: BTreeMap<String, usize> = ROUTES
        .iter()
        .enumerate()
        .map(|(i, (k, _, _))| ((*k).to_owned(), i))
        .collect();
    let key = model_lookup(&keys, &parsed.lookup).expect("`/` matches everything");
    Some((&ROUTES[keys[key]], parsed.raw.into_owned()))
}

#[test]
fn authorization_and_routing_agree() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (proxy, _running) = rt.block_on(async {
        let upstream = hub_and_backend().await;
        start_proxy(upstream).await
    });
    let mut runner = TestRunner::new(cases(256));
    runner
        .run(&(dangerous_path(), any::<bool>()), |(path, in_url)| {
            let shown = String::from_utf8_lossy(&path).into_owned();
            let answer = rt.block_on(raw_get(proxy, &path, in_url));
            match expected(&path) {
                None => {
                    // Refused before routing: a 400, or hyper closing the connection.
                    if let Some((status, _, _)) = &answer {
                        prop_assert_eq!(*status, 400, "path {:?}", shown);
                    }
                }
                Some((&(key, tag, owner), forwarded)) => {
                    let (status, location, body) = answer.expect("a routable path gets an answer");
                    let allowed = owner.is_none_or(|o| o == "alice");
                    if !allowed {
                        prop_assert_eq!(
                            status,
                            403,
                            "path {:?} matches {} (owner {:?})",
                            shown,
                            key,
                            owner
                        );
                        return Ok(());
                    }
                    if in_url && owner.is_some() {
                        // A browser's URL token is traded for a cookie by a redirect to the same
                        // address without it: on this site, and routed to the same route.
                        prop_assert_eq!(status, 302, "path {:?} matches {}", shown, key);
                        let location = location.unwrap_or_default();
                        prop_assert!(
                            location.starts_with('/')
                                && !location.starts_with("//")
                                && !location.starts_with("/\\"),
                            "path {:?}: redirected off the site, to {:?}",
                            shown,
                            location
                        );
                        let routed = expected(location.as_bytes()).map(|(r, _)| r.0);
                        prop_assert_eq!(
                            routed,
                            Some(key),
                            "path {:?} redirected to {:?}",
                            shown,
                            location
                        );
                        return Ok(());
                    }
                    prop_assert_eq!(status, 200, "path {:?} matches {}", shown, key);
                    let received = String::from_utf8(body).unwrap();
                    let prefix = format!("/t/{tag}");
                    prop_assert!(
                        received.starts_with(&prefix),
                        "path {:?} was authorized for {} but went to {:?}",
                        shown,
                        key,
                        received
                    );
                    let rest = &received[prefix.len()..];
                    prop_assert_eq!(rest, forwarded.as_str(), "path {:?}", shown);
                    // What the target received routes to the same route again.
                    let again = RequestPath::parse(rest).unwrap();
                    let routed = expected(rest.as_bytes()).map(|(r, _)| r.0);
                    prop_assert_eq!(routed, Some(key), "forwarded {:?} ({})", rest, again.lookup);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn model_lookup_is_naive_longest_prefix() {
    let model: BTreeMap<String, ()> = ["/", "/a", "/a/b"]
        .iter()
        .map(|k| (k.to_string(), ()))
        .collect();
    assert_eq!(model_lookup(&model, "/a/bc"), Some("/a"));
    assert_eq!(model_lookup(&model, "/a/b/c"), Some("/a/b"));
    assert_eq!(model_lookup(&model, "/x"), Some("/"));
    assert_eq!(model_lookup(&model, "/"), Some("/"));
}
