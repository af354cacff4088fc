//! Metrics, health and status, seen from outside: hubgate runs with `--metrics-ip 127.0.0.1
//! --metrics-port 0`, traffic goes through its ports, and `/metrics` is scraped before and
//! after so each test asserts exact deltas. Each test has a hubgate process of its own, so the
//! process-wide counters only see that test's traffic.
//!
//! Also here: `/health/live` and `/health/ready` on both the API and the metrics listener,
//! `GET /api/status`, no user data in any label, and the operator kit under
//! `config/monitoring/` naming only metrics hubgate exports.

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::{connect_async, tungstenite::Message};

use crate::metrics_support::{deltas, scrape, start_with_metrics, wait_for, Scrape, TinyHub};
use crate::support::{
    dead_port, parse_timestamp, random_token, silent_backend, Backend, Hubgate, Resp, WsPeer, WAIT,
};

/// hubgate's version, as `hubgate_build_info` and `/api/status` must report it.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Bound for readiness to notice the hub is gone: the freshness window is 30 s and the hub is
/// probed every 5 s; the rest is slack for a loaded machine.
const HUB_GONE_WAIT: Duration = Duration::from_secs(60);
/// Bound for a handshake retry that backs off up to 30 s between attempts.
const RETRY_WAIT: Duration = Duration::from_secs(90);
/// Pause between two polls of a condition that takes seconds to change.
const SLOW_POLL: Duration = Duration::from_millis(250);
const FAST_POLL: Duration = Duration::from_millis(25);

/// CHP's metric names, which hubgate keeps.
const CHP_NAMES: [&str; 9] = [
    "requests_web",
    "requests_ws",
    "requests_proxy",
    "requests_api",
    "api_route_get",
    "api_route_add",
    "api_route_delete",
    "find_target_for_req",
    "last_activity_updating",
];

// ---------------------------------------------------------------------------------------------
// Helpers

fn user_route(target: &str, user: &str) -> Value {
    json!({"target": target, "user": user, "server_name": "", "jupyterhub": true})
}

/// A tiny hub (whose handshake answers 200 when `handshake_ok`, else 500) and a hubgate started
/// with `--hub-api-url` and `JUPYTERHUB_API_TOKEN` for it, so authentication is on.
async fn gate_with_hub(handshake_ok: bool, args: &[&str]) -> (TinyHub, Hubgate) {
    let service = random_token();
    let hub = TinyHub::start(&service, handshake_ok).await;
    let gate = Hubgate::builder()
        .metrics()
        .args(["--hub-api-url", &hub.api_url()])
        .args(args)
        .env("JUPYTERHUB_API_TOKEN", &service)
        .start()
        .await;
    (hub, gate)
}

fn assert_status(resp: &Resp, status: StatusCode, what: &str, gate: &Hubgate) {
    assert_eq!(
        resp.status,
        status,
        "{what}: {resp:?}\nhubgate stderr:\n{}",
        gate.logs()
    );
}

/// `GET /api/status` with the API token, as JSON.
async fn status_report(gate: &Hubgate) -> Value {
    let resp = gate.api(Method::GET, "/api/status", "").await;
    assert_status(&resp, StatusCode::OK, "GET /api/status", gate);
    resp.json()
}

/// The `x-hubgate-version` header and the number of routes of `GET /api/routes`.
async fn listing(gate: &Hubgate) -> (f64, f64) {
    let resp = gate.api(Method::GET, "/api/routes", "").await;
    assert_status(&resp, StatusCode::OK, "GET /api/routes", gate);
    let version = resp
        .headers
        .get("x-hubgate-version")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("GET /api/routes has no numeric x-hubgate-version: {resp:?}"));
    let routes = resp
        .json()
        .as_object()
        .unwrap_or_else(|| panic!("GET /api/routes is not an object: {}", resp.text()))
        .len();
    (version, routes as f64)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected strings, got {v}"))
                .to_owned()
        })
        .collect()
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// The data plane

