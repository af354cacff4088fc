//! A fake JupyterHub API for the authentication tests: a real HTTP server on `127.0.0.1:0` that
//! answers what hubgate asks the hub about credentials, and what a browser asks it during an
//! OAuth login.
//!
//! Under `/hub/api` it serves `GET /user` (the token is the credential), the legacy
//! `GET /authorizations/token/<t>` and `GET /authorizations/cookie/<name>/<value>` (hubgate's
//! service token required), `GET /users/<name>` (groups), `GET /oauth2/authorize` (for the test
//! playing the browser), `POST /oauth2/token` (PKCE S256 checked) and `POST /proxy`.
//!
//! Users, tokens, scopes, groups and login cookies are set per test. Every call is recorded
//! (endpoint, path, headers) so caching and coalescing can be asserted, and the hub can be made
//! slow, held, failing (500), malformed (bad JSON) or down (connections dropped) at run time.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::support::{full, random_token, Body};

/// The hub's own login cookie, which the fake hub reads at `/oauth2/authorize`.
pub const LOGIN_COOKIE: &str = "jupyterhub-hub-login";

/// Which part of the hub's API a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /user`
    User,
    /// `GET /authorizations/token/<t>`
    LegacyToken,
    /// `GET /authorizations/cookie/<name>/<value>`
    Cookie,
    /// `GET /users/<name>`
    Users,
    /// `GET /oauth2/authorize`
    Authorize,
    /// `POST /oauth2/token`
    Token,
    /// `/proxy` (the handshake)
    Proxy,
    /// `GET /hub/api` (hubgate's readiness probe)
    Root,
    Other,
}

/// One request the fake hub received.
#[derive(Debug, Clone)]
pub struct HubCall {
    pub endpoint: Endpoint,
    pub method: Method,
    /// The request target as received (path and query).
    pub path: String,
    pub headers: HeaderMap,
}

