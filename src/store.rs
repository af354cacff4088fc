//! Route storage behind one interface: what survives a restart, and (for shared backends) how
//! other replicas' changes arrive.
//!
//! The in-memory route table is always the source for serving requests; a store only makes its
//! changes durable. The control plane ([`crate::control`]) writes a batch to the store and
//! publishes it to the table only once the store has acknowledged it, so an acknowledged change
//! is never lost and a failed one is never half-applied.
//!
//! Backends: [`MemoryStore`] (CHP's behaviour: nothing survives), [`file::FileStore`] (the
//! embedded default of the example configuration: an append-only, checksummed log on local disk)
//! and [`redis::RedisStore`] (one table shared by several replicas; each replica's changes reach
//! the others as [`StoreEvent`]s).

pub mod file;
pub mod redis;

use std::collections::HashMap;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Map;
use serde_json::Value;

/// A store failure. The API turns it into 503.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("route store I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("route store is corrupt: {0}")]
    Corrupt(String),
    /// The store answered with an error (out of memory, read-only, a script error): nothing
    /// was applied.
    #[error("route store refused the change: {0}")]
    Refused(String),
    /// The store could not be reached: nothing was applied.
    #[error("route store is unreachable: {0}")]
    Unavailable(String),
    /// The store was asked but did not answer, or did not confirm that enough replicas have the
    /// change (`--redis-min-replicas`): the change may or may not have been applied (it reaches
    /// the table through the store's events if it was). Retrying is safe: route changes are
    /// idempotent.
    #[error("the outcome is unknown, retry (the route store may or may not have applied the change): {0}")]
    Indeterminate(String),
    /// The shared store is now another server than the one this replica's table was read from
    /// (a failover, a restart): nothing was applied. The writer reads the table again and tries
    /// again; callers never see this unless the table cannot be read.
    #[error("route store changed servers: {0}")]
    Stale(String),
    /// Another replica changed the table first: `current` is the store's version. The writer
    /// catches up and tries again; callers never see this.
    #[error("route store is at version {current}, ahead of this replica")]
    Conflict { current: u64 },
}

/// Something another replica did, delivered by a shared store in order.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// A committed batch (this replica's own come back too, and are skipped by version).
    Batch(Batch),
    /// `last_activity` that rose somewhere: the latest wins.
    Activity(HashMap<String, i64>),
    /// Credentials revoked through some replica's API.
    Revoke(Revocation),
    /// The table must be read again from the store, if this replica's is older than
    /// `version`: a change was too large to send, or the store lost its data and was refilled.
    /// `None` (history was missed, or an entry was unreadable) reloads in any case.
    Reload { version: Option<u64> },
    /// The connection to the store came back; `version` is the store's (`None` when the store
    /// has no table at all, as after a restart without persistence).
    Reconnected { version: Option<u64> },
}

/// A revocation to apply on every replica. Carries a user name, never a credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// `None` revokes everyone.
    pub user: Option<String>,
    /// Credentials and sessions issued before this (milliseconds since the epoch) are void.
    pub at_ms: i64,
}

/// Whether the store can take writes now, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    pub reachable: bool,
    pub detail: Option<String>,
}

/// One route as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRoute {
    pub key: String,
    /// The posted data, `target` included.
    pub data: Map<String, Value>,
    /// Milliseconds since the epoch.
    pub last_activity: i64,
}

impl StoredRoute {
    /// The route as a store keeps it.
    pub fn of(route: &crate::routes::Route) -> Self {
        StoredRoute {
            key: route.key().to_owned(),
            data: route.data().to_map(),
            last_activity: route.last_activity_ms(),
        }
    }
}

/// One change in a stored batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum StoredChange {
    Put(StoredRoute),
    Del { key: String },
}

/// A batch of changes that is applied whole or not at all, and the table version it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub version: u64,
    pub changes: Vec<StoredChange>,
}

