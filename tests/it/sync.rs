//! `/api/proxy` (the whole table: paged listing, sync, batches) and `?since=` on the listings,
//! and how table versions move. Everything goes over the API and the public address.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;

use crate::support::{
    assert_json_error, empty, eventually, full, now_millis, parse_timestamp, posted, send_within,
    Backend, HttpClient, Hubgate, Resp, WAIT,
};

const PAGINATION: &str = "application/jupyterhub-pagination+json";
const TARGET: &str = "http://127.0.0.1:9";
const OTHER: &str = "http://127.0.0.1:10";

/// Bound for one request that moves a table of 100 000 routes (debug build, shared machine).
pub(crate) const BIG_WAIT: Duration = Duration::from_secs(300);
const BIG: usize = 100_000;

fn object(resp: &Resp) -> Map<String, Value> {
    match resp.json() {
        Value::Object(map) => map,
        other => panic!("expected a JSON object, got {other}"),
    }
}

fn keys(map: &Map<String, Value>) -> Vec<String> {
    map.keys().cloned().collect()
}

async fn post_proxy(hg: &Hubgate, query: &str, body: &Value) -> Resp {
    hg.api(
        Method::POST,
        &format!("/api/proxy{query}"),
        body.to_string(),
    )
    .await
}

async fn patch_proxy(hg: &Hubgate, body: &Value) -> Resp {
    hg.api(Method::PATCH, "/api/proxy", body.to_string()).await
}

/// `GET path` on the API asking for JupyterHub-style wrapped pages.
async fn get_wrapped(hg: &Hubgate, path: &str) -> Resp {
    let auth = format!("token {}", hg.token());
    hg.api_with(
        Method::GET,
        path,
        &[("authorization", auth.as_str()), ("accept", PAGINATION)],
        Bytes::new(),
    )
    .await
}

/// An API request with the token and a generous time bound, for 100 000-route bodies.
pub(crate) async fn big_api(hg: &Hubgate, method: Method, path: &str, body: String) -> Resp {
    let req = Request::builder()
        .method(method)
        .uri(hg.api_url(path))
        .header("authorization", format!("token {}", hg.token()))
        .body(full(body))
        .unwrap();
    send_within(&hg.client, req, BIG_WAIT).await
}

/// `{"/user/u<i>": {"target": target}}` for every `i` that `keep` accepts, plus `extra`, as
/// JSON text (built by hand: it is megabytes).
pub(crate) fn user_table(
    count: usize,
    target: &str,
    keep: impl Fn(usize) -> bool,
    extra: &[(&str, &str)],
) -> String {
    let mut out = String::with_capacity(count * 60);
    out.push('{');
    let mut first = true;
    let mut entry = |out: &mut String, key: &str, target: &str| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&format!("\"{key}\":{{\"target\":\"{target}\"}}"));
    };
    for (key, target) in extra {
        entry(&mut out, key, target);
    }
    for i in (0..count).filter(|i| keep(*i)) {
        entry(&mut out, &format!("/user/u{i}"), target);
    }
    out.push('}');
    out
}

fn assert_summary(resp: &Resp, what: &str, counts: [u64; 4], version: u64, dry_run: bool) {
    assert_eq!(resp.status, StatusCode::OK, "{what}: {resp:?}");
    assert!(
        resp.content_type().starts_with("application/json"),
        "{what}: content type {:?}",
        resp.content_type()
    );
    let body = resp.json();
    let [added, updated, removed, unchanged] = counts;
    assert_eq!(
        body,
        json!({
            "added": added,
            "updated": updated,
            "removed": removed,
            "unchanged": unchanged,
            "version": version,
            "dry_run": dry_run,
        }),
        "{what}"
    );
}

/// A 400 with hubgate's JSON error body whose message mentions `named` (when given).
fn assert_bad_request(resp: &Resp, what: &str, named: Option<&str>) {
    let message = assert_json_error(resp, StatusCode::BAD_REQUEST, what);
    assert!(!message.is_empty(), "{what}: empty message");
    if let Some(named) = named {
        assert!(
            message.contains(named),
            "{what}: message {message:?} does not name {named:?}"
        );
    }
}

fn last_activity(table: &Map<String, Value>, key: &str) -> i64 {
    let stamp = table[key]["last_activity"]
        .as_str()
        .unwrap_or_else(|| panic!("{key} has no last_activity: {}", table[key]));
    parse_timestamp(stamp).unwrap_or_else(|| panic!("bad last_activity {stamp:?}"))
}

