//! Authentication at the edge: hubgate asks the hub (here the fake one in `fakehub`) who sends a
//! request and lets it reach a user's server only when the hub's answer allows it.
//!
//! Routes are added the way JupyterHub adds them (`{"user", "server_name", "jupyterhub": true}`)
//! and the backends are echo servers, so what a server receives can be checked. hubgate is
//! started with the hub's URL and `JUPYTERHUB_API_TOKEN` (`with_hub`), and some tests add
//! `HUBGATE_SESSION_SECRETS` to its environment.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::{connect_async, tungstenite};

use crate::certs::{client_config, tls_get, Ca, ClientOptions};
use crate::fakehub::{Endpoint, FakeHub, Mode, LOGIN_COOKIE};
use crate::support::{
    empty, eventually, http_client, parse_raw_response, random_token, raw_http, send, Backend,
    Builder, Hubgate, Resp, WsEvent, WsPeer, WAIT,
};

/// What a browser sends as `Accept` when it navigates.
const BROWSER: (&str, &str) = (
    "accept",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
);
const CLIENT_ID: &str = "service-hubgate";
const CALLBACK: &str = "/hubgate/oauth_callback";
const SECRET_1: &str = "first-session-secret-of-the-hubgate-auth-tests";
const SECRET_2: &str = "second-session-secret-of-the-hubgate-auth-tests";
const SECRET_3: &str = "unrelated-session-secret-of-another-deployment";

// ---------------------------------------------------------------------------------------------
// Starting hubgate with a hub

/// hubgate in front of `hub`: `--hub-api-url` and the hub's service token in
/// `JUPYTERHUB_API_TOKEN`.
fn with_hub(hub: &FakeHub) -> Builder {
    Hubgate::builder()
        .args(["--hub-api-url", &hub.api_url()])
        .env("JUPYTERHUB_API_TOKEN", hub.service_token())
}

/// Starts `gate` and puts alice's default server, an echo backend, behind it.
async fn start_with_alice(gate: Builder) -> (Hubgate, Backend) {
    let gate = gate.start().await;
    let backend = Backend::echo().await;
    gate.add_route_data("/user/alice", server_route(&backend.url(""), "alice", ""))
        .await;
    (gate, backend)
}

/// hubgate in front of `hub` with alice's default server a websocket peer.
async fn start_with_alices_websocket(hub: &FakeHub) -> (Hubgate, WsPeer) {
    let gate = with_hub(hub).start().await;
    let peer = WsPeer::start().await;
    gate.add_route_data(
        "/user/alice",
        server_route(&format!("http://{}", peer.addr), "alice", ""),
    )
    .await;
    (gate, peer)
}

/// Starts `gate` with alice's and bob's default servers, each an echo backend of its own.
async fn start_with_alice_and_bob(gate: Builder) -> (Hubgate, Backend, Backend) {
    let (gate, alice_server) = start_with_alice(gate).await;
    let bob_server = Backend::echo().await;
    gate.add_route_data("/user/bob", server_route(&bob_server.url(""), "bob", ""))
        .await;
    (gate, alice_server, bob_server)
}

/// hubgate with alice's server, URL tokens allowed and sessions signed with `SECRET_1`, and a
/// session alice got with her token: `(gate, alice's server, her token, the session's JWT)`.
async fn alice_with_a_session(hub: &FakeHub) -> (Hubgate, Backend, String, String) {
    let (gate, backend) = start_with_alice(
        with_hub(hub)
            .args(["--allow-token-in-url"])
            .env("HUBGATE_SESSION_SECRETS", SECRET_1),
    )
    .await;
    let token = own_token(hub, "alice");
    let session = session_via_url_token(&gate, "/user/alice/lab", &token).await;
    (gate, backend, token, session)
}

