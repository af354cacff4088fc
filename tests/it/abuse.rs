//! Protocol abuse: what a hostile or broken client can send hubgate, on the public port.
//!
//! Conflicting and duplicated framing headers (`Content-Length`, `Transfer-Encoding`), invalid
//! header names and values, heads and URLs over `--max-header-size`, smuggling through the
//! websocket upgrade path, HTTP/2 stream resets (mid-body, and a flood of them), a websocket
//! client that never reads while its server floods it, and thousands of idle connections.
//!
//! Every case must end in a clear status or a closed connection: never a stuck worker (a normal
//! request right after is served), a crash (the process still runs), or a request delivered to
//! the wrong target (the backends record what they saw, and the tests assert on it).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{eventually, full, serve, Body, Hubgate, Server, WsEvent, WsPeer, WAIT};

// ---------------------------------------------------------------------------------------------
// Raw exchanges

/// Writes `bytes` on a new connection to `addr` and reads until the connection ends (closed or
/// reset). A connection still open after `WAIT` is a stuck worker: the test fails.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The peer may close before reading everything (a 400 after the head): not our concern.
    // One that neither reads nor closes is.
    let written = tokio::time::timeout(WAIT, stream.write_all(bytes)).await;
    assert!(
        written.is_ok(),
        "hubgate neither read nor closed within {WAIT:?}"
    );
    read_to_end(&mut stream, bytes).await
}

/// Reads until the connection ends; what came before a reset counts. `sent` is for the message
/// when it does not end within `WAIT`.
async fn read_to_end(stream: &mut TcpStream, sent: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let read = async {
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            data.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read).await.unwrap_or_else(|_| {
        panic!(
            "the connection that sent {:?} was still open {WAIT:?} later; so far it got {:?}",
            String::from_utf8_lossy(&sent[..sent.len().min(300)]),
            String::from_utf8_lossy(&data)
        )
    });
    data
}

/// One response parsed from a raw byte stream.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body was complete by its own framing (length or last chunk).
    pub complete: bool,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Every response in `data`, in order; the last one may be incomplete. Interim (1xx) responses
/// other than 101 are skipped.
pub fn parse_responses(mut data: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        data = &data[end + 4..];
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
            complete: false,
        };
        if status == 101 {
            reply.complete = true;
            replies.push(reply);
            break;
        }
        if reply.header("transfer-encoding").is_some() {
            loop {
                let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
                    data = &[];
                    break;
                };
                let size = std::str::from_utf8(&data[..line_end])
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
                let Some(size) = size else {
                    data = &[];
                    break;
                };
                let rest = &data[line_end + 2..];
                if size == 0 {
                    reply.complete = rest.starts_with(b"\r\n");
                    data = rest.get(2..).unwrap_or_default();
                    break;
                }
                if rest.len() < size + 2 {
                    reply.body.extend_from_slice(&rest[..size.min(rest.len())]);
                    data = &[];
                    break;
                }
                reply.body.extend_from_slice(&rest[..size]);
                data = &rest[size + 2..];
            }
        } else if let Some(len) = reply
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let take = len.min(data.len());
            reply.body.extend_from_slice(&data[..take]);
            reply.complete = take == len;
            data = &data[take..];
        } else {
            reply.body.extend_from_slice(data);
            reply.complete = true;
            data = &[];
        }
        replies.push(reply);
    }
    replies
}

/// Waits until a line of `logs()` satisfies `line` and returns it; fails the test with the whole
/// log after `WAIT`. hubgate's stderr is read by another thread: a line can trail the response.
pub async fn logged(logs: impl Fn() -> String, what: &str, line: impl Fn(&str) -> bool) -> String {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(found) = logs().lines().find(|l| line(l)) {
                return found.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no log line {what} within {WAIT:?}:\n{}", logs()))
}

/// Sends `bytes` and expects exactly one response with `status`, then the connection closed.
async fn expect_refused(hg: &Hubgate, what: &str, bytes: &[u8], status: u16) {
    let data = exchange(hg.proxy, bytes).await;
    let replies = parse_responses(&data);
    assert!(
        replies.len() == 1 && replies[0].status == status,
        "{what}: expected one {status} and a closed connection, got {:?}",
        String::from_utf8_lossy(&data)
    );
}

/// `GET path` on a new connection that asks to be closed: never a pooled one that hubgate may
/// be closing for idleness at that very moment.
pub async fn fresh_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let data = exchange(addr, request.as_bytes()).await;
    parse_responses(&data)
        .into_iter()
        .next()
        .unwrap_or_else(|| {
            panic!(
                "GET {path}: no response: {:?}",
                String::from_utf8_lossy(&data)
            )
        })
}

