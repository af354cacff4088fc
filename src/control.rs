//! The control plane's single writer: every route change (API posts and deletes, syncs, batches)
//! goes through one task that makes it durable in the store and only then publishes it to the
//! route table.
//!
//! One writer means no lock is held across the store's I/O and changes are ordered. Commands
//! that arrive while a write is in progress are committed together in the next write (one
//! `fsync` for the group), which is what makes durable adds fast under concurrent clients.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::routes::{Change, Outcome, Route, RouteTable, Snapshot};
use crate::store::{Batch, Store, StoreError, StoredChange};
use crate::target::Target;

/// How many queued commands one store write may commit together.
const GROUP_MAX: usize = 256;

/// How often `last_activity` is saved to a store that keeps it.
const ACTIVITY_FLUSH: Duration = Duration::from_secs(5);

/// A change request for the writer.
#[derive(Debug)]
pub enum Op {
    /// Apply these changes as one version.
    Batch(Vec<Change>),
    /// Make the table equal to `desired` (the complete table), as one version.
    Sync {
        desired: Vec<Arc<Route>>,
        dry_run: bool,
    },
}

/// What an applied (or dry-run) operation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

#[derive(Debug, Clone)]
pub struct Applied {
    /// One per change of a [`Op::Batch`], in order; empty for a sync.
    pub outcomes: Vec<Outcome>,
    pub counts: Counts,
    /// The table version after the operation.
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the route store failed, nothing was changed: {0}")]
    Store(String),
    #[error("hubgate is shutting down")]
    Closed,
}

struct Command {
    op: Op,
    reply: oneshot::Sender<Result<Applied, ControlError>>,
}

/// The handle the API uses to change routes. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::Sender<Command>,
}

impl Control {
    /// Loads the store into `table`, then starts the writer and the activity flusher.
    /// Returns the handle and whether the store could vouch for the routes it loaded.
    ///
    /// # Errors
    /// When the store cannot be read at all.
    pub async fn start(
        table: Arc<RouteTable>,
        store: Arc<dyn Store>,
        host_routing: bool,
    ) -> Result<(Control, bool), StoreError> {
        let loaded = store.load().await?;
        let mut snapshot = Snapshot::default();
        let mut changes = Vec::with_capacity(loaded.routes.len());
        for stored in loaded.routes {
            let target = match stored.data.get("target").and_then(|t| t.as_str()) {
                Some(t) => Target::parse(t),
                None => {
                    tracing::warn!(route = %stored.key, "stored route has no target; dropped");
                    continue;
                }
            };
            match target {
                Ok(target) => {
                    let route = Route::new(stored.key.into(), target, stored.data, host_routing);
                    route.set_last_activity_ms(stored.last_activity);
                    changes.push(Change::Upsert(Arc::new(route)));
                }
                Err(e) => tracing::warn!(route = %stored.key, error = %e, "stored route dropped"),
            }
        }
        let count = changes.len();
        snapshot.apply_batch(changes);
        snapshot.set_version(loaded.version);
        table.publish(snapshot);
        tracing::info!(
            store = store.name(),
            routes = count,
            version = loaded.version,
            trusted = loaded.trusted,
            "route table loaded"
        );

        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(writer(table.clone(), store.clone(), rx));
        if store.keeps_writes() {
            tokio::spawn(flush_activity(table, store));
        }
        Ok((Control { tx }, loaded.trusted))
    }

    /// Applies an operation; returns once it is durable and visible to requests.
    ///
    /// # Errors
    /// [`ControlError::Store`] when the store refused the write (nothing changed), or
    /// [`ControlError::Closed`] when the writer has stopped.
    pub async fn apply(&self, op: Op) -> Result<Applied, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command { op, reply })
            .await
            .map_err(|_| ControlError::Closed)?;
        answer.await.map_err(|_| ControlError::Closed)?
    }
}

