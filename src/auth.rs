//! Authentication and authorization at the edge: before a request reaches a user's server,
//! hubgate finds out who sent it (from a token, its own session cookie, or the hub's login
//! cookie, asking the hub and caching the answer) and whether the hub lets that user use that
//! server.
//!
//! The decision is made on the route the router matched for the request, never on the raw path,
//! so no encoding trick can make the two disagree. Everything fails closed: a hub that cannot be
//! asked means 503 (unless a recent answer is cached), never access.
//!
//! - [`cache`]: the credential cache (TTL, negative TTL, coalescing, grace).
//! - [`session`]: hubgate's signed session cookie and the OAuth state.
//! - [`oauth`]: hubgate as an OAuth client of the hub, for browsers.

pub mod cache;
pub mod oauth;
pub mod session;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::http::{full_body, json, ConnInfo, ProxyBody};
use crate::hub::{Hub, HubError, HubUser};
use crate::routes::Route;
use crate::store::Revocation;
use cache::{Coalescing, LookupFailed, Source};
use session::{SessionCheck, Signer};

/// The name of hubgate's session cookie.
pub const SESSION_COOKIE: &str = "hubgate-session";

/// Header a client might send to pose as someone; always removed when authentication is on.
const X_FORWARDED_USER: HeaderName = HeaderName::from_static("x-forwarded-user");

/// Who a request comes from, as the hub vouched for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub admin: bool,
    pub groups: Vec<String>,
    /// The credential's `access:*` scopes; `None` from hubs that predate scopes.
    pub scopes: Option<Vec<String>>,
}

impl Identity {
    fn from_hub(user: HubUser) -> Self {
        Identity {
            name: user.name,
            admin: user.admin,
            groups: user.groups,
            // Only access scopes matter here; keeping just those keeps session cookies small.
            scopes: user
                .scopes
                .map(|s| s.into_iter().filter(|s| s.starts_with("access:")).collect()),
        }
    }
}

/// Authentication settings, from the configuration. `Debug` hides the session secrets.
#[derive(Clone)]
pub struct AuthSettings {
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub cache_size: u64,
    pub grace: Duration,
    pub allow_token_in_url: bool,
    /// Ask old hubs with `GET /authorizations/token/<t>` instead of `GET /user`.
    pub legacy_token_endpoint: bool,
    /// The hub's login cookie name, when hubgate may read it.
    pub hub_login_cookie: Option<String>,
    pub oauth: Option<oauth::OAuthSettings>,
    /// Session signing secrets; the first signs.
    pub session_secrets: Vec<Vec<u8>>,
    /// The secret was made up at start: sessions end with the process and are not shared.
    pub ephemeral_secret: bool,
    /// Header set to the user's name on requests hubgate lets through.
    pub identity_header: Option<HeaderName>,
    pub cookie_path: String,
    pub cookie_secure: bool,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let AuthSettings {
            cache_ttl,
            negative_ttl,
            cache_size,
            grace,
            allow_token_in_url,
            legacy_token_endpoint,
            hub_login_cookie,
            oauth,
            session_secrets,
            ephemeral_secret,
            identity_header,
            cookie_path,
            cookie_secure,
        } = self;
        f.debug_struct("AuthSettings")
            .field("cache_ttl", cache_ttl)
            .field("negative_ttl", negative_ttl)
            .field("cache_size", cache_size)
            .field("grace", grace)
            .field("allow_token_in_url", allow_token_in_url)
            .field("legacy_token_endpoint", legacy_token_endpoint)
            .field("hub_login_cookie", hub_login_cookie)
            .field("oauth", oauth)
            .field(
                "session_secrets",
                &format_args!("{} hidden", session_secrets.len()),
            )
            .field("ephemeral_secret", ephemeral_secret)
            .field("identity_header", identity_header)
            .field("cookie_path", cookie_path)
            .field("cookie_secure", cookie_secure)
            .finish()
    }
}

/// A hub failure during a decision. Requests it affects get 503.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(String);

impl From<LookupFailed> for AuthError {
    fn from(e: LookupFailed) -> Self {
        AuthError(e.0)
    }
}

impl From<HubError> for AuthError {
    fn from(e: HubError) -> Self {
        AuthError(e.to_string())
    }
}

