//! Fair use at the front door: request rates, concurrent requests and open websockets per
//! authenticated user and per client address, and a stricter bucket for the hub's login and
//! token endpoints per client address.
//!
//! hubgate knows who sends each request (it authenticated it), so it can be fair per user where a
//! front proxy only knows addresses. The proxy asks [`Limits::admit`] once per request, after
//! authorization, and keeps the [`Permit`] it gets for as long as the request (or the websocket)
//! lives; a refusal is a 429 with `Retry-After` ([`Refusal::response`]).
//!
//! Rates are token buckets kept as GCRA (one "theoretical arrival time" per key in an
//! `AtomicU64`): a check is a compare-and-swap, and the rate and burst are applied at check time,
//! so a reload or a per-user override changes them without touching the state. The buckets live
//! in `moka` caches, bounded and evicted when idle: an entry idle for longer than its refill time
//! is a full bucket, the same as a new one, so eviction loses nothing (validation caps the refill
//! time at [`MAX_REFILL`], the caches' idle time). Concurrency counts live in a sharded map whose
//! entries go when their count reaches zero, so an open websocket is never forgotten.
//!
//! One [`Limits`] serves every worker of the process: the state is shared, so a limit means the
//! same with one worker or sixteen. Each replica keeps its own state (see the README).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::http::ProxyBody;
use crate::routes::RouteKind;

/// The longest a bucket may take to refill from empty (`burst / rate`), and so how long an idle
/// bucket is kept.
pub const MAX_REFILL: Duration = Duration::from_secs(3600);

/// Keys kept per table (users, client addresses, login addresses). Past this, the least used
/// are evicted first (TinyLFU); an evicted bucket comes back full.
const MAX_KEYS: u64 = 262_144;

const SHARDS: usize = 64;

/// The `[limits]` table of the configuration file, as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsFile {
    /// Peers (CIDRs) whose `X-Forwarded-For` names the client; from any other peer it is ignored.
    pub trusted_proxies: Vec<String>,
    /// Per authenticated user.
    pub user: Option<KeyLimitsFile>,
    /// Per client address.
    pub client: Option<KeyLimitsFile>,
    /// Per client address, on `POST` to the hub's login and token endpoints.
    pub login: Option<RateFile>,
    /// Per-user limits that replace `user` (and exempt the user from `client`); a key left out
    /// is taken from `user`.
    pub overrides: BTreeMap<String, KeyLimitsFile>,
    /// Users with no limits at all (except the login bucket).
    pub exempt_users: Vec<String>,
    /// Hub admins have no limits at all (except the login bucket).
    pub exempt_admins: bool,
}

/// The limits for one sort of key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyLimitsFile {
    /// Requests per second, sustained.
    pub rate: Option<f64>,
    /// Requests at once after an idle spell.
    pub burst: Option<u32>,
    /// Requests in flight at once (websockets not counted).
    pub concurrent: Option<u32>,
    /// Websockets open at once.
    pub websockets: Option<u32>,
    /// The route kinds they apply to (`user`, `service`, `hub`, `other`); all when left out.
    pub kinds: Option<Vec<String>>,
}

/// A rate and a burst.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateFile {
    pub rate: Option<f64>,
    pub burst: Option<u32>,
}

/// A bad `[limits]` table: the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct LimitsError {
    pub key: String,
    pub problem: String,
}

fn bad(key: impl Into<String>, problem: impl Into<String>) -> LimitsError {
    LimitsError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A token bucket as GCRA: one request every `interval`, `tolerance` of credit for a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    interval_ns: u64,
    tolerance_ns: u64,
}

