//! Fair-use limits (`[limits]` in the configuration file) through the real proxy: request rates
//! per client address and per authenticated user (the fake hub says who), the login bucket,
//! websocket caps, the trusted-proxy rule for `X-Forwarded-For`, and a reload on SIGHUP.
//! (`limits` is about the connection limit, `--max-connections`.)
//!
//! Rates are chosen so that a refill cannot happen while a test sends its burst (one token in
//! 100 s) unless the test waits for one, which it does by polling with `eventually`.

use std::path::{Path, PathBuf};

use http::{header, Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::{connect_async, tungstenite};

use crate::fakehub::FakeHub;
use crate::support::{eventually, random_token, Backend, Builder, Hubgate, Resp, WsPeer, WAIT};

/// hubgate with `limits` as its configuration file's `[limits]` table; the file stays in `dir`
/// so a test can rewrite it.
fn with_limits(dir: &Path, limits: &str) -> (Builder, PathBuf) {
    let file = dir.join("hubgate.toml");
    std::fs::write(&file, format!("[limits]\n{limits}\n")).unwrap();
    let path = file.display().to_string();
    (Hubgate::builder().args(["--config", &path]), file)
}

/// Starts hubgate with `limits` and `/` routed to an echo backend.
async fn gate_with_echo(dir: &Path, limits: &str) -> (Hubgate, Backend, PathBuf) {
    let (builder, file) = with_limits(dir, limits);
    let gate = builder.metrics().start().await;
    let backend = Backend::echo().await;
    gate.add_route("/", &backend.url("")).await;
    (gate, backend, file)
}

/// The statuses of `n` GETs of `path`, one after another, with these headers.
async fn statuses(gate: &Hubgate, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<u16> {
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(gate.get_with(path, headers).await.status.as_u16());
    }
    seen
}

#[track_caller]
fn assert_refused(resp: &Resp, limit: &str) {
    assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS, "{resp:?}");
    let retry: u64 = resp.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    let body = resp.json();
    assert_eq!(body["status"], 429, "{body}");
    assert_eq!(body["limit"], limit, "{body}");
}