impl HubCall {
    pub fn authorization(&self) -> Option<String> {
        self.headers
            .get(header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// How the hub answers the credential endpoints (everything but `/proxy` and the API root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// 500 to everything.
    Failing,
    /// 200 with a body that is not JSON.
    Malformed,
}

#[derive(Debug, Clone)]
struct UserInfo {
    admin: bool,
    groups: Vec<String>,
}

/// What a token (or a login cookie, or an OAuth access token) stands for.
#[derive(Debug, Clone)]
struct Grant {
    user: String,
    /// `None`: answer without a `scopes` field, as hubs before 2.0 do.
    scopes: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct CodeGrant {
    grant: Grant,
    client_id: String,
    redirect_uri: String,
    challenge: String,
}

struct State {
    service_token: String,
    users: Mutex<HashMap<String, UserInfo>>,
    tokens: Mutex<HashMap<String, Grant>>,
    /// Login cookie value → what it stands for.
    cookies: Mutex<HashMap<String, Grant>>,
    codes: Mutex<HashMap<String, CodeGrant>>,
    /// The one OAuth client the hub knows: (client id, redirect URI).
    client: Mutex<Option<(String, String)>>,
    /// Why OAuth requests were refused, for assertions.
    oauth_errors: Mutex<Vec<String>>,
    calls: Mutex<Vec<HubCall>>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    /// While true, answers to credential endpoints wait.
    held: watch::Sender<bool>,
    /// While true, connections are dropped: open ones at once, new ones when accepted.
    down: watch::Sender<bool>,
    /// Connections accepted and dropped because the hub was down.
    dropped: AtomicUsize,
}

/// A running fake hub; stops (and drops every connection) when dropped.
pub struct FakeHub {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
        self.state.down.send_replace(true);
    }
}

impl FakeHub {
    /// Starts a hub that accepts `service_token` as hubgate's own token (JUPYTERHUB_API_TOKEN).
    pub async fn start(service_token: &str) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake hub");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            service_token: service_token.to_owned(),
            users: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            cookies: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
            client: Mutex::new(None),
            oauth_errors: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::Normal),
            delay: Mutex::new(Duration::ZERO),
            held: watch::channel(false).0,
            down: watch::channel(false).0,
            dropped: AtomicUsize::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if *shared.down.borrow() {
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                let state = shared.clone();
                let mut down = shared.down.subscribe();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            // A request that slipped in as the hub went down gets no answer:
                            // the error makes hyper close the connection.
                            if *state.down.borrow() {
                                state.dropped.fetch_add(1, Ordering::SeqCst);
                                return Err(std::io::Error::other("the fake hub is down"));
                            }
                            Ok(answer(req, state).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        biased;
                        _ = down.wait_for(|d| *d) => {}
                        _ = conn => {}
                    }
                });
            }
        });
        FakeHub { addr, state, task }
    }

    /// `--hub-api-url` for this hub.
    pub fn api_url(&self) -> String {
        format!("http://{}/hub/api", self.addr)
    }

    /// `http://127.0.0.1:PORT` followed by `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    pub fn service_token(&self) -> &str {
        &self.state.service_token
    }

    /// Adds (or replaces) a user.
    pub fn add_user(&self, name: &str, admin: bool, groups: &[&str]) {
        self.state.users.lock().unwrap().insert(
            name.to_owned(),
            UserInfo {
                admin,
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            },
        );
    }

    /// Makes `token` a credential of `user` with these scopes (`None`: no `scopes` field).
    pub fn add_token(&self, token: &str, user: &str, scopes: Option<&[&str]>) {
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), grant(user, scopes));
    }

    /// A new token of `user` with these scopes.
    pub fn issue_token(&self, user: &str, scopes: Option<&[&str]>) -> String {
        let token = random_token();
        self.add_token(&token, user, scopes);
        token
    }

    /// The hub no longer accepts `token`.
    pub fn revoke_token(&self, token: &str) {
        self.state.tokens.lock().unwrap().remove(token);
    }

    /// Makes `value` a valid hub login cookie of `user` (with these scopes).
    pub fn add_login_cookie(&self, value: &str, user: &str, scopes: Option<&[&str]>) {
        self.state
            .cookies
            .lock()
            .unwrap()
            .insert(value.to_owned(), grant(user, scopes));
    }

    /// Registers the OAuth client the hub knows (as JupyterHub registers a service).
    pub fn register_client(&self, client_id: &str, redirect_uri: &str) {
        *self.state.client.lock().unwrap() = Some((client_id.to_owned(), redirect_uri.to_owned()));
    }

    /// Why OAuth requests were refused so far.
    pub fn oauth_errors(&self) -> Vec<String> {
        self.state.oauth_errors.lock().unwrap().clone()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Every answer to a credential endpoint waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Answers to credential endpoints wait until [`FakeHub::release`].
    pub fn hold(&self) {
        self.state.held.send_replace(true);
    }

    pub fn release(&self) {
        self.state.held.send_replace(false);
    }

    /// Down: every open connection is dropped and new ones are closed as soon as accepted.
    pub fn set_down(&self, down: bool) {
        self.state.down.send_replace(down);
    }

    /// Connections (or requests) dropped because the hub was down.
    pub fn dropped_connections(&self) -> usize {
        self.state.dropped.load(Ordering::SeqCst)
    }

    /// Every call received so far, oldest first.
    pub fn requests(&self) -> Vec<HubCall> {
        self.state.calls.lock().unwrap().clone()
    }

    /// The calls received so far to `endpoint`.
    pub fn calls_to(&self, endpoint: Endpoint) -> Vec<HubCall> {
        self.requests()
            .into_iter()
            .filter(|c| c.endpoint == endpoint)
            .collect()
    }

    /// How many calls `endpoint` received so far.
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        self.calls_to(endpoint).len()
    }

    /// Calls about credentials (everything but the `/proxy` handshake and the probe).
    pub fn auth_calls(&self) -> usize {
        self.requests()
            .iter()
            .filter(|c| !matches!(c.endpoint, Endpoint::Proxy | Endpoint::Root))
            .count()
    }
}

fn grant(user: &str, scopes: Option<&[&str]>) -> Grant {
    Grant {
        user: user.to_owned(),
        scopes: scopes.map(|s| s.iter().map(|s| (*s).to_owned()).collect()),
    }
}

