//! The control plane's single writer: every route change (API posts and deletes, syncs, batches,
//! and what other replicas did, from a shared store) goes through one task that makes it durable
//! in the store and only then publishes it to the route table.
//!
//! One writer means no lock is held across the store's I/O and changes are ordered. Commands
//! that arrive while a write is in progress are committed together in the next write (one
//! `fsync` for the group), which is what makes durable adds fast under concurrent clients.
//!
//! With a shared store (Redis) the store orders the replicas' writes: a group is computed on
//! this replica's table at version `v` and committed only if nothing since `v` touched the routes
//! it changes or answered about (a sync: only if the store is still at `v`). When other replicas
//! changed other routes meanwhile, the group lands after their changes and the writer applies
//! theirs, then its own. When one touched the same routes, the writer applies what it missed from
//! the store's events (or reloads the table) and computes the group again. So every answer (201
//! or 404, the counts of a sync) is exact for the table it was applied to.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::routes::{Change, Outcome, Route, RouteTable, Snapshot};
use crate::store::{
    Batch, Landed, Loaded, Revocation, Store, StoreError, StoreEvent, StoreHealth, StoredChange,
    StoredRoute,
};
use crate::target::Target;

/// How many queued commands one store write may commit together.
const GROUP_MAX: usize = 256;

/// How often `last_activity` is saved to a store that keeps it.
const ACTIVITY_FLUSH: Duration = Duration::from_secs(5);

/// How long a group is computed again and again while other replicas keep writing first. A
/// count would not do: one attempt (catching up, then writing) takes longer on a busy machine,
/// and eight were used up in a tenth of a second with three replicas writing.
const CONFLICT_BUDGET: Duration = Duration::from_secs(5);

/// How long the writer waits for the store's events to bring it up to the store's version
/// before it reloads the whole table instead.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// A change request for the writer.
#[derive(Debug, Clone)]
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("the route store failed, nothing was changed: {0}")]
    Store(String),
    /// The outcome is unknown: the store did not answer after being asked.
    #[error("{0}")]
    Indeterminate(String),
    #[error("the route table is not loaded from the route store yet ({0})")]
    NotLoaded(String),
    #[error("other replicas kept changing the table; nothing was changed, try again")]
    Contention,
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
    store: Arc<dyn Store>,
    table: Arc<RouteTable>,
    /// `Some(trusted)` once the table is loaded from the store.
    loaded: watch::Receiver<Option<bool>>,
    revocations: broadcast::Sender<Revocation>,
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
        let trusted = loaded.trusted;
        let control = Self::spawn(table, store, host_routing, Some(loaded));
        Ok((control, trusted))
    }

    /// Starts the writer at once and loads the store in the background, retrying until the
    /// store answers. Until then the table is marked as not loaded and changes are refused.
    /// For a shared store, which may come up after hubgate.
    pub fn launch(table: Arc<RouteTable>, store: Arc<dyn Store>, host_routing: bool) -> Control {
        table.set_loaded(false);
        Self::spawn(table, store, host_routing, None)
    }

    fn spawn(
        table: Arc<RouteTable>,
        store: Arc<dyn Store>,
        host_routing: bool,
        loaded: Option<Loaded>,
    ) -> Control {
        let (tx, rx) = mpsc::channel(1024);
        let (loaded_tx, loaded_rx) = watch::channel(None);
        let (revocations, _) = broadcast::channel(256);
        let writer = Writer {
            table: table.clone(),
            store: store.clone(),
            host_routing,
            events: store.events(),
            revocations: revocations.clone(),
        };
        // A table loaded already is published before this returns, so nothing (no listener,
        // no default route) ever sees it empty.
        let pending = match loaded {
            Some(loaded) => {
                writer.loaded(loaded, &loaded_tx);
                false
            }
            None => true,
        };
        tokio::spawn(writer.run(rx, pending, loaded_tx));
        if store.keeps_writes() {
            tokio::spawn(flush_activity(
                table.clone(),
                store.clone(),
                loaded_rx.clone(),
            ));
        }
        Control {
            tx,
            store,
            table,
            loaded: loaded_rx,
            revocations,
        }
    }

    /// Waits until the table is loaded; answers whether the store vouched for it.
    pub async fn trusted(&self) -> bool {
        let mut loaded = self.loaded.clone();
        let trusted = match loaded.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(false),
            Err(_) => false,
        };
        trusted
    }

    /// Whether the store is reachable now.
    pub fn store_health(&self) -> StoreHealth {
        self.store.health()
    }

    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// Revocations that other replicas (and this one) sent through the store.
    pub fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.revocations.subscribe()
    }

    /// Sends a revocation to every replica (a no-op for a store of one process).
    ///
    /// # Errors
    /// When the store is unreachable: the other replicas did not get it.
    pub async fn publish_revocation(&self, revocation: Revocation) -> Result<(), ControlError> {
        self.store
            .publish_revocation(revocation)
            .await
            .map_err(|e| ControlError::Store(e.to_string()))
    }

    /// [`ControlError::NotLoaded`], with the store's reason, while the table waits for its
    /// store's first load.
    ///
    /// # Errors
    /// As said: until the first load.
    pub fn require_loaded(&self) -> Result<(), ControlError> {
        if self.table.is_loaded() {
            return Ok(());
        }
        let why = self
            .store
            .health()
            .detail
            .unwrap_or_else(|| "loading".to_owned());
        Err(ControlError::NotLoaded(why))
    }

    /// Applies an operation; returns once it is durable and visible to requests.
    ///
    /// # Errors
    /// [`ControlError::Store`] when the store refused the write (nothing changed),
    /// [`ControlError::Indeterminate`] when it did not answer, [`ControlError::NotLoaded`]
    /// before the first load, or [`ControlError::Closed`] when the writer has stopped.
    pub async fn apply(&self, op: Op) -> Result<Applied, ControlError> {
        self.require_loaded()?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command { op, reply })
            .await
            .map_err(|_| ControlError::Closed)?;
        answer.await.map_err(|_| ControlError::Closed)?
    }
}

