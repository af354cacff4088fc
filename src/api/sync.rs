//! `/api/proxy`: the whole table at once. `GET` lists it (paged, or changes since a version),
//! `POST` makes it equal to a complete desired table (sync), `PATCH` applies a batch of adds and
//! removes (notify). Both writes are one version each, all-or-nothing: an invalid entry anywhere
//! is a 400 naming it and nothing changes.
//!
//! A sync body is read straight into routes, entry by entry ([`RoutesBuilder`]), never whole
//! into a `serde_json::Value`: for 100 000 routes that would be ~50 MB more at the peak of every
//! sync, on top of the table and the routes built from it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};

use super::{
    build_route, changes_since, int_param, query_param, serialize_routes, with_version, Api,
    ApiError,
};
use crate::control::{Applied, Op};
use crate::http::json;
use crate::http::ProxyBody;
use crate::routes::{Change, Route, Snapshot};

/// The media type with which JupyterHub asks for (and answers with) wrapped pages.
const PAGINATION: &str = "application/jupyterhub-pagination+json";

/// Page size when a client asks for pages without saying how large.
const DEFAULT_LIMIT: u64 = 1000;

impl Api {
    pub(super) async fn proxy_resource(
        &self,
        req: Request<Incoming>,
        methods: &'static [&'static str],
    ) -> Result<Response<ProxyBody>, ApiError> {
        self.authorize(&req)?;
        let query = req.uri().query();
        match *req.method() {
            Method::GET => {
                only_params(
                    query,
                    &["offset", "limit", "since"],
                    "offset, limit and since",
                )?;
                self.page(&req)
            }
            Method::POST => {
                only_params(query, &["dry_run"], "only dry_run")?;
                let dry_run = flag_param(query, "dry_run")?;
                let body = self
                    .read_body(req.into_body(), self.settings.max_sync_body)
                    .await?;
                self.sync_json(body, dry_run).await
            }
            Method::PATCH => {
                only_params(query, &[], "none")?;
                let body = self
                    .read_json(req.into_body(), self.settings.max_sync_body)
                    .await?;
                self.notify(body).await
            }
            _ => Err(ApiError::Method(methods)),
        }
    }

    fn page(&self, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
        let query = req.uri().query();
        let wrapped = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(PAGINATION));
        // Every parameter is checked, also those `since` makes moot: a bad one is a 400 always.
        let since = changes_since(query)?;
        let offset = int_param(query, "offset")?;
        let limit = int_param(query, "limit")?;
        let snapshot = self.table.snapshot();
        let version = snapshot.version();

        if let Some(since) = since {
            let changes = snapshot.changes_since(since).ok_or(ApiError::Gone {
                since,
                floor: snapshot.history_floor(),
            })?;
            let items = serialize_routes(changes.put.iter(), &changes.removed);
            return Ok(if wrapped {
                wrap(&items, json!({"since": since}), version)
            } else {
                with_version(json(StatusCode::OK, items), version)
            });
        }

        let sorted = snapshot.sorted();
        let total = sorted.len() as u64;
        if !wrapped && offset.is_none() && limit.is_none() {
            return Ok(with_version(
                json(StatusCode::OK, serialize_routes(sorted.iter(), &[])),
                version,
            ));
        }
        let offset = offset.unwrap_or(0);
        let limit = limit.unwrap_or(if wrapped { DEFAULT_LIMIT } else { total });
        let start = offset.min(total) as usize;
        let end = offset.saturating_add(limit).min(total) as usize;
        let items = serialize_routes(sorted[start..end].iter(), &[]);
        if !wrapped {
            return Ok(with_version(json(StatusCode::OK, items), version));
        }
        // No `next` for an empty page: following it would never move on.
        let next = (limit > 0 && end < sorted.len()).then(|| {
            json!({
                "offset": end,
                "limit": limit,
                "url": format!("/api/proxy?offset={end}&limit={limit}"),
            })
        });
        let pagination = json!({"offset": offset, "limit": limit, "total": total, "next": next});
        Ok(wrap(&items, json!({"_pagination": pagination}), version))
    }

    /// A sync from the request's JSON text. The routes are built on a blocking thread: 100 000
    /// of them take a fifth of a second, which a runtime worker should spend forwarding
    /// requests (and one thread doing every sync's building reuses one allocator arena).
    async fn sync_json(&self, body: Bytes, dry_run: bool) -> Result<Response<ProxyBody>, ApiError> {
        let builder = RoutesBuilder::new(self.settings.host_routing, Some(self.table.snapshot()));
        let desired = tokio::task::spawn_blocking(move || {
            let mut de = serde_json::Deserializer::from_slice(&body);
            let built = SyncBody(builder)
                .deserialize(&mut de)
                .and_then(|built| de.end().map(|()| built))
                .map_err(|e| ApiError::BadJson(e.to_string()))?;
            built.ok_or_else(not_routes)?.finish()
        })
        .await
        .map_err(|e| ApiError::Body(format!("the routes could not be read: {e}")))??;
        self.apply_sync(desired, dry_run).await
    }

    /// A sync from a parsed body (the same checks and answers as from its text).
    pub async fn sync(&self, body: Value, dry_run: bool) -> Result<Response<ProxyBody>, ApiError> {
        let Value::Object(entries) = body else {
            return Err(not_routes());
        };
        let mut builder =
            RoutesBuilder::new(self.settings.host_routing, Some(self.table.snapshot()));
        for (raw, data) in entries {
            builder.add(raw, data);
        }
        self.apply_sync(builder.finish()?, dry_run).await
    }

    async fn apply_sync(
        &self,
        desired: Vec<Arc<Route>>,
        dry_run: bool,
    ) -> Result<Response<ProxyBody>, ApiError> {
        let count = desired.len();
        let started = std::time::Instant::now();
        let applied = self.control.apply(Op::Sync { desired, dry_run }).await?;
        observe_change("sync", count, started);
        tracing::info!(
            routes = count,
            dry_run,
            added = applied.counts.added,
            updated = applied.counts.updated,
            removed = applied.counts.removed,
            version = applied.version,
            "sync"
        );
        Ok(summary(&applied, dry_run))
    }

    pub async fn notify(&self, body: Value) -> Result<Response<ProxyBody>, ApiError> {
        let Value::Object(mut body) = body else {
            return Err(ApiError::Invalid(
                "Body must be a JSON object: {\"add\": {...}, \"remove\": [...]}".into(),
            ));
        };
        if let Some(unknown) = body.keys().find(|k| *k != "add" && *k != "remove") {
            return Err(ApiError::Invalid(format!(
                "Unknown field '{unknown}' (expected \"add\" and \"remove\")"
            )));
        }
        let add = match body.remove("add") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(add)) => add,
            Some(_) => {
                return Err(ApiError::Invalid(
                    "'add' must be an object of routes".into(),
                ))
            }
        };
        let remove = match body.remove("remove") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(ApiError::Invalid("'remove' must be a list of paths".into())),
        };
        let mut builder = RoutesBuilder::new(self.settings.host_routing, None);
        for (raw, data) in add {
            builder.add(raw, data);
        }
        let routes = builder.finish()?;
        let mut changes = Vec::with_capacity(routes.len() + remove.len());
        for item in remove {
            let Value::String(raw) = item else {
                return Err(ApiError::Invalid(format!(
                    "'remove' must hold paths as strings, found {item}"
                )));
            };
            let key = crate::path::route_key(&raw)
                .map_err(|e| ApiError::Invalid(format!("Invalid route path '{raw}': {e}")))?;
            if routes.iter().any(|r| r.key() == key) {
                return Err(ApiError::Invalid(format!(
                    "Route '{raw}' is both added and removed"
                )));
            }
            changes.push(Change::Remove(key.into()));
        }
        changes.extend(routes.into_iter().map(Change::Upsert));
        let count = changes.len();
        let started = std::time::Instant::now();
        let applied = self.control.apply(Op::Batch(changes)).await?;
        observe_change("batch", count, started);
        tracing::info!(
            added = applied.counts.added,
            updated = applied.counts.updated,
            removed = applied.counts.removed,
            version = applied.version,
            "batch"
        );
        Ok(summary(&applied, false))
    }
}