fn classify(method: &Method, path: &str) -> Endpoint {
    if path == "/hub/api" || path == "/hub/api/" {
        return Endpoint::Root;
    }
    let Some(rest) = path.strip_prefix("/hub/api/") else {
        return Endpoint::Other;
    };
    match (method, rest) {
        (&Method::GET, "user") => Endpoint::User,
        (&Method::GET, r) if r.starts_with("authorizations/token/") => Endpoint::LegacyToken,
        (&Method::GET, r) if r.starts_with("authorizations/cookie/") => Endpoint::Cookie,
        (&Method::GET, r) if r.starts_with("users/") => Endpoint::Users,
        (&Method::GET, "oauth2/authorize") => Endpoint::Authorize,
        (&Method::POST, "oauth2/token") => Endpoint::Token,
        (_, "proxy") => Endpoint::Proxy,
        _ => Endpoint::Other,
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

fn redirect(location: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .body(full(""))
        .unwrap()
}

/// The token of an `Authorization: token <t>` (or `Bearer`) header.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer"))
        .then(|| token.trim().to_owned())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// The user model JupyterHub answers for a credential.
fn user_model(state: &State, grant: &Grant) -> Value {
    let info = state
        .users
        .lock()
        .unwrap()
        .get(&grant.user)
        .cloned()
        .unwrap_or(UserInfo {
            admin: false,
            groups: Vec::new(),
        });
    let mut model = json!({
        "kind": "user",
        "name": grant.user,
        "admin": info.admin,
        "groups": info.groups,
        "session_id": null,
    });
    if let Some(scopes) = &grant.scopes {
        model["scopes"] = json!(scopes);
    }
    model
}

async fn answer(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let endpoint = classify(&parts.method, &path);
    state.calls.lock().unwrap().push(HubCall {
        endpoint,
        method: parts.method.clone(),
        path: target,
        headers: parts.headers.clone(),
    });
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match endpoint {
        Endpoint::Proxy => return reply(StatusCode::OK, json!({})),
        Endpoint::Root => return reply(StatusCode::OK, json!({"version": "5.3.0"})),
        _ => {}
    }

    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut held = state.held.subscribe();
    let _ = held.wait_for(|h| !*h).await;
    match *state.mode.lock().unwrap() {
        Mode::Normal => {}
        Mode::Failing => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"status": 500, "message": "the fake hub is failing"}),
            )
        }
        Mode::Malformed => {
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full("{\"kind\": \"user\", \"name\": "))
                .unwrap()
        }
    }

    let headers = &parts.headers;
    let is_service = bearer(headers).as_deref() == Some(state.service_token.as_str());
    let forbidden = || {
        reply(
            StatusCode::FORBIDDEN,
            json!({"status": 403, "message": "Forbidden"}),
        )
    };
    let rest = path.strip_prefix("/hub/api/").unwrap_or_default();
    match endpoint {
        Endpoint::User => {
            let grant = bearer(headers).and_then(|t| state.tokens.lock().unwrap().get(&t).cloned());
            match grant {
                Some(grant) => reply(StatusCode::OK, user_model(&state, &grant)),
                None => forbidden(),
            }
        }
        Endpoint::LegacyToken => {
            if !is_service {
                return forbidden();
            }
            let token = decode(rest.trim_start_matches("authorizations/token/"));
            let grant = state.tokens.lock().unwrap().get(&token).cloned();
            match grant {
                Some(grant) => reply(StatusCode::OK, user_model(&state, &grant)),
                None => reply(StatusCode::NOT_FOUND, json!({"status": 404})),
            }
        }
        Endpoint::Cookie => {
            if !is_service {
                return forbidden();
            }
            let rest = rest.trim_start_matches("authorizations/cookie/");
            let Some((name, value)) = rest.split_once('/') else {
                return reply(StatusCode::NOT_FOUND, json!({"status": 404}));
            };
            let grant = (decode(name) == LOGIN_COOKIE)
                .then(|| state.cookies.lock().unwrap().get(&decode(value)).cloned())
                .flatten();
            match grant {
                Some(grant) => reply(StatusCode::OK, user_model(&state, &grant)),
                None => reply(StatusCode::NOT_FOUND, json!({"status": 404})),
            }
        }
        Endpoint::Users => {
            if !is_service {
                return forbidden();
            }
            let name = decode(rest.trim_start_matches("users/"));
            let info = state.users.lock().unwrap().get(&name).cloned();
            match info {
                Some(info) => reply(
                    StatusCode::OK,
                    json!({"kind": "user", "name": name, "admin": info.admin, "groups": info.groups}),
                ),
                None => reply(StatusCode::NOT_FOUND, json!({"status": 404})),
            }
        }
        Endpoint::Authorize => authorize(&state, parts.uri.query().unwrap_or(""), headers),
        Endpoint::Token => token(&state, &body),
        Endpoint::Proxy | Endpoint::Root | Endpoint::Other => {
            reply(StatusCode::NOT_FOUND, json!({"status": 404}))
        }
    }
}

