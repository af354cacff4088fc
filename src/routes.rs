//! The route table: the one place the data plane (every request) and the control plane (route
//! updates from the hub) meet.
//!
//! Readers take an immutable [`Snapshot`] through `arc-swap`: a lookup is one atomic load plus a
//! few hash probes, and never waits for a writer. Writers build the next snapshot and swap it in,
//! so a batch of changes is seen whole or not at all. The map inside a snapshot is a persistent
//! hash trie ([`map`]): a new snapshot shares all untouched nodes with the old one, so a write
//! costs O(log n) instead of copying 100 000 routes (the `routes` bench compares both).
//!
//! A table may hold 100 000 routes, so a route is kept small: its data in [`RouteData`] rather
//! than a `serde_json::Map`, its target parsed once into offsets of one string.
//!
//! `last_activity` is an atomic inside each [`Route`], shared by every snapshot that holds the
//! route, so traffic moves it without a lock and without a new snapshot.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::path;
use crate::target::Target;

mod data;
mod map;

pub use data::{DataValue, RouteData};
use map::RouteMap;

/// Which sort of route a request went to: decides its metrics label and its limits. A bounded
/// label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    User = 0,
    Service = 1,
    Hub = 2,
    Other = 3,
    /// No route matched.
    None = 4,
}

/// One route: a key, where it goes, and what the client said about it.
#[derive(Debug)]
pub struct Route {
    key: Arc<str>,
    target: Target,
    data: RouteData,
    last_activity_ms: AtomicI64,
    /// The table version that put this route in; set once, when its batch is applied.
    version: AtomicU64,
    /// Segments of the key that belong to the request path (the host segment under host routing
    /// does not), for `--no-include-prefix`.
    path_depth: u32,
    /// What the route serves, for metric labels.
    kind: RouteKind,
}

impl Route {
    /// Builds a route whose `last_activity` is now.
    ///
    /// `data` (a [`RouteData`] or a `serde_json::Map`) must hold `target` as a string; it is the
    /// caller's job (the API) to check that and to have parsed it into `target`.
    pub fn new(
        key: Arc<str>,
        target: Target,
        data: impl Into<RouteData>,
        host_routing: bool,
    ) -> Self {
        let data = data.into();
        let depth = u32::try_from(path::depth(&key)).unwrap_or(u32::MAX);
        let path_depth = if host_routing {
            depth.saturating_sub(1)
        } else {
            depth
        };
        let kind = if data.get("user").is_some_and(|v| v.is_string()) {
            RouteKind::User
        } else if data.get("service").is_some_and(|v| v.is_string()) {
            RouteKind::Service
        } else if data.get("hub").and_then(|v| v.as_bool()) == Some(true) {
            RouteKind::Hub
        } else {
            RouteKind::Other
        };
        Route {
            key,
            path_depth,
            target,
            data,
            kind,
            last_activity_ms: AtomicI64::new(now_ms()),
            version: AtomicU64::new(0),
        }
    }

    /// A copy not yet in any table, with the same `last_activity`.
    fn renewed(&self) -> Route {
        Route {
            key: self.key.clone(),
            target: self.target.clone(),
            data: self.data.clone(),
            last_activity_ms: AtomicI64::new(self.last_activity_ms()),
            version: AtomicU64::new(0),
            path_depth: self.path_depth,
            kind: self.kind,
        }
    }

    /// The table version whose batch added or last replaced this route.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key, shared rather than copied.
    pub fn shared_key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn data(&self) -> &RouteData {
        &self.data
    }

    pub fn kind(&self) -> RouteKind {
        self.kind
    }

    pub fn path_depth(&self) -> usize {
        self.path_depth as usize
    }