/// Waits until the wall clock (which hubgate shares) is past `millis`, so that a route created
/// now would get a different `last_activity`.
async fn clock_past(millis: i64) {
    eventually(WAIT, "the clock to move on", || async move {
        now_millis() > millis + 2
    })
    .await;
}

#[tokio::test]
async fn the_proxy_resource_needs_the_token() {
    let hg = Hubgate::start(&[]).await;
    let wrong = format!("token {}x", hg.token());
    for (method, path, body) in [
        (Method::GET, "/api/proxy", ""),
        (Method::GET, "/api/proxy?since=0", ""),
        (
            Method::POST,
            "/api/proxy",
            r#"{"/a": {"target": "http://127.0.0.1:9"}}"#,
        ),
        (Method::PATCH, "/api/proxy", r#"{"remove": ["/a"]}"#),
        (Method::POST, "/api/handshake", ""),
    ] {
        for headers in [vec![], vec![("authorization", wrong.as_str())]] {
            let resp = hg.api_with(method.clone(), path, &headers, body).await;
            assert_eq!(
                resp.status,
                StatusCode::FORBIDDEN,
                "{method} {path} with {headers:?}: {resp:?}"
            );
            assert!(resp.body.is_empty(), "{method} {path}: 403 body {resp:?}");
        }
    }
    assert!(
        hg.routes().await.is_empty(),
        "a refused sync changed the table"
    );
}

#[tokio::test]
async fn get_proxy_lists_the_whole_table_with_its_version() {
    let hg = Hubgate::start(&[]).await;
    let resp = hg.api_get("/api/proxy").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json(), json!({}));
    assert_eq!(
        resp.table_version(),
        0,
        "an empty table starts at version 0"
    );

    hg.add_route_data("/b", json!({"target": TARGET, "user": "bob", "n": 2}))
        .await;
    hg.add_route("/a", OTHER).await;
    hg.add_route_data("/c/d", json!({"target": TARGET, "nested": {"x": [1, 2]}}))
        .await;

    let resp = hg.api_get("/api/proxy").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert!(
        resp.content_type().starts_with("application/json"),
        "content type {:?}",
        resp.content_type()
    );
    assert_eq!(resp.table_version(), 3, "three adds are three versions");
    let table = object(&resp);
    assert_eq!(keys(&table), ["/a", "/b", "/c/d"], "sorted by key");
    assert_eq!(
        Value::Object(posted(&table)),
        json!({
            "/a": {"target": OTHER},
            "/b": {"target": TARGET, "user": "bob", "n": 2},
            "/c/d": {"target": TARGET, "nested": {"x": [1, 2]}},
        })
    );
    for key in table.keys() {
        last_activity(&table, key);
    }
    let routes = hg.routes().await;
    assert_eq!(table, routes, "GET /api/proxy and GET /api/routes differ");
}

#[tokio::test]
async fn offset_and_limit_page_the_sorted_table() {
    let hg = Hubgate::start(&[]).await;
    for key in ["/e", "/b", "/d", "/a", "/c"] {
        hg.add_route(key, TARGET).await;
    }
    let all = ["/a", "/b", "/c", "/d", "/e"];
    for (query, want) in [
        ("offset=0&limit=2", &all[0..2]),
        ("offset=1&limit=2", &all[1..3]),
        ("offset=3&limit=10", &all[3..]),
        ("offset=2", &all[2..]),
        ("limit=3", &all[..3]),
        ("offset=5&limit=2", &all[5..]),
        ("offset=99", &all[5..]),
        ("limit=0", &all[..0]),
    ] {
        let resp = hg.api_get(&format!("/api/proxy?{query}")).await;
        assert_eq!(resp.status, StatusCode::OK, "{query}: {resp:?}");
        assert_eq!(resp.table_version(), 5, "{query}");
        let page = object(&resp);
        assert_eq!(keys(&page), want, "{query}");
        for (key, route) in &page {
            assert_eq!(route["target"], TARGET, "{query}: {key}");
        }
    }
}