/// `DELETE path` on the API with the right token, asserting 204.
async fn revoke(gate: &Hubgate, path: &str) {
    let resp = gate.api_delete(path).await;
    assert_eq!(
        resp.status,
        StatusCode::NO_CONTENT,
        "DELETE {path}: {resp:?}\nhubgate stderr:\n{}",
        gate.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The route data JupyterHub posts for a user's server.
fn server_route(target: &str, user: &str, server: &str) -> Value {
    json!({"target": target, "user": user, "server_name": server, "jupyterhub": true})
}

/// A hub with users alice (in group `g`) and bob (in group `b`), and hubgate's service token.
async fn hub() -> FakeHub {
    let hub = FakeHub::start(&random_token()).await;
    hub.add_user("alice", false, &["g"]);
    hub.add_user("bob", false, &["b"]);
    hub.add_user("carol", false, &[]);
    hub
}

/// A token of `user` with the scopes JupyterHub gives a user's own token.
fn own_token(hub: &FakeHub, user: &str) -> String {
    let own = format!("access:servers!user={user}");
    let read = format!("read:users!user={user}");
    hub.issue_token(user, Some(&[own.as_str(), read.as_str()]))
}

/// The echo backend's JSON answer, asserting it came from the backend.
fn echoed(resp: &Resp, what: &str) -> Value {
    assert_eq!(resp.status, StatusCode::OK, "{what}: {resp:?}");
    let doc = resp.json();
    assert!(
        doc.get("path").is_some(),
        "{what}: not an echo backend answer: {doc}"
    );
    doc
}

/// A header the echo backend received, if it received it.
fn echoed_header(doc: &Value, name: &str) -> Option<String> {
    doc["headers"][name].as_str().map(str::to_owned)
}

fn location(resp: &Resp, what: &str) -> String {
    assert_eq!(resp.status, StatusCode::FOUND, "{what}: {resp:?}");
    resp.headers
        .get(header::LOCATION)
        .unwrap_or_else(|| panic!("{what}: 302 without Location: {resp:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

fn set_cookies(resp: &Resp) -> Vec<String> {
    resp.headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// The `Set-Cookie` line for cookie `name`.
fn set_cookie(resp: &Resp, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    set_cookies(resp)
        .into_iter()
        .find(|c| c.starts_with(&prefix))
}

/// The value a `Set-Cookie` line sets.
fn cookie_value(line: &str) -> String {
    let pair = line.split(';').next().unwrap_or_default();
    pair.split_once('=')
        .map(|(_, v)| v)
        .unwrap_or("")
        .to_owned()
}

fn query_of(url: &str) -> HashMap<String, String> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn assert_json_refusal(resp: &Resp, status: StatusCode, secrets: &[&str], what: &str) {
    assert_eq!(resp.status, status, "{what}: {resp:?}");
    assert!(
        resp.content_type().starts_with("application/json"),
        "{what}: content type {:?}",
        resp.content_type()
    );
    let doc = resp.json();
    assert_eq!(doc["status"], json!(status.as_u16()), "{what}: {doc}");
    for secret in secrets {
        assert!(
            !resp.text().contains(secret),
            "{what}: the body holds a secret: {}",
            resp.text()
        );
    }
}

/// Asks for a session cookie the `?token=` way (`--allow-token-in-url`): a browser GET with the
/// token in the URL is redirected to the same URL without it, with `hubgate-session` set.
async fn session_via_url_token(gate: &Hubgate, path: &str, token: &str) -> String {
    let resp = gate
        .get_with(&format!("{path}?token={token}"), &[BROWSER])
        .await;
    let to = location(&resp, "browser GET with ?token=");
    assert_eq!(to, path, "the redirect drops the token and keeps the path");
    let line = set_cookie(&resp, "hubgate-session")
        .unwrap_or_else(|| panic!("no session cookie set: {resp:?}"));
    cookie_value(&line)
}

/// A browser's cookies for one site, honouring `Path` and `Max-Age=0`.
#[derive(Default, Clone)]
struct Jar {
    /// (name, value, path)
    cookies: Vec<(String, String, String)>,
}

impl Jar {
    fn store(&mut self, resp: &Resp) {
        for line in set_cookies(resp) {
            let mut parts = line.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            let mut path = "/".to_owned();
            let mut gone = false;
            for attr in parts {
                let (key, val) = attr.split_once('=').unwrap_or((attr, ""));
                if key.eq_ignore_ascii_case("path") {
                    path = val.to_owned();
                } else if key.eq_ignore_ascii_case("max-age") && val.trim() == "0" {
                    gone = true;
                }
            }
            self.cookies.retain(|(n, _, p)| !(n == name && *p == path));
            if !gone {
                self.cookies
                    .push((name.to_owned(), value.to_owned(), path.clone()));
            }
        }
    }

    /// The `Cookie` header a browser sends with a request for `path`.
    fn header(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or(path);
        let pairs: Vec<String> = self
            .cookies
            .iter()
            .filter(|(_, _, p)| {
                path == p
                    || (path.starts_with(p.as_str())
                        && (p.ends_with('/') || path[p.len()..].starts_with('/')))
            })
            .map(|(n, v, _)| format!("{n}={v}"))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    fn get(&self, name: &str) -> Option<String> {
        self.cookies
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.clone())
    }
}

/// A browser GET on hubgate with the jar's cookies; stores what it sets.
async fn browse(gate: &Hubgate, jar: &mut Jar, path: &str) -> Resp {
    let mut headers = vec![BROWSER];
    let cookie = jar.header(path);
    if let Some(c) = &cookie {
        headers.push(("cookie", c));
    }
    let resp = gate.get_with(path, &headers).await;
    jar.store(&resp);
    resp
}

/// The browser at the hub's `authorize` with its hub login cookie: returns where the hub sends
/// it back (hubgate's callback with a code and the state).
async fn hub_authorize(hub: &FakeHub, authorize: &str, login: &str) -> String {
    let req = Request::builder()
        .uri(hub.url(authorize))
        .header("accept", BROWSER.1)
        .header("cookie", format!("{LOGIN_COOKIE}={login}"))
        .body(empty())
        .unwrap();
    let resp = send(&http_client(), req).await;
    assert_eq!(
        resp.status,
        StatusCode::FOUND,
        "the fake hub refused the authorize request {authorize}: {} (errors: {:?})",
        resp.text(),
        hub.oauth_errors()
    );
    location(&resp, "hub authorize")
}

/// hubgate and a hub set up for OAuth, alice's default server behind it, and alice's hub login
/// cookie (what a logged-in browser holds for the hub).
async fn oauth_setup(extra: &[&str]) -> (FakeHub, Hubgate, Backend, String) {
    let hub = hub().await;
    hub.register_client(CLIENT_ID, CALLBACK);
    let login = random_token();
    hub.add_login_cookie(&login, "alice", Some(&["access:servers!server=alice/"]));
    let mut args = vec![
        "--oauth-client-id",
        CLIENT_ID,
        "--oauth-callback-url",
        CALLBACK,
    ];
    args.extend_from_slice(extra);
    let (gate, backend) = start_with_alice(with_hub(&hub).args(args)).await;
    (hub, gate, backend, login)
}

/// Starts a login for `path` in `jar`'s browser and returns the authorize URL it is sent to.
async fn start_login(gate: &Hubgate, jar: &mut Jar, path: &str) -> String {
    let resp = browse(gate, jar, path).await;
    let to = location(&resp, &format!("browser GET {path} without credentials"));
    assert!(
        to.starts_with("/hub/api/oauth2/authorize?"),
        "a browser is sent to the hub's authorize endpoint, not {to}"
    );
    to
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims of a JWT, without checking it.
fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url payload"))
        .expect("JSON claims")
}

fn sign_hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// Replaces the character at `index` of `s` by another base64url character.
fn flip_char(s: &str, index: usize) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    chars[index] = if chars[index] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Who may use a user's server

#[tokio::test]
async fn the_owner_is_let_in_with_a_token_or_bearer_header_in_any_case() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let token = own_token(&hub, "alice");
    for scheme in ["token", "Bearer", "TOKEN", "bearer", "Token"] {
        let auth = format!("{scheme} {token}");
        let resp = gate
            .get_with("/user/alice/api/status", &[("authorization", &auth)])
            .await;
        let doc = echoed(&resp, &format!("Authorization: {scheme} <token>"));
        assert_eq!(doc["path"], "/user/alice/api/status");
    }
    assert_eq!(backend.seen().len(), 5);
}

#[tokio::test]
async fn another_user_is_refused_with_403_json_that_holds_no_secret() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let bob = own_token(&hub, "bob");
    let resp = gate.get_as("/user/alice/api/status", &bob).await;
    assert_json_refusal(
        &resp,
        StatusCode::FORBIDDEN,
        &[&bob, hub.service_token()],
        "bob at alice's server",
    );
    let auth = format!("Bearer {bob}");
    let resp = gate
        .get_with("/user/alice/", &[("authorization", &auth), BROWSER])
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "as a browser: {resp:?}");
    assert!(!resp.text().contains(&bob), "{}", resp.text());
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
}

#[tokio::test]
async fn requests_without_credentials_get_401_json_with_www_authenticate() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    for headers in [
        vec![],
        vec![("accept", "application/json")],
        vec![("authorization", "Basic YWxpY2U6c2VjcmV0")],
    ] {
        let resp = gate.get_with("/user/alice/api/status", &headers).await;
        assert_json_refusal(
            &resp,
            StatusCode::UNAUTHORIZED,
            &[],
            &format!("{headers:?}"),
        );
        assert!(
            resp.headers.contains_key(header::WWW_AUTHENTICATE),
            "401 without WWW-Authenticate: {resp:?}"
        );
    }
    assert!(backend.seen().is_empty());
    assert_eq!(hub.auth_calls(), 0, "nothing to ask the hub about");
}

#[tokio::test]
async fn browsers_without_credentials_are_sent_to_the_hub_login() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let resp = gate.get_with("/user/alice/lab?x=1", &[BROWSER]).await;
    let to = location(&resp, "browser without credentials");
    assert!(to.starts_with("/hub/login?next="), "redirected to {to}");
    assert_eq!(query_of(&to)["next"], "/user/alice/lab?x=1");
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn browsers_are_sent_to_the_hub_authorize_endpoint_with_oauth() {
    let (hub, gate, backend, _) = oauth_setup(&[]).await;
    let resp = gate.get_with("/user/alice/lab", &[BROWSER]).await;
    let to = location(&resp, "browser without credentials");
    assert!(
        to.starts_with("/hub/api/oauth2/authorize?"),
        "redirected to {to}"
    );
    let q = query_of(&to);
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], CALLBACK);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(
        !q["state"].is_empty() && !q["code_challenge"].is_empty(),
        "{q:?}"
    );
    let state_cookie = set_cookie(&resp, "hubgate-oauth-state")
        .unwrap_or_else(|| panic!("no state cookie: {resp:?}"));
    assert!(
        state_cookie.to_ascii_lowercase().contains("httponly"),
        "{state_cookie}"
    );
    // API clients still get a 401, not a login page.
    let resp = gate.get_with("/user/alice/lab", &[]).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{resp:?}");
    assert!(backend.seen().is_empty());
    assert_eq!(
        hub.auth_calls(),
        0,
        "the browser, not hubgate, calls authorize"
    );
}

#[tokio::test]
async fn each_scope_form_grants_alices_default_server() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    for scope in [
        "access:servers",
        "access:servers!user=alice",
        "access:servers!server=alice/",
    ] {
        let token = hub.issue_token("carol", Some(&["read:users!user=carol", scope]));
        let resp = gate.get_as("/user/alice/api/status", &token).await;
        echoed(&resp, &format!("carol with {scope}"));
    }
    for scope in [
        "access:servers!user=bob",
        "access:servers!server=alice/gpu",
        "access:servers!server=bob/",
        "access:servers!user=alicex",
    ] {
        let token = hub.issue_token("carol", Some(&[scope]));
        let resp = gate.get_as("/user/alice/api/status", &token).await;
        assert_eq!(
            resp.status,
            StatusCode::FORBIDDEN,
            "carol with {scope}: {resp:?}"
        );
    }
    assert_eq!(backend.seen().len(), 3);
}