/// hubgate still runs and serves a normal request on `path` (a `Recorder` route) with 200.
pub async fn assert_still_serving(hg: &mut Hubgate, path: &str) {
    assert!(hg.is_running(), "hubgate exited:\n{}", hg.logs());
    let reply = fresh_get(hg.proxy, path, &[]).await;
    assert_eq!(
        (reply.status, reply.text()),
        (200, format!("{path} 0")),
        "a normal request after the abuse\n{}",
        hg.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// A backend that records everything it sees

/// One request a `Recorder` received.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    pub method: String,
    /// The request target as received.
    pub path: String,
    /// Every `Host` header line, in order.
    pub hosts: Vec<String>,
    /// Up to 1 MiB of the body.
    pub body: Vec<u8>,
    pub body_len: u64,
    /// Whether the body arrived whole (false: the connection failed in the middle of it).
    pub complete: bool,
    /// Whether the handler is done with it (the body was read to its end or its failure).
    pub done: bool,
}

/// An HTTP/1.1 backend that records each request (head, body, whether the body completed) and
/// answers 200 `"<path> <body length>"`.
pub struct Recorder {
    server: Server,
    seen: Arc<Mutex<Vec<Arrival>>>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let seen: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let record = seen.clone();
        let server = serve(move |req: Request<Incoming>| {
            let record = record.clone();
            async move { record_request(req, record).await }
        })
        .await;
        Recorder { server, seen }
    }

    pub fn url(&self) -> String {
        self.server.url("")
    }

    pub fn seen(&self) -> Vec<Arrival> {
        self.seen.lock().unwrap().clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|a| a.path).collect()
    }

    /// Waits until `n` requests arrived and the handler finished with each.
    pub async fn wait_done(&self, n: usize) -> Vec<Arrival> {
        eventually(WAIT, &format!("{n} requests done at the recorder"), || {
            let seen = self.seen();
            async move { seen.len() >= n && seen.iter().all(|a| a.done) }
        })
        .await;
        self.seen()
    }
}

const KEEP_BODY: usize = 1024 * 1024;

async fn record_request(req: Request<Incoming>, seen: Arc<Mutex<Vec<Arrival>>>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned());
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(Arrival {
            method: parts.method.to_string(),
            path: path.clone(),
            hosts: parts
                .headers
                .get_all(header::HOST)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect(),
            ..Arrival::default()
        });
        seen.len() - 1
    };
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    let mut seen = seen.lock().unwrap();
                    let arrival = &mut seen[index];
                    arrival.body_len += data.len() as u64;
                    let room = KEEP_BODY.saturating_sub(arrival.body.len());
                    arrival
                        .body
                        .extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let len = {
        let mut seen = seen.lock().unwrap();
        seen[index].complete = complete;
        seen[index].done = true;
        seen[index].body_len
    };
    Response::new(full(format!("{path} {len}")))
}