async fn refusals(gate: &Hubgate, limit: &str, kind: &str) -> u64 {
    let text = gate.metrics_get("/metrics").await.text();
    let series = format!("hubgate_limit_refusals_total{{kind=\"{kind}\",limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_burst_is_refused_at_its_size_and_admitted_after_the_refill() {
    let dir = tempfile::tempdir().unwrap();
    // Five at once, then one every 2 s.
    let (gate, backend, _) = gate_with_echo(dir.path(), "client = { rate = 0.5, burst = 5 }").await;
    assert_eq!(statuses(&gate, 5, "/a", &[]).await, [200; 5]);
    let refused = gate.get("/a").await;
    assert_refused(&refused, "client_rate");
    assert!(
        refused.headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            <= 2
    );
    // A browser gets a page.
    let page = gate
        .get_with("/a", &[("accept", "text/html,*/*;q=0.8")])
        .await;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(page.content_type().starts_with("text/html"), "{page:?}");
    assert!(page.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(
        backend.seen().len(),
        5,
        "refused requests reached the backend"
    );
    assert_eq!(refusals(&gate, "client_rate", "other").await, 2);
    // The refill admits one more, and only one.
    eventually(WAIT, "a token after the refill", || async {
        gate.get("/a").await.status == StatusCode::OK
    })
    .await;
    assert_refused(&gate.get("/a").await, "client_rate");
}

/// The route data JupyterHub posts for a user's server.
fn server_route(target: &str, user: &str) -> Value {
    json!({"target": target, "user": user, "server_name": "", "jupyterhub": true})
}

fn own_token(hub: &FakeHub, user: &str) -> String {
    let own = format!("access:servers!user={user}");
    hub.issue_token(user, Some(&[own.as_str()]))
}

#[tokio::test]
async fn one_user_flooding_does_not_hold_back_another() {
    let hub = FakeHub::start(&random_token()).await;
    hub.add_user("alice", false, &[]);
    hub.add_user("bob", false, &[]);
    let dir = tempfile::tempdir().unwrap();
    let (builder, _) = with_limits(
        dir.path(),
        "user = { rate = 0.01, burst = 3, kinds = [\"user\"] }",
    );
    let gate = builder
        .args(["--hub-api-url", &hub.api_url()])
        .env("JUPYTERHUB_API_TOKEN", hub.service_token())
        .metrics()
        .start()
        .await;
    let (alice_server, bob_server) = (Backend::echo().await, Backend::echo().await);
    gate.add_route_data("/user/alice", server_route(&alice_server.url(""), "alice"))
        .await;
    gate.add_route_data("/user/bob", server_route(&bob_server.url(""), "bob"))
        .await;
    let (alice, bob) = (own_token(&hub, "alice"), own_token(&hub, "bob"));
    let alice_auth = format!("token {alice}");
    let alice_headers = [("authorization", alice_auth.as_str())];
    let flood = statuses(&gate, 40, "/user/alice/api", &alice_headers);
    let bob_auth = format!("token {bob}");
    let steady = async {
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(gate.get_as("/user/bob/api", &bob).await.status.as_u16());
        }
        seen
    };
    // Both at once, from the same address: only alice's own bucket runs dry.
    let (flooded, bob_saw) = tokio::join!(flood, steady);
    assert_eq!(bob_saw, [200; 3], "bob was held back by alice's flood");
    assert_eq!(flooded[..3], [200; 3]);
    assert!(flooded[3..].iter().all(|s| *s == 429), "{flooded:?}");
    assert_eq!(alice_server.seen().len(), 3);
    assert_eq!(bob_server.seen().len(), 3);
    assert_eq!(refusals(&gate, "user_rate", "user").await, 37);
    // bob's bucket is his: his fourth request is the one refused.
    let resp = gate
        .get_with("/user/bob/api", &[("authorization", &bob_auth)])
        .await;
    assert_refused(&resp, "user_rate");
    // The metric names the limit and the route kind, never the user.
    let text = gate.metrics_get("/metrics").await.text();
    assert!(!text
        .lines()
        .any(|l| l.starts_with("hubgate_limit") && (l.contains("alice") || l.contains("bob"))));
}

async fn connect(gate: &Hubgate, path: &str) -> Result<WsStream, u16> {
    let url = format!("ws://{}{path}", gate.proxy);
    match tokio::time::timeout(WAIT, connect_async(url)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(resp))) => Err(resp.status().as_u16()),
        Ok(Err(e)) => panic!("websocket handshake to {path}: {e:?}"),
        Err(_) => panic!("websocket handshake to {path}: no answer within {WAIT:?}"),
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[tokio::test]
async fn open_websockets_are_capped_per_client_and_freed_when_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (builder, _) = with_limits(dir.path(), "client = { websockets = 2, concurrent = 100 }");
    let gate = builder.start().await;
    let peer = WsPeer::start().await;
    gate.add_route("/ws", &format!("http://{}", peer.addr))
        .await;
    let first = connect(&gate, "/ws").await.expect("first websocket");
    let mut second = connect(&gate, "/ws").await.expect("second websocket");
    assert_eq!(connect(&gate, "/ws").await.err(), Some(429));
    // Plain requests have their own count.
    let backend = Backend::echo().await;
    gate.add_route("/plain", &backend.url("")).await;
    assert_eq!(gate.get("/plain").await.status, StatusCode::OK);
    second.close(None).await.unwrap();
    drop(second);
    eventually(WAIT, "a websocket place after one closed", || async {
        match connect(&gate, "/ws").await {
            Ok(ws) => {
                drop(ws);
                true
            }
            Err(_) => false,
        }
    })
    .await;
    drop(first);
}

#[tokio::test]
async fn the_login_bucket_slows_password_guessing_only() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, backend, _) = gate_with_echo(dir.path(), "login = { rate = 0.01, burst = 2 }").await;
    let post = |path: &'static str| gate.request(Method::POST, path, &[], "password=guess");
    assert_eq!(post("/hub/login").await.status, StatusCode::OK);
    assert_eq!(post("/hub/login").await.status, StatusCode::OK);
    assert_refused(&post("/hub/login").await, "login_rate");
    // The token endpoints share the bucket.
    assert_refused(&post("/hub/api/users/alice/tokens").await, "login_rate");
    assert_refused(&post("/hub/api/authorizations/token").await, "login_rate");
    // Everything else goes on.
    assert_eq!(statuses(&gate, 10, "/hub/login", &[]).await, [200; 10]);
    assert_eq!(post("/hub/api/users").await.status, StatusCode::OK);
    assert_eq!(backend.seen().len(), 13);
}