#[tokio::test]
async fn a_named_server_needs_its_own_server_scope() {
    let hub = hub().await;
    let gate = with_hub(&hub).start().await;
    let default = Backend::echo().await;
    let gpu = Backend::echo().await;
    gate.add_route_data("/user/alice", server_route(&default.url(""), "alice", ""))
        .await;
    gate.add_route_data(
        "/user/alice/gpu",
        server_route(&gpu.url(""), "alice", "gpu"),
    )
    .await;

    let named = hub.issue_token("carol", Some(&["access:servers!server=alice/gpu"]));
    echoed(
        &gate.get_as("/user/alice/gpu/lab", &named).await,
        "alice/gpu scope at the gpu server",
    );
    let resp = gate.get_as("/user/alice/lab", &named).await;
    assert_eq!(
        resp.status,
        StatusCode::FORBIDDEN,
        "alice/gpu scope at the default server: {resp:?}"
    );

    let default_only = hub.issue_token("carol", Some(&["access:servers!server=alice/"]));
    let resp = gate.get_as("/user/alice/gpu/lab", &default_only).await;
    assert_eq!(
        resp.status,
        StatusCode::FORBIDDEN,
        "alice/ scope at the gpu server: {resp:?}"
    );
    echoed(
        &gate.get_as("/user/alice/lab", &default_only).await,
        "alice/ scope at the default server",
    );

    let alice = own_token(&hub, "alice");
    echoed(
        &gate.get_as("/user/alice/gpu/lab", &alice).await,
        "the owner at her named server",
    );
    assert_eq!(gpu.seen().len(), 2, "{:?}", gpu.seen());
    assert_eq!(default.seen().len(), 1, "{:?}", default.seen());
}

#[tokio::test]
async fn group_scopes_grant_by_the_owners_groups_asked_with_the_service_token() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;

    let in_group = hub.issue_token("carol", Some(&["access:servers!group=g"]));
    echoed(
        &gate.get_as("/user/alice/lab", &in_group).await,
        "group g scope, alice in g",
    );
    let other_group = hub.issue_token("carol", Some(&["access:servers!group=b"]));
    let resp = gate.get_as("/user/alice/lab", &other_group).await;
    assert_eq!(
        resp.status,
        StatusCode::FORBIDDEN,
        "group b scope, alice not in b: {resp:?}"
    );

    let lookups = hub.calls_to(Endpoint::Users);
    assert!(!lookups.is_empty(), "the hub was not asked alice's groups");
    for call in &lookups {
        assert_eq!(call.path, "/hub/api/users/alice", "{call:?}");
        assert_eq!(
            call.authorization().as_deref(),
            Some(format!("token {}", hub.service_token()).as_str()),
            "groups are asked with hubgate's service token"
        );
    }
    assert_eq!(backend.seen().len(), 1);
}

#[tokio::test]
async fn admins_of_hubs_without_scopes_may_use_every_server() {
    let hub = hub().await;
    hub.add_user("root", true, &[]);
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let admin = hub.issue_token("root", None);
    echoed(
        &gate.get_as("/user/alice/lab", &admin).await,
        "an admin of an old hub (no scopes field)",
    );
    let plain = hub.issue_token("bob", None);
    let resp = gate.get_as("/user/alice/lab", &plain).await;
    assert_eq!(
        resp.status,
        StatusCode::FORBIDDEN,
        "a non-admin of an old hub: {resp:?}"
    );
    let owner = hub.issue_token("alice", None);
    echoed(
        &gate.get_as("/user/alice/lab", &owner).await,
        "the owner on an old hub",
    );
    assert_eq!(backend.seen().len(), 2);
}

#[tokio::test]
async fn a_user_with_unrelated_scopes_is_refused() {
    let hub = hub().await;
    hub.add_user("root", true, &[]);
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    // An admin flag does not help when the hub sends scopes: the scopes decide.
    let token = hub.issue_token(
        "root",
        Some(&[
            "read:users",
            "admin:users",
            "access:services",
            "access:servers!user=bob",
            "servers!user=alice",
        ]),
    );
    let resp = gate.get_as("/user/alice/lab", &token).await;
    assert_json_refusal(&resp, StatusCode::FORBIDDEN, &[&token], "unrelated scopes");
    assert!(backend.seen().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Which routes are protected

#[tokio::test]
async fn routes_without_a_user_are_open() {
    let hub = hub().await;
    let gate = with_hub(&hub).start().await;
    let backend = Backend::echo().await;
    gate.add_route_data("/hub", json!({"target": backend.url(""), "hub": true}))
        .await;
    gate.add_route_data(
        "/services/announce",
        json!({"target": backend.url(""), "service": "announce"}),
    )
    .await;
    echoed(
        &gate.get_with("/hub/login", &[]).await,
        "the hub's own route",
    );
    echoed(
        &gate.get_with("/hub/home", &[BROWSER]).await,
        "as a browser",
    );
    echoed(
        &gate.get_with("/services/announce/", &[]).await,
        "a service route without auth",
    );
    assert_eq!(backend.seen().len(), 3);
    assert_eq!(
        hub.auth_calls(),
        0,
        "open routes need no hub call: {:?}",
        hub.requests()
    );
}

#[tokio::test]
async fn auth_none_opens_a_user_route() {
    let hub = hub().await;
    let gate = with_hub(&hub).start().await;
    let backend = Backend::echo().await;
    let mut data = server_route(&backend.url(""), "alice", "");
    data["auth"] = json!("none");
    gate.add_route_data("/user/alice", data).await;
    echoed(&gate.get_with("/user/alice/lab", &[]).await, "auth none");
    assert_eq!(hub.auth_calls(), 0);
}

#[tokio::test]
async fn a_service_route_with_auth_required_needs_credentials() {
    let hub = hub().await;
    let gate = with_hub(&hub).start().await;
    let backend = Backend::echo().await;
    gate.add_route_data(
        "/services/svc",
        json!({"target": backend.url(""), "service": "svc", "auth": "required"}),
    )
    .await;
    let resp = gate.get_with("/services/svc/", &[]).await;
    assert_json_refusal(&resp, StatusCode::UNAUTHORIZED, &[], "no credentials");
    let resp = gate.get_with("/services/svc/", &[BROWSER]).await;
    assert_eq!(resp.status, StatusCode::FOUND, "browser: {resp:?}");
    assert!(backend.seen().is_empty());
    let token = hub.issue_token("alice", Some(&["access:services!service=svc"]));
    echoed(
        &gate.get_as("/services/svc/", &token).await,
        "a user with access to the service",
    );
}

#[tokio::test]
async fn auth_mode_off_behaves_as_without_auth() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub).args(["--auth-mode", "off"])).await;
    echoed(
        &gate.get_with("/user/alice/lab", &[]).await,
        "no credentials",
    );
    echoed(
        &gate.get_with("/user/alice/lab", &[BROWSER]).await,
        "a browser without credentials",
    );
    let bob = own_token(&hub, "bob");
    echoed(&gate.get_as("/user/alice/lab", &bob).await, "another user");
    assert_eq!(backend.seen().len(), 3);
    assert_eq!(hub.auth_calls(), 0, "{:?}", hub.requests());
}

// ---------------------------------------------------------------------------------------------
// Tokens in the URL

#[tokio::test]
async fn a_token_in_the_url_is_refused_for_plain_requests_by_default() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let token = own_token(&hub, "alice");
    let resp = gate
        .get_with(&format!("/user/alice/api/status?token={token}"), &[])
        .await;
    assert_json_refusal(&resp, StatusCode::UNAUTHORIZED, &[&token], "?token=");
    let resp = gate
        .get_with(&format!("/user/alice/lab?token={token}"), &[BROWSER])
        .await;
    assert_ne!(
        resp.status,
        StatusCode::OK,
        "browser with ?token=: {resp:?}"
    );
    assert!(
        set_cookie(&resp, "hubgate-session").is_none(),
        "no session for a URL token when they are not allowed: {resp:?}"
    );
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    assert_eq!(hub.calls(Endpoint::User), 0, "the URL token was ignored");
}

