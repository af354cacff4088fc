//! End to end: hubgate authenticates requests to users' servers against a real JupyterHub 6.
//!
//! The hub starts hubgate as its proxy with the flags that turn authentication on
//! (`--hub-api-url`, `--oauth-client-id service-hubgate`, `--oauth-callback-url`, and
//! `--identity-header` so the servers can record who was let through); hubgate is the hub
//! service `hubgate` (an OAuth client with `oauth_no_confirm`, scopes `proxy` and
//! `read:users:groups` for its own token, which it finds in the environment the hub passes on).
//! Users log in with the DummyAuthenticator. Hub configuration:
//! `tests/e2e/jupyterhub_auth_config.py`.
//!
//! The scenario, with a cookie-keeping browser that follows redirects one hop at a time:
//! 1. alice's and bob's servers are started through the hub's REST API;
//! 2. a browser without cookies asks for alice's server and goes hubgate → the hub's authorize
//!    endpoint → the hub's login page → (logs in as alice) → authorize → hubgate's callback →
//!    alice's server, which answers; hubgate's session cookie is HttpOnly;
//! 3. with that session, bob's server is 403;
//! 4. alice's API token reaches alice's server, bob's token gets 403, no credentials 401;
//! 5. after alice's token is revoked in the hub, hubgate keeps its cached answer until told
//!    (`DELETE /api/auth/cache/users/alice`), then the token gets 401 and alice's session is
//!    void too;
//! 6. what the servers recorded: only requests hubgate let through as alice reached alice's
//!    server, none reached bob's, and hubgate's cookies never reached either.
#![cfg(target_os = "linux")]

use std::fs;

use anyhow::{bail, ensure, Context, Result};
use hyper::body::Bytes;
use hyper::header::{
    HeaderMap, HeaderName, ACCEPT, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE, USER_AGENT,
    WWW_AUTHENTICATE,
};
use hyper::{Method, StatusCode, Uri};
use serde_json::Value;

use crate::jhub::{
    eventually, hub_answers, hubgate_binary, proxy_routes, start_server, text, venv, Http, Hub,
    HubSpec, Ports, ADMIN_TOKEN, BASE_KEY, BASE_URL, PROXY_TOKEN,
};

/// Token of the `hubgate` service: hubgate's `JUPYTERHUB_API_TOKEN` and OAuth client secret.
const HUBGATE_TOKEN: &str = "e2e-hubgate-token-0123456789";
/// hubgate's OAuth callback path on its public port, as registered with the hub.
const CALLBACK_PATH: &str = "/hubgate/oauth_callback";
const SESSION_COOKIE: &str = "hubgate-session";
const STATE_COOKIE: &str = "hubgate-oauth-state";
/// The header hubgate sets upstream to the user it let through (`--identity-header`).
const IDENTITY_HEADER: &str = "x-hubgate-user";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_users_reach_only_their_servers_through_hubgate() {
    let venv = tokio::task::spawn_blocking(venv)
        .await
        .expect("venv setup panicked");
    let ports = Ports::free().unwrap_or_else(|e| panic!("picking ports failed: {e:#}"));
    let callback = format!("http://127.0.0.1:{}{CALLBACK_PATH}", ports.public);
    let hub = Hub::start(
        venv,
        HubSpec {
            config: "jupyterhub_auth_config.py",
            proxy_command: hubgate_binary(),
            ports,
            env: vec![
                ("JUPYTERHUB_API_TOKEN", HUBGATE_TOKEN.into()),
                ("HUBGATE_E2E_CALLBACK_URL", callback.clone().into()),
            ],
        },
    )
    .unwrap_or_else(|e| panic!("starting JupyterHub failed: {e:#}"));
    if let Err(e) = scenario(&hub, &callback).await {
        panic!(
            "{e:#}\n\n----- JupyterHub log (hubgate logs to the same stream) -----\n{}",
            hub.log_tail(400)
        );
    }
}

