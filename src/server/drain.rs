//! Graceful shutdown of one worker's connections on one port: told to finish their request and
//! close when hubgate stops, and waited for.
//!
//! hyper-util's `GracefulShutdown` does the same by polling a `watch` receiver's `changed()`
//! each time a connection's task runs: ~560 instructions a proxied request in
//! `benches/load/budget.sh`. Here a connection registers its task's waker once, and each poll
//! reads one atomic flag; stopping sets the flag and wakes the registered tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

/// The connections of one worker's port.
#[derive(Default)]
pub struct Drain {
    stopping: AtomicBool,
    /// The task of each open connection that has run, to wake when stopping starts.
    wakers: Mutex<Slots>,
    open: AtomicUsize,
    closed: Notify,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Drain {
    /// A connection counted from now on (through a TLS handshake, say), so that
    /// [`Drain::stop`] waits for it.
    pub fn watcher(self: &Arc<Self>) -> Watcher {
        self.open.fetch_add(1, Ordering::AcqRel);
        Watcher {
            drain: self.clone(),
            slot: None,
        }
    }

    /// Asks every connection to close after its request, and waits until all have.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self
            .slots()
            .wakers
            .iter_mut()
            .flat_map(Option::take)
            .collect();
        wakers.into_iter().for_each(Waker::wake);
        loop {
            // Made before looking, so that a last close between the look and the wait wakes it.
            let closed = self.closed.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Nothing runs user code under this lock: a poisoned one holds consistent slots.
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, waker: Waker) -> usize {
        let mut slots = self.slots();
        match slots.free.pop() {
            Some(slot) => {
                slots.wakers[slot] = Some(waker);
                slot
            }
            None => {
                slots.wakers.push(Some(waker));
                slots.wakers.len() - 1
            }
        }
    }

    fn closed(&self, slot: Option<usize>) {
        if let Some(slot) = slot {
            let mut slots = self.slots();
            slots.wakers[slot] = None;
            slots.free.push(slot);
        }
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.closed.notify_waiters();
        }
    }
}

/// One connection's place in its [`Drain`], until dropped.
pub struct Watcher {
    drain: Arc<Drain>,
    slot: Option<usize>,
}

impl Watcher {
    /// `conn`, told to finish its request and close once the drain stops.
    pub fn watch<C: GracefulConnection>(self, conn: C) -> Draining<C> {
        Draining {
            conn: Box::pin(conn),
            watcher: self,
            asked: false,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.drain.closed(self.slot.take());
    }
}

/// A connection that closes gracefully once its [`Drain`] stops.
pub struct Draining<C> {
    conn: Pin<Box<C>>,
    watcher: Watcher,
    /// Already told to close.
    asked: bool,
}

impl<C: GracefulConnection> Future for Draining<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        let watcher = &mut this.watcher;
        if watcher.slot.is_none() {
            // A spawned task keeps one waker for its life: registered once, never replaced.
            watcher.slot = Some(watcher.drain.register(cx.waker().clone()));
        }
        // Read after registering: a stop either sees the waker or is seen here.
        if !this.asked && watcher.drain.stopping.load(Ordering::SeqCst) {
            this.asked = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    /// A real HTTP/1 connection whose one request is answered when `answer` fires.
    fn connection(
        drain: &Arc<Drain>,
        answer: tokio::sync::oneshot::Receiver<()>,
    ) -> (tokio::io::DuplexStream, tokio::sync::oneshot::Receiver<()>) {
        let (client, server) = tokio::io::duplex(4096);
        let (asked_tx, asked_rx) = tokio::sync::oneshot::channel();
        let slots = Arc::new(Mutex::new(Some((asked_tx, answer))));
        let service = hyper::service::service_fn(move |_req| {
            let pair = slots.lock().unwrap().take();
            async move {
                if let Some((asked, answer)) = pair {
                    let _ = asked.send(());
                    let _ = answer.await;
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                    "done",
                ))))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        tokio::spawn(drain.watcher().watch(conn));
        (client, asked_rx)
    }

    /// `drain.stop()` running, checked to be still waiting half a minute (of paused time) on.
    async fn stop_still_waiting(drain: &Arc<Drain>, when: &str) -> tokio::task::JoinHandle<()> {
        let stop = tokio::spawn({
            let drain = drain.clone();
            async move { drain.stop().await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!stop.is_finished(), "stop returned {when}");
        stop
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_waits_for_the_request_in_flight_then_the_connection_closes() {
        let drain = Arc::new(Drain::default());
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        let (client, asked) = connection(&drain, answer_rx);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        let client_conn = tokio::spawn(conn);
        let request = hyper::Request::get("/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = tokio::spawn(async move { sender.send_request(request).await });
        asked.await.unwrap();

        let stop = stop_still_waiting(&drain, "with a request in flight").await;

        answer_tx.send(()).unwrap();
        let body = response.await.unwrap().unwrap().into_body().collect().await;
        assert_eq!(body.unwrap().to_bytes(), "done");
        tokio::time::timeout(Duration::from_secs(30), stop)
            .await
            .expect("stop waits no longer than the last connection")
            .unwrap();
        // Told to close, the server ended the connection after its response.
        assert!(client_conn.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_counted_before_it_is_served_is_waited_for() {
        let drain = Arc::new(Drain::default());
        let watcher = drain.watcher();
        let stop = stop_still_waiting(&drain, "while a connection was still counted").await;
        drop(watcher);
        tokio::time::timeout(Duration::from_secs(30), stop)
            .await
            .expect("stop returns once the last one is gone")
            .unwrap();
    }
}