/// Which requests to a route need credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection<'a> {
    Open,
    /// A user's server: the owner, or someone the hub granted access.
    Server {
        owner: &'a str,
        server: &'a str,
    },
    /// Any authenticated user (with the service's access scope when the hub sends scopes).
    Required {
        service: Option<&'a str>,
    },
}

/// Reads a route's protection from the data the hub posted with it.
pub fn protection(route: &Route) -> Protection<'_> {
    let data = route.data();
    let str_of = |k: &str| data.get(k).and_then(|v| v.as_str());
    match str_of("auth") {
        Some("none") => return Protection::Open,
        Some("required") if str_of("user").is_none() => {
            return Protection::Required {
                service: str_of("service"),
            }
        }
        _ => {}
    }
    match str_of("user") {
        Some(owner) => Protection::Server {
            owner,
            server: str_of("server_name").unwrap_or(""),
        },
        None => Protection::Open,
    }
}

/// The outcome of a check.
pub enum Verdict {
    /// Forward the request.
    Allow(Allowed),
    /// Answer with this instead (401, 403, 503, or a redirect).
    Respond(Response<ProxyBody>),
}

pub struct Allowed {
    pub identity: Option<Arc<Identity>>,
    /// The credential came from `?token=`, which must not travel on.
    pub strip_token: bool,
    /// A renewed session cookie to set on the response.
    pub set_cookie: Option<HeaderValue>,
}

/// A credential's owner, and what the answer needs to know about the credential.
struct Identified {
    who: Arc<Identity>,
    from_url: bool,
    /// The hub token behind the identity, kept in a session made from it.
    token: Option<String>,
    /// An expired session renewed with its token: the answer carries a fresh cookie.
    renewed: bool,
}

/// Where a request's credential came from.
enum Credential<'r> {
    /// Borrowed from the request's header, or decoded from its query.
    Token {
        token: Cow<'r, str>,
        from_url: bool,
    },
    Session(String),
    HubCookie(String),
}

/// The authenticator shared by every request.
pub struct Auth {
    hub: Arc<Hub>,
    settings: AuthSettings,
    credentials: Coalescing<[u8; 32], Arc<Identity>, AuthError>,
    groups: Coalescing<String, Arc<Vec<String>>, AuthError>,
    signer: Signer,
    /// Sessions issued at or before this (ms) are void: set by "clear the cache".
    revoked_all_ms: AtomicI64,
    /// Per user, sessions issued at or before this (ms) are void.
    revoked_users: Mutex<HashMap<String, i64>>,
}

impl Auth {
    pub fn new(hub: Arc<Hub>, settings: AuthSettings) -> Self {
        let credentials = Coalescing::with_stats(
            settings.cache_size,
            settings.cache_ttl,
            settings.negative_ttl,
            settings.grace,
            cache::Stats::registered(&crate::metrics::get().auth_cache),
        );
        let groups = Coalescing::new(
            settings.cache_size,
            settings.cache_ttl,
            settings.negative_ttl,
            settings.grace,
        );
        Auth {
            hub,
            signer: Signer::new(&settings.session_secrets),
            settings,
            credentials,
            groups,
            revoked_all_ms: AtomicI64::new(0),
            revoked_users: Mutex::new(HashMap::new()),
        }
    }

