//! Route persistence: the file store (`--storage-backend file`) across clean restarts, SIGKILL at
//! random moments, torn log tails and a second process on the same directory; and the memory
//! store forgetting everything, as CHP does. Only signals, the API and the storage directory's
//! log file (to tear it) are touched.

use std::{
    collections::BTreeSet,
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{Method, Request, StatusCode};
use serde_json::{json, Map, Value};

use crate::support::{eventually, full, posted, Backend, HttpClient, Hubgate, WAIT};
use crate::sync::{big_api, user_table};

const TARGET: &str = "http://127.0.0.1:9";

/// Starts hubgate on the file store in `dir`.
async fn start_on(dir: &Path) -> Hubgate {
    Hubgate::builder().file_store(dir).start().await
}

/// Asserts that `after` is `before`: posted data first, then `last_activity`.
fn assert_same_table(before: &Map<String, Value>, after: &Map<String, Value>, what: &str) {
    assert_eq!(
        Value::Object(posted(after)),
        Value::Object(posted(before)),
        "{what}: targets and data differ"
    );
    assert_eq!(after, before, "{what}: last_activity differs");
}

#[tokio::test]
async fn routes_survive_a_clean_restart_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::echo().await;
    let mut hg = start_on(dir.path()).await;
    hg.add_route_data(
        "/user/alice",
        json!({"target": backend.url(""), "user": "alice", "server_name": "", "n": [1, {"x": null}]}),
    )
    .await;
    hg.add_route("/hub", TARGET).await;
    hg.add_route("/gone", TARGET).await;
    assert_eq!(
        hg.api_delete("/api/routes/gone").await.status,
        StatusCode::NO_CONTENT
    );
    hg.add_route_data("/hub", json!({"target": TARGET, "replaced": true}))
        .await;
    let before = hg.routes().await;
    let v = hg.table_version().await;
    assert_eq!(v, 5);

    hg.stop("TERM").await;
    let mut hg = start_on(dir.path()).await;
    assert_same_table(&before, &hg.routes().await, "after SIGTERM and restart");
    assert_eq!(
        hg.table_version().await,
        v,
        "the version after a clean restart"
    );

    hg.add_route_data("/user/bob", json!({"target": TARGET, "user": "bob"}))
        .await;
    assert_eq!(
        hg.table_version().await,
        v + 1,
        "the version continues after a restart"
    );
    let before = hg.routes().await;
    assert_eq!(before.len(), 3);

    hg.stop("KILL").await;
    let hg = start_on(dir.path()).await;
    assert_same_table(&before, &hg.routes().await, "after SIGKILL and restart");
    assert_eq!(hg.table_version().await, v + 1, "the version after SIGKILL");

    // The restored table routes requests.
    let resp = hg.get("/user/alice/lab").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["path"], "/user/alice/lab");
}

#[tokio::test]
async fn a_large_table_survives_log_compaction_and_a_kill_9() {
    const COUNT: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let mut hg = start_on(dir.path()).await;
    // Over 8 MB in one record: large enough for the store to rewrite its log after it.
    let load = user_table(COUNT, "http://127.0.0.1:9", |_| true, &[]);
    let resp = big_api(&hg, Method::POST, "/api/proxy", load).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["added"], COUNT);
    let resp = hg
        .api(
            Method::PATCH,
            "/api/proxy",
            json!({"add": {"/extra": {"target": TARGET, "user": "x"}}, "remove": ["/user/u7"]})
                .to_string(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let switch = user_table(
        COUNT,
        "http://127.0.0.1:10",
        |i| i != 7,
        &[("/extra", TARGET)],
    );
    let resp = big_api(&hg, Method::POST, "/api/proxy", switch).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["updated"], COUNT, "{}", resp.text());
    let resp = big_api(&hg, Method::GET, "/api/routes", String::new()).await;
    assert_eq!(resp.status, StatusCode::OK);
    let before = resp.json();
    assert_eq!(before.as_object().unwrap().len(), COUNT);
    let v = hg.table_version().await;
    assert_eq!(v, 3);

    hg.stop("KILL").await;
    let hg = start_on(dir.path()).await;
    assert_eq!(hg.table_version().await, v, "the version after restart");
    let resp = big_api(&hg, Method::GET, "/api/routes", String::new()).await;
    assert_eq!(resp.status, StatusCode::OK);
    let after = resp.json();
    assert_eq!(
        after.as_object().unwrap().len(),
        COUNT,
        "routes after restart"
    );
    assert_eq!(after["/extra"], before["/extra"]);
    assert_eq!(after["/user/u7"], Value::Null, "a removed route came back");
    assert_eq!(after["/user/u99999"]["target"], "http://127.0.0.1:10");
    assert!(
        after == before,
        "the table after restart differs from the one before"
    );
}