#[tokio::test]
async fn a_proxied_request_counts_once_in_every_family_and_its_bytes_exactly() {
    let backend = Backend::echo().await;
    let gate = start_with_metrics(&[]).await;
    gate.add_route_data("/user/alice", user_route(&backend.url(""), "alice"))
        .await;
    let user = [("kind", "user")];

    let before = scrape(&gate).await;
    let resp = gate.get_with("/user/alice/tree", &[]).await;
    assert_status(&resp, StatusCode::OK, "GET /user/alice/tree", &gate);
    let after = scrape(&gate).await;

    let get_2xx = [("kind", "user"), ("method", "GET"), ("status_class", "2xx")];
    deltas(&before, &after).of("hubgate_requests_total", &get_2xx, 1.0);
    assert_eq!(
        after.sum("hubgate_requests_total", &[]) - before.sum("hubgate_requests_total", &[]),
        1.0,
        "one request must count once in hubgate_requests_total: {:?}",
        after.series("hubgate_requests_total")
    );
    deltas(&before, &after)
        .of("hubgate_request_duration_seconds_count", &user, 1.0)
        .of(
            "hubgate_request_duration_seconds_bucket",
            &[("kind", "user"), ("le", "+Inf")],
            1.0,
        )
        .of("hubgate_upstream_duration_seconds_count", &user, 1.0)
        .of("hubgate_overhead_seconds_count", &[], 1.0)
        .of(
            "hubgate_response_bytes_total",
            &user,
            resp.body.len() as f64,
        )
        .of("hubgate_request_bytes_total", &user, 0.0)
        .of("hubgate_no_route_total", &[], 0.0);
    // CHP's names, with CHP's meaning.
    deltas(&before, &after)
        .of("requests_web", &[], 1.0)
        .of("requests_ws", &[], 0.0)
        .of("requests_proxy", &[("status", "200")], 1.0)
        .of("find_target_for_req_count", &[], 1.0);

    // An upload: its body counts as request bytes, byte for byte.
    let upload = "0123456789abcdef".repeat(1000) + "tail";
    let before = after;
    let resp = gate
        .request(
            Method::POST,
            "/user/alice/api/contents/notebook.ipynb",
            &[("content-type", "application/octet-stream")],
            upload.clone(),
        )
        .await;
    assert_status(&resp, StatusCode::OK, "POST an upload", &gate);
    assert_eq!(
        resp.json()["body_len"],
        json!(upload.len()),
        "the target did not get the whole upload"
    );
    let after = scrape(&gate).await;
    let post_2xx = [
        ("kind", "user"),
        ("method", "POST"),
        ("status_class", "2xx"),
    ];
    deltas(&before, &after)
        .of("hubgate_requests_total", &post_2xx, 1.0)
        .of("hubgate_requests_total", &get_2xx, 0.0)
        .of("hubgate_request_bytes_total", &user, upload.len() as f64)
        .of(
            "hubgate_response_bytes_total",
            &user,
            resp.body.len() as f64,
        )
        .of("hubgate_request_duration_seconds_count", &user, 1.0)
        .of("requests_web", &[], 1.0)
        .of("requests_proxy", &[("status", "200")], 1.0);
}

#[tokio::test]
async fn a_request_no_route_matches_counts_as_kind_none_and_no_route() {
    let gate = start_with_metrics(&[]).await;
    let before = scrape(&gate).await;
    let resp = gate.get_with("/nowhere/at/all", &[]).await;
    assert_status(&resp, StatusCode::NOT_FOUND, "GET without a route", &gate);
    let after = scrape(&gate).await;

    deltas(&before, &after)
        .of("hubgate_no_route_total", &[], 1.0)
        .of(
            "hubgate_requests_total",
            &[("kind", "none"), ("method", "GET"), ("status_class", "4xx")],
            1.0,
        );
    assert_eq!(
        after.sum("hubgate_requests_total", &[]) - before.sum("hubgate_requests_total", &[]),
        1.0,
        "{:?}",
        after.series("hubgate_requests_total")
    );
    deltas(&before, &after)
        .of("requests_proxy", &[("status", "404")], 1.0)
        .of("requests_web", &[], 1.0);
    assert_eq!(
        after.sum("hubgate_upstream_errors_total", &[]),
        before.sum("hubgate_upstream_errors_total", &[]),
        "no target was asked, so no target failed"
    );
}

#[tokio::test]
async fn failing_targets_count_by_cause_refused_and_timeout() {
    let down = dead_port();
    let silent = silent_backend().await;
    let gate = start_with_metrics(&["--proxy-timeout", "500"]).await;
    gate.add_route_data("/user/alice", user_route(&down.url(), "alice"))
        .await;
    gate.add_route_data(
        "/user/bob",
        user_route(&format!("http://{}", silent.addr), "bob"),
    )
    .await;
    let get_5xx = [("kind", "user"), ("method", "GET"), ("status_class", "5xx")];

    let before = scrape(&gate).await;
    let resp = gate.get_with("/user/alice/lab", &[]).await;
    assert_status(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "a refused target",
        &gate,
    );
    let after = scrape(&gate).await;
    deltas(&before, &after)
        .of(
            "hubgate_upstream_errors_total",
            &[("cause", "refused")],
            1.0,
        )
        .of(
            "hubgate_upstream_errors_total",
            &[("cause", "timeout")],
            0.0,
        )
        .of("hubgate_requests_total", &get_5xx, 1.0)
        .of("requests_proxy", &[("status", "503")], 1.0);

    let before = after;
    let resp = gate.get_with("/user/bob/lab", &[]).await;
    assert_status(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "a target slower than --proxy-timeout",
        &gate,
    );
    let after = scrape(&gate).await;
    deltas(&before, &after)
        .of(
            "hubgate_upstream_errors_total",
            &[("cause", "timeout")],
            1.0,
        )
        .of(
            "hubgate_upstream_errors_total",
            &[("cause", "refused")],
            0.0,
        )
        .of("hubgate_requests_total", &get_5xx, 1.0);
    assert_eq!(
        after.sum("hubgate_upstream_errors_total", &[])
            - before.sum("hubgate_upstream_errors_total", &[]),
        1.0,
        "{:?}",
        after.series("hubgate_upstream_errors_total")
    );

    // The status report mentions the failing targets for a while.
    let report = status_report(&gate).await;
    let warnings = strings(&report["report"]["warnings"]);
    assert!(
        warnings.iter().any(|w| w.contains("target")),
        "no warning about failing targets in {report}"
    );
}