#[tokio::test]
async fn a_token_in_the_url_is_accepted_for_a_websocket_handshake() {
    let hub = hub().await;
    let (gate, peer) = start_with_alices_websocket(&hub).await;
    let token = own_token(&hub, "alice");
    let url = format!(
        "ws://{}/user/alice/api/kernels/k1/channels?session_id=s1&token={token}",
        gate.proxy
    );
    let (mut ws, _) = tokio::time::timeout(WAIT, connect_async(url.as_str()))
        .await
        .expect("handshake answered")
        .unwrap_or_else(|e| panic!("websocket with ?token= refused: {e:?}\n{}", gate.logs()));
    match peer.next_event().await {
        WsEvent::Opened { path, .. } => {
            assert_eq!(path, "/user/alice/api/kernels/k1/channels?session_id=s1");
        }
        other => panic!("expected the handshake at the server, got {other:?}"),
    }
    let _ = ws.close(None).await;
    assert_eq!(hub.calls(Endpoint::User), 1);

    let bob = own_token(&hub, "bob");
    let url = format!(
        "ws://{}/user/alice/api/kernels/k1/channels?token={bob}",
        gate.proxy
    );
    match tokio::time::timeout(WAIT, connect_async(url.as_str()))
        .await
        .expect("handshake answered")
    {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        Err(e) => panic!("bob's handshake failed oddly: {e:?}"),
        Ok(_) => panic!("bob's URL token opened alice's websocket"),
    }
}

#[tokio::test]
async fn an_allowed_url_token_becomes_a_session_cookie_for_browsers() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub).args(["--allow-token-in-url"])).await;
    let token = own_token(&hub, "alice");
    let resp = gate
        .get_with(
            &format!("/user/alice/lab?x=1&token={token}&y=2"),
            &[BROWSER],
        )
        .await;
    let to = location(&resp, "browser GET with ?token=");
    assert_eq!(to, "/user/alice/lab?x=1&y=2");
    let line = set_cookie(&resp, "hubgate-session")
        .unwrap_or_else(|| panic!("no session cookie: {resp:?}"));
    assert!(
        line.to_ascii_lowercase().contains("httponly"),
        "session cookie not HttpOnly: {line}"
    );
    assert!(backend.seen().is_empty(), "redirected, not forwarded");
    assert_eq!(hub.calls(Endpoint::User), 1);

    let cookie = format!("hubgate-session={}", cookie_value(&line));
    let resp = gate.get_with(&to, &[BROWSER, ("cookie", &cookie)]).await;
    let doc = echoed(&resp, "following the redirect with the cookie");
    assert_eq!(doc["path"], "/user/alice/lab?x=1&y=2");
    assert_eq!(
        hub.calls(Endpoint::User),
        1,
        "the session needs no hub call"
    );

    // An API client's URL token is used, and does not travel on to the server.
    let resp = gate
        .get_with(&format!("/user/alice/api/status?token={token}&a=b"), &[])
        .await;
    let doc = echoed(&resp, "API client with ?token=");
    assert_eq!(doc["path"], "/user/alice/api/status?a=b");
}

/// The `Set-Cookie` line of the session a browser's URL token is traded for.
fn traded_session_cookie(resp: &Resp) -> String {
    location(resp, "browser GET with ?token=");
    set_cookie(resp, "hubgate-session").unwrap_or_else(|| panic!("no session cookie: {resp:?}"))
}

fn is_secure(set_cookie_line: &str) -> bool {
    set_cookie_line
        .split(';')
        .any(|attribute| attribute.trim().eq_ignore_ascii_case("secure"))
}

#[tokio::test]
async fn session_cookies_are_secure_over_tls_or_when_configured_and_only_then() {
    let hub = hub().await;
    let token = own_token(&hub, "alice");
    let path = format!("/user/alice/lab?token={token}");

    let (plain, _backend) = start_with_alice(with_hub(&hub).args(["--allow-token-in-url"])).await;
    let line = traded_session_cookie(&plain.get_with(&path, &[BROWSER]).await);
    assert!(!is_secure(&line), "Secure over plain HTTP: {line}");

    let (configured, _backend) =
        start_with_alice(with_hub(&hub).args(["--allow-token-in-url", "--cookie-secure"])).await;
    let line = traded_session_cookie(&configured.get_with(&path, &[BROWSER]).await);
    assert!(is_secure(&line), "--cookie-secure without Secure: {line}");

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hubgate auth test CA");
    let (key, cert) = ca.issue("server", 1).write(dir.path(), "server");
    let tls_args = [
        "--ssl-key",
        key.to_str().unwrap(),
        "--ssl-cert",
        cert.to_str().unwrap(),
    ];
    let (tls, _backend) =
        start_with_alice(with_hub(&hub).args(["--allow-token-in-url"]).args(tls_args)).await;
    let client = client_config(ClientOptions::trusting(&ca));
    let resp = tls_get(tls.proxy, client, &path, &[BROWSER])
        .await
        .expect("HTTPS request");
    let line = traded_session_cookie(&resp);
    assert!(is_secure(&line), "no Secure over TLS: {line}");
}

#[tokio::test]
async fn a_url_token_never_travels_on_however_its_name_is_encoded() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub).args(["--allow-token-in-url"])).await;
    let token = own_token(&hub, "alice");
    for query in [
        format!("token={token}"),
        format!("%74oken={token}&a=b"),
        format!("a=b&%74%6F%6B%65%6E={token}"),
        format!("token={token}&token={token}"),
    ] {
        let path = format!("/user/alice/api/status?{query}");
        let resp = gate.get_with(&path, &[]).await;
        if resp.status == StatusCode::OK {
            let doc = echoed(&resp, &path);
            let forwarded = doc["path"].as_str().unwrap_or_default().to_owned();
            assert!(
                !forwarded.contains(&token),
                "GET {path}: the token reached the server in {forwarded}"
            );
        }
        let resp = gate.get_with(&path, &[BROWSER]).await;
        if resp.status == StatusCode::FOUND {
            let to = location(&resp, &path);
            assert!(
                !to.contains(&token),
                "browser GET {path}: redirected to {to}, the token is still in the URL"
            );
        }
    }
    for seen in backend.seen() {
        assert!(
            !seen.path.contains(&token),
            "the server received the token: {}",
            seen.path
        );
    }
}

#[tokio::test]
async fn a_websocket_url_token_never_travels_on_however_its_name_is_encoded() {
    let hub = hub().await;
    let (gate, peer) = start_with_alices_websocket(&hub).await;
    let token = own_token(&hub, "alice");
    let url = format!(
        "ws://{}/user/alice/api/kernels/k1/channels?session_id=s1&%74oken={token}",
        gate.proxy
    );
    let opened = tokio::time::timeout(WAIT, connect_async(url.as_str()))
        .await
        .expect("handshake answered");
    if let Ok((mut ws, _)) = opened {
        match peer.next_event().await {
            WsEvent::Opened { path, .. } => assert!(
                !path.contains(&token),
                "the server received the token in {path}"
            ),
            other => panic!("expected the handshake at the server, got {other:?}"),
        }
        let _ = ws.close(None).await;
    }
}