#[tokio::test]
async fn the_pagination_media_type_wraps_pages() {
    let hg = Hubgate::start(&[]).await;
    for key in ["/c", "/a", "/b"] {
        hg.add_route(key, TARGET).await;
    }

    let resp = get_wrapped(&hg, "/api/proxy").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert!(resp.content_type().starts_with("application/json"));
    assert_eq!(resp.table_version(), 3);
    let body = resp.json();
    assert_eq!(body["version"], 3, "{body}");
    assert_eq!(
        body["_pagination"],
        json!({"offset": 0, "limit": 1000, "total": 3, "next": null}),
        "the default page holds 1000 routes"
    );
    let items = body["items"].as_object().expect("items is an object");
    assert_eq!(keys(items), ["/a", "/b", "/c"]);
    assert_eq!(items["/b"]["target"], TARGET);

    let first = get_wrapped(&hg, "/api/proxy?limit=2").await.json();
    assert_eq!(keys(first["items"].as_object().unwrap()), ["/a", "/b"]);
    assert_eq!(
        first["_pagination"],
        json!({
            "offset": 0,
            "limit": 2,
            "total": 3,
            "next": {"offset": 2, "limit": 2, "url": "/api/proxy?offset=2&limit=2"},
        })
    );
    let url = first["_pagination"]["next"]["url"].as_str().unwrap();
    let second = get_wrapped(&hg, url).await.json();
    assert_eq!(keys(second["items"].as_object().unwrap()), ["/c"]);
    assert_eq!(
        second["_pagination"],
        json!({"offset": 2, "limit": 2, "total": 3, "next": null})
    );
}

#[tokio::test]
async fn walking_100k_routes_in_pages_sees_every_key_once_in_order() {
    let hg = Hubgate::start(&[]).await;
    let body = user_table(BIG, TARGET, |_| true, &[]);
    let resp = big_api(&hg, Method::POST, "/api/proxy", body).await;
    assert_summary(
        &resp,
        "loading 100 000 routes",
        [BIG as u64, 0, 0, 0],
        1,
        false,
    );

    let mut seen: Vec<String> = Vec::with_capacity(BIG);
    let mut url = "/api/proxy".to_owned();
    let mut pages = 0;
    loop {
        let resp = get_wrapped(&hg, &url).await;
        assert_eq!(resp.status, StatusCode::OK, "{url}: {resp:?}");
        let body = resp.json();
        assert_eq!(body["version"], 1, "{url}");
        let pagination = &body["_pagination"];
        assert_eq!(pagination["total"], BIG, "{url}");
        assert_eq!(pagination["offset"], seen.len(), "{url}");
        let items = body["items"].as_object().expect("items is an object");
        assert!(
            items.len() <= 1000,
            "{url}: {} items, more than the default limit",
            items.len()
        );
        for (key, route) in items {
            assert_eq!(route["target"], TARGET, "{key}");
        }
        seen.extend(items.keys().cloned());
        pages += 1;
        assert!(pages <= BIG, "paging does not end");
        match &pagination["next"] {
            Value::Null => break,
            next => {
                assert!(!items.is_empty(), "{url}: an empty page with a next page");
                url = next["url"]
                    .as_str()
                    .unwrap_or_else(|| panic!("next has no url: {next}"))
                    .to_owned();
            }
        }
    }
    assert_eq!(seen.len(), BIG, "keys seen while paging ({pages} pages)");
    if let Some(i) = (1..seen.len()).find(|i| seen[i - 1] >= seen[*i]) {
        panic!(
            "keys not strictly increasing at {i}: {:?} then {:?}",
            seen[i - 1],
            seen[i]
        );
    }
    let want: BTreeSet<String> = (0..BIG).map(|i| format!("/user/u{i}")).collect();
    let got: BTreeSet<String> = seen.into_iter().collect();
    assert!(got == want, "the pages do not hold exactly the loaded keys");
}

