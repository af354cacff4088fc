//! The OpenAPI document (`docs/openapi.json`) against the router, the served copy, the example
//! client that uses only the document's operations, and regression tests for what schemathesis
//! (`.ci/schemathesis.sh`) found.
//!
//! The document and the router cannot drift apart: the router dispatches on
//! `hubgate::api::ENDPOINTS` and nothing else, and the first test holds that list and the
//! document's paths and methods equal; the second asks a live hubgate every documented
//! operation (each must be answered by its handler), every other method on those paths (405 with
//! `Allow`) and near-miss paths (404), on the API port and on the metrics listener.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::{assert_json_error, Hubgate, Resp};

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

fn document() -> Value {
    serde_json::from_str(hubgate::api::OPENAPI).expect("docs/openapi.json is JSON")
}

/// `{path: {METHOD}}` as the document describes them.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = document();
    let paths = doc["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .expect("a path item is an object")
                .keys()
                .map(|k| k.to_ascii_uppercase())
                .filter(|k| METHODS.contains(&k.as_str()))
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// The paths the metrics listener answers, as the document marks them.
fn on_metrics_listener() -> BTreeSet<String> {
    let doc = document();
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, item)| item["x-hubgate-metrics-listener"] == true)
        .map(|(path, _)| path.clone())
        .collect()
}

/// A request path for a documented path: each `{parameter}` filled with a plausible value.
fn concrete(path: &str) -> String {
    path.replace("{route_path}", "probe/route")
        .replace("{name}", "alice")
}

/// Whether `resp` is the router's own 404 or 405 (not a handler's answer).
fn is_router_refusal(resp: &Resp) -> bool {
    let router_404 = resp.status == StatusCode::NOT_FOUND
        && resp.body.as_ref() == br#"{"status":404,"message":"Not Found"}"#;
    router_404 || resp.status == StatusCode::METHOD_NOT_ALLOWED
}

#[test]
fn the_document_names_exactly_the_routers_endpoints() {
    let router: BTreeMap<String, BTreeSet<String>> = hubgate::api::ENDPOINTS
        .iter()
        .map(|e| {
            let methods = e.methods.iter().map(|m| m.to_string()).collect();
            (e.path.to_owned(), methods)
        })
        .collect();
    assert_eq!(
        router.len(),
        hubgate::api::ENDPOINTS.len(),
        "a path is listed twice in ENDPOINTS"
    );
    let doc = documented();
    for (path, methods) in &router {
        assert_eq!(
            doc.get(path),
            Some(methods),
            "the router answers {path} {methods:?}; the document says {:?}",
            doc.get(path)
        );
    }
    for path in doc.keys() {
        assert!(
            router.contains_key(path),
            "the document describes {path}, which the router does not answer"
        );
    }
}

#[test]
fn the_document_is_openapi_3_1_of_this_version() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    // Every operation is named (the stateful links and the example refer to these names).
    let mut ids = BTreeSet::new();
    for (path, methods) in documented() {
        for method in methods {
            let op = &doc["paths"][&path][method.to_ascii_lowercase()];
            let id = op["operationId"].as_str().unwrap_or_else(|| {
                panic!("{method} {path} has no operationId");
            });
            assert!(ids.insert(id.to_owned()), "operationId {id} is used twice");
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no response"
            );
        }
    }
}

#[tokio::test]
async fn every_documented_operation_is_answered_and_nothing_else() {
    let hg = Hubgate::builder().metrics().start().await;
    for (path, methods) in documented() {
        let url = concrete(&path);
        for method in METHODS {
            let resp = hg
                .api(Method::from_bytes(method.as_bytes()).unwrap(), &url, "{}")
                .await;
            if methods.contains(method) {
                assert!(
                    !is_router_refusal(&resp),
                    "{method} {url} is documented but the router refused it: {resp:?}"
                );
            } else {
                // A HEAD answer has no body.
                if method == "HEAD" {
                    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED, "HEAD {url}");
                } else {
                    assert_json_error(&resp, StatusCode::METHOD_NOT_ALLOWED, &url);
                }
                let allow = resp.headers.get("allow").map(|v| v.to_str().unwrap());
                let mut got: Vec<String> = allow
                    .unwrap_or_default()
                    .split(", ")
                    .map(str::to_owned)
                    .collect();
                got.sort();
                let want: Vec<String> = methods.iter().cloned().collect();
                assert_eq!(got, want, "Allow of {method} {url}");
            }
        }
    }
    for near_miss in [
        "/",
        "/api",
        "/api/",
        "/api/routesx",
        "/api/proxy/",
        "/api/proxy/x",
        "/api/status/",
        "/api/auth",
        "/api/auth/cache/x",
        "/api/auth/cachex",
        "/api/handshake/x",
        "/api/log-level/",
        "/api/openapi.yaml",
        "/health",
        "/health/",
        "/health/live/x",
        "/metrics/",
    ] {
        let resp = hg.api(Method::GET, near_miss, "").await;
        assert_json_error(&resp, StatusCode::NOT_FOUND, near_miss);
    }

    // The metrics listener answers the marked paths, GET and HEAD, without a token; nothing else.
    let marked = on_metrics_listener();
    assert!(!marked.is_empty());
    for path in documented().keys() {
        let resp = hg.metrics_get(&concrete(path)).await;
        if marked.contains(path) {
            assert!(
                resp.status == StatusCode::OK || resp.status == StatusCode::SERVICE_UNAVAILABLE,
                "GET {path} on the metrics listener: {resp:?}"
            );
        } else {
            assert_eq!(
                resp.status,
                StatusCode::NOT_FOUND,
                "GET {path} on the metrics listener"
            );
        }
    }
}