    /// Decides whether a request may go to `route`.
    pub async fn check<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
        route: &Route,
        websocket: bool,
    ) -> Verdict {
        let verdict = self.decide(req, conn, route, websocket).await;
        use crate::metrics::AuthOutcome;
        let outcome = match &verdict {
            Verdict::Allow(a) if a.identity.is_none() => None,
            Verdict::Allow(_) => Some(AuthOutcome::Allowed),
            Verdict::Respond(r) => Some(match r.status() {
                StatusCode::FORBIDDEN => AuthOutcome::Denied,
                StatusCode::SERVICE_UNAVAILABLE => AuthOutcome::HubError,
                // A 302 carrying a cookie trades a URL token for a session: allowed.
                StatusCode::FOUND if r.headers().contains_key(header::SET_COOKIE) => {
                    AuthOutcome::Allowed
                }
                _ => AuthOutcome::NoCredentials,
            }),
        };
        if let Some(outcome) = outcome {
            crate::metrics::get().auth_decision(outcome);
        }
        verdict
    }

    async fn decide<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
        route: &Route,
        websocket: bool,
    ) -> Verdict {
        let protection = protection(route);
        if protection == Protection::Open {
            return Verdict::Allow(Allowed {
                identity: None,
                strip_token: false,
                set_cookie: None,
            });
        }
        let browser = wants_html(req.headers()) && !websocket;
        let found = match self.identify(req, websocket).await {
            Ok(Some(found)) => found,
            Ok(None) => return Verdict::Respond(self.unauthenticated(req, conn, browser)),
            Err(e) => {
                tracing::warn!(route = %route.key(), error = %e, "hub unavailable; request refused");
                return Verdict::Respond(refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The hub cannot confirm who you are right now; try again shortly.",
                    browser,
                ));
            }
        };
        let who = found.who.clone();
        match self.authorize(&who, protection).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(user = %who.name, route = %route.key(), "access denied");
                return Verdict::Respond(refusal(
                    StatusCode::FORBIDDEN,
                    &format!("User {} may not use this server.", who.name),
                    browser,
                ));
            }
            Err(e) => {
                tracing::warn!(route = %route.key(), error = %e, "hub unavailable; request refused");
                return Verdict::Respond(refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The hub cannot confirm access right now; try again shortly.",
                    browser,
                ));
            }
        }
        if found.from_url && browser && req.method() == Method::GET {
            // Trade the token in the address bar for a cookie, so it leaves the URL (and the
            // browser history, and the Referer of every link on the page).
            if let Some(resp) = self.token_to_cookie(req, conn, &who, found.token.as_deref()) {
                return Verdict::Respond(resp);
            }
        }
        let set_cookie = if found.renewed {
            tracing::debug!(user = %who.name, "session renewed with its hub token");
            self.session_cookie(&who, found.token.as_deref(), self.secure(conn))
        } else {
            None
        };
        Verdict::Allow(Allowed {
            identity: Some(who),
            strip_token: found.from_url,
            set_cookie,
        })
    }

    /// Who sent the request. `Ok(None)`: no credential, or none the hub accepts.
    async fn identify<B>(
        &self,
        req: &Request<B>,
        websocket: bool,
    ) -> Result<Option<Identified>, AuthError> {
        let session_id = cookie(req.headers(), "jupyterhub-session-id").unwrap_or_default();
        for credential in self.credentials_of(req, websocket) {
            let found = match &credential {
                Credential::Token { token, from_url } => self
                    .identify_token(token, &session_id)
                    .await?
                    .map(|who| Identified {
                        who,
                        from_url: *from_url,
                        // Needed only to trade a token in the URL for a cookie.
                        token: from_url.then(|| token.clone().into_owned()),
                        renewed: false,
                    }),
                Credential::Session(jwt) => self.identify_session(jwt, &session_id).await?,
                Credential::HubCookie(value) => {
                    let key = digest(&["cookie", value]);
                    let (hub, value) = (self.hub.clone(), value.clone());
                    let name = self.settings.hub_login_cookie.clone().unwrap_or_default();
                    let (entry, source) = self
                        .credentials
                        .get(key, move || async move {
                            let user = hub.user_for_cookie(&name, &value).await?;
                            Ok(user.map(|u| Arc::new(Identity::from_hub(u))))
                        })
                        .await?;
                    log_source(source);
                    entry.value.clone().map(|who| Identified {
                        who,
                        from_url: false,
                        token: None,
                        renewed: false,
                    })
                }
            };
            match (found, &credential) {
                (Some(found), _) => return Ok(Some(found)),
                // A token the hub refused decides (as in JupyterHub's HubAuth); a stale or
                // foreign session cookie gives way to the hub's cookie, if there is one.
                (None, Credential::Token { .. }) => return Ok(None),
                (None, _) => continue,
            }
        }
        Ok(None)
    }

    /// Asks the hub (through the cache) who holds a token.
    async fn identify_token(
        &self,
        token: &str,
        session_id: &str,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        let key = digest(&["token", token, session_id]);
        let legacy = self.settings.legacy_token_endpoint;
        // The clones happen only on a miss: a cache hit never calls this closure.
        let fetch = || {
            let (hub, token) = (self.hub.clone(), token.to_owned());
            async move {
                let user = if legacy {
                    hub.user_for_token_legacy(&token).await?
                } else {
                    hub.user_for_token(&token).await?
                };
                Ok(user.map(|u| Arc::new(Identity::from_hub(u))))
            }
        };
        let (entry, source) = self.credentials.get(key, fetch).await?;
        log_source(source);
        Ok(entry.value.clone())
    }

    /// A session cookie: valid as it is, or expired but renewable because the hub still accepts
    /// the token it was made from (for the same user). Revoked sessions are neither.
    async fn identify_session(
        &self,
        jwt: &str,
        session_id: &str,
    ) -> Result<Option<Identified>, AuthError> {
        match self.signer.check_session(jwt) {
            SessionCheck::Valid { who, issued_ms } if !self.revoked(&who.name, issued_ms) => {
                Ok(Some(Identified {
                    who,
                    from_url: false,
                    token: None,
                    renewed: false,
                }))
            }
            SessionCheck::Expired {
                name,
                issued_ms,
                token: Some(token),
            } if !self.revoked(&name, issued_ms) => {
                let who = self.identify_token(&token, session_id).await?;
                Ok(who.filter(|who| who.name == name).map(|who| Identified {
                    who,
                    from_url: false,
                    token: Some(token),
                    renewed: true,
                }))
            }
            _ => Ok(None),
        }
    }

    /// The credentials of a request, in the order they are tried: one token, or up to two
    /// cookies. (Two slots rather than a `Vec`: this runs on every checked request.)
    fn credentials_of<'r, B>(
        &self,
        req: &'r Request<B>,
        websocket: bool,
    ) -> impl Iterator<Item = Credential<'r>> {
        let mut found = [None, None];
        if let Some(token) = header_token(req.headers()) {
            found[0] = Some(Credential::Token {
                token: Cow::Borrowed(token),
                from_url: false,
            });
        } else if let Some(token) = (websocket || self.settings.allow_token_in_url)
            .then(|| query_token(req.uri().query()))
            .flatten()
        {
            found[0] = Some(Credential::Token {
                token: Cow::Owned(token),
                from_url: true,
            });
        } else {
            found[0] = cookie(req.headers(), SESSION_COOKIE).map(Credential::Session);
            found[1] = self
                .settings
                .hub_login_cookie
                .as_deref()
                .and_then(|name| cookie(req.headers(), name))
                .map(Credential::HubCookie);
        }
        found.into_iter().flatten()
    }

    /// Whether a session of `name` issued at `issued_ms` was voided by a revocation since.
    fn revoked(&self, name: &str, issued_ms: i64) -> bool {
        let all = self.revoked_all_ms.load(Ordering::Relaxed);
        let user = self
            .revoked_users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0);
        issued_ms <= all.max(user)
    }

    /// Whether `who` may use what `protection` guards.
    async fn authorize(
        &self,
        who: &Identity,
        protection: Protection<'_>,
    ) -> Result<bool, AuthError> {
        match protection {
            Protection::Open => Ok(true),
            Protection::Required { service } => Ok(match (&who.scopes, service) {
                (Some(scopes), Some(name)) => scopes.iter().any(|s| {
                    s == "access:services" || *s == format!("access:services!service={name}")
                }),
                _ => true,
            }),
            Protection::Server { owner, server } => {
                if who.name == owner {
                    return Ok(true);
                }
                let Some(scopes) = &who.scopes else {
                    // A hub older than scopes: admins may use every server.
                    return Ok(who.admin);
                };
                let by_user = format!("access:servers!user={owner}");
                let by_server = format!("access:servers!server={owner}/{server}");
                if scopes
                    .iter()
                    .any(|s| s == "access:servers" || *s == by_user || *s == by_server)
                {
                    return Ok(true);
                }
                let granted_groups: Vec<&str> = scopes
                    .iter()
                    .filter_map(|s| s.strip_prefix("access:servers!group="))
                    .collect();
                if granted_groups.is_empty() {
                    return Ok(false);
                }
                let owner_groups = self.groups_of(owner).await?;
                Ok(owner_groups
                    .iter()
                    .any(|g| granted_groups.contains(&g.as_str())))
            }
        }
    }

    /// The groups the owner of a server is in, from the hub (cached like credentials).
    async fn groups_of(&self, owner: &str) -> Result<Arc<Vec<String>>, AuthError> {
        let hub = self.hub.clone();
        let name = owner.to_owned();
        let (entry, _) = self
            .groups
            .get(owner.to_owned(), move || async move {
                Ok(hub.groups_of(&name).await?.map(Arc::new))
            })
            .await?;
        Ok(entry.value.clone().unwrap_or_default())
    }

    /// The answer to a request without usable credentials: browsers are sent to log in, API
    /// clients get 401.
    fn unauthenticated<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
        browser: bool,
    ) -> Response<ProxyBody> {
        let navigable = matches!(*req.method(), Method::GET | Method::HEAD);
        if browser && navigable {
            let next = req
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            if self.settings.oauth.is_some() {
                if let Some(resp) = self.oauth_redirect(&next, self.secure(conn)) {
                    return resp;
                }
            }
            let login = format!(
                "{}login?next={}",
                self.hub_prefix(),
                form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
            );
            return redirect(&login, None);
        }
        let mut resp = refusal(
            StatusCode::UNAUTHORIZED,
            "Authentication required: send 'Authorization: token <token>'.",
            false,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("token realm=\"hubgate\""),
        );
        resp
    }

    /// Whether hubgate's cookies for this request get `Secure`: always with `--cookie-secure`,
    /// and whenever the request came over TLS.
    fn secure(&self, conn: &ConnInfo) -> bool {
        self.settings.cookie_secure || conn.tls
    }

    /// `/hub/api` → `/hub/`: where the hub's pages live, for login redirects.
    fn hub_prefix(&self) -> String {
        let api = self.hub.api_path().trim_end_matches('/');
        let prefix = api.strip_suffix("/api").unwrap_or(api);
        format!("{prefix}/")
    }

    /// Redirects to the same URL without `?token=`, setting the session cookie.
    fn token_to_cookie<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
        who: &Identity,
        token: Option<&str>,
    ) -> Option<Response<ProxyBody>> {
        let cookie = self.session_cookie(who, token, self.secure(conn))?;
        let mut location = same_site_path(req.uri().path());
        if let Some(q) = strip_token_param(req.uri().query()) {
            location.push('?');
            location.push_str(&q);
        }
        Some(redirect(&location, Some(cookie)))
    }

    /// `Set-Cookie` for a new session of `who`. The session itself expires with the cache TTL;
    /// one made from a hub token is kept by the browser for the browser session, so that when it
    /// expires the token inside can renew it (see [`Auth::identify_session`]).
    fn session_cookie(
        &self,
        who: &Identity,
        hub_token: Option<&str>,
        secure: bool,
    ) -> Option<HeaderValue> {
        let lifetime = self.settings.cache_ttl.as_secs().max(1) as i64;
        let jwt = self.signer.session(who, lifetime, hub_token)?;
        let secure = if secure { "; Secure" } else { "" };
        let max_age = if hub_token.is_some() {
            String::new()
        } else {
            format!("; Max-Age={lifetime}")
        };
        HeaderValue::from_str(&format!(
            "{SESSION_COOKIE}={jwt}; Path={}{max_age}; HttpOnly; SameSite=Lax{secure}",
            self.settings.cookie_path
        ))
        .ok()
    }

    /// Removes identity headers a client may have forged and hubgate's own cookies (no server
    /// needs them, and a user's server must never see another user's session), then sets the
    /// configured identity header from the verified identity.
    pub fn scrub(&self, headers: &mut HeaderMap, who: Option<&Identity>) {
        headers.remove(X_FORWARDED_USER);
        if let Some(name) = &self.settings.identity_header {
            headers.remove(name);
        }
        remove_cookies(headers, &[SESSION_COOKIE, oauth::STATE_COOKIE]);
        if let (Some(name), Some(who)) = (&self.settings.identity_header, who) {
            if let Ok(v) = HeaderValue::from_str(&who.name) {
                headers.insert(name.clone(), v);
            }
        }
    }

    /// Drops every cached answer for one user and voids their sessions issued until now.
    pub fn revoke_user(&self, name: &str) {
        self.apply_revocation(&Revocation {
            user: Some(name.to_owned()),
            at_ms: crate::routes::now_ms(),
        });
    }

    /// Drops every cached answer and voids every session issued until now.
    pub fn clear(&self) {
        self.apply_revocation(&Revocation {
            user: None,
            at_ms: crate::routes::now_ms(),
        });
    }

    /// Drops the cached answers a revocation names and voids the sessions issued before it,
    /// for one user or everyone. Applying one twice (it comes back through a shared store)
    /// changes nothing more.
    pub fn apply_revocation(&self, revocation: &Revocation) {
        match &revocation.user {
            Some(name) => {
                self.credentials.remove_if(|who| &who.name == name);
                let mut users = self.revoked_users.lock().unwrap_or_else(|e| e.into_inner());
                let at = users.entry(name.clone()).or_insert(0);
                *at = (*at).max(revocation.at_ms);
                tracing::info!(user = %name, "credentials revoked");
            }
            None => {
                self.credentials.clear();
                self.groups.clear();
                self.revoked_all_ms
                    .fetch_max(revocation.at_ms, Ordering::Relaxed);
                tracing::info!("credential cache cleared");
            }
        }
    }

    /// Cache counters and size, for `/api/status`.
    pub fn cache_stats(&self) -> serde_json::Value {
        let s = &self.credentials.stats;
        serde_json::json!({
            "entries": self.credentials.len(),
            "hits": s.hits.get(),
            "misses": s.misses.get(),
            "coalesced": s.coalesced.get(),
            "stale": s.stale.get(),
            "evictions": s.evictions.get(),
        })
    }

    /// Credentials cached now.
    pub fn cache_len(&self) -> u64 {
        self.credentials.len()
    }
}