#[tokio::test]
async fn session_cookies_use_the_configured_cookie_path() {
    let hub = hub().await;
    let (gate, _backend) =
        start_with_alice(with_hub(&hub).args(["--allow-token-in-url", "--cookie-path", "/user/"]))
            .await;
    let token = own_token(&hub, "alice");
    let resp = gate
        .get_with(&format!("/user/alice/lab?token={token}"), &[BROWSER])
        .await;
    location(&resp, "browser GET with ?token=");
    let line = set_cookie(&resp, "hubgate-session")
        .unwrap_or_else(|| panic!("no session cookie: {resp:?}"));
    assert!(
        line.split(';').any(|a| a.trim() == "Path=/user/"),
        "session cookie without Path=/user/: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// OAuth

#[tokio::test]
async fn the_oauth_browser_flow_ends_with_a_session_cookie() {
    let (hub, gate, backend, login) = oauth_setup(&[]).await;
    let mut jar = Jar::default();
    let authorize = start_login(&gate, &mut jar, "/user/alice/lab?x=1").await;
    assert!(
        jar.get("hubgate-oauth-state").is_some(),
        "no state cookie was set"
    );
    let callback = hub_authorize(&hub, &authorize, &login).await;
    assert!(callback.starts_with(CALLBACK), "{callback}");

    let resp = browse(&gate, &mut jar, &callback).await;
    let to = location(&resp, "the callback");
    assert_eq!(to, "/user/alice/lab?x=1");
    let line = set_cookie(&resp, "hubgate-session")
        .unwrap_or_else(|| panic!("the callback set no session: {resp:?}"));
    let lower = line.to_ascii_lowercase();
    assert!(lower.contains("httponly"), "{line}");
    assert!(lower.contains("samesite=lax"), "{line}");
    assert_eq!(hub.oauth_errors(), Vec::<String>::new());
    assert_eq!(hub.calls(Endpoint::Token), 1);
    let user_calls = hub.calls(Endpoint::User);

    let resp = browse(&gate, &mut jar, &to).await;
    let doc = echoed(&resp, "alice's browser after login");
    assert_eq!(doc["path"], "/user/alice/lab?x=1");
    let forwarded = echoed_header(&doc, "cookie").unwrap_or_default();
    assert!(
        !forwarded.contains("hubgate-session") && !forwarded.contains("hubgate-oauth-state"),
        "the server received hubgate's cookies: {forwarded}"
    );
    assert_eq!(hub.calls(Endpoint::User), user_calls, "no hub call");
    assert_eq!(backend.seen().len(), 1);
}

#[tokio::test]
async fn the_oauth_callback_refuses_a_tampered_state() {
    let (hub, gate, backend, login) = oauth_setup(&[]).await;
    let mut jar = Jar::default();
    let authorize = start_login(&gate, &mut jar, "/user/alice/lab").await;
    let callback = hub_authorize(&hub, &authorize, &login).await;
    let q = query_of(&callback);
    let state = &q["state"];
    let dot = state.find('.').map_or(0, |i| i + 1);
    let tampered: String = form_urlencoded::Serializer::new(format!("{CALLBACK}?"))
        .append_pair("code", &q["code"])
        .append_pair("state", &flip_char(state, dot + 4))
        .finish();
    let resp = browse(&gate, &mut jar, &tampered).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{resp:?}");
    assert!(set_cookie(&resp, "hubgate-session").is_none());
    assert_eq!(hub.calls(Endpoint::Token), 0, "the code was not traded");
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn the_oauth_callback_refuses_a_browser_without_the_state_cookie() {
    let (hub, gate, backend, login) = oauth_setup(&[]).await;
    let mut jar = Jar::default();
    let authorize = start_login(&gate, &mut jar, "/user/alice/lab").await;
    let callback = hub_authorize(&hub, &authorize, &login).await;
    let resp = gate.get_with(&callback, &[BROWSER]).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{resp:?}");
    assert!(set_cookie(&resp, "hubgate-session").is_none());
    assert_eq!(hub.calls(Endpoint::Token), 0, "the code was not traded");
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn the_oauth_callback_refuses_another_browsers_state_cookie() {
    let (hub, gate, backend, login) = oauth_setup(&[]).await;
    let mut victim = Jar::default();
    let mut attacker = Jar::default();
    start_login(&gate, &mut victim, "/user/alice/lab").await;
    let authorize = start_login(&gate, &mut attacker, "/user/alice/lab").await;
    let callback = hub_authorize(&hub, &authorize, &login).await;
    // The attacker's callback link, opened in the victim's browser.
    let resp = browse(&gate, &mut victim, &callback).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{resp:?}");
    assert!(set_cookie(&resp, "hubgate-session").is_none());
    assert_eq!(hub.calls(Endpoint::Token), 0, "the code was not traded");
    // In the browser that started it, the same link works.
    let resp = browse(&gate, &mut attacker, &callback).await;
    assert_eq!(location(&resp, "own callback"), "/user/alice/lab");
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn the_oauth_next_never_leaves_the_site() {
    let (hub, gate, _backend, login) = oauth_setup(&[]).await;
    let evil = Backend::echo().await;
    gate.add_route_data("/evil.example", server_route(&evil.url(""), "alice", ""))
        .await;
    let mut jar = Jar::default();
    let authorize = start_login(&gate, &mut jar, "//evil.example").await;
    let callback = hub_authorize(&hub, &authorize, &login).await;
    let resp = browse(&gate, &mut jar, &callback).await;
    let to = location(&resp, "the callback");
    assert!(
        to.starts_with('/') && !to.starts_with("//") && !to.starts_with("/\\"),
        "the callback sends the browser off-site: {to}"
    );
    assert!(!to.contains("://"), "{to}");
}

// ---------------------------------------------------------------------------------------------
// Session cookies

/// A hubgate with these session secrets and alice's server at `target`.
async fn replica(hub: &FakeHub, target: &str, secrets: &str, args: &[&str]) -> Hubgate {
    let gate = with_hub(hub)
        .args(args)
        .env("HUBGATE_SESSION_SECRETS", secrets)
        .start()
        .await;
    gate.add_route_data("/user/alice", server_route(target, "alice", ""))
        .await;
    gate
}

#[tokio::test]
async fn sessions_are_shared_by_replicas_with_the_same_secret_and_survive_rotation() {
    let hub = hub().await;
    let backend = Backend::echo().await;
    let target = backend.url("");
    let rotation = format!("{SECRET_2},{SECRET_1}");
    let issuer = replica(&hub, &target, SECRET_1, &["--allow-token-in-url"]).await;
    let replica_1 = replica(&hub, &target, SECRET_1, &[]).await;
    let stranger = replica(&hub, &target, SECRET_3, &[]).await;
    let rotated = replica(&hub, &target, &rotation, &["--allow-token-in-url"]).await;

    let token = own_token(&hub, "alice");
    let session = session_via_url_token(&issuer, "/user/alice/lab", &token).await;
    let cookie = format!("hubgate-session={session}");
    let calls = hub.auth_calls();

    echoed(
        &replica_1
            .get_with("/user/alice/lab", &[("cookie", &cookie)])
            .await,
        "a replica with the same secret",
    );
    echoed(
        &rotated
            .get_with("/user/alice/lab", &[("cookie", &cookie)])
            .await,
        "a replica after rotation (new secret first, old one still listed)",
    );
    assert_eq!(hub.auth_calls(), calls, "sessions need no hub call");

    let resp = stranger
        .get_with("/user/alice/lab", &[("cookie", &cookie)])
        .await;
    assert_json_refusal(
        &resp,
        StatusCode::UNAUTHORIZED,
        &[&session],
        "a hubgate with another secret",
    );
    let resp = stranger
        .get_with("/user/alice/lab", &[BROWSER, ("cookie", &cookie)])
        .await;
    assert!(
        location(&resp, "browser at a hubgate with another secret").starts_with("/hub/login"),
        "{resp:?}"
    );

    // Cookies issued after the rotation are signed with the new secret only.
    let fresh = session_via_url_token(&rotated, "/user/alice/lab", &token).await;
    let fresh_cookie = format!("hubgate-session={fresh}");
    echoed(
        &rotated
            .get_with("/user/alice/lab", &[("cookie", &fresh_cookie)])
            .await,
        "the rotated replica's own cookie",
    );
    let resp = replica_1
        .get_with("/user/alice/lab", &[("cookie", &fresh_cookie)])
        .await;
    assert_eq!(
        resp.status,
        StatusCode::UNAUTHORIZED,
        "a replica without the new secret: {resp:?}"
    );
    assert_eq!(backend.seen().len(), 3);
}

#[tokio::test]
async fn forged_or_expired_session_cookies_are_refused() {
    let hub = hub().await;
    let (gate, backend, _token, session) = alice_with_a_session(&hub).await;
    let claims = jwt_claims(&session);

    // The claims as hubgate wrote them, signed again with the right secret: accepted, so the
    // refusals below are about what was changed.
    let resigned = sign_hs256(&claims, SECRET_1);
    echoed(
        &gate
            .get_with(
                "/user/alice/lab",
                &[("cookie", &format!("hubgate-session={resigned}"))],
            )
            .await,
        "the same claims signed with the right secret",
    );

    // Expired and carrying no hub token to renew it with.
    let mut expired = claims.clone();
    expired["exp"] = json!(now_secs() - 3600);
    expired.as_object_mut().unwrap().remove("etk");
    let mut bob = claims.clone();
    bob["sub"] = json!("bob");
    let signature_at = session.rfind('.').unwrap() + 6;
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        session.split('.').nth(1).unwrap()
    );
    let bob_payload = URL_SAFE_NO_PAD.encode(bob.to_string());
    let mut swapped: Vec<&str> = session.split('.').collect();
    swapped[1] = &bob_payload;
    let swapped = swapped.join(".");
    for (what, forged) in [
        ("expired", sign_hs256(&expired, SECRET_1)),
        ("signed with another secret", sign_hs256(&claims, SECRET_3)),
        ("signature altered", flip_char(&session, signature_at)),
        ("alg none", unsigned),
        ("payload swapped for bob's", swapped),
        ("not a JWT", "garbage".to_owned()),
    ] {
        let resp = gate
            .get_with(
                "/user/alice/lab",
                &[("cookie", &format!("hubgate-session={forged}"))],
            )
            .await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{what}: {resp:?}");
    }
    assert_eq!(backend.seen().len(), 1);
}

#[tokio::test]
async fn an_expired_session_renews_with_its_hub_token_until_the_hub_refuses_it() {
    let hub = hub().await;
    let (gate, backend, token, session) = alice_with_a_session(&hub).await;
    let mut claims = jwt_claims(&session);
    // The session keeps the token it came from, sealed: whoever reads the cookie cannot.
    assert!(claims["etk"].is_string(), "no sealed token: {claims}");
    assert!(
        !claims.to_string().contains(&token),
        "the hub token is readable in the cookie: {claims}"
    );

    // The same session, expired: the token inside is checked with the hub again (a new cache
    // key is not needed: clear the cache so the hub is really asked) and a fresh cookie set.
    claims["exp"] = json!(now_secs() - 60);
    let expired = format!("hubgate-session={}", sign_hs256(&claims, SECRET_1));
    let asked_before = hub.calls(Endpoint::User);
    revoke(&gate, "/api/auth/cache").await;
    // Clearing voided sessions issued before now: re-sign with a later issue time.
    claims["iat_ms"] = json!(now_secs() * 1000 + 5_000);
    let expired_after_clear = format!("hubgate-session={}", sign_hs256(&claims, SECRET_1));
    let resp = gate
        .get_with("/user/alice/lab", &[("cookie", &expired_after_clear)])
        .await;
    echoed(&resp, "an expired session renewed with its token");
    let renewed = resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("hubgate-session="))
        .map(str::to_owned);
    assert!(renewed.is_some(), "a renewed cookie is set: {resp:?}");
    assert_eq!(
        hub.calls(Endpoint::User),
        asked_before + 1,
        "the hub was asked about the token"
    );

    // A session voided by the revocation is not renewed, even with a good token.
    let resp = gate
        .get_with("/user/alice/lab", &[("cookie", &expired)])
        .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{resp:?}");

    // Once the hub refuses the token, the expired session is refused too.
    hub.revoke_token(&token);
    revoke(&gate, "/api/auth/cache").await;
    claims["iat_ms"] = json!(now_secs() * 1000 + 10_000);
    let expired = format!("hubgate-session={}", sign_hs256(&claims, SECRET_1));
    let resp = gate
        .get_with("/user/alice/lab", &[("cookie", &expired)])
        .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{resp:?}");
    // Only the renewed request reached the server (the token-for-cookie step is a redirect).
    assert_eq!(backend.seen().len(), 1);
}

#[tokio::test]
async fn the_server_never_receives_hubgates_session_cookie() {
    let hub = hub().await;
    let (gate, _backend) = start_with_alice(with_hub(&hub).args(["--allow-token-in-url"])).await;
    let token = own_token(&hub, "alice");
    let session = session_via_url_token(&gate, "/user/alice/lab", &token).await;
    let cookie = format!("theme=dark; hubgate-session={session}; _xsrf=abc");
    let doc = echoed(
        &gate
            .get_with("/user/alice/lab", &[("cookie", &cookie)])
            .await,
        "with the session cookie among others",
    );
    let forwarded = echoed_header(&doc, "cookie").unwrap_or_default();
    assert!(!forwarded.contains("hubgate-session"), "{forwarded}");
    assert!(!forwarded.contains(&session), "{forwarded}");
    assert!(
        forwarded.contains("theme=dark") && forwarded.contains("_xsrf=abc"),
        "other cookies must pass: {forwarded}"
    );
    // Also when the request is authenticated by a token.
    let auth = format!("token {token}");
    let doc = echoed(
        &gate
            .get_with(
                "/user/alice/lab",
                &[("authorization", &auth), ("cookie", &cookie)],
            )
            .await,
        "token and session cookie",
    );
    let forwarded = echoed_header(&doc, "cookie").unwrap_or_default();
    assert!(!forwarded.contains("hubgate-session"), "{forwarded}");
}

// ---------------------------------------------------------------------------------------------
// Identity headers and the hub's cookie

/// Starts `gate` with alice's server and an open hub route (`/hub`), both one echo backend.
async fn start_with_alice_and_the_hub(gate: Builder) -> (Hubgate, Backend) {
    let (gate, backend) = start_with_alice(gate).await;
    gate.add_route_data("/hub", json!({"target": backend.url(""), "hub": true}))
        .await;
    (gate, backend)
}

/// The `X-Forwarded-User` that reached the servers when a request claimed to be mallory's:
/// alice's, with her token, to her server; and an anonymous one to the open hub route.
async fn forwarded_users_when_posing_as_mallory(
    gate: &Hubgate,
    hub: &FakeHub,
) -> (Option<String>, Option<String>) {
    let auth = format!("token {}", own_token(hub, "alice"));
    let mallory = ("x-forwarded-user", "mallory");
    let alice = gate
        .get_with("/user/alice/lab", &[("authorization", &auth), mallory])
        .await;
    let alice = echoed(&alice, "alice posing as mallory");
    let anonymous = gate.get_with("/hub/home", &[mallory]).await;
    let anonymous = echoed(&anonymous, "anonymous posing as mallory on an open route");
    (
        echoed_header(&alice, "x-forwarded-user"),
        echoed_header(&anonymous, "x-forwarded-user"),
    )
}

#[tokio::test]
async fn a_forged_x_forwarded_user_never_reaches_the_server() {
    let hub = hub().await;
    let (gate, _backend) = start_with_alice_and_the_hub(with_hub(&hub)).await;
    let (alice, anonymous) = forwarded_users_when_posing_as_mallory(&gate, &hub).await;
    assert_eq!(alice, None, "alice posing as mallory");
    assert_eq!(
        anonymous, None,
        "anonymous posing as mallory on an open route"
    );
}

#[tokio::test]
async fn the_identity_header_carries_the_user_the_hub_vouched_for() {
    let hub = hub().await;
    let (gate, _backend) = start_with_alice_and_the_hub(
        with_hub(&hub).args(["--identity-header", "X-Forwarded-User"]),
    )
    .await;
    let (alice, anonymous) = forwarded_users_when_posing_as_mallory(&gate, &hub).await;
    assert_eq!(alice.as_deref(), Some("alice"), "alice posing as mallory");
    assert_eq!(
        anonymous, None,
        "anonymous posing as mallory on an open route"
    );
    let admin = hub.issue_token("carol", Some(&["access:servers"]));
    let doc = echoed(&gate.get_as("/user/alice/lab", &admin).await, "carol");
    assert_eq!(
        echoed_header(&doc, "x-forwarded-user").as_deref(),
        Some("carol"),
        "the header names who sent the request, not the server's owner"
    );
}

#[tokio::test]
async fn the_hub_login_cookie_is_checked_with_the_service_token() {
    let hub = hub().await;
    let (gate, backend) =
        start_with_alice(with_hub(&hub).args(["--hub-login-cookie", LOGIN_COOKIE])).await;
    let alice = random_token();
    hub.add_login_cookie(&alice, "alice", Some(&["access:servers!user=alice"]));
    let bob = random_token();
    hub.add_login_cookie(&bob, "bob", Some(&["access:servers!user=bob"]));

    let cookie = format!("{LOGIN_COOKIE}={alice}");
    echoed(
        &gate
            .get_with("/user/alice/lab", &[("cookie", &cookie)])
            .await,
        "alice's hub cookie",
    );
    let calls = hub.calls_to(Endpoint::Cookie);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].path,
        format!("/hub/api/authorizations/cookie/{LOGIN_COOKIE}/{alice}")
    );
    assert_eq!(
        calls[0].authorization().as_deref(),
        Some(format!("token {}", hub.service_token()).as_str())
    );
    echoed(
        &gate
            .get_with("/user/alice/lab", &[("cookie", &cookie)])
            .await,
        "again",
    );
    assert_eq!(hub.calls(Endpoint::Cookie), 1, "the answer is cached");

    let resp = gate
        .get_with(
            "/user/alice/lab",
            &[("cookie", &format!("{LOGIN_COOKIE}={bob}"))],
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "bob's cookie: {resp:?}");
    let resp = gate
        .get_with(
            "/user/alice/lab",
            &[("cookie", &format!("{LOGIN_COOKIE}=not-a-login"))],
        )
        .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "unknown: {resp:?}");
    assert_eq!(backend.seen().len(), 2);
}