#[tokio::test]
async fn the_document_is_served_behind_the_token() {
    let hg = Hubgate::start(&[]).await;
    let resp = hg.api_get("/api/openapi.json").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.content_type(), "application/json");
    let file = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json"))
        .expect("read docs/openapi.json");
    assert_eq!(
        resp.body.as_ref(),
        file.as_slice(),
        "served != docs/openapi.json"
    );

    for headers in [vec![], vec![("authorization", "token wrong")]] {
        let resp = hg
            .api_with(Method::GET, "/api/openapi.json", &headers, "")
            .await;
        assert_eq!(resp.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert!(resp.body.is_empty());
    }
}

/// Runs `examples/sync_table.py` against `hg`; returns (success, stdout, stderr).
fn run_example(hg: &Hubgate, args: &[&str]) -> (bool, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sync_table.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env("HUBGATE_API_URL", hg.api_url(""))
        .env("CONFIGPROXY_AUTH_TOKEN", hg.token())
        .output()
        .expect("run python3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn targets(table: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    table
        .iter()
        .map(|(k, r)| (k.clone(), r["target"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn the_example_client_syncs_a_table_from_a_file() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/user/alice", "http://127.0.0.1:9001").await;
    hg.add_route("/user/carol", "http://127.0.0.1:9003").await;
    hg.add_route("/ws/keep", "http://127.0.0.1:9009").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.json");
    let desired = json!({
        "/user/alice": {"target": "http://127.0.0.1:9101", "user": "alice"},
        "/user/bob": {"target": "http://127.0.0.1:9002"},
        "/ws/keep": {"target": "http://127.0.0.1:9009"},
    });
    std::fs::write(&file, desired.to_string()).unwrap();
    let file = file.to_str().unwrap();

    // A dry run counts and changes nothing.
    let before = hg.routes().await;
    let (ok, out, err) = run_example(&hg, &[file, "--dry-run", "--page-size", "1"]);
    assert!(ok, "dry run failed: {out}\n{err}");
    assert!(
        out.contains("would change: 1 added, 1 updated, 1 removed, 1 unchanged"),
        "{out}"
    );
    assert_eq!(targets(&hg.routes().await), targets(&before));

    // Pages of one route: the listing is read in three pages before the sync.
    let (ok, out, err) = run_example(&hg, &[file, "--page-size", "1"]);
    assert!(ok, "sync failed: {out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "~ /user/alice -> http://127.0.0.1:9101 (was http://127.0.0.1:9001)",
            "+ /user/bob -> http://127.0.0.1:9002",
            "- /user/carol",
            "synced: 1 added, 1 updated, 1 removed, 1 unchanged; table version 4",
        ],
        "{out}"
    );
    let table = hg.routes().await;
    assert_eq!(
        targets(&table),
        BTreeMap::from([
            ("/user/alice".to_owned(), "http://127.0.0.1:9101".to_owned()),
            ("/user/bob".to_owned(), "http://127.0.0.1:9002".to_owned()),
            ("/ws/keep".to_owned(), "http://127.0.0.1:9009".to_owned()),
        ])
    );
    // A file hubgate refuses changes nothing, and the client says why.
    std::fs::write(
        dir.path().join("bad.json"),
        json!({"/user/dave": {"target": "not a url"}}).to_string(),
    )
    .unwrap();
    let bad = dir.path().join("bad.json");
    let (ok, out, err) = run_example(&hg, &[bad.to_str().unwrap()]);
    assert!(!ok, "a refused sync must fail: {out}");
    assert!(err.contains("400") && err.contains("/user/dave"), "{err}");
    assert_eq!(targets(&hg.routes().await), targets(&table));
}

// Regression tests for what schemathesis found (each was a real answer before the fix).

/// `POST /api/proxy?dry_run=m` (or `True`, as Python's `str(True)` spells it) ran a real sync:
/// any value but three spellings of yes was read as no. A misspelt parameter name did the same.
#[tokio::test]
async fn a_dry_run_that_is_not_clearly_yes_or_no_is_refused() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/keep", "http://127.0.0.1:9001").await;
    for query in [
        "dry_run=True",
        "dry_run=m",
        "dry_run=",
        "dryrun=true",
        "dry-run=1",
    ] {
        let resp = hg
            .api(Method::POST, &format!("/api/proxy?{query}"), "{}")
            .await;
        let message = assert_json_error(&resp, StatusCode::BAD_REQUEST, query);
        assert!(message.contains("dry"), "{query}: {message}");
        assert!(
            hg.route("/keep").await.is_some(),
            "{query} synced the table away"
        );
    }
    let resp = hg.api(Method::POST, "/api/proxy?dry_run=yes", "{}").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["dry_run"], true);
    assert!(hg.route("/keep").await.is_some());
    let resp = hg.api(Method::PATCH, "/api/proxy?dry_run=true", "{}").await;
    assert_json_error(&resp, StatusCode::BAD_REQUEST, "PATCH takes no parameters");
    let resp = hg.api(Method::GET, "/api/proxy?ofset=1", "").await;
    assert_json_error(&resp, StatusCode::BAD_REQUEST, "misspelt offset");
}

/// A route whose `user` was not a string (or whose `auth` was neither `required` nor `none`)
/// was accepted, and authentication read it as having no owner: an open route.
#[tokio::test]
async fn route_data_that_authentication_reads_must_be_well_formed() {
    let hg = Hubgate::start(&[]).await;
    for data in [
        json!({"target": "http://127.0.0.1:9001", "user": false}),
        json!({"target": "http://127.0.0.1:9001", "user": ["alice"]}),
        json!({"target": "http://127.0.0.1:9001", "user": "alice", "server_name": 1}),
        json!({"target": "http://127.0.0.1:9001", "service": null}),
        json!({"target": "http://127.0.0.1:9001", "user": "alice", "auth": "requierd"}),
        json!({"target": "http://127.0.0.1:9001", "auth": true}),
    ] {
        let resp = hg
            .api_post("/api/routes/user/alice", &data.to_string())
            .await;
        assert_json_error(&resp, StatusCode::BAD_REQUEST, &data.to_string());
        let sync = json!({"/ok": {"target": "http://127.0.0.1:9002"}, "/user/alice": data});
        let resp = hg.api(Method::POST, "/api/proxy", sync.to_string()).await;
        let message = assert_json_error(&resp, StatusCode::BAD_REQUEST, "sync");
        assert!(message.contains("/user/alice"), "{message}");
        let batch = json!({"add": {"/user/alice": data}});
        let resp = hg.api(Method::PATCH, "/api/proxy", batch.to_string()).await;
        assert_json_error(&resp, StatusCode::BAD_REQUEST, "batch");
        assert!(hg.routes().await.is_empty(), "{data} changed the table");
    }
    let good = json!({"target": "http://127.0.0.1:9001", "user": "alice", "server_name": "",
                      "auth": "none", "jupyterhub": true});
    let resp = hg
        .api_post("/api/routes/user/alice", &good.to_string())
        .await;
    assert_eq!(resp.status, StatusCode::CREATED, "{resp:?}");
}

/// With `since`, a bad `offset`/`limit` (or `inactive_since` on `/api/routes`) went unread and
/// the request was answered 200 as if it were well formed.
#[tokio::test]
async fn every_parameter_is_checked_even_when_since_makes_it_moot() {
    let hg = Hubgate::start(&[]).await;
    for path in [
        "/api/proxy?since=0&limit=-215",
        "/api/proxy?offset=391632943537594271006720&since=0",
        "/api/routes?since=0&inactive_since=yesterday",
    ] {
        let resp = hg.api_get(path).await;
        assert_json_error(&resp, StatusCode::BAD_REQUEST, path);
    }
    let resp = hg.api_get("/api/proxy?since=0&offset=1&limit=1").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
}

/// `/health/live` and `/health/ready` on the API port answered every method (TRACE, DELETE, ...)
/// with 200; `HEAD /metrics` was a 405 there but a 200 on the metrics listener.
#[tokio::test]
async fn health_answers_get_and_head_only() {
    let hg = Hubgate::builder().metrics().start().await;
    for path in ["/health/live", "/health/ready"] {
        for method in [Method::TRACE, Method::DELETE, Method::POST] {
            let resp = hg.api_with(method.clone(), path, &[], "").await;
            assert_json_error(&resp, StatusCode::METHOD_NOT_ALLOWED, path);
            assert_eq!(resp.headers["allow"], "GET, HEAD", "{method} {path}");
        }
        let resp = hg.api_with(Method::HEAD, path, &[], "").await;
        assert_eq!(resp.status, StatusCode::OK, "HEAD {path}");
    }
    let resp = hg.api(Method::HEAD, "/metrics", "").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let req = http::Request::builder()
        .method(Method::TRACE)
        .uri(hg.metrics_url("/metrics"))
        .body(crate::support::empty())
        .unwrap();
    let resp = crate::support::send(&hg.client, req).await;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers["allow"], "GET, HEAD");
}