#[tokio::test]
async fn since_before_the_loaded_version_is_410_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut hg = start_on(dir.path()).await;
    hg.add_route("/a", TARGET).await;
    hg.add_route("/b", TARGET).await;
    assert_eq!(hg.table_version().await, 2);
    hg.stop("TERM").await;

    let hg = start_on(dir.path()).await;
    assert_eq!(hg.table_version().await, 2);
    for endpoint in ["/api/routes", "/api/proxy"] {
        for since in [0, 1] {
            let resp = hg.api_get(&format!("{endpoint}?since={since}")).await;
            assert_eq!(
                resp.status,
                StatusCode::GONE,
                "{endpoint}?since={since}: {resp:?}"
            );
            assert!(
                resp.content_type().starts_with("application/json"),
                "{endpoint}: content type {:?}",
                resp.content_type()
            );
            let body = resp.json();
            assert_eq!(body["status"], 410, "{body}");
            assert!(body["message"].is_string(), "{body}");
        }
        let resp = hg.api_get(&format!("{endpoint}?since=2")).await;
        assert_eq!(resp.status, StatusCode::OK, "{endpoint}?since=2: {resp:?}");
        assert_eq!(
            resp.json(),
            json!({}),
            "{endpoint}: nothing changed since the restart"
        );
    }
    hg.add_route("/c", TARGET).await;
    assert_eq!(
        hg.api_delete("/api/routes/a").await.status,
        StatusCode::NO_CONTENT
    );
    for endpoint in ["/api/routes", "/api/proxy"] {
        let resp = hg.api_get(&format!("{endpoint}?since=2")).await;
        assert_eq!(resp.status, StatusCode::OK, "{endpoint}: {resp:?}");
        assert_eq!(resp.table_version(), 4);
        let changes = resp.json();
        let keys: BTreeSet<&String> = changes.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            BTreeSet::from([&"/a".to_owned(), &"/c".to_owned()]),
            "{changes}"
        );
        assert_eq!(changes["/a"], Value::Null);
        assert_eq!(changes["/c"]["target"], TARGET);
    }
}

/// A small xorshift generator: the crash moments vary per run, and a failing run prints its
/// seed (set `HUBGATE_CRASH_SEED` to replay it).
struct Rng(u64);

impl Rng {
    fn new() -> (Rng, u64) {
        let seed = std::env::var("HUBGATE_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1);
                nanos ^ u64::from(std::process::id()).rotate_left(32)
            });
        (Rng(seed | 1), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What the posting clients of one round saw.
#[derive(Default)]
struct Posted {
    /// Route numbers whose `POST` was answered 201.
    acked: Vec<u64>,
    /// Answers other than 201 (there should be none: a killed process answers nothing).
    unexpected: Vec<String>,
}

/// Posts `/r/<n>` for increasing `n` (shared with the other clients) until a request fails.
async fn post_until_cut(
    client: HttpClient,
    api: SocketAddr,
    token: String,
    next: Arc<AtomicU64>,
    posted: Arc<Mutex<Posted>>,
) {
    let body = json!({"target": TARGET}).to_string();
    loop {
        let n = next.fetch_add(1, Ordering::SeqCst);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{api}/api/routes/r/{n}"))
            .header("authorization", format!("token {token}"))
            .body(full(body.clone()))
            .unwrap();
        let status = match tokio::time::timeout(WAIT, client.request(req)).await {
            Ok(Ok(resp)) => resp.status(),
            // Cut by the kill (or never answered): this route may or may not exist.
            Ok(Err(_)) | Err(_) => return,
        };
        let mut posted = posted.lock().unwrap();
        if status == StatusCode::CREATED {
            posted.acked.push(n);
        } else {
            posted.unexpected.push(format!("/r/{n}: {status}"));
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_routes_survive_sigkill_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rng, seed) = Rng::new();
    eprintln!("crash test seed {seed} (HUBGATE_CRASH_SEED replays it)");
    let next = Arc::new(AtomicU64::new(0));
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut table: BTreeSet<String> = BTreeSet::new();
    let mut hg = start_on(dir.path()).await;

    for round in 1..=5 {
        let start_version = hg.table_version().await;
        let posted = Arc::new(Mutex::new(Posted::default()));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(post_until_cut(
                    hg.client.clone(),
                    hg.api,
                    hg.token().to_owned(),
                    next.clone(),
                    posted.clone(),
                ))
            })
            .collect();
        eventually(WAIT, "a first acknowledged route", || {
            let any = !posted.lock().unwrap().acked.is_empty();
            async move { any }
        })
        .await;
        let delay = 50 + rng.below(451);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        hg.stop("KILL").await;
        for client in clients {
            tokio::time::timeout(WAIT, client)
                .await
                .expect("a posting client did not stop after the kill")
                .expect("a posting client panicked");
        }
        let Posted {
            acked: round_acked,
            unexpected,
        } = std::mem::take(&mut *posted.lock().unwrap());
        assert!(
            unexpected.is_empty(),
            "round {round}: answers other than 201: {unexpected:?}"
        );

        hg = start_on(dir.path()).await;
        let now: BTreeSet<String> = hg.routes().await.keys().cloned().collect();
        let attempted = next.load(Ordering::SeqCst);
        acked.extend(&round_acked);
        let lost: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|n| !now.contains(&format!("/r/{n}")))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round} (seed {seed}, killed after {delay} ms, {} acknowledged this round): \
             acknowledged routes missing after restart: {lost:?}",
            round_acked.len()
        );
        let vanished: Vec<&String> = table.difference(&now).collect();
        assert!(
            vanished.is_empty(),
            "round {round}: routes loaded after the previous restart are gone: {vanished:?}"
        );
        let phantom: Vec<&String> = now
            .iter()
            .filter(|k| {
                k.strip_prefix("/r/")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_none_or(|n| n >= attempted)
            })
            .collect();
        assert!(
            phantom.is_empty(),
            "round {round}: routes never posted: {phantom:?}"
        );
        let restarted_version = hg.table_version().await;
        assert!(
            restarted_version >= start_version + round_acked.len() as u64,
            "round {round}: version {restarted_version} after restart, but it was \
             {start_version} and {} adds were acknowledged since",
            round_acked.len()
        );
        eprintln!(
            "round {round}: killed after {delay} ms; {} acknowledged, {} attempted in all, \
             {} routes, version {restarted_version}",
            round_acked.len(),
            attempted,
            now.len()
        );
        table = now;
    }
    assert!(
        acked.len() >= 5,
        "each round acknowledged at least one route"
    );
}