fn oauth_error(state: &State, why: String) -> Response<Body> {
    state.oauth_errors.lock().unwrap().push(why.clone());
    reply(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_request", "error_description": why}),
    )
}

/// `GET /oauth2/authorize`: checks the query, "logs in" the browser by its hub login cookie and
/// sends it back to the client's redirect URI with a code.
fn authorize(state: &State, query: &str, headers: &HeaderMap) -> Response<Body> {
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let param = |name: &str| params.get(name).cloned().unwrap_or_default();
    let Some((client_id, redirect_uri)) = state.client.lock().unwrap().clone() else {
        return oauth_error(state, "no OAuth client is registered".into());
    };
    if param("client_id") != client_id {
        return oauth_error(state, format!("unknown client_id {:?}", param("client_id")));
    }
    if param("redirect_uri") != redirect_uri {
        return oauth_error(
            state,
            format!("redirect_uri {:?} is not registered", param("redirect_uri")),
        );
    }
    if param("response_type") != "code" {
        return oauth_error(state, format!("response_type {:?}", param("response_type")));
    }
    if param("state").is_empty() {
        return oauth_error(state, "no state".into());
    }
    if param("code_challenge").is_empty() || param("code_challenge_method") != "S256" {
        return oauth_error(
            state,
            format!(
                "PKCE: code_challenge {:?}, method {:?}",
                param("code_challenge"),
                param("code_challenge_method")
            ),
        );
    }
    let logged_in =
        cookie(headers, LOGIN_COOKIE).and_then(|v| state.cookies.lock().unwrap().get(&v).cloned());
    let Some(grant) = logged_in else {
        let next: String = form_urlencoded::byte_serialize(
            format!("/hub/api/oauth2/authorize?{query}").as_bytes(),
        )
        .collect();
        return redirect(&format!("/hub/login?next={next}"));
    };
    let code = random_token();
    state.codes.lock().unwrap().insert(
        code.clone(),
        CodeGrant {
            grant,
            client_id,
            redirect_uri: redirect_uri.clone(),
            challenge: param("code_challenge"),
        },
    );
    let back = form_urlencoded::Serializer::new(String::new())
        .append_pair("code", &code)
        .append_pair("state", &param("state"))
        .finish();
    redirect(&format!("{redirect_uri}?{back}"))
}

/// `POST /oauth2/token`: trades a code for an access token of the user who authorized it.
fn token(state: &State, body: &[u8]) -> Response<Body> {
    let form: HashMap<String, String> = form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    if field("grant_type") != "authorization_code" {
        return oauth_error(state, format!("grant_type {:?}", field("grant_type")));
    }
    if field("client_secret") != state.service_token {
        return oauth_error(state, "client_secret is not the service token".into());
    }
    let Some(code) = state.codes.lock().unwrap().remove(&field("code")) else {
        return oauth_error(state, format!("unknown or used code {:?}", field("code")));
    };
    if field("client_id") != code.client_id {
        return oauth_error(state, format!("client_id {:?}", field("client_id")));
    }
    if field("redirect_uri") != code.redirect_uri {
        return oauth_error(state, format!("redirect_uri {:?}", field("redirect_uri")));
    }
    let verifier = field("code_verifier");
    let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    if verifier.is_empty() || challenge != code.challenge {
        return oauth_error(
            state,
            format!("PKCE: S256({verifier:?}) is not the challenge given at authorize"),
        );
    }
    let access_token = random_token();
    state
        .tokens
        .lock()
        .unwrap()
        .insert(access_token.clone(), code.grant);
    reply(
        StatusCode::OK,
        json!({"access_token": access_token, "token_type": "Bearer"}),
    )
}