async fn writer(table: Arc<RouteTable>, store: Arc<dyn Store>, mut rx: mpsc::Receiver<Command>) {
    while let Some(first) = rx.recv().await {
        let mut commands = vec![first];
        while commands.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(_) => break,
            }
        }
        let mut next = table.draft();
        let mut batches = Vec::new();
        let mut pending = Vec::new();
        for Command { op, reply } in commands {
            let (changes, outcomes, counts, dry_run) = match op {
                Op::Batch(changes) => {
                    let (changes, outcomes, counts) = prepare_batch(&next, changes);
                    (changes, outcomes, counts, false)
                }
                Op::Sync { desired, dry_run } => {
                    let (changes, counts) = diff(&next, desired);
                    (changes, Vec::new(), counts, dry_run)
                }
            };
            // A dry run, like every answer, goes out with its group once the writes before it
            // are durable: if they fail, so does this answer, which was computed on top of them.
            if !dry_run && !changes.is_empty() {
                let stored: Vec<StoredChange> = if store.keeps_writes() {
                    changes
                        .iter()
                        .map(|c| match c {
                            Change::Upsert(r) => StoredChange::Put(r.to_stored()),
                            Change::Remove(k) => StoredChange::Del { key: k.to_string() },
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                next.apply_batch(changes);
                batches.push(Batch {
                    version: next.version(),
                    changes: stored,
                });
            }
            let version = next.version();
            pending.push((
                reply,
                Applied {
                    outcomes,
                    counts,
                    version,
                },
            ));
        }

        let written = if batches.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let written = store.write(batches).await;
            let m = crate::metrics::get();
            m.store_write_seconds
                .observe(started.elapsed().as_secs_f64());
            match &written {
                Ok(()) => m.store_writes.with_label_values(&["ok"]).inc(),
                Err(_) => crate::metrics::store_failed(),
            }
            written
        };
        match written {
            Ok(()) => {
                table.publish(next);
                for (reply, applied) in pending {
                    let _ = reply.send(Ok(applied));
                }
            }
            Err(e) => {
                tracing::error!(store = store.name(), error = %e, "route store write failed; changes refused");
                for (reply, _) in pending {
                    let _ = reply.send(Err(ControlError::Store(e.to_string())));
                }
            }
        }

        if store.wants_compaction() {
            let snapshot = table.snapshot();
            let routes = snapshot.iter().map(|r| r.to_stored()).collect();
            if let Err(e) = store.compact(routes, snapshot.version()).await {
                tracing::error!(error = %e, "route store compaction failed; will retry");
            }
        }
    }
}

/// Drops removals of absent keys (they change nothing) and reports each change's outcome as it
/// will be once applied on `current`.
fn prepare_batch(current: &Snapshot, changes: Vec<Change>) -> (Vec<Change>, Vec<Outcome>, Counts) {
    let mut counts = Counts::default();
    let mut present: HashMap<Arc<str>, bool> = HashMap::new();
    let mut kept = Vec::with_capacity(changes.len());
    let mut outcomes = Vec::with_capacity(changes.len());
    for change in changes {
        let key: Arc<str> = match &change {
            Change::Upsert(r) => r.key().into(),
            Change::Remove(k) => k.clone(),
        };
        let exists = *present
            .entry(key.clone())
            .or_insert_with(|| current.get(&key).is_some());
        match change {
            Change::Upsert(_) => {
                outcomes.push(if exists {
                    Outcome::Replaced
                } else {
                    Outcome::Added
                });
                if exists {
                    counts.updated += 1;
                } else {
                    counts.added += 1;
                }
                present.insert(key, true);
                kept.push(change);
            }
            Change::Remove(_) if exists => {
                outcomes.push(Outcome::Removed);
                counts.removed += 1;
                present.insert(key, false);
                kept.push(change);
            }
            Change::Remove(_) => outcomes.push(Outcome::Absent),
        }
    }
    (kept, outcomes, counts)
}

/// The changes that turn `current` into `desired`. A route whose data is unchanged is left as it
/// is; one whose target is unchanged keeps its `last_activity`.
fn diff(current: &Snapshot, desired: Vec<Arc<Route>>) -> (Vec<Change>, Counts) {
    let mut counts = Counts::default();
    let mut changes = Vec::new();
    let wanted: HashSet<Arc<str>> = desired.iter().map(|r| Arc::from(r.key())).collect();
    for route in desired {
        match current.get(route.key()) {
            None => {
                counts.added += 1;
                changes.push(Change::Upsert(route));
            }
            Some(old) if old.data() == route.data() => counts.unchanged += 1,
            Some(old) => {
                if old.target().as_str() == route.target().as_str() {
                    route.set_last_activity_ms(old.last_activity_ms());
                }
                counts.updated += 1;
                changes.push(Change::Upsert(route));
            }
        }
    }
    for old in current.iter() {
        if !wanted.contains(old.key()) {
            counts.removed += 1;
            changes.push(Change::Remove(old.key().into()));
        }
    }
    (changes, counts)
}