/// Refuses a query parameter this request does not take: a misspelt `dry_run` must not turn a
/// dry run into a real sync that replaces the whole table.
fn only_params(
    query: Option<&str>,
    allowed: &[&str],
    expected: &'static str,
) -> Result<(), ApiError> {
    let Some(query) = query else { return Ok(()) };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw = pair.split_once('=').map_or(pair, |(k, _)| k);
        let name = crate::path::decode(&raw.replace('+', " "))
            .map(|n| n.into_owned())
            .unwrap_or_else(|_| raw.to_owned());
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::UnknownParam(name, expected));
        }
    }
    Ok(())
}

/// A yes-or-no query parameter; absent is no. Any value but `true`/`false`, `1`/`0`, `yes`/`no`
/// is refused rather than read as no.
fn flag_param(query: Option<&str>, name: &'static str) -> Result<bool, ApiError> {
    match query_param(query, name).as_deref() {
        None => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(_) => Err(ApiError::BadFlag(name)),
    }
}

fn not_routes() -> ApiError {
    ApiError::Invalid("Body must be a JSON object of routes: {path: {\"target\": ...}}".into())
}

/// Checks and builds the routes of a `{path: data}` object one entry at a time, as they are
/// read. The answer is the one a check of the whole parsed object gives: a path posted twice
/// keeps its first place and its last data (as a parsed JSON object does), and the first bad
/// entry in order is named, be it invalid or a second spelling of an earlier route's path.
struct RoutesBuilder {
    host_routing: bool,
    /// For a sync, the table as it was when the sync came: an entry equal to the route there is
    /// answered with that route, so that a sync that changes little keeps little new memory.
    current: Option<Arc<Snapshot>>,
    entries: Vec<Entry>,
    /// Where each route key was first seen in `entries`.
    first: HashMap<Arc<str>, usize>,
}