#[tokio::test]
async fn the_legacy_token_endpoint_is_asked_with_the_service_token() {
    let hub = hub().await;
    let (gate, _backend) =
        start_with_alice(with_hub(&hub).args(["--auth-legacy-token-endpoint"])).await;
    let alice = hub.issue_token("alice", None);
    echoed(&gate.get_as("/user/alice/lab", &alice).await, "alice");
    let calls = hub.calls_to(Endpoint::LegacyToken);
    assert_eq!(calls.len(), 1, "{:?}", hub.requests());
    assert_eq!(
        calls[0].path,
        format!("/hub/api/authorizations/token/{alice}")
    );
    assert_eq!(
        calls[0].authorization().as_deref(),
        Some(format!("token {}", hub.service_token()).as_str())
    );
    assert_eq!(hub.calls(Endpoint::User), 0);
    let bob = hub.issue_token("bob", None);
    assert_eq!(
        gate.get_as("/user/alice/lab", &bob).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        gate.get_as("/user/alice/lab", "unknown-token").await.status,
        StatusCode::UNAUTHORIZED
    );
}

// ---------------------------------------------------------------------------------------------
// The cache

#[tokio::test]
async fn a_second_request_with_the_same_token_makes_no_hub_call() {
    let hub = hub().await;
    let (gate, _backend) = start_with_alice(with_hub(&hub)).await;
    let token = own_token(&hub, "alice");
    for i in 0..5 {
        echoed(
            &gate.get_as("/user/alice/lab", &token).await,
            &format!("#{i}"),
        );
    }
    assert_eq!(hub.calls(Endpoint::User), 1);
    let call = &hub.calls_to(Endpoint::User)[0];
    assert_eq!(call.method, Method::GET);
    assert_eq!(
        call.authorization().as_deref(),
        Some(format!("token {token}").as_str()),
        "GET /user is authenticated by the token itself"
    );
}