/// Saves `last_activity` of routes that saw traffic since the last pass.
async fn flush_activity(table: Arc<RouteTable>, store: Arc<dyn Store>) {
    // What the store already has: the values just loaded from it.
    let mut saved: HashMap<Arc<str>, i64> = table
        .snapshot()
        .iter()
        .map(|r| (Arc::from(r.key()), r.last_activity_ms()))
        .collect();
    let mut tick = tokio::time::interval(ACTIVITY_FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = table.snapshot();
        let mut changed = HashMap::new();
        for route in snapshot.iter() {
            let ms = route.last_activity_ms();
            if saved.get(route.key()) != Some(&ms) {
                changed.insert(route.key().to_owned(), ms);
            }
        }
        if changed.is_empty() {
            continue;
        }
        match store.write_activity(changed.clone()).await {
            Ok(()) => {
                saved.retain(|k, _| snapshot.get(k).is_some());
                saved.extend(changed.into_iter().map(|(k, v)| (Arc::from(k), v)));
            }
            Err(e) => tracing::warn!(error = %e, "could not save last_activity; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteData;
    use crate::store::MemoryStore;

    fn route(key: &str, target: &str) -> Arc<Route> {
        let mut data = RouteData::new();
        data.insert("target".into(), target.into());
        Arc::new(Route::new(
            key.into(),
            Target::parse(target).unwrap(),
            data,
            false,
        ))
    }

    #[tokio::test]
    async fn syncs_apply_the_difference_and_keep_activity() {
        let table = Arc::new(RouteTable::new());
        let (control, trusted) = Control::start(table.clone(), Arc::new(MemoryStore), false)
            .await
            .unwrap();
        assert!(!trusted);
        let a = route("/a", "http://a/");
        a.set_last_activity_ms(1000);
        control
            .apply(Op::Batch(vec![
                Change::Upsert(a),
                Change::Upsert(route("/b", "http://b/")),
                Change::Upsert(route("/c", "http://c/")),
            ]))
            .await
            .unwrap();
        table.load().get("/a").unwrap().set_last_activity_ms(1000);

        let mut a2 = RouteData::new();
        a2.insert("target".into(), "http://a/".into());
        a2.insert("user".into(), "alice".into());
        let desired = vec![
            Arc::new(Route::new(
                "/a".into(),
                Target::parse("http://a/").unwrap(),
                a2,
                false,
            )),
            route("/b", "http://b/"),
            route("/d", "http://d/"),
        ];
        let dry = control
            .apply(Op::Sync {
                desired: desired.clone(),
                dry_run: true,
            })
            .await
            .unwrap();
        let want = Counts {
            added: 1,
            updated: 1,
            removed: 1,
            unchanged: 1,
        };
        assert_eq!(dry.counts, want);
        assert_eq!(dry.version, 1, "a dry run changes nothing");
        assert!(table.load().get("/c").is_some());

        let done = control
            .apply(Op::Sync {
                desired,
                dry_run: false,
            })
            .await
            .unwrap();
        assert_eq!(done.counts, want);
        assert_eq!(done.version, 2);
        let snap = table.snapshot();
        assert!(snap.get("/c").is_none() && snap.get("/d").is_some());
        assert_eq!(snap.get("/a").unwrap().last_activity_ms(), 1000);
        assert_eq!(snap.get("/a").unwrap().data()["user"], "alice");
    }

    #[tokio::test]
    async fn removing_absent_keys_changes_no_version() {
        let table = Arc::new(RouteTable::new());
        let (control, _) = Control::start(table.clone(), Arc::new(MemoryStore), false)
            .await
            .unwrap();
        let out = control
            .apply(Op::Batch(vec![Change::Remove("/x".into())]))
            .await
            .unwrap();
        assert_eq!(out.outcomes, vec![Outcome::Absent]);
        assert_eq!(out.version, 0);
        let out = control
            .apply(Op::Batch(vec![
                Change::Upsert(route("/x", "http://x/")),
                Change::Upsert(route("/x", "http://y/")),
                Change::Remove("/x".into()),
                Change::Remove("/x".into()),
            ]))
            .await
            .unwrap();
        assert_eq!(
            out.outcomes,
            vec![
                Outcome::Added,
                Outcome::Replaced,
                Outcome::Removed,
                Outcome::Absent
            ]
        );
        assert_eq!(out.version, 1);
    }
}