/// A float in a route's data came back one unit in the last place off after a restart on the
/// file store (`-8.363515702151354e245` listed, `-8.363515702151355e245` after): hubgate read
/// JSON numbers with serde_json's fast, not always exact, float parser, once when posted and
/// again when the store was loaded. The listing, before and after a restart, must give back the
/// numbers exactly as posted (compared as text: the shortest form of the same double).
#[tokio::test]
async fn numbers_in_route_data_survive_a_restart_exactly() {
    // Doubles with 16 and 17 significant digits, spread over the exponent range, as text.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let numbers: Vec<String> = std::iter::from_fn(|| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Some(f64::from_bits(state))
    })
    .filter(|f| f.is_finite())
    .take(300)
    .map(|f| serde_json::to_string(&f).unwrap())
    .collect();
    let data: String = numbers
        .iter()
        .enumerate()
        .map(|(i, n)| format!(r#","k{i}":{n}"#))
        .collect();
    let body = format!(r#"{{"target":"http://127.0.0.1:9"{data}}}"#);

    let dir = tempfile::tempdir().unwrap();
    let mut hg = Hubgate::builder().file_store(dir.path()).start().await;
    let resp = hg.api_post("/api/routes/floats", &body).await;
    assert_eq!(resp.status, StatusCode::CREATED, "{resp:?}");
    let check = |listing: &Resp, when: &str| {
        let text = listing.text();
        let wrong: Vec<&String> = numbers
            .iter()
            .enumerate()
            .filter(|(i, n)| !text.contains(&format!(r#""k{i}":{n}"#)))
            .map(|(_, n)| n)
            .collect();
        assert!(
            wrong.is_empty(),
            "{when}: {} of {} numbers changed, e.g. {:?}",
            wrong.len(),
            numbers.len(),
            &wrong[..wrong.len().min(3)]
        );
    };
    check(&hg.api_get("/api/routes/floats").await, "as posted");
    assert!(hg.stop("TERM").await.success());
    let hg = Hubgate::builder().file_store(dir.path()).start().await;
    check(&hg.api_get("/api/routes/floats").await, "after a restart");
}

/// A route whose whole path was `.` or `..` was accepted, and listed, but no request could ever
/// reach it: request paths have their dot segments resolved (in every encoding) before routing.
/// Deeper keys with such segments stay reachable (`/x/./y` through `/x%2F.%2Fy`).
#[tokio::test]
async fn a_route_no_request_can_reach_is_refused() {
    let hg = Hubgate::start(&[]).await;
    let body = r#"{"target": "http://127.0.0.1:9"}"#;
    for path in ["/api/routes/..", "/api/routes/%2E", "/api/routes/%2e%2E/"] {
        let resp = hg.api_post(path, body).await;
        assert_json_error(&resp, StatusCode::BAD_REQUEST, path);
    }
    let sync =
        json!({"/ok": {"target": "http://127.0.0.1:9"}, "/..": {"target": "http://127.0.0.1:9"}});
    let resp = hg.api(Method::POST, "/api/proxy", sync.to_string()).await;
    assert_json_error(&resp, StatusCode::BAD_REQUEST, "sync");
    assert!(hg.routes().await.is_empty());

    let backend = crate::support::Backend::echo().await;
    hg.add_route("/x/./y", &backend.url("")).await;
    let resp = hg.get("/x%2F.%2Fy/z").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
}
