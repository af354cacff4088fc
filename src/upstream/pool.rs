//! A worker's own connections to targets.
//!
//! Every data-plane worker has one [`Pool`]: its idle HTTP/1.1 connections, by target origin
//! (`http://host:port`). A request takes the most recently used idle connection to its origin
//! (or dials one), sends through hyper's `client::conn`, and the connection goes back to the pool
//! when the response body has ended. Each connection's driver is a task on the worker that
//! dialed it, so a request, its connection and its answer never leave that worker's thread.
//!
//! Why not hyper-util's pooled `Client`, which the hub's calls still use: it hands every request
//! to the connection's task through a channel, races a checkout against a connect, and spawns a
//! task per response to wait for the connection to be ready again; one pool is shared by every
//! thread behind a lock. `benches/load/budget.sh` counted the whole request path at 49 470
//! instructions and 30.7 allocations a request with it; the README's performance section has
//! the figures after this change.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;

use super::{dial, UpstreamStream, CONNECT_TIMEOUT};
use crate::http::ProxyBody;
use crate::target::Target;

/// How often a worker sweeps its pool ([`Pool::sweep`]): the grain of the idle timeout.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// How a worker keeps its connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// An idle connection unused for this long is closed (up to one [`SWEEP_EVERY`] later).
    pub idle_timeout: Duration,
    /// At most this many idle connections per origin; more are closed when their response ends.
    pub max_idle_per_origin: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            idle_timeout: Duration::from_secs(90),
            max_idle_per_origin: 256,
        }
    }
}

/// Why a request to a target got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    #[error("the exchange with the target failed")]
    Exchange(#[source] hyper::Error),
}

/// Whether a connection idle since sweep `since` may still be used at sweep `now`. It has been
/// idle for more than `now - since - 1` sweep intervals, so it goes once that reaches the
/// timeout: between `idle_timeout` and one interval more after it became idle.
fn fresh(idle_timeout: Duration, since: u64, now: u64) -> bool {
    let allowed = idle_timeout.as_millis().div_ceil(SWEEP_EVERY.as_millis());
    u128::from(now.saturating_sub(since)) <= allowed
}

/// Idle connections, each with the sweep count when it became idle: counting sweeps instead
/// of reading the clock saves two clock reads a request.
type Idle = Vec<(SendRequest<ProxyBody>, u64)>;

/// Idle connections by origin; the origin is kept in the entry too, so that a response can hold
/// it without allocating.
type ByOrigin = HashMap<Arc<str>, (Arc<str>, Idle), foldhash::fast::RandomState>;

/// One worker's idle connections, by origin.
pub struct Pool {
    tls: TlsConnector,
    settings: PoolSettings,
    /// Only the owning worker's tasks take this lock, so it is never contended.
    idle: Mutex<ByOrigin>,
    /// Sweeps so far.
    sweeps: AtomicU64,
}

