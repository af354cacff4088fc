//! `/api/proxy`: the whole table at once. `GET` lists it (paged, or changes since a version),
//! `POST` makes it equal to a complete desired table (sync), `PATCH` applies a batch of adds and
//! removes (notify). Both writes are one version each, all-or-nothing: an invalid entry anywhere
//! is a 400 naming it and nothing changes.

use std::collections::HashMap;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::{changes_since, int_param, query_param, serialize_routes, with_version, Api, ApiError};
use crate::control::{Applied, Op};
use crate::proxy::json;
use crate::routes::{Change, Route};
use crate::upstream::ProxyBody;

/// The media type with which JupyterHub asks for (and answers with) wrapped pages.
const PAGINATION: &str = "application/jupyterhub-pagination+json";

/// Page size when a client asks for pages without saying how large.
const DEFAULT_LIMIT: u64 = 1000;

impl Api {
    pub(super) async fn proxy_resource(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ApiError> {
        let method = req.method().clone();
        if !matches!(method, Method::GET | Method::POST | Method::PATCH) {
            return Err(ApiError::Method);
        }
        self.authorize(&req)?;
        match method {
            Method::GET => self.page(&req),
            Method::POST => {
                let dry_run = matches!(
                    query_param(req.uri().query(), "dry_run").as_deref(),
                    Some("true" | "1" | "yes")
                );
                let body = self
                    .read_json(req.into_body(), self.settings.max_sync_body)
                    .await?;
                self.sync(body, dry_run).await
            }
            _ => {
                let body = self
                    .read_json(req.into_body(), self.settings.max_sync_body)
                    .await?;
                self.notify(body).await
            }
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
        let snapshot = self.table.snapshot();
        let version = snapshot.version();

        if let Some(since) = changes_since(query)? {
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

        let offset = int_param(query, "offset")?;
        let limit = int_param(query, "limit")?;
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

    async fn sync(&self, body: Value, dry_run: bool) -> Result<Response<ProxyBody>, ApiError> {
        let Value::Object(entries) = body else {
            return Err(ApiError::Invalid(
                "Body must be a JSON object of routes: {path: {\"target\": ...}}".into(),
            ));
        };
        let desired = self.build_routes(entries)?;
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

    async fn notify(&self, body: Value) -> Result<Response<ProxyBody>, ApiError> {
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
        let routes = self.build_routes(add)?;
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

    /// Checks and builds every route of a `{path: data}` object, naming the first bad entry.
    fn build_routes(&self, entries: Map<String, Value>) -> Result<Vec<Arc<Route>>, ApiError> {
        let mut seen: HashMap<String, String> = HashMap::with_capacity(entries.len());
        let mut routes = Vec::with_capacity(entries.len());
        for (raw, data) in entries {
            let route = self
                .build_route(&raw, data)
                .map_err(|e| ApiError::Invalid(format!("Route '{raw}': {e}")))?;
            if let Some(first) = seen.insert(route.key().to_owned(), raw.clone()) {
                return Err(ApiError::Invalid(format!(
                    "Routes '{first}' and '{raw}' are the same route '{}'",
                    route.key()
                )));
            }
            routes.push(Arc::new(route));
        }
        Ok(routes)
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
