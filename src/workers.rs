//! The data plane's threads: one worker per core (`--workers`), each a single-threaded tokio
//! runtime on a thread of its own, serving its own copy of the public port from accept to the
//! last byte: TLS, HTTP, route lookup, the edge's checks, its own pool of connections to targets
//! and its websocket tunnels. A request never changes thread.
//!
//! Workers share only what is read-mostly (the route table's snapshot, settings, the edge's
//! cache) and atomics (metrics, connection counts). The control plane (API, store, hub calls,
//! the Redis follower) keeps its own runtime on the main thread.
//!
//! Why not one work-stealing runtime: it moves tasks between threads, and a request hops between
//! the connection's task and the upstream connection's task through channels and cross-thread
//! wakeups. The README's performance section has the figures of both layouts.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::proxy::Proxy;
use crate::server::{self, Handoff, Intake, Listener, Port, Unregistered};

/// The running workers.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    drained: Vec<oneshot::Receiver<bool>>,
    exit: watch::Sender<bool>,
}

/// What every worker is given.
pub struct Plan<M> {
    /// One copy of the public port per worker.
    pub copies: Vec<Unregistered>,
    pub port: Arc<Port>,
    pub handoffs: Vec<mpsc::UnboundedReceiver<Handoff>>,
    /// Builds worker `i`'s forwarding service (and so its connection pool), on its thread.
    pub proxy: M,
    pub shutdown: watch::Receiver<bool>,
    pub grace: Duration,
}

impl Workers {
    /// Starts one thread per copy of the port.
    ///
    /// # Errors
    /// When a thread cannot be started.
    pub fn start<M>(plan: Plan<M>) -> io::Result<Workers>
    where
        M: Fn(usize) -> Arc<Proxy> + Send + Sync + 'static,
    {
        let (exit, exit_rx) = watch::channel(false);
        let make = Arc::new(plan.proxy);
        let mut threads = Vec::new();
        let mut drained = Vec::new();
        let jobs = plan.copies.into_iter().zip(plan.handoffs).enumerate();
        for (worker, (copy, handoffs)) in jobs {
            let (done, drained_rx) = oneshot::channel();
            let job = Job {
                worker,
                copy,
                handoffs,
                port: plan.port.clone(),
                shutdown: plan.shutdown.clone(),
                grace: plan.grace,
                exit: exit_rx.clone(),
                done,
            };
            let make = make.clone();
            let thread = std::thread::Builder::new()
                // Linux keeps 15 bytes of a thread's name: short enough for `top -H` to show it.
                .name(format!("hg-worker-{worker}"))
                .spawn(move || job.run(|| make(worker)))?;
            threads.push(thread);
            drained.push(drained_rx);
        }
        Ok(Workers {
            threads,
            drained,
            exit,
        })
    }

    /// Waits until every worker has stopped accepting and its requests have finished (or the
    /// grace period ran out). Returns whether they all finished.
    pub async fn drained(&mut self) -> bool {
        let mut all = true;
        for done in self.drained.drain(..) {
            all &= done.await.unwrap_or(false);
        }
        all
    }

    /// Ends the workers' runtimes (their tunnels must be closed by then) and joins them.
    pub async fn exit(self) {
        let _ = self.exit.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// One worker's part.
struct Job {
    worker: usize,
    copy: Unregistered,
    handoffs: mpsc::UnboundedReceiver<Handoff>,
    port: Arc<Port>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    exit: watch::Receiver<bool>,
    done: oneshot::Sender<bool>,
}

impl Job {
    /// The worker thread's whole life: serve until shutdown, report, keep the runtime (and its
    /// tunnels) alive until told to exit.
    fn run(self, make: impl FnOnce() -> Arc<Proxy>) {
        // This worker's requests count into metric series of their own (summed at scrape).
        crate::metrics::use_worker_shard(self.worker);
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(worker = self.worker, error = %e, "cannot start a worker's runtime");
                let _ = self.done.send(false);
                return;
            }
        };
        let Job {
            worker,
            copy,
            handoffs,
            port,
            shutdown,
            grace,
            mut exit,
            done,
        } = self;
        runtime.block_on(async move {
            let listener = match Listener::register(copy) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::error!(worker, error = %e, "a worker cannot watch its listener");
                    let _ = done.send(false);
                    return;
                }
            };
            let proxy = make();
            tokio::spawn(sweep(proxy.clone()));
            let intake = Intake {
                port,
                worker,
                listener,
                handoffs,
            };
            let handler = move |req, info| proxy.clone().handle(req, info);
            let _ = done.send(server::serve(intake, handler, shutdown, grace).await);
            while !*exit.borrow_and_update() {
                if exit.changed().await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn sweep(proxy: Arc<Proxy>) {
    let mut every = tokio::time::interval(crate::upstream::SWEEP_EVERY);
    loop {
        every.tick().await;
        proxy.pool().sweep();
    }
}
