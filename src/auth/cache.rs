//! The credential cache: hub answers kept under a hash of the credential, with the three
//! behaviours the hub's load depends on.
//!
//! - Positive answers live for the cache TTL, negative ones (a token the hub refused) for a much
//!   shorter one, so a flood of bad tokens reaches the hub once per key and TTL.
//! - Concurrent misses for one key make exactly one hub call: the first starts it as a task,
//!   the others wait for the same result (and the call finishes even if its first asker leaves).
//! - A positive answer stays usable for a grace period past its TTL, for when the hub is down.
//!
//! `moka` bounds the entries with a TinyLFU policy (near-LRU, resistant to one-off scans) and
//! expires each entry at the end of its own grace period; freshness is checked here.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use prometheus::IntCounter;

/// A cached answer.
#[derive(Debug)]
pub struct Entry<V> {
    /// `None`: the hub said no.
    pub value: Option<V>,
    fresh_until: Instant,
    usable_until: Instant,
}

/// How a lookup was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hit,
    Miss,
    /// Waited for a call another request had started.
    Coalesced,
    /// The hub failed and an expired positive answer was used.
    Stale,
}

/// Counters for operators. Plain `prometheus` counters: registered ones (see
/// [`Stats::registered`]) show up in `/metrics`, others just count.
#[derive(Debug, Clone)]
pub struct Stats {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub coalesced: IntCounter,
    pub stale: IntCounter,
    pub evictions: IntCounter,
}

impl Default for Stats {
    fn default() -> Self {
        let c = || IntCounter::new("unregistered", "unregistered").expect("a valid counter");
        Stats {
            hits: c(),
            misses: c(),
            coalesced: c(),
            stale: c(),
            evictions: c(),
        }
    }
}

impl Stats {
    /// Counters that are the `result` children of a registered counter vector.
    pub fn registered(vec: &prometheus::IntCounterVec) -> Self {
        let c = |label: &str| vec.with_label_values(&[label]);
        Stats {
            hits: c("hit"),
            misses: c("miss"),
            coalesced: c("coalesced"),
            stale: c("stale"),
            evictions: c("eviction"),
        }
    }
}

/// A lookup task that failed without an answer (it panicked): the request fails closed.
#[derive(Debug, Clone)]
pub struct LookupFailed(pub String);

impl From<LookupFailed> for String {
    fn from(e: LookupFailed) -> String {
        e.0
    }
}

type Call<V, E> = Shared<BoxFuture<'static, Result<Arc<Entry<V>>, E>>>;

/// A cache of hub answers with coalesced misses.
pub struct Coalescing<K, V, E> {
    /// Keyed by digests of credentials, already uniform: foldhash (seeded per process) places
    /// them in ~40 instructions where moka's default SipHash took ~170 per request.
    entries: moka::sync::Cache<K, Arc<Entry<V>>, foldhash::fast::RandomState>,
    inflight: Arc<Mutex<HashMap<K, Call<V, E>>>>,
    ttl: Duration,
    negative_ttl: Duration,
    grace: Duration,
    pub stats: Stats,
}

struct ExpireAtEnd;

impl<K, V> moka::Expiry<K, Arc<Entry<V>>> for ExpireAtEnd {
    fn expire_after_create(&self, _k: &K, v: &Arc<Entry<V>>, now: Instant) -> Option<Duration> {
        Some(v.usable_until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _k: &K,
        v: &Arc<Entry<V>>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.usable_until.saturating_duration_since(now))
    }
}