#[tokio::test]
async fn a_websocket_counts_while_open_and_once_closed() {
    let peer = WsPeer::start().await;
    let gate = start_with_metrics(&[]).await;
    gate.add_route_data(
        "/user/alice",
        user_route(&format!("http://{}", peer.addr), "alice"),
    )
    .await;

    let before = scrape(&gate).await;
    let url = format!("ws://{}/user/alice/api/kernels/k1/channels", gate.proxy);
    let (mut ws, _) = tokio::time::timeout(WAIT, connect_async(url.as_str()))
        .await
        .expect("websocket handshake in time")
        .unwrap_or_else(|e| panic!("websocket handshake through hubgate: {e}"));
    ws.send(Message::Text("hello".into())).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("an echo in time")
        .expect("the tunnel stayed open")
        .expect("a message");
    assert_eq!(echoed.to_text().unwrap(), "hello");

    wait_for(WAIT, FAST_POLL, "one open websocket in the metrics", || {
        let gate = &gate;
        async move {
            let active = scrape(gate).await.value("hubgate_active_websockets", &[]);
            if active == 1.0 {
                Ok(())
            } else {
                Err(format!("hubgate_active_websockets {active}"))
            }
        }
    })
    .await;
    let open = scrape(&gate).await;
    assert_eq!(
        open.value("hubgate_active_websockets", &[]),
        1.0,
        "the tunnel is still open"
    );
    deltas(&before, &open)
        .of("hubgate_websocket_connections_total", &[], 1.0)
        .of("hubgate_websocket_duration_seconds_count", &[], 0.0)
        .of("requests_ws", &[], 1.0)
        .of("requests_web", &[], 0.0)
        .of(
            "hubgate_requests_total",
            &[("kind", "user"), ("method", "GET"), ("status_class", "1xx")],
            1.0,
        );

    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);

    wait_for(WAIT, FAST_POLL, "the websocket to count as closed", || {
        let gate = &gate;
        let before = &before;
        async move {
            let scrape = scrape(gate).await;
            let active = scrape.value("hubgate_active_websockets", &[]);
            let closed = scrape.value("hubgate_websocket_duration_seconds_count", &[])
                - before.value("hubgate_websocket_duration_seconds_count", &[]);
            if active == 0.0 && closed == 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "hubgate_active_websockets {active}, +{closed} websocket durations"
                ))
            }
        }
    })
    .await;
    let after = scrape(&gate).await;
    deltas(&before, &after)
        .of("hubgate_websocket_connections_total", &[], 1.0)
        .of("requests_ws", &[], 1.0);
}

// ---------------------------------------------------------------------------------------------
// The control plane