#[tokio::test]
async fn since_lists_only_changes_after_a_version() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/a", TARGET).await;
    hg.add_route("/b", TARGET).await;
    hg.add_route("/gone", TARGET).await;
    let v3 = hg.table_version().await;
    assert_eq!(v3, 3);

    hg.add_route("/c", TARGET).await;
    assert_eq!(
        hg.api_delete("/api/routes/a").await.status,
        StatusCode::NO_CONTENT
    );
    hg.add_route_data("/b", json!({"target": OTHER, "user": "bee"}))
        .await;
    // Removed and put back after v3: a put, not a removal.
    assert_eq!(
        hg.api_delete("/api/routes/gone").await.status,
        StatusCode::NO_CONTENT
    );
    hg.add_route("/gone", OTHER).await;
    let v8 = hg.table_version().await;
    assert_eq!(v8, 8);

    for endpoint in ["/api/routes", "/api/proxy"] {
        let resp = hg.api_get(&format!("{endpoint}?since={v3}")).await;
        assert_eq!(resp.status, StatusCode::OK, "{endpoint}: {resp:?}");
        assert_eq!(resp.table_version(), v8, "{endpoint}");
        let changes = object(&resp);
        let mut got = keys(&changes);
        got.sort();
        assert_eq!(got, ["/a", "/b", "/c", "/gone"], "{endpoint}: {changes:?}");
        assert_eq!(changes["/a"], Value::Null, "{endpoint}: removal");
        assert_eq!(changes["/b"]["target"], OTHER, "{endpoint}");
        assert_eq!(changes["/b"]["user"], "bee", "{endpoint}");
        assert_eq!(changes["/c"]["target"], TARGET, "{endpoint}");
        assert_eq!(changes["/gone"]["target"], OTHER, "{endpoint}");
        last_activity(&changes, "/c");

        let resp = hg.api_get(&format!("{endpoint}?since={}", v8 - 1)).await;
        assert_eq!(resp.status, StatusCode::OK, "{endpoint}: {resp:?}");
        assert_eq!(
            keys(&object(&resp)),
            ["/gone"],
            "{endpoint}: only the last change"
        );

        let resp = hg.api_get(&format!("{endpoint}?since={v8}")).await;
        assert_eq!(resp.status, StatusCode::OK, "{endpoint}: {resp:?}");
        assert_eq!(
            resp.json(),
            json!({}),
            "{endpoint}: nothing after the current version"
        );

        let resp = hg.api_get(&format!("{endpoint}?since=0")).await;
        assert_eq!(resp.status, StatusCode::OK, "{endpoint}: {resp:?}");
        let all = object(&resp);
        let mut got = keys(&all);
        got.sort();
        assert_eq!(got, ["/a", "/b", "/c", "/gone"], "{endpoint}: since=0");
        assert_eq!(all["/a"], Value::Null, "{endpoint}: since=0");
    }
}

#[tokio::test]
async fn non_integer_query_parameters_are_400() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/a", TARGET).await;
    for path in [
        "/api/proxy?offset=x",
        "/api/proxy?limit=ten",
        "/api/proxy?limit=-1",
        "/api/proxy?offset=1.5&limit=2",
        "/api/proxy?since=abc",
        "/api/proxy?since=-3",
        "/api/routes?since=abc",
        "/api/routes?since=1e3",
    ] {
        let resp = hg.api_get(path).await;
        assert_bad_request(&resp, path, None);
    }
    let resp = get_wrapped(&hg, "/api/proxy?offset=nope").await;
    assert_bad_request(&resp, "wrapped offset=nope", None);
}

#[tokio::test]
async fn sync_makes_the_table_equal_to_the_body() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/same", TARGET).await;
    hg.add_route("/more-data", TARGET).await;
    hg.add_route_data("/moved", json!({"target": TARGET, "user": "m"}))
        .await;
    hg.add_route("/dropped", TARGET).await;
    let before = hg.routes().await;
    let v0 = hg.table_version().await;
    let newest = before
        .keys()
        .map(|k| last_activity(&before, k))
        .max()
        .unwrap();
    clock_past(newest).await;

    let desired = json!({
        "/same": {"target": TARGET},
        "/more-data": {"target": TARGET, "user": "more", "admin": false},
        "/moved": {"target": OTHER, "user": "m"},
        "/new/one": {"target": OTHER, "list": [1, "two"]},
    });

    let dry = post_proxy(&hg, "?dry_run=true", &desired).await;
    assert_summary(&dry, "dry run", [1, 2, 1, 1], v0, true);
    assert_eq!(hg.routes().await, before, "a dry run changed the table");
    assert_eq!(
        hg.table_version().await,
        v0,
        "a dry run changed the version"
    );

    let resp = post_proxy(&hg, "", &desired).await;
    assert_summary(&resp, "sync", [1, 2, 1, 1], v0 + 1, false);
    assert_eq!(
        resp.table_version(),
        v0 + 1,
        "version header of the sync answer"
    );
    let after = hg.routes().await;
    assert_eq!(
        Value::Object(posted(&after)),
        desired,
        "the table is not the synced body"
    );
    assert_eq!(hg.table_version().await, v0 + 1, "a sync is one version");
    for key in ["/same", "/more-data"] {
        assert_eq!(
            after[key]["last_activity"], before[key]["last_activity"],
            "{key}: the target did not change, so last_activity must not"
        );
    }

    // The same body again changes nothing.
    let again = post_proxy(&hg, "", &desired).await;
    assert_summary(&again, "repeated sync", [0, 0, 0, 4], v0 + 1, false);
    assert_eq!(hg.routes().await, after);

    // An empty desired table empties the table.
    let resp = post_proxy(&hg, "", &json!({})).await;
    assert_summary(&resp, "empty sync", [0, 0, 4, 0], v0 + 2, false);
    assert!(hg.routes().await.is_empty());
}

