//! Prometheus metrics: what operators need to run hubgate (load, latency split into upstream time
//! and hubgate's own overhead, errors by cause, websockets, the route table and its store, the
//! auth cache and the hub), plus configurable-http-proxy's metric names with CHP's meaning so
//! existing scrapes keep working.
//!
//! One process-wide set, like the `prometheus` crate's default registry, so the data plane
//! reaches its counters without threading a handle through every constructor. Every per-request
//! series is resolved once, here, into arrays indexed by route kind, method and status class: a
//! request only does atomic adds, never a label lookup or a lock, and a scrape shares nothing with
//! the request path but those atomics. Labels are bounded: no path, user name or token ever
//! becomes a label value.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use http::Method;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::routes::{now_ms, RouteKind};

mod sharded;

use crate::upstream::FailureCause;
pub use sharded::use_worker_shard;
use sharded::Sharded;

const KINDS: [&str; 5] = ["user", "service", "hub", "other", "none"];
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// How many status codes CHP's `requests_proxy` can be labelled with (100 to 599).
const STATUSES: usize = 500;
/// Outcomes of an authentication decision, in [`AuthOutcome`] order.
const AUTH_OUTCOMES: [&str; 4] = ["allowed", "denied", "no_credentials", "hub_error"];

/// How an authentication decision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Allowed = 0,
    Denied = 1,
    NoCredentials = 2,
    HubError = 3,
}

const CAUSES: [&str; 5] = ["refused", "timeout", "reset", "tls", "other"];

/// Latency buckets, seconds: 100 µs to 30 s.
const LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// hubgate's own overhead is small: finer buckets, 5 µs to 100 ms.
const OVERHEAD: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1,
];
/// Websocket lifetimes, seconds: 1 s to a day.
const LIFETIME: &[f64] = &[1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0];
/// Sizes of syncs and batches, in routes.
const SIZES: &[f64] = &[1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0];