impl Bucket {
    fn new(
        key: &str,
        rate: Option<f64>,
        burst: Option<u32>,
    ) -> Result<Option<Bucket>, LimitsError> {
        let rate = match rate {
            None => return Ok(None),
            Some(r) if r.is_finite() && r > 0.0 => r,
            Some(_) => return Err(bad(format!("{key}.rate"), "must be a positive number")),
        };
        let burst = burst.unwrap_or(1);
        if burst == 0 {
            return Err(bad(format!("{key}.burst"), "must be at least 1"));
        }
        if f64::from(burst) / rate > MAX_REFILL.as_secs_f64() {
            return Err(bad(
                format!("{key}.burst"),
                format!(
                    "burst / rate is the time to refill from empty, at most {} s",
                    MAX_REFILL.as_secs()
                ),
            ));
        }
        let interval_ns = (1e9 / rate).round().max(1.0) as u64;
        Ok(Some(Bucket {
            interval_ns,
            tolerance_ns: interval_ns * u64::from(burst - 1),
        }))
    }

    /// Takes a token from `state` at `now` (ns), or says how long until one is there.
    fn take(&self, state: &AtomicU64, now: u64) -> Result<(), Duration> {
        let mut current = state.load(Ordering::Relaxed);
        loop {
            let tat = current.max(now);
            if tat - now > self.tolerance_ns {
                return Err(Duration::from_nanos(tat - now - self.tolerance_ns));
            }
            match state.compare_exchange_weak(
                current,
                tat + self.interval_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

/// What applies to one sort of key, validated.
#[derive(Debug, Clone, PartialEq)]
struct KeyLimits {
    bucket: Option<Bucket>,
    concurrent: Option<u32>,
    websockets: Option<u32>,
    /// Indexed by `RouteKind as usize` (user, service, hub, other).
    kinds: [bool; 4],
}

impl KeyLimits {
    fn new(key: &str, f: &KeyLimitsFile) -> Result<KeyLimits, LimitsError> {
        let bucket = Bucket::new(key, f.rate, f.burst)?;
        if f.burst.is_some() && f.rate.is_none() {
            return Err(bad(format!("{key}.burst"), "needs a rate"));
        }
        for (name, v) in [("concurrent", f.concurrent), ("websockets", f.websockets)] {
            if v == Some(0) {
                return Err(bad(format!("{key}.{name}"), "must be at least 1"));
            }
        }
        let mut kinds = [f.kinds.is_none(); 4];
        for kind in f.kinds.iter().flatten() {
            let i = ["user", "service", "hub", "other"]
                .iter()
                .position(|k| k == kind)
                .ok_or_else(|| {
                    bad(
                        format!("{key}.kinds"),
                        format!("{kind:?} is not one of user, service, hub, other"),
                    )
                })?;
            kinds[i] = true;
        }
        Ok(KeyLimits {
            bucket,
            concurrent: f.concurrent,
            websockets: f.websockets,
            kinds,
        })
    }

    fn applies(&self, kind: RouteKind) -> bool {
        self.kinds.get(kind as usize).copied().unwrap_or(false)
    }
}

/// An address block: a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net = addr.parse::<IpAddr>().ok()?.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { net, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
            IpAddr::V6(v) => (u128::from(v), 128),
        };
        let ((net, width), (ip, ip_width)) = (bits(self.net), bits(ip.to_canonical()));
        if width != ip_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= 128 || (net >> shift) == (ip >> shift)
    }
}

/// The validated `[limits]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    trusted: Vec<Cidr>,
    user: Option<KeyLimits>,
    client: Option<KeyLimits>,
    login: Option<Bucket>,
    overrides: HashMap<String, KeyLimits>,
    exempt: HashSet<String>,
    exempt_admins: bool,
}