#[tokio::test]
async fn a_refused_token_is_not_asked_again_within_the_negative_ttl() {
    let hub = hub().await;
    let (gate, backend) =
        start_with_alice(with_hub(&hub).args(["--auth-negative-ttl", "300"])).await;
    let bad = random_token();
    for i in 0..5 {
        let resp = gate.get_as("/user/alice/lab", &bad).await;
        assert_json_refusal(&resp, StatusCode::UNAUTHORIZED, &[&bad], &format!("#{i}"));
    }
    assert_eq!(hub.calls(Endpoint::User), 1);
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn a_refused_token_is_asked_again_after_the_negative_ttl() {
    let hub = hub().await;
    let (gate, _backend) =
        start_with_alice(with_hub(&hub).args(["--auth-negative-ttl", "1"])).await;
    let token = random_token();
    let resp = gate.get_as("/user/alice/lab", &token).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{resp:?}");
    assert_eq!(hub.calls(Endpoint::User), 1);
    // The hub starts accepting the token; once the refusal expired, hubgate asks again.
    hub.add_token(&token, "alice", Some(&["access:servers!user=alice"]));
    eventually(
        WAIT,
        "the refused token to be asked about again",
        || async {
            let resp = gate.get_as("/user/alice/lab", &token).await;
            match resp.status {
                StatusCode::OK => true,
                StatusCode::UNAUTHORIZED => false,
                other => panic!("unexpected {other}: {resp:?}"),
            }
        },
    )
    .await;
    assert_eq!(hub.calls(Endpoint::User), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_with_a_new_token_make_one_hub_call() {
    const N: usize = 1000;
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let token = own_token(&hub, "alice");
    hub.hold();
    let request = format!(
        "GET /user/alice/api/status HTTP/1.1\r\nHost: hub.example\r\n\
         Authorization: token {token}\r\nConnection: close\r\n\r\n"
    );
    let written = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        let (request, written, addr) = (request.clone(), written.clone(), gate.proxy);
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(request.as_bytes())
                .await
                .expect("write request");
            written.fetch_add(1, Ordering::SeqCst);
            let mut data = Vec::new();
            let _ = stream.read_to_end(&mut data).await;
            parse_raw_response(&data).map(|r| r.status)
        }));
    }
    eventually(
        Duration::from_secs(60),
        "every request sent and the hub asked",
        || async { written.load(Ordering::SeqCst) == N && hub.calls(Endpoint::User) >= 1 },
    )
    .await;
    hub.release();
    let mut statuses: HashMap<Option<u16>, usize> = HashMap::new();
    for client in clients {
        let status = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("a response within a minute")
            .expect("client task");
        *statuses.entry(status).or_default() += 1;
    }
    assert_eq!(statuses, HashMap::from([(Some(200), N)]));
    // hubgate's own cache counters, for the failure message only.
    let stats = gate.api(Method::GET, "/api/status", "").await;
    assert_eq!(
        hub.calls(Endpoint::User),
        1,
        "hubgate's status: {}",
        stats.text()
    );
    assert_eq!(backend.seen().len(), N);
}

#[tokio::test]
async fn revoking_a_user_asks_the_hub_again_and_voids_their_sessions() {
    let hub = hub().await;
    let (gate, _alice_server, _bob_server) =
        start_with_alice_and_bob(with_hub(&hub).args(["--allow-token-in-url"])).await;
    let alice = own_token(&hub, "alice");
    let bob = own_token(&hub, "bob");
    let alice_session = session_via_url_token(&gate, "/user/alice/lab", &alice).await;
    let bob_session = session_via_url_token(&gate, "/user/bob/lab", &bob).await;
    let alice_cookie = format!("hubgate-session={alice_session}");
    let bob_cookie = format!("hubgate-session={bob_session}");
    echoed(&gate.get_as("/user/alice/lab", &alice).await, "alice");
    echoed(&gate.get_as("/user/bob/lab", &bob).await, "bob");
    echoed(
        &gate
            .get_with("/user/alice/lab", &[("cookie", &alice_cookie)])
            .await,
        "alice's session",
    );
    assert_eq!(hub.calls(Endpoint::User), 2);

    let resp = gate
        .api_with(Method::DELETE, "/api/auth/cache/users/alice", &[], "")
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "without the API token");
    let resp = gate
        .api_with(
            Method::DELETE,
            "/api/auth/cache/users/alice",
            &[("authorization", "token wrong")],
            "",
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "with a wrong token");
    echoed(&gate.get_as("/user/alice/lab", &alice).await, "alice");
    assert_eq!(hub.calls(Endpoint::User), 2, "nothing was revoked");

    // The hub revokes alice's token; hubgate still trusts its cached answer until told.
    hub.revoke_token(&alice);
    echoed(
        &gate.get_as("/user/alice/lab", &alice).await,
        "alice, cached",
    );
    assert_eq!(hub.calls(Endpoint::User), 2);

    revoke(&gate, "/api/auth/cache/users/alice").await;
    let resp = gate.get_as("/user/alice/lab", &alice).await;
    assert_eq!(
        resp.status,
        StatusCode::UNAUTHORIZED,
        "alice's revoked token after the revocation: {resp:?}"
    );
    assert_eq!(
        hub.calls(Endpoint::User),
        3,
        "alice's token was asked again"
    );
    echoed(&gate.get_as("/user/bob/lab", &bob).await, "bob");
    assert_eq!(hub.calls(Endpoint::User), 3, "bob's answer is still cached");
    let resp = gate
        .get_with("/user/alice/lab", &[("cookie", &alice_cookie)])
        .await;
    assert_eq!(
        resp.status,
        StatusCode::UNAUTHORIZED,
        "alice's session is void: {resp:?}"
    );
    echoed(
        &gate
            .get_with("/user/bob/lab", &[("cookie", &bob_cookie)])
            .await,
        "bob's session still works",
    );
    let resp = gate
        .get_with("/user/alice/lab", &[("cookie", &bob_cookie)])
        .await;
    assert_eq!(
        resp.status,
        StatusCode::FORBIDDEN,
        "bob's session at alice's server: {resp:?}"
    );
}