async fn scenario(hub: &Hub, callback: &str) -> Result<()> {
    let http = Http::new();

    // 1. Both servers run, and hubgate routes them.
    hub_answers(&http, hub).await?;
    for user in ["alice", "bob"] {
        start_server(&http, hub, user).await?;
    }
    eventually(hub, "hubgate routes alice's and bob's servers", || async {
        let routes = proxy_routes(&http, hub).await?;
        for user in ["alice", "bob"] {
            let key = format!("{BASE_KEY}/user/{user}");
            ensure!(routes.contains_key(&key), "no route {key:?} yet");
        }
        Ok(())
    })
    .await?;

    // 2. A browser logs in through the hub, one hop at a time.
    let mut browser = Browser::new(hub.public_port);
    let tree = format!("{BASE_URL}user/alice/tree");
    let to_hubgate = browser.get(&tree).await?;
    let authorize = to_hubgate.location()?;
    let (path, params) = split_url(&authorize)?;
    ensure!(
        path == format!("{BASE_URL}hub/api/oauth2/authorize"),
        "hubgate should send a browser without credentials to the hub's authorize endpoint, \
         sent it to {authorize}"
    );
    for (name, want) in [
        ("client_id", "service-hubgate"),
        ("redirect_uri", callback),
        ("response_type", "code"),
        ("code_challenge_method", "S256"),
    ] {
        ensure!(
            param(&params, name) == Some(want),
            "authorize redirect {authorize}: {name} should be {want:?}"
        );
    }
    let state = param(&params, "state").unwrap_or_default().to_owned();
    ensure!(
        !state.is_empty() && param(&params, "code_challenge").is_some_and(|c| !c.is_empty()),
        "authorize redirect {authorize}: no state or code_challenge"
    );
    ensure!(
        to_hubgate.set_cookie(STATE_COOKIE).is_some(),
        "hubgate did not bind the login to the browser with {STATE_COOKIE}: {:?}",
        to_hubgate.headers
    );

    let to_login = browser.follow(&to_hubgate).await?;
    let login = to_login.location()?;
    let (path, params) = split_url(&login)?;
    ensure!(
        path == format!("{BASE_URL}hub/login") && param(&params, "next") == Some(&authorize),
        "the hub should send a browser that is not logged in to its login page, back to \
         {authorize} afterwards; it sent it to {login}"
    );
    let login_page = browser.follow(&to_login).await?;
    ensure!(
        login_page.status == StatusCode::OK,
        "{}",
        login_page.describe()
    );
    let xsrf = form_field(&login_page.body, "_xsrf").with_context(|| {
        format!(
            "no _xsrf field in the login form: {}",
            text(&login_page.body)
        )
    })?;
    let logged_in = browser
        .post_form(
            &login_page.url,
            &[("username", "alice"), ("password", "any"), ("_xsrf", &xsrf)],
        )
        .await?;
    ensure!(
        logged_in.location()? == authorize,
        "after login the hub should send the browser back to {authorize}: {}",
        logged_in.describe()
    );
    let to_callback = browser.follow(&logged_in).await?;
    let back = to_callback.location()?;
    ensure!(
        back.starts_with(&format!("{callback}?")),
        "the hub should send the browser to hubgate's callback {callback}, sent it to {back}"
    );
    let (_, params) = split_url(&back)?;
    ensure!(
        param(&params, "code").is_some_and(|c| !c.is_empty())
            && param(&params, "state") == Some(&state),
        "the hub's redirect to the callback lacks a code or changed the state: {back}"
    );
    let to_server = browser.follow(&to_callback).await?;
    ensure!(
        to_server.location()? == tree,
        "hubgate's callback should send the browser back to {tree}: {}",
        to_server.describe()
    );
    let session = to_server.set_cookie(SESSION_COOKIE).with_context(|| {
        format!(
            "hubgate's callback set no {SESSION_COOKIE} cookie: {:?}",
            to_server.headers
        )
    })?;
    ensure!(
        session
            .split(';')
            .any(|a| a.trim().eq_ignore_ascii_case("httponly")),
        "hubgate's session cookie is not HttpOnly: {session}"
    );
    let served = browser.follow(&to_server).await?;
    ensure!(served.status == StatusCode::OK, "{}", served.describe());
    let echo = served_by(&served.body, "alice")?;
    ensure!(
        echo["path"] == tree.as_str() && echo["headers"][IDENTITY_HEADER] == "alice",
        "alice's server saw path {} as {}, want {tree} as alice",
        echo["path"],
        echo["headers"][IDENTITY_HEADER]
    );
    eprintln!("alice logged in through the hub and reached her server");

    // 3. alice's session does not open bob's server.
    let bob_tree = format!("{BASE_URL}user/bob/tree");
    let refused = browser.get(&bob_tree).await?;
    ensure!(
        refused.status == StatusCode::FORBIDDEN,
        "alice's session on bob's server: {}",
        refused.describe()
    );

    // 4. API tokens: the owner's passes, another user's is refused, none at all is 401.
    let (alice_token, alice_token_id) = new_token(&http, hub, "alice").await?;
    let (bob_token, _) = new_token(&http, hub, "bob").await?;
    let api = hub.public_url("user/alice/api/contents");
    let (status, _, body) = http.get(&api, Some(&alice_token)).await?;
    ensure!(
        status == StatusCode::OK,
        "alice's token on her server: {status} {}",
        text(&body)
    );
    served_by(&body, "alice")?;
    let (status, _, body) = http.get(&api, Some(&bob_token)).await?;
    ensure!(
        status == StatusCode::FORBIDDEN,
        "bob's token on alice's server: {status} {}",
        text(&body)
    );
    let (status, headers, body) = http.get(&api, None).await?;
    ensure!(
        status == StatusCode::UNAUTHORIZED && headers.contains_key(WWW_AUTHENTICATE),
        "no credentials on alice's server: {status} {headers:?} {}",
        text(&body)
    );

    // 5. Revoking alice's token in the hub takes effect in hubgate when its cache is told.
    let (status, _, body) = http
        .send(
            Method::DELETE,
            &hub.public_url(&format!("hub/api/users/alice/tokens/{alice_token_id}")),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::NO_CONTENT,
        "revoking alice's token: {status} {}",
        text(&body)
    );
    let (status, _, body) = http.get(&api, Some(&alice_token)).await?;
    ensure!(
        status == StatusCode::OK,
        "hubgate should still answer from its cache (--auth-cache-ttl 300 s) until told: \
         {status} {}",
        text(&body)
    );
    let (status, _, body) = http
        .send(
            Method::DELETE,
            &hub.api_url("/api/auth/cache/users/alice"),
            Some(PROXY_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::NO_CONTENT,
        "DELETE /api/auth/cache/users/alice: {status} {}",
        text(&body)
    );
    let (status, _, body) = http.get(&api, Some(&alice_token)).await?;
    ensure!(
        status == StatusCode::UNAUTHORIZED,
        "alice's revoked token after the cache was told: {status} {}",
        text(&body)
    );
    let again = browser.get(&tree).await?;
    let relogin = again.location()?;
    ensure!(
        relogin.starts_with(&format!("{BASE_URL}hub/api/oauth2/authorize?")),
        "alice's session should be void after her credentials were revoked, but: {}",
        again.describe()
    );

    // 6. What reached the servers: alice's three allowed requests (the browser after login, her
    // token, her revoked token while cached), each as alice, and nothing else through hubgate.
    let alice_saw = requests(hub, "alice")?;
    let bob_saw = requests(hub, "bob")?;
    for (user, seen) in [("alice", &alice_saw), ("bob", &bob_saw)] {
        for request in seen {
            let cookie = request["headers"]["cookie"].as_str().unwrap_or_default();
            ensure!(
                !cookie.contains(SESSION_COOKIE) && !cookie.contains(STATE_COOKIE),
                "{user}'s server received hubgate's cookies: {request}"
            );
        }
    }
    let proxied = |seen: &[Value]| -> Vec<Value> {
        // The hub checks a server directly (no X-Forwarded-For); hubgate always adds it.
        seen.iter()
            .filter(|r| r["headers"]["x-forwarded-for"].is_string())
            .cloned()
            .collect()
    };
    let bob_proxied = proxied(&bob_saw);
    ensure!(
        bob_proxied.is_empty(),
        "bob's server received requests through hubgate: {bob_proxied:?}"
    );
    let alice_proxied = proxied(&alice_saw);
    let alice_auth = format!("token {alice_token}");
    for request in &alice_proxied {
        let authorization = request["headers"]["authorization"].as_str();
        ensure!(
            request["headers"][IDENTITY_HEADER] == "alice"
                && authorization.is_none_or(|a| a == alice_auth),
            "alice's server received a request that was not alice's: {request}"
        );
    }
    ensure!(
        alice_proxied.len() == 3,
        "alice's server should have received exactly her 3 allowed requests through hubgate, \
         got {}: {alice_proxied:#?}",
        alice_proxied.len()
    );
    Ok(())
}

/// The fake server's echo in `body`, checked to come from `user`'s server.
fn served_by(body: &[u8], user: &str) -> Result<Value> {
    let echo: Value = serde_json::from_slice(body)
        .with_context(|| format!("not the fake server's JSON: {}", text(body)))?;
    ensure!(
        echo["server"] == "fake-singleuser" && echo["user"] == user,
        "expected {user}'s server, got {echo}"
    );
    Ok(echo)
}

/// A new API token for `user` (`POST /hub/api/users/<user>/tokens` as admin): token and id.
async fn new_token(http: &Http, hub: &Hub, user: &str) -> Result<(String, String)> {
    let url = hub.public_url(&format!("hub/api/users/{user}/tokens"));
    let (status, _, body) = http
        .request(
            Method::POST,
            &url,
            Some(ADMIN_TOKEN),
            &[(CONTENT_TYPE, "application/json".into())],
            Bytes::from_static(br#"{"note": "hubgate e2e"}"#),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED,
        "POST {url}: {status} {}",
        text(&body)
    );
    let answer: Value = serde_json::from_slice(&body).context("token answer is not JSON")?;
    match (answer["token"].as_str(), answer["id"].as_str()) {
        (Some(token), Some(id)) => Ok((token.to_owned(), id.to_owned())),
        _ => bail!("POST {url}: no token or id in {answer}"),
    }
}

/// What `user`'s fake server recorded, one JSON object per request.
fn requests(hub: &Hub, user: &str) -> Result<Vec<Value>> {
    let path = hub.workdir().join("requests").join(format!("{user}.jsonl"));
    let log = match fs::read_to_string(&path) {
        Ok(log) => log,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    log.lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("{}", path.display())))
        .collect()
}

/// A path and its decoded query parameters, from a URL or an absolute path.
fn split_url(url: &str) -> Result<(String, Vec<(String, String)>)> {
    let uri: Uri = url.parse().with_context(|| format!("not a URL: {url}"))?;
    let params = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    Ok((uri.path().to_owned(), params))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The value of a named `<input>` in an HTML page (`name="..." value="..."`).
fn form_field(html: &[u8], name: &str) -> Option<String> {
    let html = String::from_utf8_lossy(html);
    let at = html.find(&format!("name=\"{name}\""))?;
    let tag_end = at + html[at..].find('>')?;
    let tag = &html[at..tag_end];
    let value = tag.split("value=\"").nth(1)?;
    Some(value.split('"').next()?.to_owned())
}

/// One answer the browser got.
struct Hop {
    method: Method,
    url: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Hop {
    /// Where a redirect points (as sent: a path or an absolute URL).
    fn location(&self) -> Result<String> {
        ensure!(
            self.status == StatusCode::FOUND || self.status == StatusCode::SEE_OTHER,
            "expected a redirect: {}",
            self.describe()
        );
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .with_context(|| format!("redirect without Location: {}", self.describe()))
    }

    /// The whole `Set-Cookie` value that sets `name`.
    fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.split('=').next().is_some_and(|n| n.trim() == name))
            .map(str::to_owned)
    }

    fn describe(&self) -> String {
        format!(
            "{} {}: {} Location {:?} {}",
            self.method,
            self.url,
            self.status,
            self.headers.get(LOCATION),
            text(&self.body)
        )
    }
}

struct Cookie {
    name: String,
    value: String,
    path: String,
}

/// A browser: sends `Accept: text/html`, keeps cookies (by name and path, for one host), and
/// follows redirects only when told.
struct Browser {
    http: Http,
    origin: String,
    jar: Vec<Cookie>,
}

impl Browser {
    fn new(port: u16) -> Self {
        Browser {
            http: Http::new(),
            origin: format!("http://127.0.0.1:{port}"),
            jar: Vec::new(),
        }
    }

    /// GET a path on the public port or an absolute URL.
    async fn get(&mut self, url: &str) -> Result<Hop> {
        self.send(Method::GET, url, None).await
    }

    async fn post_form(&mut self, url: &str, fields: &[(&str, &str)]) -> Result<Hop> {
        let form = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(Method::POST, url, Some(form)).await
    }

    /// GET where a redirect points.
    async fn follow(&mut self, hop: &Hop) -> Result<Hop> {
        let location = hop.location()?;
        self.get(&location).await
    }

    async fn send(&mut self, method: Method, url: &str, form: Option<String>) -> Result<Hop> {
        let url = if url.starts_with('/') {
            format!("{}{url}", self.origin)
        } else if url.starts_with(&format!("{}/", self.origin)) {
            url.to_owned()
        } else {
            bail!("the browser was sent off the proxy's public port: {url}");
        };
        let path = url.parse::<Uri>()?.path().to_owned();
        let mut headers: Vec<(HeaderName, String)> = vec![
            (
                ACCEPT,
                "text/html,application/xhtml+xml,*/*;q=0.8".to_owned(),
            ),
            (USER_AGENT, "hubgate-e2e-browser".to_owned()),
        ];
        let cookies: Vec<String> = self
            .jar
            .iter()
            .filter(|c| path_matches(&path, &c.path))
            .map(|c| format!("{}={}", c.name, c.value))
            .collect();
        if !cookies.is_empty() {
            headers.push((COOKIE, cookies.join("; ")));
        }
        let body = match form {
            Some(form) => {
                headers.push((CONTENT_TYPE, "application/x-www-form-urlencoded".to_owned()));
                Bytes::from(form)
            }
            None => Bytes::new(),
        };
        let (status, answer_headers, body) = self
            .http
            .request(method.clone(), &url, None, &headers, body)
            .await?;
        for set in answer_headers.get_all(SET_COOKIE) {
            if let Ok(set) = set.to_str() {
                self.store(set, &path);
            }
        }
        Ok(Hop {
            method,
            url,
            status,
            headers: answer_headers,
            body,
        })
    }

    /// Keeps (or, with `Max-Age` of 0 or less, drops) the cookie a `Set-Cookie` value sets.
    fn store(&mut self, set: &str, request_path: &str) {
        let mut parts = set.split(';');
        let Some((name, value)) = parts.next().and_then(|nv| nv.split_once('=')) else {
            return;
        };
        // The default path is the request path's directory (RFC 6265 §5.1.4).
        let mut path = match request_path.rfind('/') {
            Some(0) | None => "/".to_owned(),
            Some(i) => request_path[..i].to_owned(),
        };
        let mut expired = false;
        for attribute in parts {
            let (key, val) = attribute.split_once('=').unwrap_or((attribute, ""));
            match key.trim().to_ascii_lowercase().as_str() {
                "path" if val.trim().starts_with('/') => path = val.trim().to_owned(),
                "max-age" => expired = val.trim().parse::<i64>().is_ok_and(|age| age <= 0),
                _ => {}
            }
        }
        let (name, value) = (name.trim(), value.trim());
        self.jar.retain(|c| !(c.name == name && c.path == path));
        if !expired {
            self.jar.push(Cookie {
                name: name.to_owned(),
                value: value.to_owned(),
                path,
            });
        }
    }
}

/// RFC 6265 path-match.
fn path_matches(request: &str, cookie: &str) -> bool {
    request == cookie
        || (request.starts_with(cookie)
            && (cookie.ends_with('/') || request[cookie.len()..].starts_with('/')))
}
