//! A fixed number of requests, for the per-request cost budget (`benches/load/budget.sh`).
//!
//! Timed load (wrk) answers "how fast"; this answers "how much work per request", which needs
//! the same requests every time so that instruction and allocation counts can be divided by
//! their number. Two modes, loopback only, each bounded:
//! - `fixedload serve --listen 127.0.0.1:PORT [--secs S]`: a backend answering every request
//!   with a small fixed body (exits after `S` seconds, default one hour).
//! - `fixedload send --url http://127.0.0.1:PORT/path --conns C --requests N [--header 'N: V']`:
//!   `N` GET requests (each with that header, if given) spread over `C` keep-alive connections,
//!   one at a time on each; fails unless every answer is a 200. Prints one JSON line with the count and the elapsed seconds.
//! - `fixedload floor --listen 127.0.0.1:PORT --target 127.0.0.1:PORT [--secs S]`: the floor
//!   the issue-14 measurements compare hubgate with: a bare hyper 1.x proxy on one
//!   `current_thread` runtime, one upstream connection (`client::conn::http1`) per client
//!   connection, TCP_NODELAY both sides, adding one header; no routing, auth, metrics or log.
//!   What hubgate costs above it is hubgate's own work; what it costs above nginx is hyper's.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const BODY: &[u8] =
    b"hello from the backend: a small static response of about one hundred bytes.....\n";

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
            let secs: f64 = arg(&args, "--secs").map_or(Ok(3600.0), |s| s.parse())?;
            serve(&listen, Duration::from_secs_f64(secs)).await
        }
        Some("send") => {
            let url: hyper::Uri = arg(&args, "--url")
                .ok_or_else(|| anyhow::anyhow!("--url is required"))?
                .parse()?;
            let conns: usize = arg(&args, "--conns").map_or(Ok(32), |s| s.parse())?;
            let requests: usize = arg(&args, "--requests").map_or(Ok(20_000), |s| s.parse())?;
            let header = arg(&args, "--header");
            send(url, conns, requests, header).await
        }
        Some("floor") => {
            let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
            let target = arg(&args, "--target")
                .ok_or_else(|| anyhow::anyhow!("--target host:port is required"))?;
            let secs: f64 = arg(&args, "--secs").map_or(Ok(3600.0), |s| s.parse())?;
            floor(&listen, target, Duration::from_secs_f64(secs)).await
        }
        _ => anyhow::bail!(
            "usage: fixedload serve --listen ADDR | send --url URL --conns C --requests N \
             [--header 'N: V'] | floor --listen ADDR --target HOST:PORT"
        ),
    }
}

async fn serve(listen: &str, lifetime: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    let accept = async {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        r = accept => r,
        () = tokio::time::sleep(lifetime) => Ok(()),
    }
}

async fn send(
    url: hyper::Uri,
    conns: usize,
    requests: usize,
    header: Option<String>,
) -> anyhow::Result<()> {
    let header = match header.as_deref().map(|h| h.split_once(':')) {
        None => None,
        Some(Some((name, value))) => Some((
            hyper::header::HeaderName::from_bytes(name.trim().as_bytes())?,
            hyper::header::HeaderValue::from_str(value.trim())?,
        )),
        Some(None) => anyhow::bail!("--header wants 'Name: value'"),
    };
    let authority = url
        .authority()
        .ok_or_else(|| anyhow::anyhow!("--url needs host:port"))?
        .clone();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conns {
        let share = requests / conns + usize::from(i < requests % conns);
        let (url, authority, header) = (url.clone(), authority.clone(), header.clone());
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(authority.as_str()).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            for _ in 0..share {
                let mut req = Request::get(url.clone())
                    .header(hyper::header::HOST, authority.as_str())
                    .body(Empty::<Bytes>::new())?;
                if let Some((name, value)) = &header {
                    req.headers_mut().insert(name.clone(), value.clone());
                }
                let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
                    .await??;
                anyhow::ensure!(resp.status() == 200, "answered {}", resp.status());
                resp.into_body().collect().await?;
            }
            Ok::<usize, anyhow::Error>(share)
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    println!(
        "{{\"requests\": {done}, \"seconds\": {:.3}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn floor(listen: &str, target: String, lifetime: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    let target: &'static str = target.leak();
    let accept = async {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                if let Err(e) = floor_connection(stream, target).await {
                    eprintln!("floor: {e}");
                }
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        r = accept => r,
        () = tokio::time::sleep(lifetime) => Ok(()),
    }
}

/// One client connection with its own upstream connection, both driven on this thread.
async fn floor_connection(client: TcpStream, target: &'static str) -> anyhow::Result<()> {
    let upstream = TcpStream::connect(target).await?;
    upstream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(conn);
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let sender = sender.clone();
        async move {
            req.headers_mut().insert(
                "x-forwarded-proto",
                hyper::header::HeaderValue::from_static("http"),
            );
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(req).await
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}