/// The single writer and what it needs.
struct Writer {
    table: Arc<RouteTable>,
    store: Arc<dyn Store>,
    host_routing: bool,
    events: Option<mpsc::Receiver<StoreEvent>>,
    revocations: broadcast::Sender<Revocation>,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        pending: bool,
        loaded_tx: watch::Sender<Option<bool>>,
    ) {
        if pending {
            let loaded = self.load_until_it_answers().await;
            self.loaded(loaded, &loaded_tx);
        }

        loop {
            tokio::select! {
                biased;
                Some(event) = next_event(&mut self.events) => self.on_event(event).await,
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let mut commands = vec![first];
                    while commands.len() < GROUP_MAX {
                        match rx.try_recv() {
                            Ok(c) => commands.push(c),
                            Err(_) => break,
                        }
                    }
                    self.commit(commands).await;
                    if self.store.wants_compaction() {
                        let snapshot = self.table.snapshot();
                        let routes = snapshot.iter().map(|r| StoredRoute::of(r)).collect();
                        if let Err(e) = self.store.compact(routes, snapshot.version()).await {
                            tracing::error!(error = %e, "route store compaction failed; will retry");
                        }
                    }
                }
            }
        }
    }

    /// Publishes the first load and says so.
    fn loaded(&self, loaded: Loaded, loaded_tx: &watch::Sender<Option<bool>>) {
        let trusted = loaded.trusted;
        self.install(loaded, true);
        self.table.set_loaded(true);
        let _ = loaded_tx.send(Some(trusted));
    }

    async fn load_until_it_answers(&self) -> Loaded {
        let mut wait = Duration::from_millis(200);
        loop {
            match self.store.load().await {
                Ok(loaded) => return loaded,
                Err(e) => {
                    tracing::warn!(
                        store = self.store.name(),
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "cannot load routes yet: not ready until the route store answers"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Makes the table equal to a loaded one. Routes whose data did not change stay as they
    /// are; `last_activity` is the later of the two.
    fn install(&self, loaded: Loaded, first: bool) {
        let current = self.table.snapshot();
        let mut changes = Vec::with_capacity(loaded.routes.len());
        for stored in loaded.routes {
            if let Some(old) = current.get(&stored.key) {
                if old.data() == &stored.data {
                    old.merge_last_activity_ms(stored.last_activity);
                    changes.push(Change::Upsert(old.clone()));
                    continue;
                }
            }
            if let Some(route) = self.route_of(stored) {
                if let Some(old) = current.get(route.key()) {
                    route.merge_last_activity_ms(old.last_activity_ms());
                }
                changes.push(Change::Upsert(Arc::new(route)));
            }
        }
        let count = changes.len();
        let mut snapshot = Snapshot::default();
        snapshot.apply_batch(changes);
        snapshot.set_version(loaded.version);
        self.table.publish(snapshot);
        tracing::info!(
            store = self.store.name(),
            routes = count,
            version = loaded.version,
            trusted = loaded.trusted,
            "{}",
            if first {
                "route table loaded"
            } else {
                "route table reloaded from the store"
            }
        );
    }

    /// A stored route as a table route; `None` (logged) when its target is unusable.
    fn route_of(&self, stored: StoredRoute) -> Option<Route> {
        let target = match stored.data.get("target").and_then(|t| t.as_str()) {
            Some(t) => Target::parse(t),
            None => {
                tracing::warn!(route = %stored.key, "stored route has no target; dropped");
                return None;
            }
        };
        match target {
            Ok(target) => {
                let route = Route::new(stored.key.into(), target, stored.data, self.host_routing);
                route.set_last_activity_ms(stored.last_activity);
                Some(route)
            }
            Err(e) => {
                tracing::warn!(route = %stored.key, error = %e, "stored route dropped");
                None
            }
        }
    }

    /// Commits a group of commands, computing it again after conflicts with other replicas.
    async fn commit(&mut self, commands: Vec<Command>) {
        let (ops, replies): (Vec<Op>, Vec<_>) =
            commands.into_iter().map(|c| (c.op, c.reply)).unzip();
        let mut outcome = Err(ControlError::Contention);
        let deadline = tokio::time::Instant::now() + CONFLICT_BUDGET;
        let mut conflicts = 0usize;
        // A sync makes the whole table: it conflicts with any change that came between. Batches
        // conflict only with changes to the same routes (in a shared store that can tell).
        let whole_table = ops.iter().any(|op| matches!(op, Op::Sync { .. }));
        while tokio::time::Instant::now() < deadline {
            let base = self.table.load().version();
            let (next, batches, answers, absent) = self.prepare(&ops);
            let mut own = None;
            let written = if batches.is_empty() {
                // Nothing to write (removing an absent route, an unchanged sync, a dry run):
                // the answer was computed on this replica's table, so with a shared store make
                // sure no other replica changed it meanwhile: a route added through another
                // replica a moment ago must not be answered 404 here.
                match self.store.current_version().await {
                    Ok(Some(current)) if current != next.version() => {
                        Err(StoreError::Conflict { current })
                    }
                    Err(e @ StoreError::Stale(_)) => Err(e),
                    // Unreachable: answer from this replica's table, which is what it serves.
                    _ => Ok(Landed {
                        on: base,
                        between: Vec::new(),
                    }),
                }
            } else {
                let started = std::time::Instant::now();
                // Kept to apply after what came between, should the store put them there.
                own = (!whole_table).then(|| batches.clone());
                let written = self.store.write_routes(batches, whole_table, absent).await;
                let m = crate::metrics::get();
                m.store_write_seconds
                    .observe(started.elapsed().as_secs_f64());
                match &written {
                    Ok(_) => m.store_writes.with_label_values(&["ok"]).inc(),
                    Err(StoreError::Conflict { .. }) => {}
                    Err(_) => crate::metrics::store_failed(),
                }
                written
            };
            outcome = match written {
                Ok(landed) if landed.on == base => {
                    self.table.publish(next);
                    Ok(answers)
                }
                Ok(landed) => {
                    // Other replicas changed other routes meanwhile: these batches were applied
                    // after theirs, with the versions after theirs. The answers hold (no change
                    // between touched these routes); the table takes theirs, then these.
                    let shift = landed.on.saturating_sub(base);
                    self.apply_landed(landed, own.take().unwrap_or_default())
                        .await;
                    Ok(answers
                        .into_iter()
                        .map(|mut a| {
                            a.version += shift;
                            a
                        })
                        .collect())
                }
                Err(StoreError::Conflict { current }) => {
                    tracing::debug!(
                        current,
                        local = self.table.load().version(),
                        "another replica wrote first; catching up"
                    );
                    conflicts += 1;
                    crate::metrics::get().store_conflicts.inc();
                    self.catch_up(current).await;
                    self.apply_received_events().await;
                    continue;
                }
                Err(StoreError::Stale(why)) => {
                    tracing::info!(why = %why, "reading the table again before writing");
                    if let Err(e) = self.resync().await {
                        Err(ControlError::Store(e.to_string()))
                    } else {
                        self.apply_received_events().await;
                        continue;
                    }
                }
                Err(e @ StoreError::Indeterminate(_)) => {
                    tracing::error!(store = self.store.name(), error = %e, "route store did not answer a write");
                    Err(ControlError::Indeterminate(e.to_string()))
                }
                Err(e) => {
                    tracing::error!(store = self.store.name(), error = %e, "route store write failed; changes refused");
                    Err(ControlError::Store(e.to_string()))
                }
            };
            break;
        }
        match outcome {
            Ok(answers) => {
                for (reply, applied) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(applied));
                }
            }
            Err(e) => {
                if matches!(e, ControlError::Contention) {
                    tracing::warn!(
                        conflicts,
                        "gave up a write: other replicas kept writing first"
                    );
                }
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Brings the table to where a write that [`Landed`] after other replicas' changes left the
    /// store: their batches, then `own` with the versions they got. From what the store told
    /// when it had it all, else from the store's events (or a reload).
    async fn apply_landed(&mut self, landed: Landed, own: Vec<Batch>) {
        let target = landed.on + own.len() as u64;
        let base = self.table.load().version();
        if landed.between.len() as u64 == landed.on.saturating_sub(base) {
            let own = own
                .into_iter()
                .zip(landed.on + 1..)
                .map(|(b, version)| Batch {
                    version,
                    changes: b.changes,
                });
            for batch in landed.between.into_iter().chain(own) {
                self.apply_event(StoreEvent::Batch(batch)).await;
            }
        }
        self.catch_up(target).await;
    }

    /// The next table, the batches that make it, and each command's answer.
    /// Also answers the routes whose absence an answer relied on (a removal answered 404), which
    /// the batches do not change but which must not have changed in the store either.
    fn prepare(&self, ops: &[Op]) -> (Snapshot, Vec<Batch>, Vec<Applied>, Vec<String>) {
        let keeps = self.store.keeps_writes();
        let mut next = self.table.draft();
        let mut batches = Vec::new();
        let mut answers = Vec::with_capacity(ops.len());
        let mut absent = Vec::new();
        for op in ops {
            let (changes, outcomes, counts, dry_run) = match op.clone() {
                Op::Batch(changes) => {
                    let (changes, outcomes, counts) = prepare_batch(&next, changes, &mut absent);
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
                let stored: Vec<StoredChange> = if keeps {
                    changes
                        .iter()
                        .map(|c| match c {
                            Change::Upsert(r) => StoredChange::Put(StoredRoute::of(r)),
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
            answers.push(Applied {
                outcomes,
                counts,
                version: next.version(),
            });
        }
        (next, batches, answers, absent)
    }

    /// Brings the table up to the store's version `current`: from the store's events if they
    /// arrive soon, else by reloading it.
    async fn catch_up(&mut self, current: u64) {
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        while self.table.load().version() < current {
            let event = match &mut self.events {
                Some(events) => tokio::time::timeout_at(deadline, events.recv()).await,
                None => break,
            };
            match event {
                Ok(Some(event)) => self.on_event(event).await,
                _ => break,
            }
        }
        if self.table.load().version() != current {
            let _ = self.resync().await;
        }
    }

    /// Applies the store's events that have already arrived, without waiting for more: a group
    /// computed again after a conflict starts from the freshest table this replica can have.
    async fn apply_received_events(&mut self) {
        loop {
            let event = match &mut self.events {
                Some(events) => events.try_recv().ok(),
                None => None,
            };
            match event {
                Some(event) => self.on_event(event).await,
                None => return,
            }
        }
    }

    /// Counts an event from the store and applies it.
    async fn on_event(&mut self, event: StoreEvent) {
        let kind = match &event {
            StoreEvent::Batch(_) => "batch",
            StoreEvent::Activity(_) => "activity",
            StoreEvent::Revoke(_) => "revoke",
            StoreEvent::Reload { .. } => "reload",
            StoreEvent::Reconnected { .. } => "reconnected",
        };
        crate::metrics::get()
            .store_events
            .with_label_values(&[kind])
            .inc();
        self.apply_event(event).await;
    }

    /// Applies one event (from the store's log, or handed back by a write that landed after
    /// other replicas' changes).
    async fn apply_event(&mut self, event: StoreEvent) {
        let local = self.table.load().version();
        match event {
            StoreEvent::Batch(batch) if batch.version <= local => {}
            StoreEvent::Batch(batch) if batch.version == local + 1 => {
                let changes = batch
                    .changes
                    .into_iter()
                    .filter_map(|c| match c {
                        StoredChange::Put(stored) => {
                            self.route_of(stored).map(|r| Change::Upsert(Arc::new(r)))
                        }
                        StoredChange::Del { key } => Some(Change::Remove(key.into())),
                    })
                    .collect::<Vec<_>>();
                let mut next = self.table.draft();
                // Keep the activity of routes replaced with the same target, as a local
                // replacement does.
                for change in &changes {
                    if let Change::Upsert(route) = change {
                        if let Some(old) = next.get(route.key()) {
                            if old.target().as_str() == route.target().as_str() {
                                route.merge_last_activity_ms(old.last_activity_ms());
                            }
                        }
                    }
                }
                next.apply_batch(changes);
                self.table.publish(next);
            }
            StoreEvent::Batch(batch) => {
                tracing::info!(
                    local,
                    store = batch.version,
                    "missed changes from the store; reloading"
                );
                let _ = self.resync().await;
            }
            StoreEvent::Activity(raised) => {
                let snapshot = self.table.load();
                for (key, ms) in raised {
                    if let Some(route) = snapshot.get(&key) {
                        route.merge_last_activity_ms(ms);
                    }
                }
            }
            StoreEvent::Revoke(revocation) => {
                let _ = self.revocations.send(revocation);
            }
            // This replica's own large batch comes back as a marker: nothing to read.
            StoreEvent::Reload { version: Some(v) } if v <= local => {}
            // A failed reload is logged; the next event or write tries again.
            StoreEvent::Reload { .. } => drop(self.resync().await),
            StoreEvent::Reconnected { version } => match version {
                None if local > 0 => drop(self.resync().await),
                Some(v) if v < local => drop(self.resync().await),
                _ => {}
            },
        }
    }

    /// Makes the table equal to the store's, or, when the store lost its table (restarted
    /// without persistence), fills it with this replica's.
    ///
    /// # Errors
    /// When the store cannot be read (the current table is kept).
    async fn resync(&mut self) -> Result<(), StoreError> {
        let loaded = match self.store.load().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload routes from the store; keeping the current table until it answers");
                return Err(e);
            }
        };
        let local = self.table.snapshot();
        if loaded.version == 0 && loaded.routes.is_empty() && local.version() > 0 {
            let routes = local.iter().map(|r| StoredRoute::of(r)).collect();
            match self.store.refill(routes, local.version()).await {
                Ok(true) => {
                    tracing::warn!(
                        routes = local.len(),
                        version = local.version(),
                        "the route store had lost its table; filled it again from this replica's"
                    );
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refill the route store");
                    return Err(e);
                }
            }
            // Another replica refilled it first: take theirs.
            return match self.store.load().await {
                Ok(l) => {
                    self.install(l, false);
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload routes from the store");
                    Err(e)
                }
            };
        }
        self.install(loaded, false);
        Ok(())
    }
}

async fn next_event(events: &mut Option<mpsc::Receiver<StoreEvent>>) -> Option<StoreEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Drops removals of absent keys (they change nothing) and reports each change's outcome as it
/// will be once applied on `current`.
/// The keys of removals answered [`Outcome::Absent`] are added to `absent`.
fn prepare_batch(
    current: &Snapshot,
    changes: Vec<Change>,
    absent: &mut Vec<String>,
) -> (Vec<Change>, Vec<Outcome>, Counts) {
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
            Change::Remove(key) => {
                outcomes.push(Outcome::Absent);
                absent.push(key.to_string());
            }
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
async fn flush_activity(
    table: Arc<RouteTable>,
    store: Arc<dyn Store>,
    mut loaded: watch::Receiver<Option<bool>>,
) {
    if loaded.wait_for(Option::is_some).await.is_err() {
        return;
    }
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