impl Pool {
    pub fn new(tls: Arc<rustls::ClientConfig>, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            tls: TlsConnector::from(tls),
            settings,
            idle: Mutex::default(),
            sweeps: AtomicU64::new(0),
        })
    }

    /// Sends a request (its URI in origin form) to `target` on a pooled connection, or on a
    /// new one. A pooled connection that the target closed before it took the request is
    /// replaced by a new one, once.
    ///
    /// # Errors
    /// When no connection could be made or the exchange failed.
    pub async fn send(
        self: &Arc<Self>,
        target: &Target,
        req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let (origin, reused) = self.checkout(target.origin()).await;
        let req = match reused {
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lease(resp, origin, sender)),
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(SendError::Exchange(e.into_error())),
                },
            },
            None => req,
        };
        let (mut sender, conn) = self.handshake(target).await?;
        tokio::spawn(drive(conn));
        let resp = sender
            .send_request(req)
            .await
            .map_err(SendError::Exchange)?;
        Ok(self.lease(resp, origin, sender))
    }

    /// Sends a request that asks to switch protocols (a websocket handshake) on a connection of
    /// its own, which the upgraded stream then owns: it never returns to the pool.
    ///
    /// # Errors
    /// When no connection could be made or the exchange failed.
    pub async fn send_upgrade(
        &self,
        target: &Target,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let (mut sender, conn) = self.handshake(target).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "target connection for an upgrade ended with an error");
            }
        });
        sender.send_request(req).await.map_err(SendError::Exchange)
    }

    /// Closes idle connections past their timeout and forgets origins with none left.
    pub fn sweep(&self) {
        let now = self.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().retain(|_, (_, idle)| {
            idle.retain(|(sender, since)| !sender.is_closed() && self.fresh(*since, now));
            !idle.is_empty()
        });
    }

    fn fresh(&self, since: u64, now: u64) -> bool {
        fresh(self.settings.idle_timeout, since, now)
    }

    fn lock(&self) -> MutexGuard<'_, ByOrigin> {
        // A panic while holding it cannot leave the map inconsistent: every change is one call.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The origin's shared name, and an idle connection ready to take a request, if any.
    async fn checkout(&self, origin: &str) -> (Arc<str>, Option<SendRequest<ProxyBody>>) {
        loop {
            let (name, candidate) = self.take_idle(origin);
            let Some(mut sender) = candidate else {
                return (name, None);
            };
            if sender.is_ready() {
                return (name, Some(sender));
            }
            // Back from a response whose end its driver has not seen yet: a moment's wait. One
            // that does not become ready (closed meanwhile) is dropped, and the next one tried.
            let ready = tokio::time::timeout(Duration::from_secs(1), sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                return (name, Some(sender));
            }
        }
    }

    fn take_idle(&self, origin: &str) -> (Arc<str>, Option<SendRequest<ProxyBody>>) {
        let now = self.sweeps.load(Ordering::Relaxed);
        let mut map = self.lock();
        let Some((name, idle)) = map.get_mut(origin) else {
            return (Arc::from(origin), None);
        };
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && self.fresh(since, now) {
                return (name.clone(), Some(sender));
            }
        }
        (name.clone(), None)
    }

    fn checkin(&self, origin: Arc<str>, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut map = self.lock();
        let (_, idle) = map
            .entry(origin.clone())
            .or_insert_with(|| (origin, Vec::new()));
        if idle.len() < self.settings.max_idle_per_origin {
            idle.push((sender, self.sweeps.load(Ordering::Relaxed)));
        }
    }

    async fn handshake(
        &self,
        target: &Target,
    ) -> Result<
        (
            SendRequest<ProxyBody>,
            http1::Connection<TokioIo<UpstreamStream>, ProxyBody>,
        ),
        SendError,
    > {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            dial(&self.tls, target.endpoint(), target.authority()),
        )
        .await
        .map_err(|_| {
            SendError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })?
        .map_err(SendError::Connect)?;
        // hyper's adaptive read buffer (8 KiB, doubling while reads fill it) is kept: for 1 MiB
        // responses through one worker (`run.sh --rows big`, one run each, MB/s against nginx
        // with one worker) it gave 0.93x, a fixed 16 KiB 0.44x, 64 KiB 0.95x, 256 KiB 1.02x,
        // the fixed sizes inside this machine's noise.
        http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Exchange)
    }

    fn lease(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        origin: Arc<str>,
        sender: SendRequest<ProxyBody>,
    ) -> Response<PooledBody> {
        resp.map(|inner| PooledBody {
            inner,
            lease: Some(Lease {
                pool: self.clone(),
                origin,
                sender,
            }),
        })
    }
}

/// Drives one connection until it closes (the target's close, an error, or every handle to it
/// dropped).
async fn drive(conn: http1::Connection<TokioIo<UpstreamStream>, ProxyBody>) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "target connection ended with an error");
    }
}

/// The connection a response came on, to go back to its pool when the body has ended.
struct Lease {
    pool: Arc<Pool>,
    origin: Arc<str>,
    sender: SendRequest<ProxyBody>,
}

/// A target's response body. Its connection returns to the pool once the body has been read
/// to its end; a body dropped before that takes its connection down with it (what was left
/// unread would be read as the next response).
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.pool.checkin(lease.origin, lease.sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing in it (HEAD, 204, 304, `content-length: 0`) is never polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connections_go_within_one_sweep_after_their_timeout() {
        let ninety = Duration::from_secs(90);
        // 90 s is six sweeps: idle since sweep 3, usable through sweep 9, gone at sweep 10.
        assert!(fresh(ninety, 3, 3));
        assert!(fresh(ninety, 3, 9));
        assert!(!fresh(ninety, 3, 10));
        // A timeout shorter than a sweep still keeps a connection until the next one.
        assert!(fresh(Duration::from_secs(1), 5, 6));
        assert!(!fresh(Duration::from_secs(1), 5, 7));
    }
}