impl Settings {
    /// Validates the file's table; `None` when it sets no limit at all.
    ///
    /// # Errors
    /// [`LimitsError`] naming the first bad key (`limits.user.rate`, ...).
    pub fn from_file(f: &LimitsFile) -> Result<Option<Settings>, LimitsError> {
        let trusted = f
            .trusted_proxies
            .iter()
            .map(|s| {
                Cidr::parse(s).ok_or_else(|| {
                    bad(
                        "limits.trusted_proxies",
                        format!("{s:?} is not an address or CIDR block"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let user = f
            .user
            .as_ref()
            .map(|u| KeyLimits::new("limits.user", u))
            .transpose()?;
        let client = f
            .client
            .as_ref()
            .map(|c| KeyLimits::new("limits.client", c))
            .transpose()?;
        let login = match &f.login {
            Some(l) if l.rate.is_none() => return Err(bad("limits.login.rate", "is required")),
            Some(l) => Bucket::new("limits.login", l.rate, l.burst)?,
            None => None,
        };
        let base = f.user.clone().unwrap_or_default();
        let overrides = f
            .overrides
            .iter()
            .map(|(name, o)| {
                let merged = KeyLimitsFile {
                    rate: o.rate.or(base.rate),
                    burst: o.burst.or(base.burst),
                    concurrent: o.concurrent.or(base.concurrent),
                    websockets: o.websockets.or(base.websockets),
                    kinds: o.kinds.clone().or(base.kinds.clone()),
                };
                Ok((
                    name.clone(),
                    KeyLimits::new(&format!("limits.overrides.{name}"), &merged)?,
                ))
            })
            .collect::<Result<HashMap<_, _>, LimitsError>>()?;
        if user.is_none() && client.is_none() && login.is_none() && overrides.is_empty() {
            return Ok(None);
        }
        Ok(Some(Settings {
            trusted,
            user,
            client,
            login,
            overrides,
            exempt: f.exempt_users.iter().cloned().collect(),
            exempt_admins: f.exempt_admins,
        }))
    }
}

/// Which limit refused a request: the `limit` label of `hubgate_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Login,
    ClientRate,
    UserRate,
    ClientConcurrent,
    UserConcurrent,
    ClientWebsockets,
    UserWebsockets,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Login => "login_rate",
            Limit::ClientRate => "client_rate",
            Limit::UserRate => "user_rate",
            Limit::ClientConcurrent => "client_concurrent",
            Limit::UserConcurrent => "user_concurrent",
            Limit::ClientWebsockets => "client_websockets",
            Limit::UserWebsockets => "user_websockets",
        }
    }
}

/// A refused request: which limit, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    pub retry_after: Duration,
}

impl Refusal {
    /// The 429: a small HTML page when the client asked for HTML (a browser), JSON otherwise.
    pub fn response(&self, request_headers: &HeaderMap) -> Response<ProxyBody> {
        let seconds = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        let seconds = seconds.max(1);
        let browser = request_headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"));
        let mut resp = if browser {
            crate::http::html(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "<!DOCTYPE html>\n<html><head><title>429 Too Many Requests</title></head>\
                     <body><h1>Too many requests</h1><p>Please wait {seconds} s and try \
                     again.</p></body></html>\n"
                ),
            )
        } else {
            crate::http::json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({
                    "status": 429,
                    "message": "Too many requests",
                    "limit": self.limit.as_str(),
                    "retry_after": seconds,
                })
                .to_string(),
            )
        };
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        resp
    }
}

/// What a request is, as far as the limits care.
pub struct Ask<'a> {
    pub method: &'a Method,
    /// The request path, decoded (the route table's lookup form).
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The peer's address; `None` on a Unix socket.
    pub peer: Option<IpAddr>,
    /// The authenticated user's name and whether the hub says they are an admin.
    pub user: Option<(&'a str, bool)>,
    pub kind: RouteKind,
    pub websocket: bool,
}

