//! Websocket load for the whole-process benchmark (`benches/load/run.sh`).
//!
//! Three modes, each bounded in time and count, loopback only:
//! - `wsload echo --listen 127.0.0.1:PORT [--secs S]`: a websocket echo backend that exits after
//!   `S` seconds (default one hour) so a forgotten one does not linger.
//! - `wsload hold --url ws://... --conns N --pid PID [--secs S]`: opens `N` connections through
//!   the proxy (at most `--parallel` handshakes at a time), checks each with one echo, holds them
//!   all open for `S` seconds, and prints one JSON line: how many opened and answered, how long
//!   opening took, and the proxy's `VmRSS` (from `/proc/PID/status`) before and while held.
//! - `wsload rate --url ws://... --conns C --secs S`: `C` connections each sending a small
//!   message and waiting for its echo, in a loop for `S` seconds; prints messages per second and
//!   the round-trip p50/p99 as one JSON line.
//!
//! `--header 'Name: value'` (repeatable) adds a header to every handshake, e.g. credentials.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Small buffers: tens of thousands of idle connections must not measure the load tool.
fn ws_config() -> WebSocketConfig {
    #[allow(deprecated)]
    WebSocketConfig {
        max_send_queue: None,
        write_buffer_size: 0,
        max_write_buffer_size: 1 << 20,
        max_message_size: Some(1 << 20),
        max_frame_size: Some(1 << 20),
        accept_unmasked_frames: false,
    }
}

struct Args {
    mode: String,
    listen: String,
    url: String,
    conns: usize,
    parallel: usize,
    pid: Option<u32>,
    secs: f64,
    size: usize,
    timeout: f64,
    headers: Vec<(HeaderName, HeaderValue)>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut argv = std::env::args().skip(1);
    let mode = argv
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: wsload echo|hold|rate [options]"))?;
    let mut a = Args {
        mode,
        listen: "127.0.0.1:0".into(),
        url: String::new(),
        conns: 100,
        parallel: 200,
        pid: None,
        secs: 0.0,
        size: 64,
        timeout: 120.0,
        headers: Vec::new(),
    };
    while let Some(flag) = argv.next() {
        let value = argv
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => a.listen = value,
            "--url" => a.url = value,
            "--conns" => a.conns = value.parse()?,
            "--parallel" => a.parallel = value.parse()?,
            "--pid" => a.pid = Some(value.parse()?),
            "--secs" => a.secs = value.parse()?,
            "--size" => a.size = value.parse()?,
            "--timeout" => a.timeout = value.parse()?,
            "--header" => {
                let (k, v) = value
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--header wants 'Name: value'"))?;
                a.headers.push((
                    HeaderName::try_from(k.trim())?,
                    HeaderValue::try_from(v.trim())?,
                ));
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn rss_kb(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn check_loopback(addr: &str) -> anyhow::Result<()> {
    let host = addr
        .trim_start_matches("ws://")
        .split(['/', '?'])
        .next()
        .unwrap_or_default();
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    if ["127.0.0.1", "localhost", "[::1]"].contains(&host) {
        Ok(())
    } else {
        anyhow::bail!("wsload only talks to loopback addresses, not {host}")
    }
}

async fn connect(args: &Args) -> anyhow::Result<Ws> {
    let mut req = args.url.as_str().into_client_request()?;
    for (k, v) in &args.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    let host = req
        .uri()
        .authority()
        .ok_or_else(|| anyhow::anyhow!("url without host"))?
        .to_string();
    let tcp = TcpStream::connect(host).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config())).await?;
    Ok(ws)
}

/// Sends one message and waits for the same payload back.
async fn echo_once(ws: &mut Ws, payload: &str) -> anyhow::Result<()> {
    ws.send(Message::Text(payload.to_owned())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t == payload => return Ok(()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => anyhow::bail!("unexpected message {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed"),
        }
    }
}

async fn echo_server(args: &Args) -> anyhow::Result<()> {
    check_loopback(&args.listen)?;
    let listener = TcpListener::bind(&args.listen).await?;
    eprintln!("wsload echo listening on {}", listener.local_addr()?);
    let secs = if args.secs > 0.0 { args.secs } else { 3600.0 };
    let deadline = tokio::time::sleep(Duration::from_secs_f64(secs));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Ok(()),
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        let reply = match msg {
                            Message::Text(_) | Message::Binary(_) => msg,
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
}

async fn hold(args: Arc<Args>) -> anyhow::Result<()> {
    check_loopback(&args.url)?;
    let rss_before = rss_kb(args.pid);
    let limit = Arc::new(Semaphore::new(args.parallel.max(1)));
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(args.timeout);
    let mut tasks = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let limit = limit.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.ok()?;
            let open = async {
                let mut ws = connect(&args).await?;
                echo_once(&mut ws, &format!("hello {i}")).await?;
                anyhow::Ok(ws)
            };
            match tokio::time::timeout(deadline, open).await {
                Ok(Ok(ws)) => Some(ws),
                Ok(Err(e)) => {
                    if i % 1000 == 0 || args.conns <= 10 {
                        eprintln!("wsload: connection {i} failed: {e}");
                    }
                    None
                }
                Err(_) => None,
            }
        }));
    }
    let mut held = Vec::with_capacity(args.conns);
    for t in tasks {
        if let Ok(Some(ws)) = t.await {
            held.push(ws);
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.secs.max(1.0))).await;
    let rss_held = rss_kb(args.pid);
    // Still alive after the hold? One more echo on a sample of them.
    let sample: Vec<usize> = (0..held.len()).step_by((held.len() / 100).max(1)).collect();
    let mut alive = 0usize;
    for &i in &sample {
        let ok = tokio::time::timeout(
            Duration::from_secs(5),
            echo_once(&mut held[i], "still there"),
        )
        .await;
        if matches!(ok, Ok(Ok(()))) {
            alive += 1;
        }
    }
    let opened = held.len();
    let close_start = Instant::now();
    let closes = held.into_iter().map(|mut ws| async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    });
    futures_util::future::join_all(closes).await;
    println!(
        "{}",
        serde_json::json!({
            "mode": "hold",
            "wanted": args.conns,
            "opened": opened,
            "failed": args.conns - opened,
            "open_secs": open_secs,
            "sample_alive": alive,
            "sample": sample.len(),
            "rss_kb_before": rss_before,
            "rss_kb_held": rss_held,
            "close_secs": close_start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

async fn rate(args: Arc<Args>) -> anyhow::Result<()> {
    check_loopback(&args.url)?;
    let secs = if args.secs > 0.0 { args.secs } else { 10.0 };
    let mut conns = Vec::new();
    for _ in 0..args.conns {
        conns.push(connect(&args).await?);
    }
    let payload: String = "x".repeat(args.size);
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for mut ws in conns {
        let payload = payload.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut rtts_us: Vec<u32> = Vec::with_capacity(1 << 16);
            while Instant::now() < end {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), echo_once(&mut ws, &payload))
                    .await
                {
                    Ok(Ok(())) => {
                        rtts_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32)
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            rtts_us
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "mode": "rate",
            "conns": args.conns,
            "messages": all.len(),
            "secs": elapsed,
            "msgs_per_sec": all.len() as f64 / elapsed,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "errors": errors.load(Ordering::Relaxed),
            "rss_kb": rss_kb(args.pid),
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(parse_args()?);
    match args.mode.as_str() {
        "echo" => echo_server(&args).await,
        "hold" => hold(args).await,
        "rate" => rate(args).await,
        other => anyhow::bail!("unknown mode {other}: echo, hold or rate"),
    }
}