#[tokio::test]
async fn sync_refuses_bad_input_and_changes_nothing() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route_data("/keep", json!({"target": TARGET, "user": "k"}))
        .await;
    let before = hg.routes().await;
    let v0 = hg.table_version().await;
    let good = json!({"target": OTHER});

    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("a list", "[]".into(), None),
        ("a string", "\"/a\"".into(), None),
        ("a number", "7".into(), None),
        ("null", "null".into(), None),
        ("not JSON", "{\"/a\": ".into(), None),
        (
            "no target",
            json!({"/good": good, "/no-target": {"user": "x"}}).to_string(),
            Some("/no-target"),
        ),
        (
            "numeric target",
            json!({"/good": good, "/num-target": {"target": 5}}).to_string(),
            Some("/num-target"),
        ),
        (
            "entry not an object",
            json!({"/good": good, "/bare-string": "http://127.0.0.1:9"}).to_string(),
            Some("/bare-string"),
        ),
        (
            "ftp target",
            json!({"/good": good, "/ftp": {"target": "ftp://127.0.0.1/"}}).to_string(),
            Some("/ftp"),
        ),
        (
            "not a URL",
            json!({"/good": good, "/nonsense": {"target": "not a url"}}).to_string(),
            Some("/nonsense"),
        ),
        (
            "same route twice",
            json!({"/good": good, "/a": {"target": TARGET}, "/a/": {"target": OTHER}}).to_string(),
            Some("/a/"),
        ),
        (
            "undecodable key",
            json!({"/good": good, "/%zz": {"target": TARGET}}).to_string(),
            Some("/%zz"),
        ),
    ];
    for (what, body, named) in &cases {
        for query in ["", "?dry_run=true"] {
            let resp = hg
                .api(Method::POST, &format!("/api/proxy{query}"), body.clone())
                .await;
            assert_bad_request(&resp, &format!("sync{query} with {what}"), *named);
        }
        assert_eq!(
            hg.routes().await,
            before,
            "sync with {what} changed the table"
        );
        assert_eq!(
            hg.table_version().await,
            v0,
            "sync with {what} changed the version"
        );
    }
}

#[tokio::test]
async fn bodies_over_max_sync_body_are_413() {
    let hg = Hubgate::start(&["--max-sync-body", "1000"]).await;
    hg.add_route("/keep", TARGET).await;
    let before = hg.routes().await;

    let mut desired = Map::new();
    for i in 0..40 {
        desired.insert(format!("/user/u{i}"), json!({"target": OTHER}));
    }
    let body = Value::Object(desired).to_string();
    assert!(body.len() > 1000);
    let resp = hg.api(Method::POST, "/api/proxy", body.clone()).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE, "sync: {resp:?}");
    let patch = json!({"add": serde_json::from_str::<Value>(&body).unwrap()}).to_string();
    let resp = hg.api(Method::PATCH, "/api/proxy", patch).await;
    assert_eq!(
        resp.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch: {resp:?}"
    );
    assert_eq!(
        hg.routes().await,
        before,
        "an oversized body changed the table"
    );

    // Under the limit, the same kind of body is taken.
    let small = json!({"/keep": {"target": TARGET}, "/user/u1": {"target": OTHER}});
    let resp = post_proxy(&hg, "", &small).await;
    assert_summary(&resp, "small sync", [1, 0, 0, 1], 2, false);
}