    /// Milliseconds since the Unix epoch of the last traffic through this route.
    pub fn last_activity_ms(&self) -> i64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// Records traffic now. Called per body frame, so it only writes when the millisecond moved:
    /// concurrent requests on one route then mostly read a shared cache line instead of fighting
    /// over it.
    pub fn touch(&self) {
        let now = now_ms();
        if now > self.last_activity_ms.load(Ordering::Relaxed) {
            self.last_activity_ms.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Sets `last_activity` (used when a replacement keeps the old route's activity).
    pub fn set_last_activity_ms(&self, ms: i64) {
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Raises `last_activity` to `ms` unless it is later already (activity seen by another
    /// replica: the latest wins).
    pub fn merge_last_activity_ms(&self, ms: i64) {
        self.last_activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The route as the API shows it: the posted data plus `last_activity`.
    pub fn to_json(&self) -> Value {
        let mut obj = self.data.to_map();
        obj.insert(
            "last_activity".to_owned(),
            Value::String(format_timestamp(self.last_activity_ms())),
        );
        Value::Object(obj)
    }
}

/// Milliseconds since the Unix epoch. Read twice per proxied request, so it does without
/// chrono's calendar arithmetic (which cost ~170 instructions per call in `budget.sh`).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// ISO-8601 UTC with milliseconds, as CHP (JavaScript's `Date.toISOString`) writes it.
pub fn format_timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// One change to the table.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace the route at its key.
    Upsert(Arc<Route>),
    /// Remove the route at this key, if there is one.
    Remove(Arc<str>),
}

/// What applying a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Replaced,
    Removed,
    /// A removal of a key that was not there.
    Absent,
}

/// How many removals a snapshot remembers for "changes since version" queries.
const TOMBSTONES: usize = 100_000;

/// An immutable view of the whole table.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Hashed with foldhash rather than SipHash: a lookup hashes up to one prefix per path
    /// segment, and the keys come from the hub, not from clients, so flooding resistance buys
    /// nothing here.
    routes: RouteMap,
    /// How many keys have each depth; its length bounds how deep a lookup starts probing.
    depth_counts: Vec<usize>,
    /// The route at `/`, where every unmatched path ends: kept at hand, not looked up.
    root: Option<Arc<Route>>,
    version: u64,
    /// Recent removals in version order, for "changes since version".
    tombstones: imbl::Vector<(u64, Arc<str>)>,
    /// Changes since a version below this cannot be told: removals before it were forgotten.
    history_floor: u64,
    /// The routes sorted by key, built on first use (listing, paging) and kept with the snapshot.
    sorted: OnceLock<Arc<Vec<Arc<Route>>>>,
}

impl Clone for Snapshot {
    /// A copy to modify: shares every node with this one but not the sorted cache.
    fn clone(&self) -> Self {
        Snapshot {
            routes: self.routes.clone(),
            depth_counts: self.depth_counts.clone(),
            version: self.version,
            tombstones: self.tombstones.clone(),
            history_floor: self.history_floor,
            root: self.root.clone(),
            sorted: OnceLock::new(),
        }
    }
}

/// What changed after a version: routes put since then, and keys removed since then (and not
/// put back).
#[derive(Debug)]
pub struct ChangesSince {
    pub put: Vec<Arc<Route>>,
    pub removed: Vec<Arc<str>>,
}

impl Snapshot {
    /// The route for a canonical lookup path: the longest key that is a whole-segment prefix.
    pub fn lookup(&self, lookup: &str) -> Option<&Arc<Route>> {
        let max_depth = self.depth_counts.len().saturating_sub(1);
        // Byte offsets of the `/` that starts each segment; a prefix of k segments ends at the
        // (k+1)-th one. Paths deeper than any key are cut to the deepest key's depth first.
        let mut ends: [usize; 32] = [0; 32];
        let mut n = 0;
        for (i, b) in lookup.bytes().enumerate().skip(1) {
            if b == b'/' {
                if n == ends.len() {
                    return self.lookup_slow(lookup);
                }
                ends[n] = i;
                n += 1;
            }
        }
        let depth = if lookup == "/" { 0 } else { n + 1 };
        let mut k = depth.min(max_depth);
        while k > 0 {
            // No key has this many segments: nothing to probe.
            if self.depth_counts[k] == 0 {
                k -= 1;
                continue;
            }
            let end = if k == depth {
                lookup.len()
            } else {
                ends[k - 1]
            };
            if let Some(route) = self.routes.get(&lookup[..end]) {
                return Some(route);
            }
            k -= 1;
        }
        self.root.as_ref()
    }

    /// The same search for paths with more than 32 segments.
    fn lookup_slow(&self, lookup: &str) -> Option<&Arc<Route>> {
        let mut prefix = lookup;
        loop {
            if let Some(route) = self.routes.get(prefix) {
                return Some(route);
            }
            match prefix.rfind('/') {
                Some(0) | None => return self.root.as_ref(),
                Some(i) => prefix = &prefix[..i],
            }
        }
    }

    /// The route stored at exactly this key.
    pub fn get(&self, key: &str) -> Option<&Arc<Route>> {
        self.routes.get(key)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.len() == 0
    }

    /// Bumped by every applied batch.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    /// The oldest version [`Snapshot::changes_since`] can answer for.
    pub fn history_floor(&self) -> u64 {
        self.history_floor
    }

    /// All routes sorted by key; computed once per snapshot.
    pub fn sorted(&self) -> Arc<Vec<Arc<Route>>> {
        self.sorted
            .get_or_init(|| {
                let mut all: Vec<Arc<Route>> = self.routes.values().cloned().collect();
                all.sort_unstable_by(|a, b| a.key().cmp(b.key()));
                Arc::new(all)
            })
            .clone()
    }

    /// What changed after `version`, or `None` when this snapshot no longer remembers that far.
    pub fn changes_since(&self, version: u64) -> Option<ChangesSince> {
        if version < self.history_floor {
            return None;
        }
        let put: Vec<Arc<Route>> = self
            .sorted()
            .iter()
            .filter(|r| r.version() > version)
            .cloned()
            .collect();
        let mut removed: Vec<Arc<str>> = self
            .tombstones
            .iter()
            .rev()
            .take_while(|(v, _)| *v > version)
            .filter(|(_, key)| self.routes.get(key).is_none())
            .map(|(_, key)| key.clone())
            .collect();
        removed.sort_unstable();
        removed.dedup();
        Some(ChangesSince { put, removed })
    }

    /// Applies one batch as one new version and returns what each change did, in order.
    pub fn apply_batch(&mut self, changes: Vec<Change>) -> Vec<Outcome> {
        // The sorted list belongs to the table as it was: a listing (or "changes since") of the
        // changed table must not be answered from it.
        self.sorted.take();
        self.version += 1;
        let outcomes = changes.into_iter().map(|c| self.apply(c)).collect();
        while self.tombstones.len() > TOMBSTONES {
            if let Some((v, _)) = self.tombstones.pop_front() {
                self.history_floor = v;
            }
        }
        outcomes
    }

    /// Starts the version count at a stored version (at load).
    pub fn set_version(&mut self, version: u64) {
        self.version = version;
        self.history_floor = version;
    }

    fn apply(&mut self, change: Change) -> Outcome {
        match change {
            Change::Upsert(mut route) => {
                // A route that a table holds already (one a sync found unchanged, replaced by
                // another write before the sync was applied) goes in as a copy: the snapshots
                // that hold it keep seeing the version they put it in.
                if route.version() != 0 {
                    route = Arc::new(route.renewed());
                }
                route.version.store(self.version, Ordering::Relaxed);
                let depth = path::depth(route.key());
                if route.key() == "/" {
                    self.root = Some(route.clone());
                }
                match self.routes.insert(route) {
                    Some(_) => Outcome::Replaced,
                    None => {
                        if self.depth_counts.len() <= depth {
                            self.depth_counts.resize(depth + 1, 0);
                        }
                        self.depth_counts[depth] += 1;
                        Outcome::Added
                    }
                }
            }
            Change::Remove(key) => match self.routes.remove(&key) {
                Some(_) => {
                    if &*key == "/" {
                        self.root = None;
                    }
                    self.tombstones.push_back((self.version, key.clone()));
                    let depth = path::depth(&key);
                    self.depth_counts[depth] -= 1;
                    while self.depth_counts.last() == Some(&0) {
                        self.depth_counts.pop();
                    }
                    Outcome::Removed
                }
                None => Outcome::Absent,
            },
        }
    }
}

/// The live table: lock-free reads, serialised writes.
#[derive(Debug, Default)]
pub struct RouteTable {
    current: ArcSwap<Snapshot>,
    /// Serialises writers so none loses another's change between load and swap. Held only for
    /// the in-memory update (never across an await); readers never touch it.
    writer: Mutex<()>,
    /// Set while the table waits for its store's first load (a shared store that is not
    /// reachable yet): a request that finds no route is then told to come back, not 404.
    unloaded: std::sync::atomic::AtomicBool,
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot. Cheap; hold it for the length of one request at most.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// A snapshot that may be kept (for listing the table while it changes).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies a batch atomically and returns what each change did, in order.
    pub fn apply(&self, changes: Vec<Change>) -> Vec<Outcome> {
        let _guard = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Snapshot::clone(&self.current.load());
        let outcomes = next.apply_batch(changes);
        self.current.store(Arc::new(next));
        outcomes
    }

    /// Replaces the table with a snapshot built from the current one (see [`RouteTable::draft`]).
    /// Only the control plane's single writer calls this, so no change is lost between the two.
    pub fn publish(&self, next: Snapshot) {
        let _guard = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.current.store(Arc::new(next));
    }

    /// A modifiable copy of the current snapshot, for the control plane's writer.
    pub fn draft(&self) -> Snapshot {
        Snapshot::clone(&self.current.load())
    }

    /// Whether the table holds what its store has (false only while a shared store's first
    /// load is pending).
    pub fn is_loaded(&self) -> bool {
        !self.unloaded.load(Ordering::Acquire)
    }

    /// Marks the table as loaded or waiting for its store.
    pub fn set_loaded(&self, loaded: bool) {
        self.unloaded.store(!loaded, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(key: &str) -> Arc<Route> {
        let target = Target::parse("http://127.0.0.1:1/").unwrap();
        let mut data = RouteData::new();
        data.insert("target".into(), "http://127.0.0.1:1/".into());
        Arc::new(Route::new(key.into(), target, data, false))
    }

    fn table(keys: &[&str]) -> RouteTable {
        let t = RouteTable::new();
        t.apply(keys.iter().map(|k| Change::Upsert(route(k))).collect());
        t
    }

    fn matched(t: &RouteTable, path: &str) -> Option<String> {
        t.load().lookup(path).map(|r| r.key().to_owned())
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let t = table(&["/", "/b", "/b/c", "/b/c/d"]);
        assert_eq!(matched(&t, "/b/c/dword").as_deref(), Some("/b/c"));
        assert_eq!(matched(&t, "/b/cd").as_deref(), Some("/b"));
        assert_eq!(matched(&t, "/b/c/d/e").as_deref(), Some("/b/c/d"));
        assert_eq!(matched(&t, "/b/c/d").as_deref(), Some("/b/c/d"));
        assert_eq!(matched(&t, "/x").as_deref(), Some("/"));
        assert_eq!(matched(&t, "/B/c").as_deref(), Some("/"));
        assert_eq!(matched(&t, "/").as_deref(), Some("/"));
    }

    #[test]
    fn no_root_means_no_match() {
        let t = table(&["/a/b"]);
        assert_eq!(matched(&t, "/a"), None);
        assert_eq!(matched(&t, "/a/bc"), None);
        assert_eq!(matched(&t, "/a//b"), None);
        assert_eq!(matched(&t, "/a/b/c").as_deref(), Some("/a/b"));
    }

    #[test]
    fn deep_paths_still_match() {
        let t = table(&["/a"]);
        let deep = format!("/a{}", "/x".repeat(100));
        assert_eq!(matched(&t, &deep).as_deref(), Some("/a"));
        let t = table(&["/", "/a/b"]);
        assert_eq!(matched(&t, &deep).as_deref(), Some("/"));
    }

    #[test]
    fn removal_shrinks_probe_depth_and_versions_move() {
        let t = table(&["/a/b/c", "/a"]);
        assert_eq!(t.load().version(), 1);
        let out = t.apply(vec![
            Change::Remove("/a/b/c".into()),
            Change::Remove("/nope".into()),
        ]);
        assert_eq!(out, vec![Outcome::Removed, Outcome::Absent]);
        assert_eq!(t.load().version(), 2);
        assert_eq!(t.load().depth_counts, vec![0, 1]);
        assert_eq!(matched(&t, "/a/b/c/d").as_deref(), Some("/a"));
    }

    #[test]
    fn old_snapshots_are_unchanged_by_writes() {
        let t = table(&["/a"]);
        let before = t.snapshot();
        t.apply(vec![
            Change::Upsert(route("/a/b")),
            Change::Remove("/a".into()),
        ]);
        assert_eq!(before.len(), 1);
        assert!(before.get("/a").is_some());
        assert!(t.load().get("/a").is_none());
    }

    #[test]
    fn changes_since_a_version() {
        let t = table(&["/a", "/b"]);
        t.apply(vec![
            Change::Remove("/a".into()),
            Change::Upsert(route("/c")),
        ]);
        t.apply(vec![Change::Remove("/c".into())]);
        t.apply(vec![Change::Upsert(route("/c"))]);
        let snap = t.snapshot();
        assert_eq!(snap.version(), 4);
        let keys = |c: ChangesSince| {
            let put: Vec<String> = c.put.iter().map(|r| r.key().to_owned()).collect();
            let removed: Vec<String> = c.removed.iter().map(|k| k.to_string()).collect();
            (put, removed)
        };
        assert_eq!(
            keys(snap.changes_since(0).unwrap()),
            (vec!["/b".into(), "/c".into()], vec!["/a".into()])
        );
        assert_eq!(
            keys(snap.changes_since(1).unwrap()),
            (vec!["/c".into()], vec!["/a".into()])
        );
        assert_eq!(
            keys(snap.changes_since(3).unwrap()),
            (vec!["/c".into()], vec![])
        );
        assert_eq!(keys(snap.changes_since(4).unwrap()), (vec![], vec![]));
    }

    /// Found by fuzzing (fuzz/fuzz_targets/routes.rs): the sorted cache outlived a batch applied
    /// to the same snapshot, so listings and "changes since" missed the batch's routes.
    #[test]
    fn a_batch_invalidates_the_sorted_listing() {
        let mut snap = Snapshot::default();
        snap.apply_batch(vec![Change::Upsert(route("/a"))]);
        assert_eq!(snap.sorted().len(), 1);
        assert_eq!(snap.changes_since(0).unwrap().put.len(), 1);
        snap.apply_batch(vec![Change::Upsert(route("/"))]);
        let keys: Vec<String> = snap.sorted().iter().map(|r| r.key().to_owned()).collect();
        assert_eq!(keys, ["/", "/a"]);
        let since = snap.changes_since(1).unwrap();
        assert_eq!(since.put.len(), 1);
        assert_eq!(since.put[0].key(), "/");
    }

    #[test]
    fn timestamps_look_like_javascripts() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_timestamp(1_763_836_200_123),
            "2025-11-22T18:30:00.123Z"
        );
    }
}