impl<K, V, E> Coalescing<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
    E: Clone + Send + Sync + From<LookupFailed> + 'static,
{
    pub fn new(capacity: u64, ttl: Duration, negative_ttl: Duration, grace: Duration) -> Self {
        Self::with_stats(capacity, ttl, negative_ttl, grace, Stats::default())
    }

    pub fn with_stats(
        capacity: u64,
        ttl: Duration,
        negative_ttl: Duration,
        grace: Duration,
        stats: Stats,
    ) -> Self {
        let evictions = stats.evictions.clone();
        Coalescing {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(ExpireAtEnd)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.inc();
                    }
                })
                .build_with_hasher(foldhash::fast::RandomState::default()),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            ttl,
            negative_ttl,
            grace,
            stats,
        }
    }

    /// The answer for `key`: cached if fresh, else from `fetch` (one call per key at a time).
    /// When `fetch` fails, an expired positive answer still in its grace period is returned.
    ///
    /// # Errors
    /// `fetch`'s error, when there is no usable cached answer.
    pub async fn get<F, Fut>(&self, key: K, fetch: F) -> Result<(Arc<Entry<V>>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    {
        let cached = self.entries.get(&key);
        let now = Instant::now();
        if let Some(entry) = &cached {
            if now < entry.fresh_until {
                self.stats.hits.inc();
                return Ok((entry.clone(), Source::Hit));
            }
        }
        let (call, source) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(&key) {
                Some(call) => (call.clone(), Source::Coalesced),
                None => {
                    // A call that ended since the look-up above (on another worker) has filled
                    // the cache by now: it inserts before it leaves `inflight`. Asking again
                    // under the lock keeps it to one hub call per credential.
                    if let Some(entry) = self.entries.get(&key) {
                        if Instant::now() < entry.fresh_until {
                            self.stats.hits.inc();
                            return Ok((entry, Source::Hit));
                        }
                    }
                    let call = self.start(key.clone(), fetch());
                    inflight.insert(key.clone(), call.clone());
                    (call, Source::Miss)
                }
            }
        };
        match source {
            Source::Coalesced => self.stats.coalesced.inc(),
            _ => self.stats.misses.inc(),
        };
        match call.await {
            Ok(entry) => Ok((entry, source)),
            Err(e) => match cached {
                Some(entry) if entry.value.is_some() && Instant::now() < entry.usable_until => {
                    self.stats.stale.inc();
                    Ok((entry, Source::Stale))
                }
                _ => Err(e),
            },
        }
    }

    /// Runs one fetch as its own task, so it completes (and fills the cache) even when every
    /// request waiting for it goes away.
    fn start<Fut>(&self, key: K, fetch: Fut) -> Call<V, E>
    where
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    {
        let entries = self.entries.clone();
        let inflight = self.inflight.clone();
        let (ttl, negative_ttl, grace) = (self.ttl, self.negative_ttl, self.grace);
        let task = tokio::spawn(async move {
            let result = fetch.await.map(|value| {
                let now = Instant::now();
                let entry = Arc::new(match value {
                    Some(v) => Entry {
                        value: Some(v),
                        fresh_until: now + ttl,
                        usable_until: now + ttl + grace,
                    },
                    None => Entry {
                        value: None,
                        fresh_until: now + negative_ttl,
                        usable_until: now + negative_ttl,
                    },
                });
                entries.insert(key.clone(), entry.clone());
                entry
            });
            inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            result
        });
        async move {
            match task.await {
                Ok(result) => result,
                // The fetch panicked or was cancelled: there is no answer to share.
                Err(e) => Err(E::from(LookupFailed(e.to_string()))),
            }
        }
        .boxed()
        .shared()
    }

    /// Drops every entry whose answer matches `pred` (for revoking one user).
    pub fn remove_if(&self, pred: impl Fn(&V) -> bool) {
        let doomed: Vec<Arc<K>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.value.as_ref().is_some_and(&pred))
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            self.entries.invalidate(&*k);
        }
    }

    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Entries currently held (approximate, as moka counts them).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache() -> Coalescing<u32, String, String> {
        Coalescing::new(
            100,
            Duration::from_secs(300),
            Duration::from_secs(10),
            Duration::from_secs(300),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_make_one_call() {
        let c = Arc::new(cache());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..100 {
            let (c, calls) = (c.clone(), calls.clone());
            waiters.push(tokio::spawn(async move {
                c.get(1, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Some("alice".to_owned()))
                })
                .await
                .map(|(e, _)| e.value.clone())
            }));
        }
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap().as_deref(), Some("alice"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (_, source) = c.get(1, || async { Ok(None) }).await.unwrap();
        assert_eq!(source, Source::Hit);
    }

    #[tokio::test]
    async fn stale_positive_answers_cover_a_hub_outage_but_negatives_do_not() {
        let c: Coalescing<u32, String, String> = Coalescing::new(
            100,
            Duration::from_millis(1),
            Duration::from_millis(1),
            Duration::from_secs(300),
        );
        c.get(1, || async { Ok(Some("alice".to_owned())) })
            .await
            .unwrap();
        c.get(2, || async { Ok(None) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (entry, source) = c.get(1, || async { Err("down".to_owned()) }).await.unwrap();
        assert_eq!(
            (entry.value.as_deref(), source),
            (Some("alice"), Source::Stale)
        );
        assert_eq!(
            c.get(2, || async { Err("down".to_owned()) })
                .await
                .unwrap_err(),
            "down"
        );
        assert_eq!(
            c.get(3, || async { Err("down".to_owned()) })
                .await
                .unwrap_err(),
            "down"
        );
    }

    #[tokio::test]
    async fn revoked_entries_are_asked_again() {
        let c = cache();
        c.get(1, || async { Ok(Some("alice".to_owned())) })
            .await
            .unwrap();
        c.get(2, || async { Ok(Some("bob".to_owned())) })
            .await
            .unwrap();
        c.remove_if(|v| v == "alice");
        let (_, source) = c
            .get(1, || async { Ok(Some("alice".to_owned())) })
            .await
            .unwrap();
        assert_eq!(source, Source::Miss);
        let (_, source) = c.get(2, || async { Ok(None) }).await.unwrap();
        assert_eq!(source, Source::Hit);
    }
}
