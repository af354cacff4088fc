//! Websocket tunnels: once client and target have both switched protocols, the bytes between
//! them, copied both ways, holding no buffer while the websocket is idle, and closed in order
//! when hubgate stops.
//!
//! `tokio::io::copy_bidirectional` gives each direction an 8 KiB buffer for the tunnel's whole
//! life: 16 KiB per websocket, most of the ~18 KiB each one cost, though a notebook's websocket
//! is idle nearly all the time. Here each read lands in a buffer on the stack and is written on
//! at once; only what the other side cannot take yet is copied to the heap, and that copy is
//! freed as soon as it is written.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics;
use crate::routes::Route;

/// The most one read takes; what `copy_bidirectional` reads at a time too.
const CHUNK: usize = 8 * 1024;

/// Copies `a` to `b` and `b` to `a` until both have ended (each end is passed on as a shutdown
/// of the other side's writes), or one fails.
async fn copy_both<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_to_b, mut b_to_a) = (Pump::default(), Pump::default());
    poll_fn(|cx| {
        let forward = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        ready!(forward);
        ready!(back);
        Poll::Ready(Ok(()))
    })
    .await
}

/// One direction of a tunnel.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet written, from `written` on; empty (and unallocated) otherwise.
    pending: Vec<u8>,
    written: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader has ended: shut the writer down once `pending` is out.
    read_done: bool,
    done: bool,
}

impl Pump {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut from: Pin<&mut R>,
        mut to: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.written < self.pending.len() {
                let n = ready!(to.as_mut().poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                ready!(to.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }

            let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match from.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read for now: push out what was written (TLS streams
                    // hold it back until flushed).
                    if self.unflushed {
                        ready!(to.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut at = 0;
            while at < data.len() {
                match to.as_mut().poll_write(cx, &data[at..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The other side is slow: keep the rest until it takes it (the next
                        // loop turn waits for that, and reads nothing more meanwhile).
                        self.pending = data[at..].to_vec();
                        self.written = 0;
                        break;
                    }
                }
            }
        }
    }
}

/// Copies bytes both ways between an upgraded client and target until either side closes, or
/// until hubgate stops, when both sides get an orderly TCP close.
pub(super) async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    route: Arc<Route>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    let mut client = ActivityIo {
        inner: TokioIo::new(client),
        route: route.clone(),
    };
    let mut upstream = ActivityIo {
        inner: TokioIo::new(upstream),
        route,
    };
    let m = metrics::get();
    m.websockets.inc();
    m.active_websockets.inc();
    let opened = Instant::now();
    tokio::select! {
        copied = copy_both(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, "websocket tunnel closed with an error");
            }
        }
        _ = stopped(&mut closing) => {
            use tokio::io::AsyncWriteExt;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
            })
            .await;
            tracing::debug!(route = %client.route.key(), "websocket closed for shutdown");
        }
    }
    m.active_websockets.dec();
    m.websocket_duration.observe(opened.elapsed().as_secs_f64());
}

/// Resolves once the flag is true (never, if its sender is gone without setting it).
async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// An upgraded stream that records activity on its route for every read (so both directions of
/// a websocket count, where CHP counts only one).
struct ActivityIo<T> {
    inner: T,
    route: Arc<Route>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.route.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_through_slow_writers_and_passes_ends_on() {
        // Tiny pipes, so writes stall and bytes wait in `pending`.
        let (client, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_target, target) = tokio::io::duplex(64);
        let tunnel =
            tokio::spawn(async move { copy_both(&mut proxy_client, &mut proxy_target).await });
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(client);
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let ((), n) = tokio::join!(send, recv);
            n.unwrap();
            got
        });
        let (mut r, mut w) = tokio::io::split(target);
        let send = async {
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let ((), n) = tokio::join!(send, recv);
        n.unwrap();
        assert_eq!(got, up);
        assert_eq!(client_side.await.unwrap(), down);
        tunnel.await.unwrap().unwrap();
    }
}