/// The labels of a family that has none.
const NO_LABELS: fn() -> [&'static str; 0] = || [];

/// The process's metrics.
pub struct Metrics {
    registry: Registry,

    /// The request path's series, kept as their group: only this module's methods touch them.
    traffic: Traffic,
    pub active_connections: IntGaugeVec,
    pub active_websockets: IntGauge,
    pub websockets: IntCounter,
    pub websocket_duration: Histogram,
    /// When a target last failed (ms since the epoch; 0: never). For `/api/status`.
    pub last_upstream_failure_ms: AtomicI64,
    /// Connections refused because a listener was at `--max-connections`.
    pub connections_refused: IntCounter,
    /// Client connections closed by a timeout (nothing sent after connecting, or idle).
    pub client_timeouts: IntCounter,

    pub routes: IntGauge,
    pub table_version: IntGauge,
    pub api_operations: IntCounterVec,
    pub change_size: HistogramVec,
    pub change_apply: HistogramVec,
    pub store_writes: IntCounterVec,
    pub store_write_seconds: Histogram,
    /// When the store last refused a write (ms since the epoch; 0: never). For `/api/status`.
    pub last_store_failure_ms: AtomicI64,
    /// Whether the route store answers (1) or not (0); always 1 for the memory and file stores.
    pub store_reachable: IntGauge,
    /// Writes computed again because another replica wrote first (shared store).
    pub store_conflicts: IntCounter,
    /// What other replicas did, as received from a shared store, by kind.
    pub store_events: IntCounterVec,

    auth_decisions: [IntCounter; 4],
    pub auth_cache: IntCounterVec,
    pub auth_cache_entries: IntGauge,
    pub hub_requests: IntCounterVec,
    pub hub_request_seconds: HistogramVec,

    chp_requests_web: Sharded<IntCounter>,
    chp_requests_ws: Sharded<IntCounter>,
    /// By status code, 100 to 599 (CHP's label is the code itself).
    chp_requests_proxy: Sharded<IntCounter>,
    pub chp_requests_api: IntCounterVec,
    pub chp_api_route_get: IntCounter,
    pub chp_api_route_add: IntCounter,
    pub chp_api_route_delete: IntCounter,
    chp_find_target: Sharded<Histogram>,
    pub chp_last_activity_updating: Histogram,

    pub start_time_seconds: IntGauge,
    pub certificate_expiry: IntGaugeVec,
    /// Requests refused by a limit (`crate::limits`), by limit and route kind.
    pub limit_refusals: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("a unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("a unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("a unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid metric");
    r.register(Box::new(h.clone())).expect("a unique metric");
    h
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("a valid metric");
    r.register(Box::new(h.clone())).expect("a unique metric");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("a unique metric");
    g
}

/// The request path's series: traffic, latency, bytes and failures on the public port.
struct Traffic {
    requests: Sharded<IntCounter>,
    duration: Sharded<Histogram>,
    upstream: Sharded<Histogram>,
    overhead: Sharded<Histogram>,
    request_bytes: Sharded<IntCounter>,
    response_bytes: Sharded<IntCounter>,
    upstream_errors: Vec<IntCounter>,
    no_route: IntCounter,
}

impl Traffic {
    fn register(r: &Registry) -> Self {
        let by_kind = |name: &str, help: &str| {
            Sharded::histograms(r, name, help, &["kind"], KINDS.len(), LATENCY)
        };
        let bytes =
            |name: &str, help: &str| Sharded::counters(r, name, help, &["kind"], KINDS.len());
        let errors_vec = counter_vec(
            r,
            "hubgate_upstream_errors_total",
            "Requests that failed at the target (answered 503), by cause.",
            &["cause"],
        );
        Traffic {
            requests: Sharded::counters(
                r,
                "hubgate_requests_total",
                "Requests on the public port, by route kind, method and status class.",
                &["kind", "method", "status_class"],
                KINDS.len() * METHODS.len() * CLASSES.len(),
            ),
            duration: by_kind(
                "hubgate_request_duration_seconds",
                "From a request's head arriving to its response's head leaving, by route kind.",
            ),
            upstream: by_kind(
                "hubgate_upstream_duration_seconds",
                "Time spent waiting for the target's response head, by route kind.",
            ),
            overhead: Sharded::histograms(
                r,
                "hubgate_overhead_seconds",
                "hubgate's own share of a proxied request's duration (total minus upstream).",
                &[],
                1,
                OVERHEAD,
            ),
            request_bytes: bytes(
                "hubgate_request_bytes_total",
                "Request body bytes forwarded to targets, by route kind.",
            ),
            response_bytes: bytes(
                "hubgate_response_bytes_total",
                "Response body bytes forwarded to clients, by route kind.",
            ),
            upstream_errors: CAUSES
                .iter()
                .map(|c| errors_vec.with_label_values(&[c]))
                .collect(),
            no_route: counter(
                r,
                "hubgate_no_route_total",
                "Requests no route matched (answered 404).",
            ),
        }
    }
}

/// Client connections and websocket tunnels.
struct Connections {
    active_connections: IntGaugeVec,
    active_websockets: IntGauge,
    websockets: IntCounter,
    websocket_duration: Histogram,
    connections_refused: IntCounter,
    client_timeouts: IntCounter,
}

impl Connections {
    fn register(r: &Registry) -> Self {
        Connections {
            active_connections: gauge_vec(
                r,
                "hubgate_active_connections",
                "Open client connections, by listener.",
                &["listener"],
            ),
            active_websockets: gauge(r, "hubgate_active_websockets", "Open websocket tunnels."),
            websockets: counter(
                r,
                "hubgate_websocket_connections_total",
                "Websocket tunnels opened.",
            ),
            websocket_duration: histogram(
                r,
                "hubgate_websocket_duration_seconds",
                "How long websocket tunnels stayed open.",
                LIFETIME,
            ),
            connections_refused: counter(
                r,
                "hubgate_connections_refused_total",
                "Connections answered 503 and closed because a listener was at --max-connections.",
            ),
            client_timeouts: counter(
                r,
                "hubgate_client_timeouts_total",
                "Client connections closed for sending nothing in time (--keep-alive-timeout, --timeout).",
            ),
        }
    }
}

/// The route table, its API and its store.
struct Table {
    routes: IntGauge,
    table_version: IntGauge,
    api_operations: IntCounterVec,
    change_size: HistogramVec,
    change_apply: HistogramVec,
    store_writes: IntCounterVec,
    store_write_seconds: Histogram,
    store_reachable: IntGauge,
    store_conflicts: IntCounter,
    store_events: IntCounterVec,
}

impl Table {
    fn register(r: &Registry) -> Self {
        Table {
            routes: gauge(r, "hubgate_routes", "Routes in the table."),
            table_version: gauge(
                r,
                "hubgate_route_table_version",
                "The route table's version.",
            ),
            api_operations: counter_vec(
                r,
                "hubgate_api_operations_total",
                "Route API operations, by operation and result.",
                &["op", "result"],
            ),
            change_size: histogram_vec(
                r,
                "hubgate_route_change_size",
                "Routes in each sync or batch, by operation.",
                &["op"],
                SIZES,
            ),
            change_apply: histogram_vec(
                r,
                "hubgate_route_change_apply_seconds",
                "Time to apply a sync or batch (store write included), by operation.",
                &["op"],
                LATENCY,
            ),
            store_writes: counter_vec(
                r,
                "hubgate_store_writes_total",
                "Writes to the route store, by result.",
                &["result"],
            ),
            store_write_seconds: histogram(
                r,
                "hubgate_store_write_seconds",
                "Time for one (grouped) write to the route store to be durable.",
                LATENCY,
            ),
            store_reachable: gauge(
                r,
                "hubgate_store_reachable",
                "Whether the route store answers (1) or not (0).",
            ),
            store_conflicts: counter(
                r,
                "hubgate_store_conflicts_total",
                "Writes computed again because another replica changed the table first.",
            ),
            store_events: counter_vec(
                r,
                "hubgate_store_events_total",
                "Changes of other replicas received from the shared route store, by kind.",
                &["kind"],
            ),
        }
    }
}

/// Authentication at the edge and the calls it makes to the hub.
struct AuthAndHub {
    auth_decisions: [IntCounter; 4],
    auth_cache: IntCounterVec,
    auth_cache_entries: IntGauge,
    hub_requests: IntCounterVec,
    hub_request_seconds: HistogramVec,
}

impl AuthAndHub {
    fn register(r: &Registry) -> Self {
        let decisions = counter_vec(
            r,
            "hubgate_auth_decisions_total",
            "Authentication decisions on protected routes, by outcome.",
            &["outcome"],
        );
        AuthAndHub {
            auth_decisions: AUTH_OUTCOMES.map(|o| decisions.with_label_values(&[o])),
            auth_cache: counter_vec(
                r,
                "hubgate_auth_cache_total",
                "Credential cache lookups, by result (hit, miss, coalesced, stale), and evictions.",
                &["result"],
            ),
            auth_cache_entries: gauge(r, "hubgate_auth_cache_entries", "Credentials in the cache."),
            hub_requests: counter_vec(
                r,
                "hubgate_hub_requests_total",
                "Calls to the hub's API, by endpoint and status (or error).",
                &["endpoint", "status"],
            ),
            hub_request_seconds: histogram_vec(
                r,
                "hubgate_hub_request_seconds",
                "Duration of calls to the hub's API, by endpoint.",
                &["endpoint"],
                LATENCY,
            ),
        }
    }
}

/// configurable-http-proxy's metric names, with CHP's meaning.
struct Chp {
    requests_web: Sharded<IntCounter>,
    requests_ws: Sharded<IntCounter>,
    requests_proxy: Sharded<IntCounter>,
    requests_api: IntCounterVec,
    api_route_get: IntCounter,
    api_route_add: IntCounter,
    api_route_delete: IntCounter,
    find_target: Sharded<Histogram>,
    last_activity_updating: Histogram,
}

impl Chp {
    fn register(r: &Registry) -> Self {
        Chp {
            requests_web: Sharded::counters(
                r,
                "requests_web",
                "Count of web requests (as CHP).",
                &[],
                1,
            ),
            requests_ws: Sharded::counters(
                r,
                "requests_ws",
                "Count of websocket requests (as CHP).",
                &[],
                1,
            ),
            requests_proxy: Sharded::counters(
                r,
                "requests_proxy",
                "Count of proxy requests, by status (as CHP).",
                &["status"],
                STATUSES,
            ),
            requests_api: counter_vec(
                r,
                "requests_api",
                "Count of API requests, by status (as CHP).",
                &["status"],
            ),
            api_route_get: counter(
                r,
                "api_route_get",
                "Count of API route get requests (as CHP).",
            ),
            api_route_add: counter(
                r,
                "api_route_add",
                "Count of API route add requests (as CHP).",
            ),
            api_route_delete: counter(
                r,
                "api_route_delete",
                "Count of API route delete requests (as CHP).",
            ),
            find_target: Sharded::histograms(
                r,
                "find_target_for_req",
                "Time to find a request's route, seconds (a summary in CHP).",
                &[],
                1,
                OVERHEAD,
            ),
            last_activity_updating: histogram(
                r,
                "last_activity_updating",
                "Time to record a route's activity, seconds (a summary in CHP).",
                OVERHEAD,
            ),
        }
    }
}

/// The process itself: its resources, version, start time and certificates.
struct Process {
    start_time_seconds: IntGauge,
    certificate_expiry: IntGaugeVec,
}

impl Process {
    fn register(r: &Registry) -> Self {
        let process = prometheus::process_collector::ProcessCollector::new(
            std::process::id() as i32,
            "hubgate",
        );
        r.register(Box::new(process)).expect("a unique metric");
        let build = gauge_vec(
            r,
            "hubgate_build_info",
            "Always 1; the version is a label.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let start_time_seconds = gauge(
            r,
            "hubgate_start_time_seconds",
            "When this hubgate started, seconds since the Unix epoch.",
        );
        start_time_seconds.set(chrono::Utc::now().timestamp());
        Process {
            start_time_seconds,
            certificate_expiry: gauge_vec(
                r,
                "hubgate_tls_certificate_expiry_seconds",
                "When a listener's certificate expires, seconds since the Unix epoch.",
                &["listener"],
            ),
        }
    }
}

impl Metrics {
    /// Registers every family, in groups, and lays them out flat for the code elsewhere that uses
    /// them (the request path's series stay a group: only this module uses them).
    fn new() -> Self {
        let r = Registry::new();
        let (traffic, c) = (Traffic::register(&r), Connections::register(&r));
        let (table, auth, chp) = (
            Table::register(&r),
            AuthAndHub::register(&r),
            Chp::register(&r),
        );
        let process = Process::register(&r);
        let limit_refusals = counter_vec(
            &r,
            "hubgate_limit_refusals_total",
            "Requests answered 429 by a limit, by limit and route kind.",
            &["limit", "kind"],
        );
        let m = Metrics {
            limit_refusals,
            registry: r,
            traffic,
            active_connections: c.active_connections,
            active_websockets: c.active_websockets,
            websockets: c.websockets,
            websocket_duration: c.websocket_duration,
            last_upstream_failure_ms: AtomicI64::new(0),
            connections_refused: c.connections_refused,
            client_timeouts: c.client_timeouts,
            routes: table.routes,
            table_version: table.table_version,
            api_operations: table.api_operations,
            change_size: table.change_size,
            change_apply: table.change_apply,
            store_writes: table.store_writes,
            store_write_seconds: table.store_write_seconds,
            last_store_failure_ms: AtomicI64::new(0),
            store_reachable: table.store_reachable,
            store_conflicts: table.store_conflicts,
            store_events: table.store_events,
            auth_decisions: auth.auth_decisions,
            auth_cache: auth.auth_cache,
            auth_cache_entries: auth.auth_cache_entries,
            hub_requests: auth.hub_requests,
            hub_request_seconds: auth.hub_request_seconds,
            chp_requests_web: chp.requests_web,
            chp_requests_ws: chp.requests_ws,
            chp_requests_proxy: chp.requests_proxy,
            chp_requests_api: chp.requests_api,
            chp_api_route_get: chp.api_route_get,
            chp_api_route_add: chp.api_route_add,
            chp_api_route_delete: chp.api_route_delete,
            chp_find_target: chp.find_target,
            chp_last_activity_updating: chp.last_activity_updating,
            start_time_seconds: process.start_time_seconds,
            certificate_expiry: process.certificate_expiry,
        };
        m.seed();
        m
    }

    /// One series of each lazily made family exists from the start, so every family (and its
    /// type) is in the first scrape and `rate()` has a zero to start from for the commonest
    /// traffic; the rest appear as they happen.
    fn seed(&self) {
        let user = RouteKind::User as usize;
        self.traffic
            .requests
            .get(user * METHODS.len() * CLASSES.len() + 1, || {
                [KINDS[user], METHODS[0], CLASSES[1]]
            });
        self.traffic.duration.get(user, || [KINDS[user]]);
        self.traffic.upstream.get(user, || [KINDS[user]]);
        self.request_bytes(RouteKind::User);
        self.response_bytes(RouteKind::User);
    }

    /// Records one request answered on the public port.
    pub fn request(
        &self,
        kind: RouteKind,
        method: &Method,
        status: u16,
        total: Duration,
        upstream: Option<Duration>,
        websocket: bool,
    ) {
        let m = method_index(method);
        let class = (usize::from(status / 100)).clamp(1, 5) - 1;
        let k = kind as usize;
        self.traffic
            .requests
            .get((k * METHODS.len() + m) * CLASSES.len() + class, || {
                [KINDS[k], METHODS[m], CLASSES[class]]
            })
            .inc();
        self.traffic
            .duration
            .get(k, || [KINDS[k]])
            .observe(total.as_secs_f64());
        if let Some(up) = upstream {
            self.traffic
                .upstream
                .get(k, || [KINDS[k]])
                .observe(up.as_secs_f64());
            self.traffic
                .overhead
                .get(0, NO_LABELS)
                .observe(total.saturating_sub(up).as_secs_f64());
        }
        if websocket {
            self.chp_requests_ws.get(0, NO_LABELS).inc();
        } else {
            self.chp_requests_web.get(0, NO_LABELS).inc();
        }
        if kind == RouteKind::None && status == 404 {
            self.traffic.no_route.inc();
        }
        let code = usize::from(status.clamp(100, 599));
        self.chp_requests_proxy
            .get(code - 100, || [code.to_string()])
            .inc();
    }

    pub fn auth_decision(&self, outcome: AuthOutcome) {
        self.auth_decisions[outcome as usize].inc();
    }

    pub fn lookup_time(&self, d: Duration) {
        self.chp_find_target
            .get(0, NO_LABELS)
            .observe(d.as_secs_f64());
    }

    pub fn upstream_error(&self, cause: FailureCause) {
        let i = match cause {
            FailureCause::Refused => 0,
            FailureCause::Timeout => 1,
            FailureCause::Reset => 2,
            FailureCause::Tls => 3,
            FailureCause::Other => 4,
        };
        self.traffic.upstream_errors[i].inc();
        self.last_upstream_failure_ms
            .store(now_ms(), Ordering::Relaxed);
    }

    pub fn request_bytes(&self, kind: RouteKind) -> &IntCounter {
        let k = kind as usize;
        self.traffic.request_bytes.get(k, || [KINDS[k]])
    }

    pub fn response_bytes(&self, kind: RouteKind) -> &IntCounter {
        let k = kind as usize;
        self.traffic.response_bytes.get(k, || [KINDS[k]])
    }

    /// The Prometheus text format of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        out
    }
}

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Records a hub call's duration and status (or error kind).
pub fn hub_call(endpoint: &'static str, status: &str, elapsed: Duration) {
    let m = get();
    m.hub_requests.with_label_values(&[endpoint, status]).inc();
    m.hub_request_seconds
        .with_label_values(&[endpoint])
        .observe(elapsed.as_secs_f64());
}

/// Records a failed store write for `/api/status`.
pub fn store_failed() {
    let m = get();
    m.store_writes.with_label_values(&["error"]).inc();
    m.last_store_failure_ms.store(now_ms(), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_series_is_resolved_and_rendered() {
        let m = get();
        m.request(
            RouteKind::User,
            &Method::GET,
            200,
            Duration::from_millis(3),
            Some(Duration::from_millis(2)),
            false,
        );
        m.request(
            RouteKind::None,
            &Method::POST,
            404,
            Duration::from_micros(40),
            None,
            false,
        );
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text
            .contains(r#"hubgate_requests_total{kind="user",method="GET",status_class="2xx"} "#));
        assert!(text
            .contains(r#"hubgate_requests_total{kind="none",method="POST",status_class="4xx"} "#));
        assert!(text.contains("hubgate_overhead_seconds_count"));
        assert!(text.contains("hubgate_no_route_total"));
        assert!(text.contains(r#"requests_proxy{status="200"}"#));
        assert!(text.contains("hubgate_build_info{version="));
    }
}