// ---------------------------------------------------------------------------------------------
// Framing: Content-Length and Transfer-Encoding

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_the_connection_closed() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;

    // CL.TE: a front end trusting Content-Length would leave "0\r\n\r\n" and a second request
    // on the connection; TE.CL the reverse. hubgate reads the chunked body (RFC 9112 §6.3),
    // forwards it without the Content-Length, answers, and closes the connection: whatever
    // follows is never read as a request.
    let cases: [(&str, &[u8], &[u8]); 3] = [
        (
            "CL.TE",
            b"POST /a/clte HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\nGET /a/smuggled-1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"abc",
        ),
        (
            "TE.CL",
            b"POST /a/tecl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n\
              2d\r\nGET /a/smuggled-2 HTTP/1.1\r\nHost: x\r\nX: y\r\n\r\n\r\n0\r\n\r\n\
              GET /a/smuggled-3 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a/smuggled-2 HTTP/1.1\r\nHost: x\r\nX: y\r\n\r\n",
        ),
        (
            "TE with CL 0",
            b"POST /a/te-cl0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\nGET /a/smuggled-4 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"hello",
        ),
    ];
    for (i, (what, bytes, body)) in cases.iter().enumerate() {
        let data = exchange(hg.proxy, bytes).await;
        let replies = parse_responses(&data);
        assert!(
            replies.len() == 1 && replies[0].status == 200 && replies[0].complete,
            "{what}: expected one 200 and a closed connection, got {:?}",
            String::from_utf8_lossy(&data)
        );
        assert_eq!(replies[0].header("connection"), Some("close"), "{what}");
        let seen = target.wait_done(i + 1).await;
        let arrival = &seen[i];
        assert_eq!(&arrival.body, body, "{what}: the body the target got");
        assert!(arrival.complete, "{what}: {arrival:?}");
    }
    assert_eq!(
        target.paths(),
        ["/a/clte", "/a/tecl", "/a/te-cl0"],
        "only the outer requests reach the target"
    );
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn transfer_encodings_other_than_a_final_chunked_are_400_and_reach_no_target() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;
    let cases: [(&str, &[u8]); 5] = [
        (
            "identity",
            b"POST /a/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
        ),
        (
            "chunked not last",
            b"POST /a/2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "unknown coding",
            b"POST /a/3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "HTTP/1.0 with Transfer-Encoding",
            b"POST /a/4 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "space before the colon",
            b"POST /a/5 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        expect_refused(&hg, what, bytes, 400).await;
    }
    assert!(target.seen().is_empty(), "{:?}", target.seen());
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn duplicated_content_length_is_one_length_when_equal_and_400_when_not() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;

    let data = exchange(
        hg.proxy,
        b"POST /a/equal HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\
          Connection: close\r\n\r\nabcGET /a/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let replies = parse_responses(&data);
    assert!(
        replies.len() == 1 && replies[0].status == 200,
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    assert_eq!(replies[0].text(), "/a/equal 3");
    let seen = target.wait_done(1).await;
    assert_eq!(seen[0].body, b"abc");

    let cases: [(&str, &[u8]); 4] = [
        (
            "two different lengths",
            b"POST /a/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
        ),
        (
            "a list of lengths",
            b"POST /a/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 30\r\n\r\nabc",
        ),
        (
            "a signed length",
            b"POST /a/3 HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        ),
        (
            "a length past u64",
            b"POST /a/4 HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nabc",
        ),
    ];
    for (what, bytes) in cases {
        expect_refused(&hg, what, bytes, 400).await;
    }
    assert_eq!(target.paths(), ["/a/equal"]);
    assert_still_serving(&mut hg, "/a/after").await;
}

// ---------------------------------------------------------------------------------------------
// Header names and values

#[tokio::test]
async fn invalid_header_names_and_values_are_400_and_reach_no_target() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;
    let cases: [(&str, &[u8]); 10] = [
        (
            "a separator in a name",
            b"GET /a/1 HTTP/1.1\r\nHost: x\r\nX(y): 1\r\n\r\n",
        ),
        (
            "an empty name",
            b"GET /a/2 HTTP/1.1\r\nHost: x\r\n: v\r\n\r\n",
        ),
        (
            "no colon",
            b"GET /a/3 HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
        ),
        (
            "a control byte in a value",
            b"GET /a/4 HTTP/1.1\r\nHost: x\r\nX-V: a\x01b\r\n\r\n",
        ),
        (
            "NUL in a value",
            b"GET /a/5 HTTP/1.1\r\nHost: x\r\nX-V: a\x00b\r\n\r\n",
        ),
        (
            "a bare CR in a value",
            b"GET /a/6 HTTP/1.1\r\nHost: x\r\nX-V: a\rb\r\n\r\n",
        ),
        (
            "an obsolete line fold",
            b"GET /a/7 HTTP/1.1\r\nHost: x\r\nX-V: a\r\n b\r\n\r\n",
        ),
        (
            "a space in the target",
            b"GET /a/8 x HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "an unknown version",
            b"GET /a/9 HTTP/2.0\r\nHost: x\r\n\r\n",
        ),
        // RFC 9112 §3.2: more than one Host is a 400. Forwarding both would let hubgate route
        // (and authenticate) by one while the target acts on the other.
        (
            "two Host headers",
            b"GET /a/10 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        expect_refused(&hg, what, bytes, 400).await;
    }
    assert!(target.seen().is_empty(), "{:?}", target.seen());
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn two_host_headers_are_400_with_host_routing_too() {
    let x = Recorder::start().await;
    let y = Recorder::start().await;
    let mut hg = Hubgate::start(&["--host-routing"]).await;
    hg.add_route("/x.example", &x.url()).await;
    hg.add_route("/y.example", &y.url()).await;
    for order in [["x.example", "y.example"], ["y.example", "x.example"]] {
        let request = format!(
            "GET /p HTTP/1.1\r\nHost: {}\r\nHost: {}\r\n\r\n",
            order[0], order[1]
        );
        expect_refused(&hg, "two hosts", request.as_bytes(), 400).await;
    }
    assert!(x.seen().is_empty() && y.seen().is_empty());
    let data = exchange(
        hg.proxy,
        b"GET /p HTTP/1.1\r\nHost: y.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(parse_responses(&data)[0].status, 200);
    assert_eq!(y.seen()[0].hosts, ["y.example"]);
    assert!(hg.is_running());
}

// ---------------------------------------------------------------------------------------------
// Size limits

#[tokio::test]
async fn heads_and_urls_past_max_header_size_are_431_and_the_limit_is_exact_enough() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&["--max-header-size", "16384"]).await;
    hg.add_route("/a", &target.url()).await;

    let long_url = |len: usize| format!("/a/{}", "u".repeat(len));
    let under = long_url(12 * 1024);
    let request = format!("GET {under} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let data = exchange(hg.proxy, request.as_bytes()).await;
    assert_eq!(parse_responses(&data)[0].status, 200, "a 12 KiB URL");
    assert_eq!(target.paths(), [under], "the URL arrives whole");

    let over = long_url(20 * 1024);
    let request = format!("GET {over} HTTP/1.1\r\nHost: x\r\n\r\n");
    expect_refused(&hg, "a 20 KiB URL", request.as_bytes(), 431).await;

    let mut request = String::from("GET /a/many HTTP/1.1\r\nHost: x\r\n");
    for i in 0..120 {
        request.push_str(&format!("X-H{i}: v\r\n"));
    }
    request.push_str("\r\n");
    expect_refused(&hg, "120 header fields", request.as_bytes(), 431).await;

    let request = format!(
        "GET /a/big-cookie HTTP/1.1\r\nHost: x\r\nCookie: c={}\r\n\r\n",
        "c".repeat(17 * 1024)
    );
    expect_refused(&hg, "a 17 KiB cookie", request.as_bytes(), 431).await;

    // A head that never ends, sent as fast as the socket takes it: refused when the limit is
    // reached, not buffered (the writes fail long before 64 MiB: the socket buffers on the way
    // hold far less).
    let mut stream = TcpStream::connect(hg.proxy).await.unwrap();
    let mut sent = 0usize;
    let mut head = b"GET /a/endless HTTP/1.1\r\nHost: x\r\n".to_vec();
    let line = format!("X-Endless: {}\r\n", "e".repeat(1000));
    while sent < 64 * 1024 * 1024 {
        head.extend_from_slice(line.as_bytes());
        if stream.write_all(&head).await.is_err() {
            break;
        }
        sent += head.len();
        head.clear();
    }
    let data = read_to_end(&mut stream, b"an endless head").await;
    let replies = parse_responses(&data);
    assert!(
        replies.is_empty() || replies[0].status == 431,
        "an endless head: {:?}",
        String::from_utf8_lossy(&data)
    );
    assert!(
        sent < 64 * 1024 * 1024,
        "hubgate read 64 MiB of a head limited to 16 KiB"
    );

    assert_eq!(target.paths().len(), 1, "{:?}", target.paths());
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn a_url_past_64_kib_is_414_even_when_heads_may_be_larger() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&["--max-header-size", "262144"]).await;
    hg.add_route("/a", &target.url()).await;
    let request = format!(
        "GET /a/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "u".repeat(70 * 1024)
    );
    expect_refused(&hg, "a 70 KiB URL", request.as_bytes(), 414).await;
    let request = format!(
        "GET /a/fine HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "h".repeat(100 * 1024)
    );
    let data = exchange(hg.proxy, request.as_bytes()).await;
    assert_eq!(parse_responses(&data)[0].status, 200, "a 100 KiB header");
    assert_eq!(target.paths(), ["/a/fine"]);
    assert_still_serving(&mut hg, "/a/after").await;
}

// ---------------------------------------------------------------------------------------------
// Smuggling through the upgrade path

const WS_HEAD: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn after_an_upgrade_the_target_refused_the_next_request_goes_to_its_own_route() {
    let a = Recorder::start().await;
    let b = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &a.url()).await;
    hg.add_route("/b", &b.url()).await;

    // The target at /a answers 200 to the upgrade: the connection stays HTTP, so the request
    // behind it is routed on its own path, never tunnelled to /a's target.
    let request = format!(
        "GET /a/ws HTTP/1.1\r\nHost: x\r\n{WS_HEAD}\r\n\
         GET /b/second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let data = exchange(hg.proxy, request.as_bytes()).await;
    let replies = parse_responses(&data);
    let texts: Vec<(u16, String)> = replies.iter().map(|r| (r.status, r.text())).collect();
    assert_eq!(
        texts,
        [(200, "/a/ws 0".to_owned()), (200, "/b/second 0".to_owned())],
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    assert_eq!(a.paths(), ["/a/ws"]);
    assert_eq!(b.paths(), ["/b/second"]);
    assert_still_serving(&mut hg, "/b/after").await;
}

#[tokio::test]
async fn bytes_pipelined_behind_an_accepted_upgrade_belong_to_the_tunnel() {
    let peer = WsPeer::start().await;
    let b = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/ws", &format!("http://{}", peer.addr)).await;
    hg.add_route("/b", &b.url()).await;

    let request = format!(
        "GET /ws/x HTTP/1.1\r\nHost: x\r\n{WS_HEAD}\r\n\
         GET /b/smuggled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let data = exchange(hg.proxy, request.as_bytes()).await;
    let replies = parse_responses(&data);
    assert_eq!(
        replies.first().map(|r| r.status),
        Some(101),
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    // The websocket peer got the bytes as (invalid) frames and closed the tunnel.
    assert!(matches!(peer.next_event().await, WsEvent::Opened { .. }));
    assert!(matches!(peer.next_event().await, WsEvent::Closed));
    assert!(b.seen().is_empty(), "{:?}", b.seen());
    assert_still_serving(&mut hg, "/b/after").await;
}

/// A target that answers every request on a connection with `reply` (and stays open).
async fn answering(reply: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                let mut got = Vec::new();
                loop {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    got.drain(..end + 4);
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_a_target_failure() {
    let (addr, _task) = answering(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
          GET /b/from-the-target HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let b = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/rogue", &format!("http://{addr}")).await;
    hg.add_route("/b", &b.url()).await;

    let data = exchange(
        hg.proxy,
        b"GET /rogue/x HTTP/1.1\r\nHost: x\r\n\r\nGET /b/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let replies = parse_responses(&data);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [503, 200],
        "a switch nobody asked for is a failed target, and the connection stays HTTP: {:?}",
        String::from_utf8_lossy(&data)
    );
    assert_eq!(b.paths(), ["/b/next"], "only the client's own request");
    logged(
        || hg.logs(),
        "saying why the target failed",
        |l| l.contains("proxy error") && l.contains("101") && l.contains("no upgrade"),
    )
    .await;
    assert_still_serving(&mut hg, "/b/after").await;
}

// ---------------------------------------------------------------------------------------------
// A request body that is the client's fault

#[tokio::test]
async fn a_malformed_chunked_body_is_400_and_not_blamed_on_the_target() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;
    let data = exchange(
        hg.proxy,
        b"POST /a/bad-chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\nzz\r\nnot a chunk\r\n0\r\n\r\nGET /a/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let replies = parse_responses(&data);
    assert!(
        replies.len() == 1 && replies[0].status == 400,
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    // The head may have gone on before the body was found bad: then the target saw the body
    // fail, never a complete (shorter) request. Nothing else reached it.
    let seen = target.wait_done(0).await;
    assert!(seen.len() <= 1, "{seen:?}");
    assert!(seen.iter().all(|a| !a.complete), "{seen:?}");
    logged(
        || hg.logs(),
        "blaming the request body",
        |l| l.contains("bad request") && l.contains("request body"),
    )
    .await;
    let logs = hg.logs();
    assert!(
        !logs.contains("proxy error"),
        "a client's bad body is not a target failure:\n{logs}"
    );
    assert_still_serving(&mut hg, "/a/after").await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 stream resets

type Upload =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

/// A body fed from a channel: `Ok` data goes out, an `Err` fails the body (hyper then resets
/// the stream).
fn channel_body() -> (mpsc::UnboundedSender<Result<Bytes, std::io::Error>>, Upload) {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map(Frame::data), rx))
    });
    (tx, StreamBody::new(stream.boxed()))
}

#[tokio::test]
async fn an_http2_stream_reset_mid_upload_reaches_the_target_as_an_aborted_body() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;

    let tcp = TcpStream::connect(hg.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Upload>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake (prior knowledge)");
    tokio::spawn(conn);

    let (tx, body) = channel_body();
    let req = Request::post(format!("http://{}/a/upload", hg.proxy))
        .body(body)
        .unwrap();
    let response = tokio::spawn(sender.send_request(req));
    tx.send(Ok(Bytes::from(vec![b'x'; 20_000]))).unwrap();
    eventually(WAIT, "the upload to start at the target", || {
        let seen = target.seen();
        async move { seen.first().is_some_and(|a| a.body_len >= 20_000) }
    })
    .await;
    tx.send(Err(std::io::Error::other("the client gives up")))
        .unwrap();
    let outcome = tokio::time::timeout(WAIT, response)
        .await
        .expect("the reset request never ended")
        .unwrap();
    assert!(
        outcome
            .as_ref()
            .map_or(true, |r| r.status() != StatusCode::OK),
        "{outcome:?}"
    );
    let seen = target.wait_done(1).await;
    assert_eq!(seen[0].method, "POST");
    assert!(
        !seen[0].complete,
        "a reset upload must not reach the target as a complete body: {:?}",
        seen[0].body_len
    );

    // The same connection carries on, and so does everyone else.
    let (tx, body) = channel_body();
    tx.send(Ok(Bytes::from_static(b"fine"))).unwrap();
    drop(tx);
    sender
        .ready()
        .await
        .expect("the HTTP/2 connection survived the reset");
    let req = Request::post(format!("http://{}/a/next", hg.proxy))
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("no answer on the same connection")
        .expect("a request on the same connection");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"/a/next 4");
    assert_still_serving(&mut hg, "/a/after").await;
}

/// An HTTP/2 frame: header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;

/// An HPACK string literal (not Huffman-coded) with a 7-bit length prefix.
fn hpack_string(s: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(s.len(), 7, 0);
    out.extend_from_slice(s);
    out
}

/// An HPACK integer with an `n`-bit prefix and the high bits `flags`.
fn hpack_int(mut value: usize, n: u32, flags: u8) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if value < max {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | max as u8];
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
    out
}

/// A request header block: `:method` (indexed: GET or POST), `:scheme http`, `:path`,
/// `:authority x`, then `extra` as literals without indexing, each with an indexed name from the
/// static table.
fn request_block(post: bool, path: &str, extra: &[(usize, &str)]) -> Vec<u8> {
    let mut block = vec![if post { 0x83 } else { 0x82 }, 0x86];
    block.extend(hpack_int(4, 4, 0));
    block.extend(hpack_string(path.as_bytes()));
    block.extend(hpack_int(1, 4, 0));
    block.extend(hpack_string(b"x"));
    for (index, value) in extra {
        block.extend(hpack_int(*index, 4, 0));
        block.extend(hpack_string(value.as_bytes()));
    }
    block
}

/// HPACK static table indexes.
const CONTENT_LENGTH: usize = 28;
const TRANSFER_ENCODING: usize = 57;

/// One frame read back: (type, flags, stream, payload).
type ReadFrame = (u8, u8, u32, Vec<u8>);

/// A raw HTTP/2 (prior knowledge) client: sends the preface and an empty SETTINGS, then what a
/// test writes; reads frames until the test has what it waits for or hubgate closes.
struct RawH2 {
    stream: TcpStream,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&preface).await.expect("preface");
        RawH2 { stream }
    }

    /// Writes `out` while reading frames, until `done(frames)` or the connection ends (then
    /// `closed`). Fails the test when neither happens within `WAIT`. Returns the frames and
    /// how many bytes of `out` were written.
    async fn exchange(
        &mut self,
        out: &[u8],
        done: impl Fn(&[ReadFrame]) -> bool,
    ) -> (Vec<ReadFrame>, usize, bool) {
        let (mut reader, mut writer) = self.stream.split();
        let mut written = 0;
        let write = async {
            for piece in out.chunks(16 * 1024) {
                if writer.write_all(piece).await.is_err() {
                    break;
                }
                written += piece.len();
            }
        };
        let mut frames = Vec::new();
        let mut closed = false;
        let read = async {
            let mut data = Vec::new();
            let mut buf = vec![0; 64 * 1024];
            loop {
                while data.len() >= 9 {
                    let len = (usize::from(data[0]) << 16)
                        | (usize::from(data[1]) << 8)
                        | usize::from(data[2]);
                    if data.len() < 9 + len {
                        break;
                    }
                    let stream = u32::from_be_bytes([data[5], data[6], data[7], data[8]]);
                    frames.push((
                        data[3],
                        data[4],
                        stream & 0x7fff_ffff,
                        data[9..9 + len].to_vec(),
                    ));
                    data.drain(..9 + len);
                }
                if done(&frames) {
                    return;
                }
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        closed = true;
                        return;
                    }
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
        };
        let (_, ()) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
            .await
            .unwrap_or_else(|_| {
                panic!("a raw HTTP/2 exchange was neither done nor closed after {WAIT:?}")
            });
        (frames, written, closed)
    }
}

fn has(frames: &[ReadFrame], kind: u8, stream: u32) -> bool {
    frames.iter().any(|f| f.0 == kind && f.2 == stream)
}

#[tokio::test]
async fn a_flood_of_http2_stream_resets_does_not_stop_other_clients() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;

    // "Rapid reset" (CVE-2023-44487): open a stream, cancel it at once, thousands of times.
    const STREAMS: u32 = 5000;
    let mut out = Vec::new();
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        let block = request_block(false, "/a/reset", &[]);
        out.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    let mut h2 = RawH2::connect(hg.proxy).await;
    let (frames, _, closed) = h2.exchange(&out, |f| has(f, GOAWAY, 0)).await;
    // hubgate sends a GOAWAY and closes (the rapid-reset limit of the h2 library).
    assert!(
        closed || has(&frames, GOAWAY, 0),
        "the resetting connection got neither a GOAWAY nor a close"
    );
    drop(h2);

    assert!(hg.is_running(), "hubgate exited:\n{}", hg.logs());
    let reached = target.paths().len();
    assert!(
        reached < STREAMS as usize,
        "every cancelled stream was forwarded ({reached})"
    );
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn http2_bodies_that_contradict_their_length_are_not_smuggled_to_http1_targets() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/a", &target.url()).await;

    // H2.CL: a body longer than its content-length, the rest an HTTP/1.1 request. H2.TE: a
    // transfer-encoding (not allowed in HTTP/2) with a chunked body that ends early, then a
    // request. Downgraded naively, either would put a second request on the target connection.
    let smuggled = "GET /a/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut out = Vec::new();
    out.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block(true, "/a/h2cl", &[(CONTENT_LENGTH, "5")]),
    ));
    out.extend(frame(
        DATA,
        END_STREAM,
        1,
        format!("hello{smuggled}").as_bytes(),
    ));
    out.extend(frame(
        HEADERS,
        END_HEADERS,
        3,
        &request_block(true, "/a/h2te", &[(TRANSFER_ENCODING, "chunked")]),
    ));
    out.extend(frame(
        DATA,
        END_STREAM,
        3,
        format!("0\r\n\r\n{smuggled}").as_bytes(),
    ));
    out.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        5,
        &request_block(false, "/a/after-h2", &[]),
    ));
    let mut h2 = RawH2::connect(hg.proxy).await;
    let (frames, _, _) = h2
        .exchange(&out, |f| has(f, HEADERS, 5) || has(f, GOAWAY, 0))
        .await;
    // Both bad streams are refused (reset), and the connection goes on to serve stream 5.
    for stream in [1, 3] {
        assert!(
            has(&frames, RST_STREAM, stream) || has(&frames, GOAWAY, 0),
            "stream {stream} was not refused: {frames:?}"
        );
    }
    drop(h2);
    let paths = target.paths();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "a smuggled request reached the target: {paths:?}"
    );
    for arrival in target.seen() {
        assert!(
            arrival.path == "/a/after-h2" || !arrival.complete,
            "a contradictory body reached the target as a whole request: {arrival:?}"
        );
    }
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn http2_heads_past_max_header_size_are_431_and_an_endless_one_is_cut_off() {
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&["--max-header-size", "16384"]).await;
    hg.add_route("/a", &target.url()).await;

    let tcp = TcpStream::connect(hg.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake (prior knowledge)");
    tokio::spawn(conn);
    let big = Request::get(format!("http://{}/a/big", hg.proxy))
        .header("x-big", "b".repeat(20 * 1024))
        .body(full(""))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(big))
        .await
        .expect("no answer to a large head")
        .expect("an answer to a large head");
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    sender.ready().await.expect("the connection survives a 431");
    let small = Request::get(format!("http://{}/a/small", hg.proxy))
        .body(full(""))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(small))
        .await
        .expect("no answer after a 431")
        .expect("an answer after a 431");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(target.paths(), ["/a/small"]);

    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames
    // (CVE-2024-27316's flood). hubgate must hang up, not buffer it: the writes fail long
    // before 64 MiB (the socket buffers on the way hold far less).
    const TOTAL: usize = 64 * 1024 * 1024;
    let mut block = request_block(false, "/a/endless", &[]);
    block.push(0x00);
    block.extend(hpack_string(b"x-endless"));
    block.extend(hpack_int(TOTAL, 7, 0));
    let mut out = frame(HEADERS, 0, 1, &block);
    let filler = vec![b'e'; 16 * 1024];
    while out.len() < TOTAL {
        out.extend(frame(CONTINUATION, 0, 1, &filler));
    }
    let mut h2 = RawH2::connect(hg.proxy).await;
    let (frames, written, closed) = h2.exchange(&out, |_| false).await;
    assert!(
        closed && has(&frames, GOAWAY, 0),
        "an endless header block got no GOAWAY and close: {frames:?}"
    );
    assert!(written < TOTAL, "hubgate took all of a 64 MiB header block");
    drop(h2);
    assert_eq!(target.paths(), ["/a/small"]);
    assert_still_serving(&mut hg, "/a/after").await;
}