#[tokio::test]
async fn the_login_rate_flag_sets_the_bucket_without_a_file() {
    let out = Hubgate::builder()
        .args(["--limit-login-rate", "0"])
        .run_to_exit()
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--limit-login-rate"), "{stderr}");
    let gate = Hubgate::builder()
        .env("HUBGATE_LIMIT_LOGIN_RATE", "0.01")
        .start()
        .await;
    let backend = Backend::echo().await;
    gate.add_route("/", &backend.url("")).await;
    let login = || gate.request(Method::POST, "/hub/login", &[], "password=guess");
    assert_eq!(login().await.status, StatusCode::OK);
    assert_refused(&login().await, "login_rate");
    assert_eq!(gate.get("/hub/login").await.status, StatusCode::OK);
}

#[tokio::test]
async fn forwarded_for_counts_only_from_a_trusted_peer() {
    let dir = tempfile::tempdir().unwrap();
    let limit = "client = { rate = 0.01, burst = 2 }";
    // 127.0.0.1 is not trusted: a new X-Forwarded-For on each request changes nothing.
    let untrusted = format!("trusted_proxies = [\"10.0.0.0/8\"]\n{limit}");
    let (gate, _backend, _) = gate_with_echo(dir.path(), &untrusted).await;
    let forged = ["192.0.2.1", "192.0.2.2", "192.0.2.3"];
    let mut seen = Vec::new();
    for xff in forged {
        seen.push(gate.get_with("/", &[("x-forwarded-for", xff)]).await.status);
    }
    assert_eq!(
        seen,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    drop(gate);
    // Trusted, the header names the client: each address has its own bucket.
    let trusted = format!("trusted_proxies = [\"127.0.0.0/8\"]\n{limit}");
    let other = tempfile::tempdir().unwrap();
    let (gate, _backend, _) = gate_with_echo(other.path(), &trusted).await;
    for xff in forged {
        let headers = [("x-forwarded-for", xff)];
        assert_eq!(statuses(&gate, 2, "/", &headers).await, [200, 200], "{xff}");
    }
    let forged_left = [("x-forwarded-for", "6.6.6.6, 192.0.2.1")];
    assert_refused(&gate.get_with("/", &forged_left).await, "client_rate");
}

#[tokio::test]
async fn sighup_reloads_the_limits_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, _backend, file) =
        gate_with_echo(dir.path(), "client = { rate = 0.01, burst = 2 }").await;
    assert_eq!(statuses(&gate, 2, "/", &[]).await, [200, 200]);
    assert_refused(&gate.get("/").await, "client_rate");
    std::fs::write(&file, "[limits]\nclient = { rate = -1.0 }\n").unwrap();
    gate.signal("HUP");
    eventually(WAIT, "the failed reload in the log", || async {
        gate.logs().contains("limits not reloaded")
    })
    .await;
    assert!(
        gate.logs().contains("limits.client.rate"),
        "{}",
        gate.logs()
    );
    assert_refused(&gate.get("/").await, "client_rate");
    std::fs::write(&file, "[limits]\nclient = { rate = 0.05, burst = 100 }\n").unwrap();
    gate.signal("HUP");
    eventually(WAIT, "the larger burst after the reload", || async {
        gate.get("/").await.status == StatusCode::OK
    })
    .await;
    // The new limits are in force a moment before the line saying so is written.
    eventually(WAIT, "the reload in the log", || async {
        gate.logs().contains("limits reloaded")
    })
    .await;
}

#[tokio::test]
async fn a_bad_limits_table_stops_the_start_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (builder, _) = with_limits(dir.path(), "user = { rate = 5.0, kinds = [\"users\"] }");
    let out = builder.run_to_exit().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("limits.user.kinds"), "{stderr}");
}
