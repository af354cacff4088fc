//! The handshake with the hub (`--hub-api-url`, `JUPYTERHUB_API_TOKEN`): a fresh hubgate asks the
//! hub to sync its routes (`POST /hub/api/proxy`), a restarted one whose file store vouches for
//! its table does not, `--notify-hub` announces the API (`PATCH /hub/api/proxy`), failures are
//! retried while the proxy keeps serving, and `POST /api/handshake` asks on demand.
//!
//! hubgate is started with the hub's URL and a hub token in `JUPYTERHUB_API_TOKEN` (`with_hub`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

use crate::support::{
    dead_addr, eventually, full, random_token, Backend, Body, Builder, Hubgate, WAIT,
};

/// Bound for a retry that backs off (0.5 s, 1 s, 2 s, ... up to 30 s between attempts).
const RETRY_WAIT: Duration = Duration::from_secs(90);

/// One request the fake hub received.
#[derive(Debug, Clone)]
struct HubCall {
    method: Method,
    path: String,
    authorization: Option<String>,
    body: String,
}

struct HubState {
    calls: Mutex<Vec<HubCall>>,
    /// How many of the next calls get a 500.
    fail_next: AtomicUsize,
    /// Every call gets a 500 while this is set.
    fail_always: AtomicBool,
    /// When set, a call that would succeed waits for `release` first.
    hold: AtomicBool,
    release: Notify,
}