// ---------------------------------------------------------------------------------------------
// A websocket client that never reads

/// A websocket server that sends 64 KiB binary messages as fast as it can, up to `limit`
/// bytes, counting what it managed to send; `finished` once sending failed or hit the limit.
struct Flooder {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    _task: JoinHandle<()>,
}

impl Flooder {
    async fn start(limit: u64) -> Flooder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let (count, done) = (sent.clone(), finished.clone());
        let task = tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            let chunk = Bytes::from(vec![b'f'; 64 * 1024]);
            while count.load(Ordering::SeqCst) < limit {
                if ws.send(Message::Binary(chunk.to_vec())).await.is_err() {
                    break;
                }
                count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        });
        Flooder {
            addr,
            sent,
            finished,
            _task: task,
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn a_websocket_client_that_never_reads_cannot_make_hubgate_buffer_a_flood() {
    const LIMIT: u64 = 1024 * MIB;
    let flooder = Flooder::start(LIMIT).await;
    let echo = WsPeer::start().await;
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/flood", &format!("http://{}", flooder.addr))
        .await;
    hg.add_route("/echo", &format!("http://{}", echo.addr))
        .await;
    hg.add_route("/a", &target.url()).await;
    let rss_before = hg.rss_bytes();

    let url = format!("ws://{}/flood/x", hg.proxy);
    let (sleeper, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    // The client never reads: once the socket buffers on the way are full, the flooder must be
    // held back, not hubgate's memory filled.
    let mut last = 0;
    eventually(WAIT, "the flood to be held back", || {
        let now = flooder.sent();
        let stalled = now == last && now > 0;
        last = now;
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stalled || now >= LIMIT
        }
    })
    .await;
    let sent = flooder.sent();
    let grown = hg.rss_bytes().saturating_sub(rss_before);
    assert!(
        sent < 64 * MIB,
        "the flooder sent {} MiB to a client that reads nothing",
        sent / MIB
    );
    assert!(
        grown < 64 * MIB,
        "hubgate grew by {} MiB holding a flood for a client that reads nothing",
        grown / MIB
    );

    // Everyone else is unaffected.
    assert_eq!(fresh_get(hg.proxy, "/a/meanwhile", &[]).await.status, 200);
    let url = format!("ws://{}/echo/x", hg.proxy);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    ws.send(Message::Text("still here".into())).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t == "still here"),
        "{echoed:?}"
    );

    // When the sleeper goes away, the tunnel ends and the flooder's sends fail.
    drop(sleeper);
    eventually(WAIT, "the flooder to notice the client is gone", || {
        let done = flooder.finished.load(Ordering::SeqCst);
        async move { done }
    })
    .await;
    assert!(flooder.sent() < LIMIT);
    assert_still_serving(&mut hg, "/a/after").await;
}

