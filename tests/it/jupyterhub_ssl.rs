//! End to end: a real JupyterHub 6 with `internal_ssl = True` runs hubgate as its proxy.
//!
//! With internal_ssl the hub creates its own CAs and certificates (under
//! `<workdir>/internal-ssl`), serves HTTPS itself, and starts the proxy with CHP's TLS flags:
//! `--api-ssl-key/-cert/-ca --api-ssl-request-cert --api-ssl-reject-unauthorized` (the hub talks
//! to the proxy's API over mutual TLS) and `--client-ssl-key/-cert/-ca --client-ssl-request-cert
//! --client-ssl-reject-unauthorized` (the certificate the proxy presents to `https://` targets,
//! and the CAs it trusts them by). Every target is then `https://`: the hub's own route and each
//! user's server, which gets a pair signed by the hub's `notebooks-ca` and requires a client
//! certificate. The fake server is `tests/e2e/singleuser_ssl.py`; the hub's configuration is
//! `tests/e2e/jupyterhub_ssl_config.py`. The public port stays plain HTTP.
//!
//! The scenario:
//! 1. the hub answers through hubgate (hubgate → hub over mutual TLS), and hubgate runs with
//!    every internal_ssl flag the hub passed;
//! 2. alice's server, started through the hub's REST API, answers through hubgate, and saw
//!    hubgate's `proxy-client` certificate;
//! 3. hubgate's API, with the hub's own certificate, lists `https://` targets for both routes;
//! 4. the API refuses plain HTTP, a TLS client without a certificate, and a client whose
//!    certificate comes from a CA the hub did not give hubgate for its API (`proxy-client-ca`);
//! 5. the hub reconciles its table over mutual TLS without repairing anything, and stopping
//!    alice's server removes her route.
#![cfg(target_os = "linux")]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::jhub::{
    alice_answers, eventually, hub_answers, hub_reconciles_again, hubgate_binary, start_server,
    stop_server, text, venv, Http, Hub, HubSpec, Ports, BASE_KEY, BASE_URL, PROXY_TOKEN,
};

/// Every flag JupyterHub 6 adds with internal_ssl (jupyterhub/proxy.py, `_get_ssl_options`).
const INTERNAL_SSL_FLAGS: [&str; 10] = [
    "--api-ssl-key",
    "--api-ssl-cert",
    "--api-ssl-ca",
    "--api-ssl-request-cert",
    "--api-ssl-reject-unauthorized",
    "--client-ssl-key",
    "--client-ssl-cert",
    "--client-ssl-ca",
    "--client-ssl-request-cert",
    "--client-ssl-reject-unauthorized",
];
/// The header singleuser_ssl.py answers with: the common name of the client's certificate.
const PEER_HEADER: &str = "x-fake-singleuser-peer";
/// How long one exchange with the API may take.
const EXCHANGE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_with_internal_ssl_runs_on_hubgate() {
    let venv = tokio::task::spawn_blocking(venv)
        .await
        .expect("venv setup panicked");
    let spec = Ports::free().map(|ports| HubSpec {
        config: "jupyterhub_ssl_config.py",
        proxy_command: hubgate_binary(),
        ports,
        env: Vec::new(),
    });
    let hub = spec
        .and_then(|spec| Hub::start(venv, spec))
        .unwrap_or_else(|e| panic!("starting JupyterHub failed: {e:#}"));
    if let Err(e) = scenario(&hub).await {
        let cmdline = hub
            .proxy_pid()
            .and_then(proxy_cmdline)
            .map_or_else(|e| format!("(unknown: {e:#})"), |args| args.join(" "));
        panic!(
            "{e:#}\n\nthe hub started the proxy as: {cmdline}\n\n\
             ----- JupyterHub log (hubgate logs to the same stream) -----\n{}",
            hub.log_tail(400)
        );
    }
}