#[tokio::test]
async fn a_torn_log_tail_is_ignored_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut hg = start_on(dir.path()).await;
    hg.add_route_data("/a", json!({"target": TARGET, "user": "a"}))
        .await;
    hg.add_route("/b", TARGET).await;
    let before = hg.routes().await;
    hg.stop("TERM").await;

    let log = dir.path().join("routes.log");
    assert!(log.exists(), "no routes.log in the storage directory");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(
        b"0badc0de {\"batch\":{\"version\":3,\"changes\":[{\"op\":\"put\",\"key\":\"/torn\"",
    )
    .unwrap();
    drop(f);

    let mut hg = start_on(dir.path()).await;
    assert_same_table(&before, &hg.routes().await, "after a torn tail");
    assert_eq!(
        hg.table_version().await,
        2,
        "the torn record is not a version"
    );

    // Appends after the torn tail are read back: the garbage did not swallow them.
    hg.add_route("/c", TARGET).await;
    let before = hg.routes().await;
    hg.stop("TERM").await;
    let hg = start_on(dir.path()).await;
    assert_same_table(
        &before,
        &hg.routes().await,
        "a route added after the torn tail",
    );
    assert_eq!(hg.table_version().await, 3);
}

#[tokio::test]
async fn a_second_hubgate_on_the_same_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_on(dir.path()).await;
    first.add_route("/a", TARGET).await;

    let out = Hubgate::builder()
        .file_store(dir.path())
        .run_to_exit()
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second hubgate exited with {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("in use"),
        "the message does not say the directory is in use:\n{stderr}"
    );

    // The first one is unharmed and its log still takes writes.
    assert!(first.is_running(), "the first hubgate stopped");
    first.add_route("/b", TARGET).await;
    let before = first.routes().await;
    first.stop("TERM").await;
    let hg = start_on(dir.path()).await;
    assert_same_table(&before, &hg.routes().await, "the first hubgate's table");
}

#[tokio::test]
async fn the_memory_backend_starts_empty_after_a_restart() {
    for args in [vec![], vec!["--storage-backend", "memory"]] {
        let mut hg = Hubgate::start(&args).await;
        hg.add_route("/a", TARGET).await;
        assert_eq!(hg.routes().await.len(), 1);
        hg.stop("TERM").await;
        let hg = Hubgate::start(&args).await;
        assert!(
            hg.routes().await.is_empty(),
            "{args:?}: routes survived a restart"
        );
        assert_eq!(hg.table_version().await, 0, "{args:?}");
    }
}