#[tokio::test]
async fn clearing_the_cache_asks_the_hub_again_for_everyone() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub).args(["--allow-token-in-url"])).await;
    gate.add_route_data("/user/bob", server_route(&backend.url(""), "bob", ""))
        .await;
    let alice = own_token(&hub, "alice");
    let bob = own_token(&hub, "bob");
    let alice_cookie = format!(
        "hubgate-session={}",
        session_via_url_token(&gate, "/user/alice/lab", &alice).await
    );
    let bob_cookie = format!(
        "hubgate-session={}",
        session_via_url_token(&gate, "/user/bob/lab", &bob).await
    );
    assert_eq!(hub.calls(Endpoint::User), 2);
    let resp = gate
        .api_with(Method::DELETE, "/api/auth/cache", &[], "")
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "without the API token");
    echoed(
        &gate
            .get_with("/user/bob/lab", &[("cookie", &bob_cookie)])
            .await,
        "bob's session before the clear",
    );

    revoke(&gate, "/api/auth/cache").await;
    echoed(&gate.get_as("/user/alice/lab", &alice).await, "alice");
    echoed(&gate.get_as("/user/bob/lab", &bob).await, "bob");
    assert_eq!(hub.calls(Endpoint::User), 4, "both tokens were asked again");
    for (who, cookie) in [("alice", &alice_cookie), ("bob", &bob_cookie)] {
        let resp = gate
            .get_with(&format!("/user/{who}/lab"), &[("cookie", cookie)])
            .await;
        assert_eq!(
            resp.status,
            StatusCode::UNAUTHORIZED,
            "{who}'s session is void: {resp:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// When the hub fails

/// Waits for hubgate's start-up handshake, so that it does not count as a call made while the
/// hub is down.
async fn handshake_done(hub: &FakeHub) {
    eventually(WAIT, "the start-up handshake", || async {
        hub.calls(Endpoint::Proxy) >= 1
    })
    .await;
}

#[tokio::test]
async fn a_cached_token_keeps_working_past_its_ttl_while_the_hub_is_down() {
    let hub = hub().await;
    let (gate, _backend) =
        start_with_alice(with_hub(&hub).args(["--auth-cache-ttl", "1", "--auth-grace", "300"]))
            .await;
    handshake_done(&hub).await;
    let token = own_token(&hub, "alice");
    echoed(&gate.get_as("/user/alice/lab", &token).await, "hub up");
    let cached_at = Instant::now();
    hub.set_down(true);
    // Until the TTL is over the answer is fresh; after it hubgate tries the hub (which drops the
    // connection) and falls back on the cached answer. Every request meanwhile must work. Two
    // seconds after the hub answered, its answer is past the one-second TTL for certain.
    eventually(WAIT, "the cached answer to pass its TTL", || async {
        let resp = gate.get_as("/user/alice/lab", &token).await;
        echoed(&resp, "cached token while the hub is down");
        cached_at.elapsed() >= Duration::from_secs(2) && hub.dropped_connections() > 0
    })
    .await;
    echoed(
        &gate.get_as("/user/alice/lab", &token).await,
        "cached token past its TTL, hub down",
    );
    assert_eq!(hub.calls(Endpoint::User), 1, "the hub was down all along");
}

#[tokio::test]
async fn an_uncached_token_gets_503_while_the_hub_is_down() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    handshake_done(&hub).await;
    let cached = own_token(&hub, "alice");
    echoed(&gate.get_as("/user/alice/lab", &cached).await, "hub up");
    hub.set_down(true);
    let fresh = own_token(&hub, "alice");
    let resp = gate.get_as("/user/alice/lab", &fresh).await;
    assert_json_refusal(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        &[&fresh],
        "new token, hub down",
    );
    let auth = format!("token {fresh}");
    let resp = gate
        .get_with("/user/alice/lab", &[("authorization", &auth), BROWSER])
        .await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "browser");
    echoed(
        &gate.get_as("/user/alice/lab", &cached).await,
        "a cached token, hub down",
    );
    assert_eq!(backend.seen().len(), 2);

    hub.set_down(false);
    echoed(
        &gate.get_as("/user/alice/lab", &fresh).await,
        "the new token once the hub is back",
    );
}

#[tokio::test]
async fn hub_errors_and_malformed_answers_mean_503_never_access() {
    let hub = hub().await;
    let (gate, backend) = start_with_alice(with_hub(&hub)).await;
    let alice = own_token(&hub, "alice");
    let bob = own_token(&hub, "bob");
    for mode in [Mode::Failing, Mode::Malformed] {
        hub.set_mode(mode);
        for token in [&alice, &bob] {
            let resp = gate.get_as("/user/alice/lab", token).await;
            assert_json_refusal(
                &resp,
                StatusCode::SERVICE_UNAVAILABLE,
                &[token],
                &format!("{mode:?}"),
            );
        }
    }
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    // The failures were not remembered as refusals.
    hub.set_mode(Mode::Normal);
    echoed(&gate.get_as("/user/alice/lab", &alice).await, "hub fixed");
    assert_eq!(
        gate.get_as("/user/alice/lab", &bob).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_slow_hub_delays_but_does_not_break_a_check() {
    let hub = hub().await;
    let (gate, _backend) = start_with_alice(with_hub(&hub)).await;
    hub.set_delay(Duration::from_millis(300));
    let token = own_token(&hub, "alice");
    let (a, b) = tokio::join!(
        gate.get_as("/user/alice/lab", &token),
        gate.get_as("/user/alice/lab", &token)
    );
    echoed(&a, "first");
    echoed(&b, "second");
    assert_eq!(hub.calls(Endpoint::User), 1);
}

// ---------------------------------------------------------------------------------------------
// Paths

#[tokio::test]
async fn path_tricks_never_reach_another_users_server() {
    let hub = hub().await;
    let (gate, alice_server, bob_server) = start_with_alice_and_bob(with_hub(&hub)).await;
    let bob = own_token(&hub, "bob");
    for path in [
        "/user/alice/..",
        "/user/bob/../alice/",
        "/user/%61lice/",
        "/user//alice/",
        "/user/alice%2F..%2F",
        "/USER/alice/",
        "/user/alice;x/",
        "/user/bob/%2e%2e/alice/",
        "/user/bob/%2E%2E/alice/x",
        "//user/alice/",
        "/user/./alice/",
        "/user/bob/..%2Falice/",
        "/user/bob/.%2e/alice/",
        "/user/ALICE/",
        "/user/alice%00/",
    ] {
        let before = bob_server.seen().len();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: hub.example\r\nAuthorization: token {bob}\r\n\
             Connection: close\r\n\r\n"
        );
        let resp = raw_http(gate.proxy, request.as_bytes()).await;
        let at_bob = bob_server.seen().len() > before;
        assert!(
            matches!(resp.status, 400 | 403 | 404) || (resp.status == 200 && at_bob),
            "bob GET {path}: {} {:?}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
        assert!(
            alice_server.seen().is_empty(),
            "bob GET {path} reached alice's server: {:?}",
            alice_server.seen()
        );
    }
    // The routes do work for their owners, so the silence above means something.
    echoed(
        &gate.get_as("/user/bob/lab", &bob).await,
        "bob at his server",
    );
    let alice = own_token(&hub, "alice");
    echoed(
        &gate.get_as("/user/alice/lab", &alice).await,
        "alice at hers",
    );
    assert_eq!(alice_server.seen().len(), 1);
}
