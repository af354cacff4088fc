//! What the metrics tests need beyond `support`: a Prometheus text-format parser, scraping a
//! hubgate started with a metrics listener, and a tiny hub whose `/proxy` handshake can fail and
//! which can be stopped and started again on its port.
//!
//! The shared fake hub (`fakehub`) always accepts the handshake and can only drop connections
//! while "down", so the `/api/status` states `unregistered` and a hub that is really gone (a
//! refused port) need this one.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpSocket, task::JoinHandle};

use crate::support::{full, Body, Hubgate, WAIT};

// ---------------------------------------------------------------------------------------------
// The Prometheus text format

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A whole scrape, parsed.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    /// Family name → `counter`, `gauge`, `histogram`, `summary` or `untyped`, from `# TYPE`.
    pub types: HashMap<String, String>,
}

impl Scrape {
    /// Parses the text format, panicking (with the line) on anything malformed, on a sample whose
    /// family has no `# TYPE` line, and on a series that appears twice.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            let line = line.trim_end();
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind), None) = (words.next(), words.next(), words.next())
                    else {
                        panic!("malformed TYPE line {line:?}");
                    };
                    let previous = types.insert(name.to_owned(), kind.to_owned());
                    assert!(previous.is_none(), "two TYPE lines for {name}");
                }
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|why| {
                panic!("malformed sample line {line:?}: {why}\nwhole scrape:\n{text}")
            }));
        }
        let scrape = Scrape {
            text: text.to_owned(),
            samples,
            types,
        };
        let untyped: Vec<&str> = scrape
            .samples
            .iter()
            .filter(|s| scrape.family_of(&s.name).is_none())
            .map(|s| s.name.as_str())
            .collect();
        assert!(
            untyped.is_empty(),
            "samples without a # TYPE line for their family: {untyped:?}"
        );
        let mut series = HashSet::new();
        for s in &scrape.samples {
            assert!(
                series.insert((s.name.clone(), s.labels.clone())),
                "series {} {:?} appears twice",
                s.name,
                s.labels
            );
        }
        scrape
    }

    /// The family a sample name belongs to (itself, or a histogram's or summary's base name for
    /// `_bucket`, `_sum` and `_count`), if a `# TYPE` line declares it.
    pub fn family_of(&self, name: &str) -> Option<&str> {
        if let Some((family, _)) = self.types.get_key_value(name) {
            return Some(family);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some((family, kind)) = self.types.get_key_value(base) {
                    let fits = match suffix {
                        "_bucket" => kind == "histogram",
                        _ => kind == "histogram" || kind == "summary",
                    };
                    if fits {
                        return Some(family);
                    }
                }
            }
        }
        None
    }

    /// The series `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// The series `name` with exactly these labels; 0 when it is not (yet) there, as a counter
    /// that was never touched.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum of every series `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Whether any series is called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The series called `name`, for messages.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// Parses `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                chars.next();
                rest = &after[start + 1..];
                break;
            }
            let mut label = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            if !is_label_name(&label) {
                return Err(format!("bad label name {label:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    None => return Err(format!("label {label}: unterminated value")),
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => return Err(format!("label {label}: bad escape {other:?}")),
                    },
                    Some(c) => value.push(c),
                }
            }
            if labels.insert(label.clone(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
        }
    }
    let mut words = rest.split_whitespace();
    let value = words.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    if let Some(ts) = words.next() {
        ts.parse::<i64>()
            .map_err(|e| format!("timestamp {ts:?}: {e}"))?;
    }
    if let Some(extra) = words.next() {
        return Err(format!("trailing {extra:?}"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Asserts that the series `name{labels}` grew by exactly `expected` between two scrapes.
#[track_caller]
pub fn assert_delta(
    before: &Scrape,
    after: &Scrape,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) {
    let (b, a) = (before.value(name, labels), after.value(name, labels));
    assert!(
        a - b == expected,
        "{name}{labels:?}: expected +{expected}, went from {b} to {a} (+{}); series now: {:?}",
        a - b,
        after.series(name)
    );
}

/// The changes between two scrapes, asserted one series at a time:
/// `deltas(&before, &after).of("requests_web", &[], 1.0).of(...)`.
pub fn deltas<'a>(before: &'a Scrape, after: &'a Scrape) -> Deltas<'a> {
    Deltas { before, after }
}

pub struct Deltas<'a> {
    before: &'a Scrape,
    after: &'a Scrape,
}

impl Deltas<'_> {
    /// Asserts that `name{labels}` grew by exactly `expected`.
    #[track_caller]
    pub fn of(&self, name: &str, labels: &[(&str, &str)], expected: f64) -> &Self {
        assert_delta(self.before, self.after, name, labels, expected);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Polling with the last observation in the failure message

/// Polls `check` every `every` until it returns `Ok`; after `timeout`, panics naming `what` and
/// the last thing `check` saw.
pub async fn wait_for<F, Fut>(timeout: Duration, every: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------------------------
// hubgate with a metrics listener

/// Starts hubgate with a metrics listener (`Builder::metrics`), a token-protected API and these
/// flags.
pub async fn start_with_metrics(args: &[&str]) -> Hubgate {
    Hubgate::builder().metrics().args(args).start().await
}

/// `GET /metrics` on the metrics listener, parsed.
pub async fn scrape(gate: &Hubgate) -> Scrape {
    let resp = gate.metrics_get("/metrics").await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "GET /metrics on the metrics listener: {resp:?}\nhubgate stderr:\n{}",
        gate.logs()
    );
    assert!(
        resp.content_type().starts_with("text/plain"),
        "/metrics content type {:?}",
        resp.content_type()
    );
    Scrape::parse(&resp.text())
}

// ---------------------------------------------------------------------------------------------
// A tiny hub

struct HubState {
    service_token: String,
    /// Token → user name, for `GET /user`.
    tokens: Mutex<HashMap<String, String>>,
    /// Whether `/proxy` (the handshake) succeeds; a 500 otherwise.
    proxy_ok: AtomicBool,
    proxy_calls: AtomicUsize,
    user_calls: AtomicUsize,
    /// The connections being served, aborted when the hub stops.
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A hub API at `http://ADDR/hub/api`: `GET /hub/api` (the probe) answers 200, `/hub/api/proxy`
/// 200 or 500 as set, `GET /hub/api/user` the user of the bearer token (403 for others).
/// [`TinyHub::stop`] closes the port (connections are refused), [`TinyHub::restart`] listens
/// on the same port again.
pub struct TinyHub {
    pub addr: SocketAddr,
    state: Arc<HubState>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for TinyHub {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TinyHub {
    /// Starts a hub that accepts `service_token` as hubgate's own token and whose handshake
    /// answers 200 when `proxy_ok`, else 500.
    pub async fn start(service_token: &str, proxy_ok: bool) -> TinyHub {
        let state = Arc::new(HubState {
            service_token: service_token.to_owned(),
            tokens: Mutex::new(HashMap::new()),
            proxy_ok: AtomicBool::new(proxy_ok),
            proxy_calls: AtomicUsize::new(0),
            user_calls: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let (addr, task) =
            listen(state.clone(), "127.0.0.1:0".parse().unwrap()).expect("start the tiny hub");
        TinyHub {
            addr,
            state,
            accept: Mutex::new(Some(task)),
        }
    }

    /// `--hub-api-url` for this hub.
    pub fn api_url(&self) -> String {
        format!("http://{}/hub/api", self.addr)
    }

    pub fn add_token(&self, token: &str, user: &str) {
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), user.to_owned());
    }

    pub fn set_proxy_ok(&self, ok: bool) {
        self.state.proxy_ok.store(ok, Ordering::SeqCst);
    }

    /// Calls to `/hub/api/proxy` so far.
    pub fn proxy_calls(&self) -> usize {
        self.state.proxy_calls.load(Ordering::SeqCst)
    }

    /// Calls to `GET /hub/api/user` so far.
    pub fn user_calls(&self) -> usize {
        self.state.user_calls.load(Ordering::SeqCst)
    }

    /// Closes the listening port and every open connection.
    pub fn stop(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        for conn in self.state.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// Listens on the same port again. The stopped listener is dropped by its task being
    /// cancelled, which may take a moment: binding is retried for a bounded time.
    pub async fn restart(&self) {
        self.stop();
        let deadline = Instant::now() + WAIT;
        let task = loop {
            match listen(self.state.clone(), self.addr) {
                Ok((_, task)) => break task,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot listen on {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        *self.accept.lock().unwrap() = Some(task);
    }
}

/// Binds `addr` (reusing a port in TIME_WAIT) and serves the hub there.
fn listen(state: Arc<HubState>, addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(128)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let served = state.clone();
            let conn = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = served.clone();
                    async move { Ok::<_, Infallible>(hub_answer(req, &state)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            let mut conns = state.conns.lock().unwrap();
            conns.retain(|c| !c.is_finished());
            conns.push(conn);
        }
    });
    Ok((addr, task))
}

fn hub_reply(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

fn hub_answer(req: Request<Incoming>, state: &HubState) -> Response<Body> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, t)| t.trim().to_owned());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/hub/api" | "/hub/api/") => {
            hub_reply(StatusCode::OK, json!({"version": "5.3.0"}))
        }
        (_, "/hub/api/proxy") => {
            state.proxy_calls.fetch_add(1, Ordering::SeqCst);
            if bearer.as_deref() != Some(state.service_token.as_str()) {
                hub_reply(StatusCode::FORBIDDEN, json!({"status": 403}))
            } else if state.proxy_ok.load(Ordering::SeqCst) {
                hub_reply(StatusCode::OK, json!({}))
            } else {
                hub_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"status": 500, "message": "the tiny hub fails its handshake"}),
                )
            }
        }
        (&Method::GET, "/hub/api/user") => {
            state.user_calls.fetch_add(1, Ordering::SeqCst);
            let user = bearer.and_then(|t| state.tokens.lock().unwrap().get(&t).cloned());
            match user {
                Some(name) => hub_reply(
                    StatusCode::OK,
                    json!({
                        "kind": "user",
                        "name": name,
                        "admin": false,
                        "groups": [],
                        "scopes": ["self"],
                        "session_id": null,
                    }),
                ),
                None => hub_reply(StatusCode::FORBIDDEN, json!({"status": 403})),
            }
        }
        _ => hub_reply(StatusCode::NOT_FOUND, json!({"status": 404})),
    }
}