async fn scenario(hub: &Hub) -> Result<()> {
    let http = Http::new();

    // 1. The hub's route is https:// and the hub requires a client certificate: an answer here
    //    means hubgate reached it with the one the hub gave it.
    hub_answers(&http, hub).await?;
    let flags = ProxyFlags::read(hub)?;
    eprintln!(
        "JupyterHub with internal_ssl is up behind {}; API CA {}, target CA {}",
        hub.proxy_command.display(),
        flags.api_ca.display(),
        flags.client_ca.display()
    );
    let certs = hub.workdir().join("internal-ssl");
    let hub_pair = (
        certs.join("hub-internal/hub-internal.crt"),
        certs.join("hub-internal/hub-internal.key"),
    );
    // The bundle the hub itself trusts: every CA it made, proxy-api-ca among them.
    let hub_trust = certs.join("hub-ca_trust.crt");
    let api = MtlsApi {
        port: hub.api_port,
        roots: hub_trust.clone(),
    };

    // 2. alice's server: https:// target requiring a client certificate from proxy-client-ca.
    start_server(&http, hub, "alice").await?;
    eventually(hub, "alice's server answers through hubgate", || {
        alice_answers(&http, hub)
    })
    .await?;
    let url = hub.public_url("user/alice/x");
    let (status, headers, body) = http.get(&url, None).await?;
    ensure!(
        status == StatusCode::OK,
        "GET {url}: {status} {}",
        text(&body)
    );
    let echo: Value = serde_json::from_slice(&body)
        .with_context(|| format!("GET {url}: not the fake server's JSON: {}", text(&body)))?;
    let want_path = format!("{BASE_URL}user/alice/x");
    ensure!(
        echo["server"] == "fake-singleuser"
            && echo["user"] == "alice"
            && echo["path"] == want_path.as_str(),
        "GET {url}: unexpected answer {echo}"
    );
    let peer = headers.get(PEER_HEADER).and_then(|v| v.to_str().ok());
    ensure!(
        peer == Some("proxy-client"),
        "alice's server saw client certificate {peer:?}, want hubgate's `proxy-client`"
    );

    // 3. The API with the hub's own certificate: both targets are https://.
    let routes = api
        .routes(Some(&hub_pair))
        .await
        .context("GET /api/routes with the hub's certificate")?;
    let hub_target = format!("https://127.0.0.1:{}", hub.hub_port);
    let hub_route = routes.get(BASE_KEY).with_context(|| {
        format!(
            "no hub route {BASE_KEY:?} in {}",
            Value::from(routes.clone())
        )
    })?;
    ensure!(
        hub_route["target"] == hub_target.as_str() && hub_route["hub"] == true,
        "hub route {hub_route}, want target {hub_target}"
    );
    let alice_key = format!("{BASE_KEY}/user/alice");
    let alice = routes
        .get(&alice_key)
        .with_context(|| format!("no route {alice_key:?} in {}", Value::from(routes.clone())))?;
    ensure!(
        alice["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://127.0.0.1:"))
            && alice["user"] == "alice",
        "route {alice_key:?}: {alice}, want an https:// target"
    );

    // 4. Mutual TLS only. The same client code succeeded just above, so a failure here is the
    //    server's refusal, not a bad root or server name on our side.
    let plain = plain_http_get(hub.api_port).await;
    ensure!(
        !plain.starts_with(b"HTTP/"),
        "the API answered plain HTTP: {}",
        text(&plain)
    );
    let without_cert = api.routes(None).await;
    ensure!(
        without_cert.is_err(),
        "the API answered a TLS client without a certificate: {without_cert:?}"
    );
    let other_ca = api
        .routes(Some(&(flags.client_cert.clone(), flags.client_key.clone())))
        .await;
    ensure!(
        other_ca.is_err(),
        "the API answered a client whose certificate is from proxy-client-ca, \
         which is not in --api-ssl-ca {}: {other_ca:?}",
        flags.api_ca.display()
    );
    eprintln!(
        "API refused: plain HTTP ({} bytes back), no certificate ({:#}), \
         proxy-client certificate ({:#})",
        plain.len(),
        without_cert.err().unwrap_or_else(|| anyhow!("?")),
        other_ca.err().unwrap_or_else(|| anyhow!("?"))
    );

    // 5. The hub reconciles over mutual TLS (every 2 s) and finds nothing to repair.
    hub_reconciles_again(hub).await?;
    stop_server(&http, hub, "alice").await?;
    eventually(hub, "alice's route is gone from hubgate", || async {
        let routes = api.routes(Some(&hub_pair)).await?;
        ensure!(
            !routes.contains_key(&alice_key),
            "hubgate still lists {alice_key:?}"
        );
        Ok(())
    })
    .await?;
    let log = hub.log();
    for trouble in [
        "Deleting stale route",
        "Updating route",
        "Updating Hub route",
        "already deleted",
        "Failed to connect to proxy",
        "Proxy stopped",
    ] {
        ensure!(
            !log.contains(trouble),
            "`{trouble}` in the hub's log: the hub had trouble with hubgate over internal_ssl"
        );
    }
    Ok(())
}