/// Where a [`Store::write_routes`] landed.
#[derive(Debug, Clone, PartialEq)]
pub struct Landed {
    /// The version the batches were applied on: the one they were computed on, or a later one
    /// when other replicas changed other routes meanwhile (the batches then got the versions
    /// after theirs).
    pub on: u64,
    /// The batches that came between, oldest first, as far as the store could tell (all or
    /// none); the rest arrive as events.
    pub between: Vec<Batch>,
}

/// What a store holds at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub routes: Vec<StoredRoute>,
    pub version: u64,
    /// Whether the store can vouch for this table: only when the hub synced it once and it has
    /// been intact since. False on a first start, before any successful handshake, or after the
    /// log was lost or damaged: then the hub should be asked to sync.
    pub trusted: bool,
}

/// The interface every backend implements.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether writes keep anything. The control plane skips preparing the records of a store
    /// that would only drop them (a sync of 100 000 routes need not copy them all).
    fn keeps_writes(&self) -> bool {
        true
    }

    /// Reads the whole stored table.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>>;

    /// The table version in a shared store, to check that this replica is up to date;
    /// `None` for a store only this process writes.
    fn current_version(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// Whether a failed [`Store::load`] at start should be retried (the store is a service that
    /// may come up later) rather than end the start.
    fn retries_load(&self) -> bool {
        false
    }

    /// The events of a shared store, taken once by the control plane. `None` for a store only
    /// this process writes.
    fn events(&self) -> Option<tokio::sync::mpsc::Receiver<StoreEvent>> {
        None
    }

    /// Whether the store is reachable now.
    fn health(&self) -> StoreHealth {
        StoreHealth {
            reachable: true,
            detail: None,
        }
    }

    /// Sends a revocation to the other replicas. Nothing to do for a store of one process.
    fn publish_revocation(&self, _revocation: Revocation) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// Refills a store that lost its table with this one, unless another replica did first.
    /// Returns whether this call wrote it.
    fn refill(
        &self,
        _routes: Vec<StoredRoute>,
        _version: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }

    /// Makes batches durable, in order. `Ok` means every batch survives a crash from now on.
    fn write(&self, batches: Vec<Batch>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Like [`Store::write`], for a store shared by replicas that detects conflicts per route:
    /// the batches (computed on the table at the first one's version - 1) may be applied on top
    /// of changes other replicas made meanwhile to other routes, unless `whole_table` (a sync,
    /// which conflicts with every change). `absent` are routes the answers took as absent
    /// without changing them (a removal answered 404): a change to them between conflicts too.
    /// Answers where they landed.
    fn write_routes(
        &self,
        batches: Vec<Batch>,
        _whole_table: bool,
        _absent: Vec<String>,
    ) -> BoxFuture<'_, Result<Landed, StoreError>> {
        Box::pin(async move {
            let on = batches.first().map_or(0, |b| b.version - 1);
            self.write(batches).await.map(|()| Landed {
                on,
                between: Vec::new(),
            })
        })
    }

    /// Saves `last_activity` for some routes. Advisory: it may be lost in a crash, and a store
    /// may keep only the latest value per route.
    fn write_activity(
        &self,
        activity: HashMap<String, i64>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Records that the hub has synced this store's table (a handshake succeeded), so that a later
    /// start can vouch for it.
    fn mark_synced(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether [`Store::compact`] would be worth calling now.
    fn wants_compaction(&self) -> bool {
        false
    }

    /// Replaces the stored history with this whole table at this version.
    fn compact(
        &self,
        _routes: Vec<StoredRoute>,
        _version: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Keeps nothing: a restart starts empty, as configurable-http-proxy does.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn keeps_writes(&self) -> bool {
        false
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async { Ok(Loaded::default()) })
    }

    fn write(&self, _batches: Vec<Batch>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn write_activity(
        &self,
        _activity: HashMap<String, i64>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}
