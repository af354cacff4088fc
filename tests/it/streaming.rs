//! Bodies pass through hubgate as streams: a gigabyte each way with bounded memory, and an
//! event stream whose chunks arrive one at a time.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use tokio::{
    sync::{mpsc, Notify},
    task::JoinHandle,
};

use crate::support::{rss_bytes, serve, Backend, Body, Hubgate, WAIT};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// hubgate's resident memory must stay under this while a gigabyte passes through.
const RSS_LIMIT: u64 = 200 * 1024 * 1024;
/// A hang guard for moving a gigabyte through a debug build on a busy machine; not a speed test.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);

/// A body of `total` bytes made of one shared chunk repeated: nothing is allocated per chunk.
fn generated_body(total: u64) -> Body {
    let chunk = Bytes::from(vec![b'g'; CHUNK]);
    let count = total / CHUNK as u64;
    let frames =
        stream::iter((0..count).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))));
    StreamBody::new(frames).boxed()
}

/// Samples the resident memory of a process until stopped, keeping the maximum.
struct RssWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                max.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                if flag.load(Ordering::Relaxed) {
                    return max.load(Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RssWatch { stop, task }
    }

    /// The largest RSS seen, in bytes.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .expect("RSS sampling failed (did hubgate exit?)")
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

#[tokio::test]
async fn gigabyte_download_streams_with_bounded_memory() {
    let backend = serve(|_req: http::Request<Incoming>| async {
        Response::builder()
            .header("content-type", "application/octet-stream")
            .body(generated_body(GIB))
            .unwrap()
    })
    .await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/big", &backend.url("")).await;
    let baseline = hg.rss_bytes();

    let watch = RssWatch::start(hg.pid());
    let req = hg
        .proxy_request(Method::GET, "/big/file")
        .body(crate::support::empty())
        .unwrap();
    let transfer = async {
        let resp = hg.client.request(req).await.expect("GET /big/file");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download body");
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
            }
        }
        total
    };
    let total = tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
        .await
        .expect("download did not finish");
    let max_rss = watch.finish().await;

    assert_eq!(total, GIB, "bytes received");
    assert!(
        max_rss < RSS_LIMIT,
        "hubgate RSS reached {} MiB (baseline {} MiB) while streaming 1 GiB down",
        mib(max_rss),
        mib(baseline)
    );
}

#[tokio::test]
async fn gigabyte_upload_streams_with_bounded_memory() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/up", &backend.url("")).await;
    let baseline = hg.rss_bytes();

    let watch = RssWatch::start(hg.pid());
    let req = hg
        .proxy_request(Method::POST, "/up/file")
        .header("content-type", "application/octet-stream")
        .body(generated_body(GIB))
        .unwrap();
    let transfer = async {
        let resp = hg.client.request(req).await.expect("POST /up/file");
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("answer body")
            .to_bytes();
        (status, body)
    };
    let (status, body) = tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
        .await
        .expect("upload did not finish");
    let max_rss = watch.finish().await;

    assert_eq!(
        status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&body)
    );
    let echoed: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
    assert_eq!(echoed["body_len"], GIB, "bytes the backend received");
    assert!(
        max_rss < RSS_LIMIT,
        "hubgate RSS reached {} MiB (baseline {} MiB) while streaming 1 GiB up",
        mib(max_rss),
        mib(baseline)
    );
}

/// A response body fed from a channel, one frame per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

#[tokio::test]
async fn event_stream_chunks_are_not_buffered() {
    let release = Arc::new(Notify::new());
    let backend_release = release.clone();
    let backend = serve(move |_req: http::Request<Incoming>| {
        let release = backend_release.clone();
        async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
                release.notified().await;
                let _ = tx.send(Bytes::from_static(b"data: second\n\n")).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(ChannelBody(rx).boxed())
                .unwrap()
        }
    })
    .await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/events", &backend.url("")).await;

    let req = hg
        .proxy_request(Method::GET, "/events/stream")
        .header("accept", "text/event-stream")
        .body(crate::support::empty())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, hg.client.request(req))
        .await
        .expect("no response head while the backend holds its second chunk")
        .expect("GET /events/stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("text/event-stream"));
    let mut body = resp.into_body();

    // The first chunk must arrive while the second is still held back by the backend.
    let mut received = Vec::new();
    let first = async {
        while !String::from_utf8_lossy(&received).contains("data: first") {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        received.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => panic!("event stream failed: {e}"),
                None => panic!("event stream ended early"),
            }
        }
    };
    tokio::time::timeout(WAIT, first)
        .await
        .expect("the first chunk was not delivered before the second was released (buffering?)");
    assert!(!String::from_utf8_lossy(&received).contains("second"));

    release.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the rest of the stream did not arrive")
        .expect("event stream body")
        .to_bytes();
    received.extend_from_slice(&rest);
    assert_eq!(
        String::from_utf8_lossy(&received),
        "data: first\n\ndata: second\n\n"
    );
}