// ---------------------------------------------------------------------------------------------
// Thousands of idle connections

/// The value of `hubgate_active_connections{listener="proxy"}`.
async fn active_proxy_connections(hg: &Hubgate) -> i64 {
    let auth = format!("token {}", hg.token());
    let metrics = fresh_get(hg.api, "/metrics", &[("authorization", &auth)]).await;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    metrics
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("hubgate_active_connections{listener=\"proxy\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// How one idle connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Refused at the limit with the documented 503 JSON.
    Refused,
    /// Closed with nothing sent (the keep-alive timeout).
    Closed,
    /// Anything else: a failure.
    Other(String),
}

/// Opens `n` connections that send nothing and returns, per connection, a task that reads it
/// until it ends.
async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<JoinHandle<Fate>> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            let data = read_to_end(&mut stream, b"").await;
            if data.is_empty() {
                return Fate::Closed;
            }
            let replies = parse_responses(&data);
            match replies.first() {
                Some(r)
                    if r.status == 503
                        && r.header("content-type") == Some("application/json")
                        && r.text().contains("\"status\":503") =>
                {
                    Fate::Refused
                }
                _ => Fate::Other(String::from_utf8_lossy(&data).into_owned()),
            }
        }));
    }
    tasks
}

async fn fates(tasks: Vec<JoinHandle<Fate>>) -> (usize, usize) {
    let (mut refused, mut closed) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Fate::Refused => refused += 1,
            Fate::Closed => closed += 1,
            Fate::Other(what) => panic!("an idle connection ended with {what:?}"),
        }
    }
    (refused, closed)
}