/// One entry of the object, in order.
struct Entry {
    /// The path as posted, when it is not the route's key as it is (to name it in errors).
    raw: Option<Box<str>>,
    built: Result<Arc<Route>, Box<ApiError>>,
}

impl Entry {
    fn raw(&self) -> &str {
        match (&self.raw, &self.built) {
            (Some(raw), _) => raw,
            (None, Ok(route)) => route.key(),
            (None, Err(_)) => "",
        }
    }
}

impl RoutesBuilder {
    fn new(host_routing: bool, current: Option<Arc<Snapshot>>) -> Self {
        RoutesBuilder {
            host_routing,
            current,
            entries: Vec::new(),
            first: HashMap::new(),
        }
    }

    fn add(&mut self, raw: String, data: Value) {
        let built = match build_route(&raw, data, self.host_routing) {
            Ok(route) => {
                let same = self
                    .current
                    .as_ref()
                    .and_then(|table| table.get(route.key()))
                    .filter(|old| old.data() == route.data());
                Ok(same.cloned().unwrap_or_else(|| Arc::new(route)))
            }
            Err(e) => Err(Box::new(ApiError::Invalid(format!("Route '{raw}': {e}")))),
        };
        let key: Arc<str> = match &built {
            Ok(route) => route.shared_key().clone(),
            Err(_) => match crate::path::route_key(&raw) {
                Ok(key) => key.into(),
                // A bad path fails the same way wherever it comes, so no later entry changes it.
                Err(_) => {
                    return self.entries.push(Entry {
                        raw: Some(raw.into()),
                        built,
                    })
                }
            },
        };
        let entry = Entry {
            raw: (built.is_err() || raw != *key).then(|| raw.into()),
            built,
        };
        match self.first.get(&key) {
            None => {
                self.first.insert(key, self.entries.len());
                self.entries.push(entry);
            }
            Some(&i) if self.entries[i].raw() == entry.raw() => self.entries[i] = entry,
            Some(&i) => {
                let duplicate = ApiError::Invalid(format!(
                    "Routes '{}' and '{}' are the same route '{key}'",
                    self.entries[i].raw(),
                    entry.raw()
                ));
                self.entries.push(Entry {
                    raw: Some(entry.raw().into()),
                    built: Err(Box::new(duplicate)),
                });
            }
        }
    }

    /// The routes, or the first entry's error.
    fn finish(self) -> Result<Vec<Arc<Route>>, ApiError> {
        self.entries
            .into_iter()
            .map(|entry| entry.built.map_err(|e| *e))
            .collect()
    }
}

/// A sync body as it is parsed: the routes of an object, or `None` for any other JSON value.
struct SyncBody(RoutesBuilder);

impl<'de> DeserializeSeed<'de> for SyncBody {
    type Value = Option<RoutesBuilder>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SyncBody {
    type Value = Option<RoutesBuilder>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of routes")
    }

    fn visit_map<M: MapAccess<'de>>(mut self, mut map: M) -> Result<Self::Value, M::Error> {
        while let Some(raw) = map.next_key::<String>()? {
            let data: Value = map.next_value()?;
            self.0.add(raw, data);
        }
        Ok(Some(self.0))
    }

    // Any other value is parsed to its end (so that bad JSON is still told as such), then refused.
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

fn observe_change(op: &str, routes: usize, started: std::time::Instant) {
    let m = crate::metrics::get();
    m.change_size
        .with_label_values(&[op])
        .observe(routes as f64);
    m.change_apply
        .with_label_values(&[op])
        .observe(started.elapsed().as_secs_f64());
}

fn summary(applied: &Applied, dry_run: bool) -> Response<ProxyBody> {
    let c = &applied.counts;
    let body = json!({
        "added": c.added,
        "updated": c.updated,
        "removed": c.removed,
        "unchanged": c.unchanged,
        "version": applied.version,
        "dry_run": dry_run,
    });
    with_version(json(StatusCode::OK, body.to_string()), applied.version)
}

/// `{"items": <items>, "version": v, ...extra}`, as a JupyterHub-style page.
fn wrap(items: &[u8], extra: Value, version: u64) -> Response<ProxyBody> {
    let mut out = Vec::with_capacity(items.len() + 128);
    out.extend_from_slice(b"{\"items\":");
    out.extend_from_slice(items);
    out.extend_from_slice(format!(",\"version\":{version}").as_bytes());
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            out.push(b',');
            out.extend_from_slice(Value::String(k).to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(v.to_string().as_bytes());
        }
    }
    out.push(b'}');
    with_version(json(StatusCode::OK, out), version)
}