/// The files the hub passed to the proxy, read from the running proxy's command line.
struct ProxyFlags {
    api_ca: PathBuf,
    client_key: PathBuf,
    client_cert: PathBuf,
    client_ca: PathBuf,
}

impl ProxyFlags {
    fn read(hub: &Hub) -> Result<Self> {
        let pid = hub.proxy_pid()?;
        ensure!(hub.is_proxy(pid), "pid {pid} is not hubgate");
        let args = proxy_cmdline(pid)?;
        let missing: Vec<&str> = INTERNAL_SSL_FLAGS
            .into_iter()
            .filter(|flag| {
                !args
                    .iter()
                    .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            })
            .collect();
        ensure!(
            missing.is_empty(),
            "the hub started hubgate without {missing:?}: {}",
            args.join(" ")
        );
        let value = |flag: &str| -> Result<PathBuf> {
            let path = args
                .iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
                .with_context(|| format!("{flag} has no value in {}", args.join(" ")))?;
            ensure!(path.is_file(), "{flag} {} is not a file", path.display());
            Ok(path)
        };
        Ok(ProxyFlags {
            api_ca: value("--api-ssl-ca")?,
            client_key: value("--client-ssl-key")?,
            client_cert: value("--client-ssl-cert")?,
            client_ca: value("--client-ssl-ca")?,
        })
    }
}

fn proxy_cmdline(pid: u32) -> Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).context("reading the proxy's cmdline")?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// hubgate's API over TLS, verified against the hub's trust bundle, as the hub reaches it.
struct MtlsApi {
    port: u16,
    roots: PathBuf,
}

impl MtlsApi {
    /// `GET /api/routes` with the proxy token, presenting `identity` (certificate, key) if any.
    async fn routes(&self, identity: Option<&(PathBuf, PathBuf)>) -> Result<Map<String, Value>> {
        let config = client_config(&self.roots, identity)?;
        let exchange = async {
            let tcp = TcpStream::connect(("127.0.0.1", self.port)).await?;
            let name = ServerName::try_from("127.0.0.1")?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .context("HTTP/1.1 over TLS")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let request = Request::get("/api/routes")
                .header(HOST, format!("127.0.0.1:{}", self.port))
                .header(AUTHORIZATION, format!("token {PROXY_TOKEN}"))
                .body(Empty::<Bytes>::new())?;
            let response = sender.send_request(request).await.context("request")?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.context("response body")?.to_bytes();
            anyhow::Ok((parts, body))
        };
        let (parts, body) = tokio::time::timeout(EXCHANGE, exchange)
            .await
            .map_err(|_| anyhow!("no answer within {EXCHANGE:?}"))??;
        ensure!(
            parts.status == StatusCode::OK,
            "GET /api/routes: {} {}",
            parts.status,
            text(&body)
        );
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        ensure!(
            content_type.is_some_and(|t| t.starts_with("application/json")),
            "GET /api/routes: Content-Type {content_type:?}"
        );
        match serde_json::from_slice(&body).context("GET /api/routes: not JSON")? {
            Value::Object(routes) => Ok(routes),
            other => Err(anyhow!("GET /api/routes: not an object: {other}")),
        }
    }
}

fn client_config(roots: &Path, identity: Option<&(PathBuf, PathBuf)>) -> Result<Arc<ClientConfig>> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(roots)
        .with_context(|| format!("reading {}", roots.display()))?
    {
        store.add(cert?)?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whatever the API port sends back to a plain-HTTP request (up to 4 KiB, within 5 s).
async fn plain_http_get(port: u16) -> Vec<u8> {
    let exchange = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!(
            "GET /api/routes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Authorization: token {PROXY_TOKEN}\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while answer.len() < 4096 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        std::io::Result::Ok(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(answer)) => answer,
        _ => Vec::new(),
    }
}