fn log_source(source: Source) {
    match source {
        Source::Stale => {
            tracing::warn!("hub unavailable; using a cached identity within its grace period")
        }
        Source::Miss => tracing::debug!("asked the hub about a credential"),
        _ => {}
    }
}

/// SHA-256 over the parts, each followed by a NUL so that ("ab","c") and ("a","bc") differ.
fn digest(parts: &[&str]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `Authorization: token <t>` or `Bearer <t>`, scheme in any case.
/// Borrowed from the request, in ASCII only: `to_str` admits nothing else.
pub fn header_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim_ascii();
    let (scheme, token) = value.split_at(value.find(|c: char| c.is_ascii_whitespace())?);
    let token = token.trim_ascii();
    let known = scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer");
    (known && !token.is_empty() && !token.bytes().any(|b| b.is_ascii_whitespace())).then_some(token)
}

pub fn query_token(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .filter(|t| !t.is_empty())
}

/// The query without any `token` parameter (`None` when nothing is left). Other parameters keep
/// their exact encoding.
pub fn strip_token_param(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|pair| {
            // Compare the decoded name, as `query_token` reads it: `%74oken=` is a token too.
            let name = pair.split('=').next().unwrap_or_default();
            let decoded = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            decoded != "token" && !name.is_empty()
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// A request path as a `Location` that stays on this site and routes as the path did. A browser
/// reads `//host/...` (and `/\host/...`, where `\` counts as `/`) as another host; the router
/// ignores leading slashes and decodes `%5C` to the same `\`, so neither change moves the
/// request to another route.
fn same_site_path(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/')).replace('\\', "%5C")
}

/// The value of a cookie, from any `Cookie` header.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

pub fn remove_cookies(headers: &mut HeaderMap, names: &[&str]) {
    let all: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if all.is_empty() {
        return;
    }
    let kept: Vec<String> = all
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            !pair.is_empty() && !names.contains(&name)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

/// A 302 to `location`, optionally setting a cookie.
pub fn redirect(location: &str, cookie: Option<HeaderValue>) -> Response<ProxyBody> {
    let mut resp = Response::new(full_body(""));
    *resp.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A refusal as JSON (`{"status", "message"}`) or, for browsers, a small HTML page. The message
/// never holds a credential.
pub fn refusal(status: StatusCode, message: &str, browser: bool) -> Response<ProxyBody> {
    let mut resp = if browser {
        let code = status.as_u16();
        let reason = status.canonical_reason().unwrap_or("Error");
        let escaped = message
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let page = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {reason}</title></head>\n\
             <body><h1>{code}: {reason}</h1><p>{escaped}</p><hr><p>hubgate</p></body></html>\n"
        );
        let mut r = Response::new(full_body(page));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r
    } else {
        json(
            status,
            serde_json::json!({"status": status.as_u16(), "message": message}).to_string(),
        )
    };
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn tokens_come_from_token_or_bearer_headers() {
        assert_eq!(
            header_token(&headers(&[("authorization", "token abc")])),
            Some("abc")
        );
        assert_eq!(
            header_token(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            header_token(&headers(&[("authorization", "TOKEN  abc ")])),
            Some("abc")
        );
        assert_eq!(
            header_token(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(
            header_token(&headers(&[("authorization", "token a b")])),
            None
        );
        assert_eq!(
            header_token(&headers(&[("authorization", "xtoken abc")])),
            None
        );
        assert_eq!(
            header_token(&headers(&[("authorization", "token\tabc")])),
            Some("abc")
        );
        assert_eq!(header_token(&headers(&[("authorization", "token")])), None);
    }

    #[test]
    fn token_params_are_removed_keeping_the_rest() {
        assert_eq!(strip_token_param(Some("token=abc")), None);
        assert_eq!(
            strip_token_param(Some("a=1&token=abc&b=%20")).as_deref(),
            Some("a=1&b=%20")
        );
        assert_eq!(
            strip_token_param(Some("tokens=1")).as_deref(),
            Some("tokens=1")
        );
        assert_eq!(query_token(Some("a=1&token=x%2By")).as_deref(), Some("x+y"));
    }

    #[test]
    fn cookies_are_read_and_removed_by_name() {
        let mut h = headers(&[
            ("cookie", "a=1; hubgate-session=jwt; b=2"),
            ("cookie", "c=3"),
        ]);
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("jwt"));
        assert_eq!(cookie(&h, "c").as_deref(), Some("3"));
        remove_cookies(&mut h, &[SESSION_COOKIE]);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
        let mut only = headers(&[("cookie", "hubgate-session=x")]);
        remove_cookies(&mut only, &[SESSION_COOKIE]);
        assert!(only.get(header::COOKIE).is_none());
    }

    /// Found by the property test `model::authorization_and_routing_agree`: a browser bringing
    /// `?token=` to `//user/alice/x` was redirected to `//user/alice/x`, which a browser reads
    /// as the host `user`.
    #[test]
    fn token_redirects_stay_on_the_site_and_route() {
        assert_eq!(same_site_path("/user/alice/x"), "/user/alice/x");
        assert_eq!(same_site_path("//user/alice/x"), "/user/alice/x");
        assert_eq!(same_site_path("///evil.example/"), "/evil.example/");
        assert_eq!(same_site_path("/\\evil.example/"), "/%5Cevil.example/");
        assert_eq!(same_site_path("/"), "/");
        for path in [
            "//user/alice/x",
            "/\\user/alice",
            "//../user/alice",
            "//%2e%2e/a",
        ] {
            let before = crate::path::RequestPath::parse(path).unwrap();
            let location = same_site_path(path);
            let after = crate::path::RequestPath::parse(&location).unwrap();
            assert_eq!(before.lookup, after.lookup, "{path}");
        }
    }

    #[test]
    fn digests_separate_their_parts() {
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
        assert_eq!(digest(&["a"]), digest(&["a"]));
    }

    #[test]
    fn protection_follows_the_route_data() {
        let route = |data: serde_json::Value| {
            let serde_json::Value::Object(mut data) = data else {
                unreachable!()
            };
            data.insert("target".into(), "http://t/".into());
            Route::new(
                "/x".into(),
                crate::target::Target::parse("http://t/").unwrap(),
                data,
                false,
            )
        };
        let r = route(serde_json::json!({"user": "alice", "server_name": ""}));
        assert_eq!(
            protection(&r),
            Protection::Server {
                owner: "alice",
                server: ""
            }
        );
        let r = route(serde_json::json!({"user": "alice", "server_name": "gpu"}));
        assert_eq!(
            protection(&r),
            Protection::Server {
                owner: "alice",
                server: "gpu"
            }
        );
        let r = route(serde_json::json!({"user": "alice", "auth": "none"}));
        assert_eq!(protection(&r), Protection::Open);
        let r = route(serde_json::json!({"hub": true}));
        assert_eq!(protection(&r), Protection::Open);
        let r = route(serde_json::json!({"service": "s", "auth": "required"}));
        assert_eq!(protection(&r), Protection::Required { service: Some("s") });
        let r = route(serde_json::json!({"service": "s"}));
        assert_eq!(protection(&r), Protection::Open);
    }
}