#[tokio::test]
async fn idle_connections_past_a_small_limit_are_refused_and_the_rest_time_out() {
    const LIMIT: usize = 50;
    const OPEN: usize = 1000;
    ensure_open_files(4 * OPEN as u64);
    let target = Recorder::start().await;
    let mut hg = Hubgate::start(&[
        "--max-connections",
        &LIMIT.to_string(),
        "--keep-alive-timeout",
        "3000",
    ])
    .await;
    hg.add_route("/a", &target.url()).await;

    let tasks = idle_connections(hg.proxy, OPEN).await;
    // While they are open, a new client is served or refused cleanly, never left hanging.
    let data = exchange(
        hg.proxy,
        b"GET /a/during HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let during = parse_responses(&data);
    assert!(
        matches!(during.first().map(|r| r.status), Some(200 | 503)),
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    let (refused, closed) = fates(tasks).await;
    assert!(
        refused >= OPEN - LIMIT * 4 && closed >= 1,
        "of {OPEN} idle connections at a limit of {LIMIT}: {refused} refused, {closed} timed out"
    );
    eventually(WAIT, "the idle connections to be gone", || async {
        active_proxy_connections(&hg).await == 0
    })
    .await;
    assert_still_serving(&mut hg, "/a/after").await;
}

#[tokio::test]
async fn many_idle_connections_under_a_large_limit_leave_room_and_time_out() {
    const OPEN: usize = 1500;
    ensure_open_files(4 * OPEN as u64);
    let target = Recorder::start().await;
    let mut hg =
        Hubgate::start(&["--max-connections", "10000", "--keep-alive-timeout", "2000"]).await;
    hg.add_route("/a", &target.url()).await;
    let fds_before = fd_count(hg.pid());

    let tasks = idle_connections(hg.proxy, OPEN).await;
    let reply = fresh_get(hg.proxy, "/a/during", &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (refused, closed) = fates(tasks).await;
    assert_eq!(
        (refused, closed),
        (0, OPEN),
        "every idle connection timed out"
    );
    eventually(WAIT, "hubgate's descriptors to return", || {
        let fds = fd_count(hg.pid());
        async move { fds <= fds_before + 5 }
    })
    .await;
    assert_still_serving(&mut hg, "/a/after").await;
}

/// Raises this process's soft limit on open files to at least `n` (hubgate, started after,
/// inherits it): a machine whose soft limit is the usual 1024 still runs these tests.
fn ensure_open_files(n: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            let mut values = l
                .split_whitespace()
                .skip(3)
                .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
            (values.next().unwrap_or(0), values.next().unwrap_or(0))
        })
        .expect("a Max open files line");
    if soft >= n {
        return;
    }
    assert!(
        hard >= n,
        "this test needs {n} open files; the hard limit is {hard}"
    );
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={n}:{hard}"),
        ])
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