#[tokio::test]
async fn api_operations_count_by_operation_and_result_and_the_table_gauges_match_the_api() {
    let backend = Backend::echo().await;
    let gate = start_with_metrics(&[]).await;
    let op = |op: &'static str, result: &'static str| [("op", op), ("result", result)];

    let s0 = scrape(&gate).await;
    let resp = gate
        .api(
            Method::POST,
            "/api/routes/user/alice",
            user_route(&backend.url(""), "alice").to_string(),
        )
        .await;
    assert_status(&resp, StatusCode::CREATED, "POST a route", &gate);
    let s1 = scrape(&gate).await;
    deltas(&s0, &s1)
        .of("api_route_add", &[], 1.0)
        .of("hubgate_api_operations_total", &op("route_add", "2xx"), 1.0)
        .of("requests_api", &[("status", "201")], 1.0)
        .of("hubgate_store_writes_total", &[("result", "ok")], 1.0);

    let (version, routes) = listing(&gate).await;
    let s2 = scrape(&gate).await;
    deltas(&s1, &s2)
        .of("api_route_get", &[], 1.0)
        .of(
            "hubgate_api_operations_total",
            &op("routes_list", "2xx"),
            1.0,
        )
        .of("requests_api", &[("status", "200")], 1.0);
    assert_eq!(
        s2.get("hubgate_routes", &[]),
        Some(routes),
        "hubgate_routes vs GET /api/routes"
    );
    assert_eq!(
        s2.get("hubgate_route_table_version", &[]),
        Some(version),
        "hubgate_route_table_version vs x-hubgate-version"
    );

    let resp = gate.api(Method::DELETE, "/api/routes/user/alice", "").await;
    assert_status(&resp, StatusCode::NO_CONTENT, "DELETE a route", &gate);
    let s3 = scrape(&gate).await;
    deltas(&s2, &s3)
        .of("api_route_delete", &[], 1.0)
        .of(
            "hubgate_api_operations_total",
            &op("route_delete", "2xx"),
            1.0,
        )
        .of("requests_api", &[("status", "204")], 1.0);

    let resp = gate
        .api(Method::POST, "/api/routes/user/bob", "{this is not json")
        .await;
    assert_status(&resp, StatusCode::BAD_REQUEST, "POST a bad body", &gate);
    let s4 = scrape(&gate).await;
    deltas(&s3, &s4)
        .of("hubgate_api_operations_total", &op("route_add", "4xx"), 1.0)
        .of("hubgate_api_operations_total", &op("route_add", "2xx"), 0.0)
        .of("api_route_add", &[], 0.0)
        .of("requests_api", &[("status", "400")], 1.0);

    let desired = json!({
        "/user/carol": user_route(&backend.url(""), "carol"),
        "/user/dave": user_route(&backend.url(""), "dave"),
        "/services/announce": {"target": backend.url(""), "service": "announce"},
    });
    let resp = gate
        .api(Method::POST, "/api/proxy", desired.to_string())
        .await;
    assert_status(&resp, StatusCode::OK, "POST /api/proxy (sync)", &gate);
    let s5 = scrape(&gate).await;
    deltas(&s4, &s5)
        .of("hubgate_route_change_size_count", &[("op", "sync")], 1.0)
        .of("hubgate_route_change_size_sum", &[("op", "sync")], 3.0)
        .of(
            "hubgate_route_change_apply_seconds_count",
            &[("op", "sync")],
            1.0,
        )
        .of("hubgate_api_operations_total", &op("sync", "2xx"), 1.0);

    let (version, routes) = listing(&gate).await;
    assert_eq!(routes, 3.0, "the sync left exactly its three routes");
    let s6 = scrape(&gate).await;
    assert_eq!(
        s6.get("hubgate_routes", &[]),
        Some(routes),
        "hubgate_routes after the sync"
    );
    assert_eq!(
        s6.get("hubgate_route_table_version", &[]),
        Some(version),
        "hubgate_route_table_version after the sync"
    );
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn auth_decisions_cache_lookups_and_hub_calls_are_counted() {
    let backend = Backend::echo().await;
    let (hub, gate) = gate_with_hub(true, &[]).await;
    let (alice, bob) = (random_token(), random_token());
    hub.add_token(&alice, "alice");
    hub.add_token(&bob, "bob");
    gate.add_route_data("/user/alice", user_route(&backend.url(""), "alice"))
        .await;
    let outcome = |o: &'static str| [("outcome", o)];
    let cache = |r: &'static str| [("result", r)];
    let hub_user = |s: &'static str| [("endpoint", "user"), ("status", s)];

    let s0 = scrape(&gate).await;
    let resp = gate.get_as("/user/alice/tree", &alice).await;
    assert_status(&resp, StatusCode::OK, "alice with her token", &gate);
    let s1 = scrape(&gate).await;
    deltas(&s0, &s1)
        .of("hubgate_auth_decisions_total", &outcome("allowed"), 1.0)
        .of("hubgate_auth_cache_total", &cache("miss"), 1.0)
        .of("hubgate_auth_cache_total", &cache("hit"), 0.0)
        .of("hubgate_hub_requests_total", &hub_user("200"), 1.0);
    assert_eq!(hub.user_calls(), 1, "the hub saw one GET /user");

    let resp = gate.get_as("/user/alice/tree", &alice).await;
    assert_status(&resp, StatusCode::OK, "alice again", &gate);
    let s2 = scrape(&gate).await;
    deltas(&s1, &s2)
        .of("hubgate_auth_decisions_total", &outcome("allowed"), 1.0)
        .of("hubgate_auth_cache_total", &cache("hit"), 1.0)
        .of("hubgate_auth_cache_total", &cache("miss"), 0.0)
        .of("hubgate_hub_requests_total", &hub_user("200"), 0.0);
    assert_eq!(hub.user_calls(), 1, "a cache hit does not ask the hub");

    let resp = gate.get_as("/user/alice/tree", &bob).await;
    assert_status(&resp, StatusCode::FORBIDDEN, "bob on alice's server", &gate);
    let s3 = scrape(&gate).await;
    deltas(&s2, &s3)
        .of("hubgate_auth_decisions_total", &outcome("denied"), 1.0)
        .of("hubgate_auth_decisions_total", &outcome("allowed"), 0.0)
        .of("hubgate_auth_cache_total", &cache("miss"), 1.0)
        .of("hubgate_hub_requests_total", &hub_user("200"), 1.0);

    let resp = gate
        .get_with("/user/alice/tree", &[("accept", "application/json")])
        .await;
    assert_status(&resp, StatusCode::UNAUTHORIZED, "no credentials", &gate);
    let s4 = scrape(&gate).await;
    deltas(&s3, &s4).of(
        "hubgate_auth_decisions_total",
        &outcome("no_credentials"),
        1.0,
    );
    assert_eq!(
        s4.sum("hubgate_hub_requests_total", &[("endpoint", "user")]),
        s3.sum("hubgate_hub_requests_total", &[("endpoint", "user")]),
        "no credentials, no hub call"
    );
    assert!(
        s4.value("hubgate_auth_cache_entries", &[]) > 0.0,
        "hubgate_auth_cache_entries with two tokens cached: {:?}",
        s4.series("hubgate_auth_cache_entries")
    );

    hub.stop();
    let carol = random_token();
    hub.add_token(&carol, "carol");
    let resp = gate.get_as("/user/alice/tree", &carol).await;
    assert_status(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "an uncached token while the hub is down",
        &gate,
    );
    let s5 = scrape(&gate).await;
    deltas(&s4, &s5)
        .of("hubgate_auth_decisions_total", &outcome("hub_error"), 1.0)
        .of("hubgate_hub_requests_total", &hub_user("error"), 1.0)
        .of("hubgate_hub_requests_total", &hub_user("200"), 0.0);
    assert_eq!(
        s5.sum("hubgate_auth_decisions_total", &[]) - s0.sum("hubgate_auth_decisions_total", &[]),
        5.0,
        "five decisions in all: {:?}",
        s5.series("hubgate_auth_decisions_total")
    );
}

// ---------------------------------------------------------------------------------------------
// The process, and what labels may hold

#[tokio::test]
async fn process_and_build_metrics_are_exported() {
    let started = now_secs();
    let gate = start_with_metrics(&[]).await;
    let scrape = scrape(&gate).await;
    let scraped = now_secs();

    assert_eq!(
        scrape.get("hubgate_build_info", &[("version", VERSION)]),
        Some(1.0),
        "hubgate_build_info: {:?}",
        scrape.series("hubgate_build_info")
    );
    let positive = [
        "hubgate_process_resident_memory_bytes",
        "hubgate_process_open_fds",
        "hubgate_process_start_time_seconds",
    ];
    for name in positive {
        assert!(
            scrape.value(name, &[]) > 0.0,
            "{name}: {:?}",
            scrape.series(name)
        );
    }
    let cpu = scrape
        .get("hubgate_process_cpu_seconds_total", &[])
        .unwrap_or_else(|| panic!("no hubgate_process_cpu_seconds_total"));
    assert!(cpu >= 0.0, "hubgate_process_cpu_seconds_total {cpu}");
    let start = scrape
        .get("hubgate_start_time_seconds", &[])
        .unwrap_or_else(|| panic!("no hubgate_start_time_seconds"));
    assert!(
        start >= started.floor() - 1.0 && start <= scraped.ceil(),
        "hubgate_start_time_seconds {start} is not between the test's start {started} and its \
         scrape {scraped}"
    );
    assert_eq!(
        scrape
            .types
            .get("hubgate_requests_total")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        scrape
            .types
            .get("hubgate_request_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        scrape
            .types
            .get("hubgate_active_websockets")
            .map(String::as_str),
        Some("gauge")
    );
}

#[tokio::test]
async fn no_user_name_path_token_or_cookie_reaches_a_label() {
    const USER: &str = "alice-secret-user";
    const TOKEN: &str = "tok-very-secret";
    const LOGIN_COOKIE: &str = "cookie-very-secret";
    const OTHER_COOKIE: &str = "cookie-value-secret";
    const PATH_PART: &str = "path-secret";
    let secrets = [USER, TOKEN, LOGIN_COOKIE, OTHER_COOKIE, PATH_PART];

    let backend = Backend::echo().await;
    let peer = WsPeer::start().await;
    let (hub, gate) = gate_with_hub(true, &["--hub-login-cookie", "jupyterhub-hub-login"]).await;
    hub.add_token(TOKEN, USER);
    gate.add_route_data(&format!("/user/{USER}"), user_route(&backend.url(""), USER))
        .await;
    gate.add_route_data(
        &format!("/user/{USER}/ws-{PATH_PART}"),
        user_route(&format!("http://{}", peer.addr), USER),
    )
    .await;

    let path = format!("/user/{USER}/some/{PATH_PART}");
    let auth = format!("token {TOKEN}");
    let cookies = format!("jupyterhub-hub-login={LOGIN_COOKIE}; other={OTHER_COOKIE}");
    let resp = gate
        .get_with(&path, &[("authorization", &auth), ("cookie", &cookies)])
        .await;
    assert_status(
        &resp,
        StatusCode::OK,
        "the owner with token and cookies",
        &gate,
    );
    let resp = gate
        .get_with(&path, &[("authorization", &auth), ("cookie", &cookies)])
        .await;
    assert_status(&resp, StatusCode::OK, "the owner again (cached)", &gate);
    let resp = gate
        .get_with(
            &format!("{path}?token={TOKEN}"),
            &[("accept", "application/json")],
        )
        .await;
    assert_status(&resp, StatusCode::UNAUTHORIZED, "a token in the URL", &gate);
    let resp = gate.get_with(&path, &[("cookie", &cookies)]).await;
    assert_status(
        &resp,
        StatusCode::UNAUTHORIZED,
        "an unknown hub login cookie",
        &gate,
    );
    let resp = gate
        .request(
            Method::POST,
            &path,
            &[("authorization", &auth)],
            "x".repeat(100),
        )
        .await;
    assert_status(&resp, StatusCode::OK, "an upload", &gate);
    let resp = gate
        .get_with(&format!("/nothing/{USER}/{PATH_PART}?token={TOKEN}"), &[])
        .await;
    assert_status(&resp, StatusCode::NOT_FOUND, "no route", &gate);

    let ws_url = format!(
        "ws://{}/user/{USER}/ws-{PATH_PART}/channels?token={TOKEN}",
        gate.proxy
    );
    let (mut ws, _) = tokio::time::timeout(WAIT, connect_async(ws_url.as_str()))
        .await
        .expect("websocket handshake in time")
        .unwrap_or_else(|e| panic!("websocket with a URL token: {e}"));
    ws.send(Message::Text("hi".into())).await.unwrap();
    let _ = tokio::time::timeout(WAIT, ws.next()).await;
    ws.close(None).await.unwrap();
    drop(ws);

    for (method, api_path) in [
        (Method::GET, format!("/api/routes/user/{USER}")),
        (
            Method::DELETE,
            format!("/api/routes/user/{USER}-{PATH_PART}"),
        ),
        (Method::DELETE, format!("/api/auth/cache/users/{USER}")),
        (Method::GET, format!("/api/routes?inactive_since={TOKEN}")),
    ] {
        let _ = gate.api(method, &api_path, "").await;
    }
    let resp = gate
        .api_with(Method::GET, "/api/routes", &[("authorization", &auth)], "")
        .await;
    assert_status(
        &resp,
        StatusCode::FORBIDDEN,
        "a user token on the API",
        &gate,
    );

    let from_metrics = scrape(&gate).await;
    let resp = gate.api(Method::GET, "/metrics", "").await;
    assert_status(&resp, StatusCode::OK, "GET /metrics on the API", &gate);
    let from_api = Scrape::parse(&resp.text());
    assert!(
        from_metrics.value("hubgate_auth_decisions_total", &[("outcome", "allowed")]) >= 3.0,
        "the traffic was not authenticated as expected: {:?}",
        from_metrics.series("hubgate_auth_decisions_total")
    );
    for (which, scrape) in [("metrics listener", &from_metrics), ("API", &from_api)] {
        let mut leaks = Vec::new();
        for sample in &scrape.samples {
            let mut texts = vec![sample.name.as_str()];
            for (k, v) in &sample.labels {
                texts.push(k);
                texts.push(v);
            }
            for text in texts {
                for secret in secrets {
                    if text.contains(secret) {
                        leaks.push(format!(
                            "{} {:?} holds {secret:?}",
                            sample.name, sample.labels
                        ));
                    }
                }
            }
        }
        assert!(
            leaks.is_empty(),
            "/metrics from the {which} leaks: {leaks:#?}"
        );
        for secret in secrets {
            assert!(
                !scrape.text.contains(secret),
                "/metrics from the {which} contains {secret:?} somewhere:\n{}",
                scrape.text
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Health endpoints and who may see /metrics

#[tokio::test]
async fn metrics_on_the_api_need_the_token_and_health_answers_on_both_ports() {
    let gate = start_with_metrics(&[]).await;

    let resp = gate.api_with(Method::GET, "/metrics", &[], "").await;
    assert_status(
        &resp,
        StatusCode::FORBIDDEN,
        "/metrics on the API without a token",
        &gate,
    );
    let resp = gate
        .api_with(
            Method::GET,
            "/metrics",
            &[("authorization", "token not-the-token")],
            "",
        )
        .await;
    assert_status(
        &resp,
        StatusCode::FORBIDDEN,
        "/metrics on the API, wrong token",
        &gate,
    );
    let resp = gate.api(Method::GET, "/metrics", "").await;
    assert_status(
        &resp,
        StatusCode::OK,
        "/metrics on the API with the token",
        &gate,
    );
    let scrape = Scrape::parse(&resp.text());
    assert!(scrape.has("hubgate_build_info"), "{}", scrape.text);

    for path in ["/health/live", "/health/ready"] {
        let resp = gate.api_with(Method::GET, path, &[], "").await;
        assert_status(
            &resp,
            StatusCode::OK,
            &format!("{path} on the API, no token"),
            &gate,
        );
        assert!(resp.json()["status"].is_string(), "{path}: {}", resp.text());
        let resp = gate.metrics_get(path).await;
        assert_status(
            &resp,
            StatusCode::OK,
            &format!("{path} on the metrics port"),
            &gate,
        );
        assert!(resp.json()["status"].is_string(), "{path}: {}", resp.text());
    }
    let resp = gate.metrics_get("/metrics").await;
    assert_status(
        &resp,
        StatusCode::OK,
        "/metrics on the metrics port, no token",
        &gate,
    );
    for path in ["/nope", "/api/routes", "/api/status", "/metrics/extra"] {
        let resp = gate.metrics_get(path).await;
        assert_status(
            &resp,
            StatusCode::NOT_FOUND,
            &format!("{path} on the metrics port"),
            &gate,
        );
    }
}

#[tokio::test]
async fn readiness_follows_the_hub_when_authentication_is_on() {
    let (hub, gate) = gate_with_hub(true, &[]).await;
    let ready_on_both = |want: StatusCode| {
        let gate = &gate;
        move || async move {
            let on_metrics = gate.metrics_get("/health/ready").await;
            let on_api = gate.api_with(Method::GET, "/health/ready", &[], "").await;
            if on_metrics.status == want && on_api.status == want {
                Ok(())
            } else {
                Err(format!(
                    "metrics port {} {}, API {} {}",
                    on_metrics.status,
                    on_metrics.text(),
                    on_api.status,
                    on_api.text()
                ))
            }
        }
    };
    wait_for(
        WAIT,
        SLOW_POLL,
        "ready with the hub up",
        ready_on_both(StatusCode::OK),
    )
    .await;

    hub.stop();
    wait_for(
        HUB_GONE_WAIT,
        SLOW_POLL,
        "not ready once the hub is gone",
        ready_on_both(StatusCode::SERVICE_UNAVAILABLE),
    )
    .await;
    let resp = gate.metrics_get("/health/ready").await;
    assert_status(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness, hub gone",
        &gate,
    );
    let reasons = strings(&resp.json()["reasons"]);
    assert!(
        reasons.iter().any(|r| r.to_lowercase().contains("hub")),
        "no reason mentions the hub: {reasons:?}"
    );
    let live = gate.metrics_get("/health/live").await;
    assert_status(
        &live,
        StatusCode::OK,
        "liveness does not depend on the hub",
        &gate,
    );

    hub.restart().await;
    wait_for(
        WAIT,
        SLOW_POLL,
        "ready again with the hub back",
        ready_on_both(StatusCode::OK),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// /api/status

#[tokio::test]
async fn the_status_report_describes_hubgate_and_its_table() {
    let backend = Backend::echo().await;
    let gate = start_with_metrics(&[]).await;
    gate.add_route_data("/user/alice", user_route(&backend.url(""), "alice"))
        .await;
    gate.add_route_data("/user/bob", user_route(&backend.url(""), "bob"))
        .await;

    let resp = gate.api_with(Method::GET, "/api/status", &[], "").await;
    assert_status(
        &resp,
        StatusCode::FORBIDDEN,
        "/api/status without the token",
        &gate,
    );

    let report = status_report(&gate).await;
    let (version, routes) = listing(&gate).await;
    assert_eq!(report["status"], "ok", "{report}");
    let checked_at = report["checked_at"].as_str().unwrap_or_default();
    assert!(
        parse_timestamp(checked_at).is_some(),
        "checked_at {checked_at:?} is not a timestamp: {report}"
    );
    assert!(report["report"]["errors"].is_array(), "{report}");
    assert!(strings(&report["report"]["errors"]).is_empty(), "{report}");
    let warnings = strings(&report["report"]["warnings"]);
    assert!(
        !warnings.iter().any(|w| w.contains("open")),
        "an open-API warning with a token set: {report}"
    );
    assert_eq!(report["version"], VERSION, "{report}");
    assert!(report["uptime_seconds"].is_u64(), "{report}");
    assert_eq!(report["routes"].as_f64(), Some(routes), "{report}");
    assert_eq!(report["table_version"].as_f64(), Some(version), "{report}");
}

#[tokio::test]
async fn the_status_report_warns_when_the_api_is_open() {
    let gate = Hubgate::builder().metrics().open_api().start().await;
    let resp = gate.api_with(Method::GET, "/api/status", &[], "").await;
    assert_status(&resp, StatusCode::OK, "/api/status on an open API", &gate);
    let report = resp.json();
    let warnings = strings(&report["report"]["warnings"]);
    assert!(
        warnings.iter().any(|w| {
            let w = w.to_lowercase();
            w.contains("api") && (w.contains("open") || w.contains("configproxy_auth_token"))
        }),
        "no warning about the open API: {report}"
    );
}

#[tokio::test]
async fn the_status_report_follows_the_handshake_and_the_hub() {
    let (hub, gate) = gate_with_hub(false, &[]).await;
    let status_is = |want: &'static str| {
        let gate = &gate;
        move || async move {
            let report = status_report(gate).await;
            if report["status"] == want {
                Ok(())
            } else {
                Err(report.to_string())
            }
        }
    };

    wait_for(
        WAIT,
        SLOW_POLL,
        "unregistered: the hub answers its probe but fails the handshake",
        status_is("unregistered"),
    )
    .await;
    assert!(hub.proxy_calls() >= 1, "hubgate never tried the handshake");

    hub.set_proxy_ok(true);
    wait_for(
        RETRY_WAIT,
        SLOW_POLL,
        "ok after a handshake retry",
        status_is("ok"),
    )
    .await;

    hub.stop();
    wait_for(
        HUB_GONE_WAIT,
        SLOW_POLL,
        "unreachable once the hub is gone",
        status_is("unreachable"),
    )
    .await;
    let report = status_report(&gate).await;
    let errors = strings(&report["report"]["errors"]);
    assert!(
        errors.iter().any(|e| e.to_lowercase().contains("hub")),
        "no error mentions the hub: {report}"
    );

    hub.restart().await;
    wait_for(
        WAIT,
        SLOW_POLL,
        "ok again with the hub back",
        status_is("ok"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// The operator kit

/// The `expr:` values of a Prometheus rules file, block scalars included.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(value) = line.trim_start().strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let mut block = String::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push_str(next.trim());
                    block.push('\n');
                    i += 1;
                }
                exprs.push(block);
            } else {
                exprs.push(value.trim_matches(|c| c == '"' || c == '\'').to_owned());
            }
        }
        i += 1;
    }
    exprs
}

/// Every `targets[].expr` of a Grafana dashboard (panels in rows included), and the queries of
/// its query variables.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(targets)) = map.get("targets") {
                for t in targets {
                    if let Some(expr) = t.get("expr").and_then(Value::as_str) {
                        out.push(expr.to_owned());
                    }
                }
            }
            if let Some(Value::Array(vars)) = map.get("list") {
                // Only query variables hold PromQL; a datasource variable's query is a plugin name.
                for var in vars.iter().filter(|v| v["type"] == "query") {
                    if let Some(query) = var.get("query").and_then(Value::as_str) {
                        out.push(query.to_owned());
                    }
                }
            }
            for value in map.values() {
                dashboard_exprs(value, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                dashboard_exprs(item, out);
            }
        }
        _ => {}
    }
}

/// The metric names an expression uses: identifiers outside quoted strings that are not
/// variables (`$x`), kept when they are hubgate's (`hubgate_...`) or CHP's.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.chars().peekable();
    let mut prev = ' ';
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            let quote = c;
            while let Some(d) = chars.next() {
                if d == '\\' {
                    chars.next();
                } else if d == quote {
                    break;
                }
            }
            prev = quote;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut ident = String::from(c);
            while let Some(&d) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    ident.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            let variable = prev == '$';
            prev = 'x';
            if !variable && (ident.starts_with("hubgate_") || CHP_NAMES.contains(&ident.as_str())) {
                names.insert(ident);
            }
            continue;
        }
        prev = c;
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/monitoring");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("grafana-dashboard.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut dashboard_queries = Vec::new();
    dashboard_exprs(&dashboard, &mut dashboard_queries);
    let alerts = alert_exprs(
        &std::fs::read_to_string(dir.join("hubgate-alerts.yml")).expect("read the alert rules"),
    );
    assert!(
        dashboard_queries.len() >= 10 && alerts.len() >= 5,
        "too few expressions found (dashboard {}, alerts {}): is the extraction broken?",
        dashboard_queries.len(),
        alerts.len()
    );
    let mut used: Vec<(String, &str)> = Vec::new();
    for (exprs, file) in [
        (&dashboard_queries, "grafana-dashboard.json"),
        (&alerts, "hubgate-alerts.yml"),
    ] {
        for expr in exprs {
            let names = metric_names(expr);
            // Only Prometheus's own `up` may stand alone; anything else naming no metric means
            // the extraction missed it.
            assert!(
                !names.is_empty() || expr.trim_start().starts_with("up"),
                "no hubgate or CHP metric found in {expr:?} ({file})"
            );
            used.extend(names.into_iter().map(|n| (n, file)));
        }
    }

    // A hubgate that has seen some of everything: routes, proxied and unrouted requests, a
    // websocket, failed targets, authentication decisions and hub calls.
    let backend = Backend::echo().await;
    let peer = WsPeer::start().await;
    let down = dead_port();
    let (hub, gate) = gate_with_hub(true, &[]).await;
    let alice = random_token();
    hub.add_token(&alice, "alice");
    gate.add_route_data("/user/alice", user_route(&backend.url(""), "alice"))
        .await;
    gate.add_route_data("/open", json!({"target": backend.url("")}))
        .await;
    gate.add_route_data("/ws", json!({"target": format!("http://{}", peer.addr)}))
        .await;
    gate.add_route_data("/down", json!({"target": down.url()}))
        .await;
    for _ in 0..2 {
        let resp = gate.get_as("/user/alice/tree", &alice).await;
        assert_status(&resp, StatusCode::OK, "alice", &gate);
    }
    let resp = gate.get_with("/user/alice/tree", &[]).await;
    assert_status(&resp, StatusCode::UNAUTHORIZED, "no credentials", &gate);
    let resp = gate.request(Method::POST, "/open/x", &[], "body").await;
    assert_status(&resp, StatusCode::OK, "an open route", &gate);
    let resp = gate.get_with("/nowhere", &[]).await;
    assert_status(&resp, StatusCode::NOT_FOUND, "no route", &gate);
    let resp = gate.get_with("/down/x", &[]).await;
    assert_status(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "a refused target",
        &gate,
    );
    let (mut ws, _) =
        tokio::time::timeout(WAIT, connect_async(format!("ws://{}/ws/x", gate.proxy)))
            .await
            .expect("websocket handshake in time")
            .expect("websocket through hubgate");
    ws.send(Message::Text("hi".into())).await.unwrap();
    let _ = tokio::time::timeout(WAIT, ws.next()).await;
    ws.close(None).await.unwrap();
    drop(ws);
    let resp = gate
        .api(
            Method::POST,
            "/api/proxy",
            json!({"/user/alice": user_route(&backend.url(""), "alice")}).to_string(),
        )
        .await;
    assert_status(&resp, StatusCode::OK, "a sync", &gate);
    let _ = gate.api(Method::GET, "/api/routes", "").await;

    let scrape = scrape(&gate).await;
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| {
            let histogram = scrape
                .types
                .get(name.as_str())
                .is_some_and(|t| t == "histogram")
                && scrape.has(&format!("{name}_bucket"));
            !scrape.has(name) && !histogram
        })
        .map(|(name, file)| format!("{name} (used in {file})"))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        missing.is_empty(),
        "the operator kit uses metrics hubgate does not export: {missing:#?}\nexported: {:?}",
        scrape
            .samples
            .iter()
            .map(|s| s.name.as_str())
            .collect::<BTreeSet<_>>()
    );
}