#[tokio::test]
async fn patch_applies_adds_and_removes_as_one_version() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/a", TARGET).await;
    hg.add_route("/b", TARGET).await;
    hg.add_route("/c", TARGET).await;
    let v0 = hg.table_version().await;

    let resp = patch_proxy(
        &hg,
        &json!({
            "add": {
                "/a": {"target": OTHER, "user": "alice"},
                "/d/e": {"target": OTHER},
                "/f": {"target": TARGET, "x": 1},
            },
            "remove": ["/b", "/c/", "/never-there"],
        }),
    )
    .await;
    assert_summary(&resp, "batch", [2, 1, 2, 0], v0 + 1, false);
    assert_eq!(resp.table_version(), v0 + 1);
    assert_eq!(hg.table_version().await, v0 + 1, "a batch is one version");
    assert_eq!(
        Value::Object(posted(&hg.routes().await)),
        json!({
            "/a": {"target": OTHER, "user": "alice"},
            "/d/e": {"target": OTHER},
            "/f": {"target": TARGET, "x": 1},
        })
    );

    // Only adds, only removes.
    let resp = patch_proxy(&hg, &json!({"add": {"/g": {"target": TARGET}}})).await;
    assert_summary(&resp, "adds only", [1, 0, 0, 0], v0 + 2, false);
    let resp = patch_proxy(&hg, &json!({"remove": ["/g", "/f"]})).await;
    assert_summary(&resp, "removes only", [0, 0, 2, 0], v0 + 3, false);
    let mut left = keys(&hg.routes().await);
    left.sort();
    assert_eq!(left, ["/a", "/d/e"]);
}

#[tokio::test]
async fn patch_with_any_bad_entry_applies_nothing() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/keep", TARGET).await;
    hg.add_route("/other", TARGET).await;
    let before = hg.routes().await;
    let v0 = hg.table_version().await;

    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "one bad add among good ones",
            json!({
                "add": {"/good": {"target": OTHER}, "/bad-add": {"target": "gopher://x"}},
                "remove": ["/other"],
            }),
            Some("/bad-add"),
        ),
        (
            "an add without target",
            json!({"add": {"/good": {"target": OTHER}, "/no-target": {}}}),
            Some("/no-target"),
        ),
        (
            "an undecodable add",
            json!({"add": {"/good": {"target": OTHER}, "/%zz": {"target": OTHER}}}),
            Some("/%zz"),
        ),
        (
            "an undecodable removal",
            json!({"add": {"/good": {"target": OTHER}}, "remove": ["/other", "/%zz"]}),
            Some("/%zz"),
        ),
        (
            "an unknown field",
            json!({"add": {"/good": {"target": OTHER}}, "frobnicate": true}),
            Some("frobnicate"),
        ),
        (
            "a path added and removed",
            json!({"add": {"/good": {"target": OTHER}, "/both": {"target": OTHER}},
                   "remove": ["/both/"]}),
            Some("/both"),
        ),
        (
            "remove not a list",
            json!({"add": {"/good": {"target": OTHER}}, "remove": "/other"}),
            None,
        ),
        (
            "a removal that is not a string",
            json!({"add": {"/good": {"target": OTHER}}, "remove": ["/other", 7]}),
            None,
        ),
        ("add not an object", json!({"add": ["/good"]}), None),
        ("a list body", json!(["/good"]), None),
    ];
    for (what, body, named) in &cases {
        let resp = patch_proxy(&hg, body).await;
        assert_bad_request(&resp, what, *named);
        assert_eq!(
            hg.routes().await,
            before,
            "batch with {what} changed the table"
        );
        assert_eq!(
            hg.table_version().await,
            v0,
            "batch with {what} changed the version"
        );
    }
}

#[tokio::test]
async fn removing_absent_paths_changes_no_version() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/a", TARGET).await;
    let before = hg.routes().await;
    let v0 = hg.table_version().await;
    let resp = patch_proxy(&hg, &json!({"remove": ["/nope", "/a/b", "/nada/"]})).await;
    assert_summary(&resp, "removing absent paths", [0, 0, 0, 0], v0, false);
    assert_eq!(resp.table_version(), v0);
    assert_eq!(hg.table_version().await, v0);
    assert_eq!(hg.routes().await, before);
    let resp = patch_proxy(&hg, &json!({})).await;
    assert_summary(&resp, "an empty batch", [0, 0, 0, 0], v0, false);
}