/// An in-process stand-in for JupyterHub's `/hub/api/proxy`: records every call and answers
/// 200 `{}` (or 500 when told to fail).
struct FakeHub {
    addr: SocketAddr,
    state: Arc<HubState>,
    task: JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeHub {
    async fn start() -> FakeHub {
        FakeHub::on(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind fake hub"),
        )
    }

    fn on(listener: TcpListener) -> FakeHub {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HubState {
            calls: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            fail_always: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            release: Notify::new(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(hub_answer(req, state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeHub { addr, state, task }
    }

    /// `--hub-api-url` for this hub.
    fn api_url(&self) -> String {
        format!("http://{}/hub/api", self.addr)
    }

    fn calls(&self) -> Vec<HubCall> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Calls of `method` to `/hub/api/proxy`.
    fn proxy_calls(&self, method: Method) -> Vec<HubCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method && c.path == "/hub/api/proxy")
            .collect()
    }

    async fn wait_for_calls(&self, method: Method, n: usize, timeout: Duration) {
        eventually(timeout, &format!("{n} {method} /hub/api/proxy"), || {
            let count = self.proxy_calls(method.clone()).len();
            async move { count >= n }
        })
        .await;
    }
}

async fn hub_answer(req: Request<Incoming>, state: Arc<HubState>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.calls.lock().unwrap().push(HubCall {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        authorization: parts
            .headers
            .get("authorization")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let failing = state.fail_always.load(Ordering::SeqCst)
        || state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if failing {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("content-type", "application/json")
            .body(full(r#"{"status": 500, "message": "hub trouble"}"#))
            .unwrap();
    }
    // Created before the flag is read, so a release between the two is not missed.
    let released = state.release.notified();
    if state.hold.load(Ordering::SeqCst) {
        released.await;
    }
    Response::builder()
        .header("content-type", "application/json")
        .body(full("{}"))
        .unwrap()
}

/// hubgate that knows the hub at `hub_url` (`--hub-api-url`) and holds `hub_token` as its
/// `JUPYTERHUB_API_TOKEN`.
fn with_hub(hub_url: &str, hub_token: &str) -> Builder {
    Hubgate::builder()
        .args(["--hub-api-url", hub_url])
        .env("JUPYTERHUB_API_TOKEN", hub_token)
}

/// A hub and a file store that hubgates started one after another share.
struct FileStoreRuns {
    dir: tempfile::TempDir,
    hub: FakeHub,
    hub_token: String,
}

impl FileStoreRuns {
    async fn new() -> FileStoreRuns {
        FileStoreRuns {
            dir: tempfile::tempdir().unwrap(),
            hub: FakeHub::start().await,
            hub_token: random_token(),
        }
    }

    /// Start a hubgate on the shared store that asks the shared hub.
    async fn start(&self) -> Hubgate {
        with_hub(&self.hub.api_url(), &self.hub_token)
            .file_store(self.dir.path())
            .start()
            .await
    }
}

fn assert_hub_token(calls: &[HubCall], hub_token: &str) {
    for call in calls {
        assert_eq!(
            call.authorization.as_deref(),
            Some(format!("token {hub_token}").as_str()),
            "{call:?}"
        );
    }
}

#[tokio::test]
async fn a_fresh_hubgate_asks_the_hub_to_sync() {
    let hub = FakeHub::start().await;
    let hub_token = random_token();
    let gate = with_hub(&hub.api_url(), &hub_token).start().await;
    hub.wait_for_calls(Method::POST, 1, WAIT).await;
    let calls = hub.proxy_calls(Method::POST);
    assert_eq!(
        calls.len(),
        1,
        "one successful handshake is enough: {calls:?}"
    );
    assert_hub_token(&calls, &hub_token);
    assert!(
        hub.proxy_calls(Method::PATCH).is_empty(),
        "PATCH without --notify-hub: {:?}",
        hub.calls()
    );
    drop(gate);
}

#[tokio::test]
async fn a_restarted_file_store_with_its_routes_does_not_ask_the_hub() {
    let runs = FileStoreRuns::new().await;
    let (hub, hub_token) = (&runs.hub, &runs.hub_token);

    let mut gate = runs.start().await;
    hub.wait_for_calls(Method::POST, 1, WAIT).await;
    assert_hub_token(&hub.proxy_calls(Method::POST), hub_token);
    gate.add_route("/user/a", "http://127.0.0.1:9").await;
    let before = gate.routes().await;
    gate.stop("TERM").await;

    let gate = runs.start().await;
    assert_eq!(gate.routes().await, before, "the file store lost the table");
    // A call of our own as a barrier: had hubgate started a handshake of its own when it came
    // up, that call would have reached the hub first.
    let resp = gate.api(Method::POST, "/api/handshake", "").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let calls = hub.proxy_calls(Method::POST);
    assert_eq!(
        calls.len(),
        2,
        "expected the first start's handshake and ours only; the restart asked the hub too: \
         {calls:?}\nhubgate log:\n{}",
        gate.logs()
    );
}

#[tokio::test]
async fn an_empty_file_store_asks_again_when_the_first_run_never_reached_the_hub() {
    let runs = FileStoreRuns::new().await;
    let hub = &runs.hub;
    hub.state.fail_always.store(true, Ordering::SeqCst);

    // First run: the hub only fails, and hubgate is stopped before any handshake succeeded.
    let mut gate = runs.start().await;
    hub.wait_for_calls(Method::POST, 1, WAIT).await;
    gate.stop("TERM").await;
    let failed = hub.proxy_calls(Method::POST).len();

    // Second run: the store is still empty and was never synced; the hub now answers.
    hub.state.fail_always.store(false, Ordering::SeqCst);
    let gate = runs.start().await;
    assert_eq!(
        Value::Object(gate.routes().await),
        json!({}),
        "the store should be empty"
    );
    eventually(
        WAIT,
        "a POST /hub/api/proxy from the restarted hubgate (its empty table was never synced)",
        || {
            let count = hub.proxy_calls(Method::POST).len();
            async move { count > failed }
        },
    )
    .await;
}

#[tokio::test]
async fn a_damaged_log_asks_the_hub_to_sync() {
    let runs = FileStoreRuns::new().await;
    let (hub, hub_token) = (&runs.hub, &runs.hub_token);

    let mut gate = runs.start().await;
    hub.wait_for_calls(Method::POST, 1, WAIT).await;
    gate.add_route("/user/a", "http://127.0.0.1:9").await;
    gate.stop("TERM").await;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(runs.dir.path().join("routes.log"))
        .expect("open routes.log");
    std::io::Write::write_all(&mut log, b"deadbeef {\"batch\":{\"vers").unwrap();
    drop(log);

    let gate = runs.start().await;
    let routes = Value::Object(gate.routes().await);
    assert_eq!(
        routes["/user/a"]["target"], "http://127.0.0.1:9",
        "{routes}"
    );
    hub.wait_for_calls(Method::POST, 2, WAIT).await;
    assert_hub_token(&hub.proxy_calls(Method::POST), hub_token);
}

#[tokio::test]
async fn a_failing_hub_is_retried_while_the_proxy_serves() {
    let backend = Backend::echo().await;
    let hub = FakeHub::start().await;
    hub.state.fail_next.store(3, Ordering::SeqCst);
    // The fourth call succeeds, but only once the test has checked the proxy in the meantime.
    hub.state.hold.store(true, Ordering::SeqCst);
    let hub_token = random_token();
    let gate = with_hub(&hub.api_url(), &hub_token).start().await;

    hub.wait_for_calls(Method::POST, 4, RETRY_WAIT).await;
    assert!(
        !gate.logs().contains("hub handshake done"),
        "the handshake is reported done while the hub has not answered:\n{}",
        gate.logs()
    );
    gate.add_route("/user/x", &backend.url("")).await;
    let resp = gate.get("/user/x/tree").await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "the proxy while the hub is failing: {resp:?}"
    );
    assert_eq!(resp.json()["path"], "/user/x/tree");
    hub.state.hold.store(false, Ordering::SeqCst);
    hub.state.release.notify_waiters();

    eventually(WAIT, "hubgate to log the handshake done", || {
        let done = gate.logs().contains("hub handshake done");
        async move { done }
    })
    .await;
    let calls = hub.proxy_calls(Method::POST);
    assert_eq!(
        calls.len(),
        4,
        "three failures, then one success: {calls:?}"
    );
    assert_hub_token(&calls, &hub_token);
    let resp = gate.get("/user/x").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
}

#[tokio::test]
async fn a_hub_that_is_not_listening_yet_is_retried_until_it_is() {
    let backend = Backend::echo().await;
    let addr = dead_addr().await;
    let hub_token = random_token();
    let url = format!("http://{addr}/hub/api");
    let gate = with_hub(&url, &hub_token).start().await;

    eventually(WAIT, "a failed handshake in the log", || {
        let failed = gate.logs().contains("hub handshake failed");
        async move { failed }
    })
    .await;
    gate.add_route("/user/y", &backend.url("")).await;
    let resp = gate.get("/user/y/api").await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "the proxy while the hub is away: {resp:?}"
    );

    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind the fake hub on {addr} again: {e}"));
    let hub = FakeHub::on(listener);
    hub.wait_for_calls(Method::POST, 1, RETRY_WAIT).await;
    assert_hub_token(&hub.proxy_calls(Method::POST), &hub_token);
    let resp = gate.get("/user/y").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
}

#[tokio::test]
async fn notify_hub_announces_the_api_with_patch() {
    let hub = FakeHub::start().await;
    let hub_token = random_token();
    let gate = with_hub(&hub.api_url(), &hub_token)
        .args(["--notify-hub"])
        .start()
        .await;
    hub.wait_for_calls(Method::PATCH, 1, WAIT).await;
    let calls = hub.proxy_calls(Method::PATCH);
    assert_hub_token(&calls, &hub_token);
    let body: Value = serde_json::from_str(&calls[0].body)
        .unwrap_or_else(|e| panic!("PATCH body is not JSON ({e}): {:?}", calls[0].body));
    assert_eq!(
        body["api_url"],
        format!("http://127.0.0.1:{}", gate.api.port()),
        "{body}"
    );
    assert_eq!(body["auth_token"], gate.token(), "{body}");
    assert_eq!(body["ip"], "127.0.0.1", "{body}");
    assert_eq!(body["port"], gate.api.port(), "{body}");
    assert_eq!(body["protocol"], "http", "{body}");
}

#[tokio::test]
async fn post_handshake_calls_the_hub_once() {
    let hub = FakeHub::start().await;
    let hub_token = random_token();
    let gate = with_hub(&hub.api_url(), &hub_token).start().await;
    hub.wait_for_calls(Method::POST, 1, WAIT).await;
    assert_eq!(hub.proxy_calls(Method::POST).len(), 1);

    let resp = gate.api(Method::POST, "/api/handshake", "").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert!(
        resp.content_type().starts_with("application/json"),
        "{resp:?}"
    );
    let calls = hub.proxy_calls(Method::POST);
    assert_eq!(
        calls.len(),
        2,
        "one call per POST /api/handshake: {calls:?}"
    );
    assert_hub_token(&calls, &hub_token);

    let wrong = gate.api_with(Method::POST, "/api/handshake", &[], "").await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN, "{wrong:?}");
    assert_eq!(
        hub.proxy_calls(Method::POST).len(),
        2,
        "a refused request called the hub"
    );
}

#[tokio::test]
async fn post_handshake_with_a_failing_hub_is_502() {
    let hub = FakeHub::start().await;
    hub.state.fail_always.store(true, Ordering::SeqCst);
    let hub_token = random_token();
    let gate = with_hub(&hub.api_url(), &hub_token).start().await;
    let resp = gate.api(Method::POST, "/api/handshake", "").await;
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{resp:?}");
    let body = resp.json();
    assert_eq!(body["status"], 502, "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert!(!hub.proxy_calls(Method::POST).is_empty());
}

#[tokio::test]
async fn post_handshake_without_a_hub_is_409() {
    let hg = Hubgate::start(&[]).await;
    let resp = hg.api_post("/api/handshake", "").await;
    assert_eq!(resp.status, StatusCode::CONFLICT, "{resp:?}");
    let body = resp.json();
    assert_eq!(body["status"], 409, "{body}");
    assert!(body["message"].is_string(), "{body}");
}