/// Counts per key, in shards, each entry gone when its count is back to zero: the map holds only
/// keys with something in flight.
struct Counts<K> {
    shards: Box<[Mutex<HashMap<K, u32, foldhash::fast::RandomState>>]>,
    hasher: foldhash::fast::RandomState,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new() -> Self {
        Counts {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u32, foldhash::fast::RandomState>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// One more for `key`, unless it has `cap` already.
    fn acquire(&self, key: &K, cap: u32) -> bool {
        // A poisoned shard only means another thread panicked between two integer updates.
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        match shard.get_mut(key) {
            Some(n) if *n >= cap => false,
            Some(n) => {
                *n += 1;
                true
            }
            None => {
                shard.insert(key.clone(), 1);
                true
            }
        }
    }

    fn release(&self, key: &K) {
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = shard.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn get(&self, key: &K) -> u32 {
        let shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(key).copied().unwrap_or(0)
    }
}

type Table<K> = moka::sync::Cache<K, Arc<AtomicU64>, foldhash::fast::RandomState>;

fn table<K: Hash + Eq + Send + Sync + 'static>() -> Table<K> {
    moka::sync::Cache::builder()
        .max_capacity(MAX_KEYS)
        .time_to_idle(MAX_REFILL)
        .build_with_hasher(foldhash::fast::RandomState::default())
}

/// The state every worker shares.
struct State {
    users: Table<String>,
    clients: Table<IpAddr>,
    logins: Table<IpAddr>,
    user_requests: Counts<String>,
    user_websockets: Counts<String>,
    client_requests: Counts<IpAddr>,
    client_websockets: Counts<IpAddr>,
    /// GCRA times are nanoseconds since this.
    epoch: Instant,
}

/// The limits of one process: settings (replaced whole on reload) and the state of every key.
pub struct Limits {
    settings: ArcSwap<Settings>,
    state: Arc<State>,
}

/// What a request holds while it runs: its places in the concurrency counts, given back when it
/// is dropped (with the response body, or when the websocket closes).
#[must_use]
#[derive(Default)]
pub struct Permit {
    state: Option<Arc<State>>,
    user: Option<(String, bool)>,
    client: Option<(IpAddr, bool)>,
}

impl Permit {
    /// `body` holding the permit until it is dropped.
    pub fn attach(self, body: ProxyBody) -> ProxyBody {
        if self.state.is_none() {
            return body;
        }
        body.map_frame(move |frame| {
            let _held = &self;
            frame
        })
        .boxed()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(state) = &self.state else { return };
        if let Some((name, websocket)) = &self.user {
            let counts = if *websocket {
                &state.user_websockets
            } else {
                &state.user_requests
            };
            counts.release(name);
        }
        if let Some((ip, websocket)) = &self.client {
            let counts = if *websocket {
                &state.client_websockets
            } else {
                &state.client_requests
            };
            counts.release(ip);
        }
    }
}

impl Limits {
    pub fn new(settings: Settings) -> Self {
        Limits {
            settings: ArcSwap::from_pointee(settings),
            state: Arc::new(State {
                users: table(),
                clients: table(),
                logins: table(),
                user_requests: Counts::new(),
                user_websockets: Counts::new(),
                client_requests: Counts::new(),
                client_websockets: Counts::new(),
                epoch: Instant::now(),
            }),
        }
    }

    /// Replaces the settings; every key's state stays (a bucket keeps what it has used).
    pub fn reload(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// Admits a request, or says which limit refuses it (and counts the refusal).
    ///
    /// # Errors
    /// The [`Refusal`] when a limit is reached.
    pub fn admit(&self, ask: &Ask<'_>) -> Result<Permit, Refusal> {
        let settings = self.settings.load();
        let result = self.check(&settings, ask);
        if let Err(refusal) = &result {
            crate::metrics::get()
                .limit_refusals
                .with_label_values(&[refusal.limit.as_str(), kind_name(ask.kind)])
                .inc();
        }
        result
    }

    fn check(&self, s: &Settings, ask: &Ask<'_>) -> Result<Permit, Refusal> {
        let state = &self.state;
        let client = ask
            .peer
            .map(|peer| client_address(&s.trusted, peer, ask.headers));
        if let (Some(bucket), Some(ip)) = (&s.login, client) {
            if is_login(ask.method, ask.path) {
                take(bucket, &state.logins, ip, self.now(), Limit::Login)?;
            }
        }
        let user = match ask.user {
            Some((name, admin)) if s.exempt.contains(name) || (admin && s.exempt_admins) => {
                return Ok(Permit::default());
            }
            Some((name, _)) => match s.overrides.get(name) {
                Some(own) => return self.per_user(own, name, ask),
                None => Some(name),
            },
            None => None,
        };
        let mut permit = Permit {
            state: Some(state.clone()),
            user: None,
            client: None,
        };
        if let (Some(limits), Some(ip)) = (&s.client, client) {
            if limits.applies(ask.kind) {
                if let Some(bucket) = &limits.bucket {
                    take_by(bucket, &state.clients, &ip, self.now(), Limit::ClientRate)?;
                }
                let (counts, cap, limit) = if ask.websocket {
                    (
                        &state.client_websockets,
                        limits.websockets,
                        Limit::ClientWebsockets,
                    )
                } else {
                    (
                        &state.client_requests,
                        limits.concurrent,
                        Limit::ClientConcurrent,
                    )
                };
                if let Some(cap) = cap {
                    hold(counts, &ip, cap, limit)?;
                    permit.client = Some((ip, ask.websocket));
                }
            }
        }
        if let (Some(limits), Some(name)) = (&s.user, user) {
            permit.user = self.hold_user(limits, name, ask)?;
        }
        Ok(permit)
    }

    /// An overridden user: their own limits instead of `user`, and no client limits.
    fn per_user(&self, limits: &KeyLimits, name: &str, ask: &Ask<'_>) -> Result<Permit, Refusal> {
        let user = self.hold_user(limits, name, ask)?;
        Ok(Permit {
            state: Some(self.state.clone()),
            user,
            client: None,
        })
    }

    fn hold_user(
        &self,
        limits: &KeyLimits,
        name: &str,
        ask: &Ask<'_>,
    ) -> Result<Option<(String, bool)>, Refusal> {
        if !limits.applies(ask.kind) {
            return Ok(None);
        }
        let state = &self.state;
        if let Some(bucket) = &limits.bucket {
            let slot = state
                .users
                .get_with_by_ref(name, || Arc::new(AtomicU64::new(0)));
            bucket
                .take(&slot, self.now())
                .map_err(|retry_after| Refusal {
                    limit: Limit::UserRate,
                    retry_after,
                })?;
        }
        let (counts, cap, limit) = if ask.websocket {
            (
                &state.user_websockets,
                limits.websockets,
                Limit::UserWebsockets,
            )
        } else {
            (
                &state.user_requests,
                limits.concurrent,
                Limit::UserConcurrent,
            )
        };
        let Some(cap) = cap else { return Ok(None) };
        let name = name.to_owned();
        hold(counts, &name, cap, limit)?;
        Ok(Some((name, ask.websocket)))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.state.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

fn take(
    bucket: &Bucket,
    table: &Table<IpAddr>,
    ip: IpAddr,
    now: u64,
    limit: Limit,
) -> Result<(), Refusal> {
    take_by(bucket, table, &ip, now, limit)
}

fn take_by<K: Hash + Eq + Clone + Send + Sync + 'static>(
    bucket: &Bucket,
    table: &Table<K>,
    key: &K,
    now: u64,
    limit: Limit,
) -> Result<(), Refusal> {
    let slot = table.get_with_by_ref(key, || Arc::new(AtomicU64::new(0)));
    bucket
        .take(&slot, now)
        .map_err(|retry_after| Refusal { limit, retry_after })
}

fn hold<K: Hash + Eq + Clone>(
    counts: &Counts<K>,
    key: &K,
    cap: u32,
    limit: Limit,
) -> Result<(), Refusal> {
    if counts.acquire(key, cap) {
        Ok(())
    } else {
        Err(Refusal {
            limit,
            retry_after: Duration::from_secs(1),
        })
    }
}

fn kind_name(kind: RouteKind) -> &'static str {
    match kind {
        RouteKind::User => "user",
        RouteKind::Service => "service",
        RouteKind::Hub => "hub",
        RouteKind::Other => "other",
        RouteKind::None => "none",
    }
}

/// The client: the peer, or, when the peer is a trusted proxy, the right-most address in
/// `X-Forwarded-For` that is not a trusted proxy itself (the left part is the client's to forge).
fn client_address(trusted: &[Cidr], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    hops.reverse();
    let mut client = peer;
    for hop in hops {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !is_trusted(client) {
                    break;
                }
            }
            // An entry that is not an address ends what can be believed.
            Err(_) => break,
        }
    }
    client
}

/// `POST` to the hub's login or token endpoints, under any base URL: `…/hub/login`,
/// `…/hub/api/authorizations/token`, `…/hub/api/users/<name>/tokens`.
fn is_login(method: &Method, path: &str) -> bool {
    if method != Method::POST {
        return false;
    }
    let path = path.trim_end_matches('/');
    if path.ends_with("/hub/login") || path.ends_with("/hub/api/authorizations/token") {
        return true;
    }
    let Some(rest) = path.strip_suffix("/tokens") else {
        return false;
    };
    let Some((before, name)) = rest.rsplit_once('/') else {
        return false;
    };
    !name.is_empty() && before.ends_with("/hub/api/users")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Settings {
        let file: LimitsFile = toml::from_str(toml_text).unwrap();
        Settings::from_file(&file).unwrap().unwrap()
    }

    fn ask<'a>(headers: &'a HeaderMap, peer: &str, user: Option<&'a str>) -> Ask<'a> {
        Ask {
            method: &Method::GET,
            path: "/user/x/api",
            headers,
            peer: Some(peer.parse().unwrap()),
            user: user.map(|u| (u, false)),
            kind: RouteKind::User,
            websocket: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_refused_at_its_size_and_admitted_after_the_refill() {
        let limits = Limits::new(settings("[user]\nrate = 2.0\nburst = 3"));
        let h = HeaderMap::new();
        for _ in 0..3 {
            drop(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).unwrap());
        }
        let refused = limits
            .admit(&ask(&h, "10.0.0.1", Some("alice")))
            .err()
            .unwrap();
        assert_eq!(refused.limit, Limit::UserRate);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        // Another user has a bucket of their own.
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("bob"))).is_ok());
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_ok());
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_err());
        // A long pause refills the whole burst, and no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_ok());
        }
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_given_back_when_the_permit_goes() {
        let limits = Limits::new(settings("[client]\nconcurrent = 2\nwebsockets = 1"));
        let h = HeaderMap::new();
        let a = limits.admit(&ask(&h, "10.0.0.1", None)).unwrap();
        let b = limits.admit(&ask(&h, "10.0.0.1", None)).unwrap();
        let refused = limits.admit(&ask(&h, "10.0.0.1", None)).err().unwrap();
        assert_eq!(refused.limit, Limit::ClientConcurrent);
        assert!(limits.admit(&ask(&h, "10.0.0.2", None)).is_ok());
        let mut ws = ask(&h, "10.0.0.1", None);
        ws.websocket = true;
        let open = limits.admit(&ws).unwrap();
        assert_eq!(
            limits.admit(&ws).err().unwrap().limit,
            Limit::ClientWebsockets
        );
        drop(a);
        assert!(limits.admit(&ask(&h, "10.0.0.1", None)).is_ok());
        drop((b, open));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(limits.state.client_requests.get(&ip), 0);
        assert_eq!(limits.state.client_websockets.get(&ip), 0);
        assert!(limits
            .state
            .client_requests
            .shards
            .iter()
            .all(|s| s.lock().unwrap().is_empty()));
    }

    #[tokio::test(start_paused = true)]
    async fn overrides_exemptions_and_kinds() {
        let limits = Limits::new(settings(
            "exempt_users = [\"root\"]\nexempt_admins = true\n\
             [user]\nrate = 1.0\nkinds = [\"user\"]\n\
             [overrides.culler]\nrate = 100.0\nburst = 100",
        ));
        let h = HeaderMap::new();
        for _ in 0..50 {
            assert!(limits.admit(&ask(&h, "10.0.0.1", Some("culler"))).is_ok());
            assert!(limits.admit(&ask(&h, "10.0.0.1", Some("root"))).is_ok());
            let mut admin = ask(&h, "10.0.0.1", Some("boss"));
            admin.user = Some(("boss", true));
            assert!(limits.admit(&admin).is_ok());
            let mut hub = ask(&h, "10.0.0.1", Some("alice"));
            hub.kind = RouteKind::Hub;
            assert!(limits.admit(&hub).is_ok());
        }
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_ok());
        assert!(limits.admit(&ask(&h, "10.0.0.1", Some("alice"))).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_login_bucket_counts_only_login_and_token_posts() {
        let limits = Limits::new(settings("[login]\nrate = 0.1\nburst = 2"));
        let h = HeaderMap::new();
        let login = |path: &'static str| Ask {
            method: &Method::POST,
            path,
            ..ask(&h, "10.0.0.9", None)
        };
        assert!(limits.admit(&login("/hub/login")).is_ok());
        assert!(limits
            .admit(&login("/base/hub/api/users/al/tokens"))
            .is_ok());
        let refused = limits
            .admit(&login("/hub/api/authorizations/token"))
            .err()
            .unwrap();
        assert_eq!(refused.limit, Limit::Login);
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        for _ in 0..20 {
            assert!(limits.admit(&ask(&h, "10.0.0.9", None)).is_ok());
            assert!(limits.admit(&login("/hub/api/users")).is_ok());
        }
        assert!(is_login(&Method::POST, "/hub/login/"));
        assert!(!is_login(&Method::GET, "/hub/login"));
        assert!(!is_login(&Method::POST, "/hub/api/users//tokens"));
        assert!(!is_login(&Method::POST, "/user/x/hub/loginx"));
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers() {
        let trusted = [
            Cidr::parse("10.1.0.0/16").unwrap(),
            Cidr::parse("::1").unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 192.0.2.7, 10.1.2.3".parse().unwrap(),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_address(&trusted, ip("10.1.0.1"), &h),
            ip("192.0.2.7")
        );
        assert_eq!(client_address(&trusted, ip("::1"), &h), ip("192.0.2.7"));
        assert_eq!(
            client_address(&trusted, ip("192.0.2.99"), &h),
            ip("192.0.2.99")
        );
        assert_eq!(
            client_address(&trusted, ip("::ffff:10.1.9.9"), &HeaderMap::new()),
            ip("10.1.9.9")
        );
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_address(&trusted, ip("10.1.0.1"), &h), ip("10.1.0.1"));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Cidr::parse("0.0.0.0/0").unwrap().contains(ip("::2")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }

    #[test]
    fn bad_tables_name_their_key() {
        let err = |t: &str| {
            let file: LimitsFile = toml::from_str(t).unwrap();
            Settings::from_file(&file).unwrap_err().key
        };
        assert_eq!(err("[user]\nrate = 0.0"), "limits.user.rate");
        assert_eq!(err("[client]\nburst = 3"), "limits.client.burst");
        assert_eq!(err("[client]\nconcurrent = 0"), "limits.client.concurrent");
        assert_eq!(err("[user]\nkinds = [\"users\"]"), "limits.user.kinds");
        assert_eq!(err("[login]\nburst = 3"), "limits.login.rate");
        assert_eq!(
            err("[login]\nrate = 0.001\nburst = 10"),
            "limits.login.burst"
        );
        assert_eq!(
            err("trusted_proxies = [\"nope\"]"),
            "limits.trusted_proxies"
        );
        assert_eq!(
            err("[overrides.svc]\nrate = -1.0"),
            "limits.overrides.svc.rate"
        );
        let empty: LimitsFile = toml::from_str("trusted_proxies = [\"10.0.0.0/8\"]").unwrap();
        assert!(Settings::from_file(&empty).unwrap().is_none());
    }

    #[test]
    fn refusals_answer_browsers_with_a_page_and_clients_with_json() {
        let refusal = Refusal {
            limit: Limit::UserRate,
            retry_after: Duration::from_millis(1200),
        };
        let mut h = HeaderMap::new();
        let resp = refusal.response(&h);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        h.insert(header::ACCEPT, "text/html,*/*;q=0.8".parse().unwrap());
        let resp = refusal.response(&h);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
    }
}
