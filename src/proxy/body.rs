//! The bodies the data plane wraps around what it forwards: activity and byte counts, failures
//! noticed in the middle of a stream, and the access-log line written when a response ends.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus::IntCounter;

use crate::http::ProxyBody;
use crate::routes::Route;
use crate::upstream::PooledBody;

/// A target's response body: from a pooled connection, or from one that switched protocols.
/// An enum rather than a box: one allocation less on every request.
pub(super) enum TargetBody {
    Pooled(PooledBody),
    Upgrade(hyper::body::Incoming),
}

impl Body for TargetBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            TargetBody::Pooled(b) => Pin::new(b).poll_frame(cx),
            TargetBody::Upgrade(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TargetBody::Pooled(b) => b.is_end_stream(),
            TargetBody::Upgrade(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TargetBody::Pooled(b) => b.size_hint(),
            TargetBody::Upgrade(b) => b.size_hint(),
        }
    }
}

/// One access-log line's worth, written when the response body is done (or dropped).
pub(super) struct AccessRecord {
    pub(super) method: http::Method,
    pub(super) route: Option<Arc<Route>>,
    pub(super) status: u16,
    pub(super) started: Instant,
    pub(super) client: Option<IpAddr>,
}

/// A response body that writes the access-log line when it ends, with the bytes it carried.
/// Paths, queries, tokens and cookies are never logged: the route's key stands for the path.
pub(super) struct LoggedBody {
    inner: ProxyBody,
    record: AccessRecord,
    bytes: u64,
}

impl LoggedBody {
    pub(super) fn new(inner: ProxyBody, record: AccessRecord) -> Self {
        LoggedBody {
            inner,
            record,
            bytes: 0,
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                self.bytes += n;
            }
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let r = &self.record;
        tracing::info!(
            target: "hubgate::access",
            method = %r.method,
            route = r.route.as_ref().map_or("-", |route| route.key()),
            status = r.status,
            duration_ms = r.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            client = %r.client.map_or_else(|| "-".to_owned(), |ip| ip.to_canonical().to_string()),
            "request"
        );
    }
}

pin_project! {
    /// A body that records activity on its route for every frame that passes, and counts its
    /// bytes.
    pub struct ActivityBody<B> {
        #[pin]
        inner: B,
        route: Option<Arc<Route>>,
        bytes: Option<&'static IntCounter>,
    }
}

impl<B> ActivityBody<B> {
    pub fn new(inner: B, route: Option<Arc<Route>>, bytes: Option<&'static IntCounter>) -> Self {
        ActivityBody {
            inner,
            route,
            bytes,
        }
    }
}

impl<B: Body> Body for ActivityBody<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(route) = this.route.as_ref() {
                route.touch();
            }
            if let (Some(bytes), Some(data)) = (this.bytes, frame.data_ref()) {
                bytes.inc_by(data.remaining() as u64);
            }
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

pin_project! {
    /// A body that reports its first failure to `on_error`: the client's request body (a
    /// forwarded request that fails because of it is the client's fault) or the target's
    /// response body (a response cut in the middle is logged and counted).
    pub(super) struct Watched<B, F> {
        #[pin]
        inner: B,
        on_error: Option<F>,
    }
}

impl<B, F> Watched<B, F> {
    pub(super) fn new(inner: B, on_error: F) -> Self {
        Watched {
            inner,
            on_error: Some(on_error),
        }
    }
}

impl<B, F> Body for Watched<B, F>
where
    B: Body<Error = hyper::Error>,
    F: FnOnce(&hyper::Error),
{
    type Data = B::Data;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if let Some(on_error) = this.on_error.take() {
                on_error(e);
            }
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