#[tokio::test]
async fn every_change_is_one_version_and_no_op_is_none() {
    let hg = Hubgate::start(&[]).await;
    let mut v = hg.table_version().await;
    assert_eq!(v, 0);

    hg.add_route("/a", TARGET).await;
    v += 1;
    assert_eq!(hg.table_version().await, v, "POST /api/routes/a");
    hg.add_route("/b", TARGET).await;
    v += 1;
    assert_eq!(hg.table_version().await, v, "POST /api/routes/b");

    assert_eq!(
        hg.api_delete("/api/routes/b").await.status,
        StatusCode::NO_CONTENT
    );
    v += 1;
    assert_eq!(hg.table_version().await, v, "DELETE /api/routes/b");
    assert_eq!(
        hg.api_delete("/api/routes/b").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(hg.table_version().await, v, "DELETE of an absent route");

    let desired = json!({
        "/a": {"target": OTHER},
        "/c": {"target": TARGET},
        "/d": {"target": TARGET},
        "/e": {"target": TARGET},
    });
    let resp = post_proxy(&hg, "", &desired).await;
    v += 1;
    assert_summary(&resp, "sync of four changes", [3, 1, 0, 0], v, false);
    assert_eq!(hg.table_version().await, v, "a sync of four changes");
    let resp = post_proxy(&hg, "", &desired).await;
    assert_summary(&resp, "sync of nothing new", [0, 0, 0, 4], v, false);
    assert_eq!(hg.table_version().await, v, "a sync with nothing to do");
    let resp = post_proxy(&hg, "?dry_run=true", &json!({})).await;
    assert_summary(&resp, "dry run", [0, 0, 4, 0], v, true);
    assert_eq!(hg.table_version().await, v, "a dry run");

    let resp = patch_proxy(
        &hg,
        &json!({"add": {"/f": {"target": TARGET}, "/g": {"target": TARGET}},
               "remove": ["/c", "/d"]}),
    )
    .await;
    v += 1;
    assert_summary(&resp, "batch of four changes", [2, 0, 2, 0], v, false);
    assert_eq!(hg.table_version().await, v, "a batch of four changes");
    let resp = patch_proxy(&hg, &json!({"remove": ["/c", "/d"]})).await;
    assert_summary(&resp, "batch of absent removals", [0, 0, 0, 0], v, false);
    assert_eq!(hg.table_version().await, v, "a batch that removes nothing");

    // Refused requests are not changes either.
    let resp = post_proxy(&hg, "", &json!({"/x": {"target": "nope"}})).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let resp = hg
        .api_post("/api/routes/x", &json!({"target": "nope"}).to_string())
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(hg.table_version().await, v, "refused changes");
    let proxy_version = hg.api_get("/api/proxy").await.table_version();
    assert_eq!(
        proxy_version, v,
        "GET /api/proxy and GET /api/routes disagree"
    );
}

/// What one request through the proxy got.
#[derive(Debug)]
struct Observed {
    path: String,
    /// Whether the sync had already returned when this request was sent.
    after_sync: bool,
    outcome: Result<(StatusCode, String), String>,
}

/// Requests `paths` through the proxy in a loop, one at a time, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Observed>>>,
    task: JoinHandle<()>,
}

impl Traffic {
    fn start(client: HttpClient, proxy: SocketAddr, paths: Vec<String>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, synced, seen) = (stop.clone(), synced.clone(), seen.clone());
            async move {
                for path in paths.iter().cycle() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let after_sync = synced.load(Ordering::SeqCst);
                    let outcome = get_text(&client, proxy, path).await;
                    seen.lock().unwrap().push(Observed {
                        path: path.clone(),
                        after_sync,
                        outcome,
                    });
                }
            }
        });
        Traffic {
            stop,
            synced,
            seen,
            task,
        }
    }

    fn count(&self, after_sync: bool) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.after_sync == after_sync)
            .count()
    }

    async fn wait_for(&self, after_sync: bool, n: usize) {
        eventually(
            WAIT,
            &format!("{n} requests through the proxy"),
            || async move { self.count(after_sync) >= n },
        )
        .await;
    }

    async fn finish(self) -> Vec<Observed> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the traffic task did not stop")
            .expect("the traffic task panicked");
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

async fn get_text(
    client: &HttpClient,
    proxy: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let req = Request::builder()
        .uri(format!("http://{proxy}{path}"))
        .body(empty())
        .unwrap();
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {WAIT:?}")))
}

fn watched_paths() -> Vec<String> {
    [0, 2, 4_242, 50_000, 77_776, BIG - 2]
        .iter()
        .map(|i| format!("/user/u{i}"))
        .collect()
}

/// A hubgate whose table (version 1) holds `BIG` user routes to `old`, and `/` to `root`.
async fn big_table(old: &Backend, root: &Backend) -> Hubgate {
    let hg = Hubgate::start(&[]).await;
    let load = user_table(BIG, &old.url(""), |_| true, &[("/", root.url("").as_str())]);
    let resp = big_api(&hg, Method::POST, "/api/proxy", load).await;
    assert_summary(&resp, "load", [BIG as u64 + 1, 0, 0, 0], 1, false);
    hg
}

/// Posts the sync `table` while requests run on the watched paths, checks its summary (`what`,
/// `counts`), and returns what the requests saw before and after it returned.
async fn sync_under_traffic(
    hg: &Hubgate,
    table: String,
    what: &str,
    counts: [u64; 4],
) -> Vec<Observed> {
    let traffic = Traffic::start(hg.client.clone(), hg.proxy, watched_paths());
    traffic.wait_for(false, 30).await;
    let resp = big_api(hg, Method::POST, "/api/proxy", table).await;
    assert_summary(&resp, what, counts, 2, false);
    traffic.synced.store(true, Ordering::SeqCst);
    traffic.wait_for(true, 60).await;
    traffic.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_under_traffic_switches_every_route_at_once() {
    let old = Backend::fixed(200, "text/plain", "old").await;
    let new = Backend::fixed(200, "text/plain", "new").await;
    let root = Backend::fixed(200, "text/plain", "root").await;
    let hg = big_table(&old, &root).await;
    let root_target = root.url("");
    let switch = user_table(BIG, &new.url(""), |_| true, &[("/", root_target.as_str())]);
    let seen = sync_under_traffic(&hg, switch, "switch", [0, BIG as u64, 0, 1]).await;

    let mut counts = [0usize; 2];
    for o in &seen {
        match &o.outcome {
            Ok((StatusCode::OK, body)) if body == "new" => counts[1] += 1,
            Ok((StatusCode::OK, body)) if body == "old" && !o.after_sync => counts[0] += 1,
            other => panic!(
                "{} (sent {} the sync returned) got {other:?}; expected {}",
                o.path,
                if o.after_sync { "after" } else { "before" },
                if o.after_sync {
                    "\"new\""
                } else {
                    "\"old\" or \"new\""
                }
            ),
        }
    }
    eprintln!(
        "{} requests: {} old, {} new",
        seen.len(),
        counts[0],
        counts[1]
    );
    assert!(counts[0] >= 30 && counts[1] >= 60, "{counts:?}");

    // Every route, not just the watched ones, points at the new backend.
    let new_target = new.url("");
    let mut total = 0;
    for offset in (0..=BIG).step_by(10_000) {
        let page = get_wrapped(&hg, &format!("/api/proxy?offset={offset}&limit=10000")).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let page = page.json();
        for (key, route) in page["items"].as_object().expect("items") {
            let want = if key == "/" {
                &root_target
            } else {
                &new_target
            };
            assert_eq!(route["target"].as_str(), Some(want.as_str()), "{key}");
            total += 1;
        }
    }
    assert_eq!(total, BIG + 1);
    assert_eq!(hg.get("/user/u99999/tree").await.text(), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_removing_half_the_routes_never_fails_kept_ones() {
    let old = Backend::fixed(200, "text/plain", "old").await;
    let root = Backend::fixed(200, "text/plain", "root").await;
    let hg = big_table(&old, &root).await;
    let halve = user_table(
        BIG,
        &old.url(""),
        |i| i % 2 == 0,
        &[("/", root.url("").as_str())],
    );
    let half = (BIG / 2) as u64;
    let seen = sync_under_traffic(&hg, halve, "halve", [0, 0, half, half + 1]).await;
    for o in &seen {
        assert!(
            matches!(&o.outcome, Ok((StatusCode::OK, body)) if body == "old"),
            "{} (a kept route) got {:?} during or after the sync",
            o.path,
            o.outcome
        );
    }
    eprintln!("{} requests to kept routes, all answered", seen.len());

    let total = get_wrapped(&hg, "/api/proxy?limit=0").await.json();
    assert_eq!(total["_pagination"]["total"], half + 1);
    assert_eq!(hg.get("/user/u1").await.text(), "root", "a removed route");
    assert_eq!(
        hg.get("/user/u99999").await.text(),
        "root",
        "a removed route"
    );
    assert_eq!(hg.get("/user/u99998").await.text(), "old", "a kept route");
}
