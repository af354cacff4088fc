//! TLS: HTTPS (HTTP/1.1 and HTTP/2 by ALPN) on the public port, mutual TLS on the API port and
//! towards `https://` targets, certificate reloads (SIGHUP and changed files) that spare open
//! connections, start-up refusals of bad TLS settings, CHP's compatibility flags, and the
//! `--redirect-port` listener. Certificates are made by rcgen for each test.

use std::path::{Path, PathBuf};

use http::{header, Request, StatusCode};
use serde_json::Value;

use crate::certs::{
    client_config, echo_versioned, h1, h2, peer_cert, replace_file, tls_connect, tls_get, Ca,
    ClientOptions, Leaf, TlsTarget, H2_AND_HTTP1, SERVER_NAME,
};
use crate::lifecycle::{free_port, raw_exchange};
use crate::support::{collect, eventually, full, serve, Hubgate, Server, WAIT};

/// Exit code for a bad configuration (`EX_USAGE`).
const EX_USAGE: i32 = 64;
/// Exit code for a start-up failure found after the configuration was read.
const EX_START: i32 = 2;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

/// A CA, a server certificate from it in `dir`, and an echo backend reporting HTTP versions.
struct Https {
    ca: Ca,
    key: PathBuf,
    cert: PathBuf,
    backend: Server,
}

impl Https {
    async fn new(dir: &Path) -> Https {
        let ca = Ca::new("hubgate test CA");
        let (key, cert) = ca.issue("first", 1).write(dir, "server");
        let backend = serve(echo_versioned).await;
        Https {
            ca,
            key,
            cert,
            backend,
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--ssl-key".into(),
            path_str(&self.key).into(),
            "--ssl-cert".into(),
            path_str(&self.cert).into(),
        ]
    }

    /// hubgate with TLS on the public port, these extra flags, and the route `/app`.
    async fn start(&self, extra: &[&str]) -> Hubgate {
        let hg = Hubgate::builder()
            .args(self.args())
            .args(extra.iter().copied())
            .start()
            .await;
        hg.add_route("/app", &self.backend.url("")).await;
        hg
    }
}

#[tokio::test]
async fn https_serves_http1_and_http2_and_forwards_as_http1() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path()).await;
    let hg = https.start(&[]).await;

    // HTTP/1.1 by ALPN.
    let stream = tls_connect(hg.proxy, client_config(ClientOptions::trusting(&https.ca)))
        .await
        .expect("TLS handshake");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN"
    );
    let mut conn = h1(stream).await.unwrap();
    let req = Request::get("/app/one?x=1")
        .header(header::HOST, SERVER_NAME)
        .body(full(""))
        .unwrap();
    let resp = collect(conn.send_request(req))
        .await
        .expect("HTTPS request");
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let seen = resp.json();
    assert_eq!(seen["path"], "/app/one?x=1");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");
    assert_eq!(seen["headers"]["host"], SERVER_NAME, "{seen}");

    // HTTP/2 by ALPN: forwarded to the backend as HTTP/1.1 with the request's authority as Host.
    let mut opts = ClientOptions::trusting(&https.ca);
    opts.alpn = H2_AND_HTTP1;
    let stream = tls_connect(hg.proxy, client_config(opts))
        .await
        .expect("TLS handshake");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "hubgate must choose h2 when offered"
    );
    let mut conn = h2(stream).await.expect("HTTP/2 handshake");
    let authority = format!("{SERVER_NAME}:{}", hg.proxy.port());
    for i in 0..3 {
        let req = Request::get(format!("https://{authority}/app/two/{i}"))
            .body(full(""))
            .unwrap();
        let resp = collect(conn.send_request(req))
            .await
            .expect("HTTP/2 request");
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        let seen = resp.json();
        assert_eq!(seen["path"], format!("/app/two/{i}"));
        assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
        assert_eq!(seen["headers"]["host"], authority.as_str(), "{seen}");
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");
    }
}

/// Whether an exchange failed because the server sent a TLS alert (with TLS 1.3 a refused
/// client certificate shows on the first read, not in the client's handshake).
fn refused_by_alert(outcome: &Result<crate::support::Resp, String>) -> bool {
    matches!(outcome, Err(e) if e.to_ascii_lowercase().contains("alert"))
}

#[tokio::test]
async fn api_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let rogue_ca = Ca::new("rogue CA");
    let (key, cert) = server_ca.issue("api", 1).write(dir.path(), "api");
    let ca_file = client_ca.write(dir.path(), "client-ca");
    let hg = Hubgate::start(&[
        "--api-ssl-key",
        path_str(&key),
        "--api-ssl-cert",
        path_str(&cert),
        "--api-ssl-ca",
        path_str(&ca_file),
        "--api-ssl-request-cert",
        "--api-ssl-reject-unauthorized",
    ])
    .await;
    let auth = format!("token {}", hg.token());
    let headers = [("authorization", auth.as_str())];

    let good = client_ca.issue("jupyterhub", 7);
    let mut opts = ClientOptions::trusting(&server_ca);
    opts.identity = Some(&good);
    let resp = tls_get(hg.api, client_config(opts), "/api/routes", &headers)
        .await
        .expect("a client with a certificate from --api-ssl-ca");
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");

    let anonymous = tls_get(
        hg.api,
        client_config(ClientOptions::trusting(&server_ca)),
        "/api/routes",
        &headers,
    )
    .await;
    assert!(
        refused_by_alert(&anonymous),
        "a client without a certificate must be refused by a TLS alert: {anonymous:?}"
    );

    let stranger = rogue_ca.issue("intruder", 9);
    let mut opts = ClientOptions::trusting(&server_ca);
    opts.identity = Some(&stranger);
    let rogue = tls_get(hg.api, client_config(opts), "/api/routes", &headers).await;
    assert!(
        refused_by_alert(&rogue),
        "a client with a certificate from another CA must be refused by a TLS alert: {rogue:?}"
    );
}

/// The CAs and files of a target that requires client certificates from `client_ca`.
struct MutualTarget {
    server_ca_file: PathBuf,
    client_key: PathBuf,
    client_cert: PathBuf,
    target: TlsTarget,
}

impl MutualTarget {
    async fn start(dir: &Path) -> MutualTarget {
        let server_ca = Ca::new("internal server CA");
        let client_ca = Ca::new("internal client CA");
        let server_ca_file = server_ca.write(dir, "server-ca");
        let (client_key, client_cert) = client_ca.issue("proxy-client", 3).write(dir, "client");
        let config = crate::certs::server_config(&server_ca.issue("target", 2), Some(&client_ca));
        MutualTarget {
            server_ca_file,
            client_key,
            client_cert,
            target: TlsTarget::start(config).await,
        }
    }

    /// hubgate's flags for reaching the target: its client certificate and the target's CA.
    fn client_args(&self) -> [&str; 6] {
        [
            "--client-ssl-key",
            path_str(&self.client_key),
            "--client-ssl-cert",
            path_str(&self.client_cert),
            "--client-ssl-ca",
            path_str(&self.server_ca_file),
        ]
    }
}

#[tokio::test]
async fn https_target_requiring_a_client_certificate_is_reached_only_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MutualTarget::start(dir.path()).await;

    let with_cert = Hubgate::start(&mt.client_args()).await;
    with_cert.add_route("/t", &mt.target.url()).await;
    let resp = with_cert.get("/t/inside?x=1").await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "{resp:?}\n{}",
        with_cert.logs()
    );
    assert_eq!(resp.json()["path"], "/t/inside?x=1");

    let without_cert = Hubgate::start(&["--client-ssl-ca", path_str(&mt.server_ca_file)]).await;
    without_cert.add_route("/t", &mt.target.url()).await;
    let resp = without_cert.get("/t/inside").await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{resp:?}");
}

#[tokio::test]
async fn https_target_with_a_certificate_from_another_ca_is_503_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mt = MutualTarget::start(dir.path()).await;
    let other_ca = Ca::new("some other CA");
    let impostor = TlsTarget::start(crate::certs::server_config(
        &other_ca.issue("impostor", 4),
        None,
    ))
    .await;

    let hg = Hubgate::start(&mt.client_args()).await;
    hg.add_route("/t", &impostor.url()).await;
    let resp = hg.get("/t/x").await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{resp:?}");
    eventually(
        WAIT,
        "an error line naming a TLS failure of the target",
        || {
            let logged = hg
                .logs()
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("503") && l.contains("tls"));
            async move { logged }
        },
    )
    .await;
}

#[tokio::test]
async fn insecure_accepts_a_self_signed_target() {
    let target = TlsTarget::start(crate::certs::server_config(
        &Leaf::self_signed("self-signed target"),
        None,
    ))
    .await;

    let verifying = Hubgate::start(&[]).await;
    verifying.add_route("/t", &target.url()).await;
    let resp = verifying.get("/t/x").await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a self-signed target without --insecure: {resp:?}"
    );

    let insecure = Hubgate::start(&["--insecure"]).await;
    insecure.add_route("/t", &target.url()).await;
    let resp = insecure.get("/t/x").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}\n{}", insecure.logs());
    assert_eq!(resp.json()["path"], "/t/x");
}

/// How a reload is set off.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    Sighup,
    FileChange,
}

async fn reload_keeps_open_connections(trigger: Trigger) {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path()).await;
    let hg = https.start(&["--keep-alive-timeout", "60000"]).await;
    let config = client_config(ClientOptions::trusting(&https.ca));
    let first = tls_connect(hg.proxy, config.clone()).await.unwrap();
    let first_cert = peer_cert(&first);
    let mut old = h1(first).await.unwrap();
    let get = |path: &str| {
        Request::get(path)
            .header(header::HOST, SERVER_NAME)
            .body(full(""))
            .unwrap()
    };
    let resp = collect(old.send_request(get("/app/before"))).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);

    let second = https.ca.issue("second", 2);
    replace_file(&https.cert, &second.cert_pem);
    replace_file(&https.key, &second.key_pem);
    if let Trigger::Sighup = trigger {
        hg.signal("HUP");
    }
    eventually(
        WAIT,
        &format!("new connections to get the new certificate ({trigger:?})"),
        || {
            let config = config.clone();
            let want = second.der.clone();
            async move {
                match tls_connect(hg.proxy, config).await {
                    Ok(stream) => peer_cert(&stream) == want,
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    let fresh = tls_get(hg.proxy, config.clone(), "/app/new", &[])
        .await
        .expect("a request on a new connection after the reload");
    assert_eq!(fresh.status, StatusCode::OK);

    // The connection opened before the reload still works.
    old.ready().await.expect("the old connection is still open");
    let resp = collect(old.send_request(get("/app/after")))
        .await
        .expect("a request on the connection opened before the reload");
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_ne!(first_cert, second.der);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_connections_only() {
    reload_keeps_open_connections(Trigger::Sighup).await;
}

#[tokio::test]
async fn changed_certificate_files_are_reloaded_without_a_signal() {
    reload_keeps_open_connections(Trigger::FileChange).await;
}

fn refusals(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("certificate") && l.contains("refused")
        })
        .count()
}

#[tokio::test]
async fn a_broken_replacement_is_refused_and_the_old_certificate_stays() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path()).await;
    let hg = https.start(&["--keep-alive-timeout", "60000"]).await;
    let config = client_config(ClientOptions::trusting(&https.ca));
    let first = tls_connect(hg.proxy, config.clone()).await.unwrap();
    let original = peer_cert(&first);
    let mut old = h1(first).await.unwrap();
    let get = || {
        Request::get("/app/x")
            .header(header::HOST, SERVER_NAME)
            .body(full(""))
            .unwrap()
    };
    assert_eq!(
        collect(old.send_request(get())).await.unwrap().status,
        StatusCode::OK
    );

    let original_key = std::fs::read_to_string(&https.key).unwrap();
    let mismatched = https.ca.issue("mismatched", 3);
    let broken: [(&str, String, String); 2] = [
        (
            "garbage certificate",
            "this is not a certificate\n".to_owned(),
            original_key.clone(),
        ),
        (
            "certificate whose key is not the key file's",
            mismatched.cert_pem.clone(),
            original_key,
        ),
    ];
    for (what, cert, key) in broken {
        let before = refusals(&hg.logs());
        replace_file(&https.cert, &cert);
        replace_file(&https.key, &key);
        hg.signal("HUP");
        eventually(WAIT, &format!("a log line refusing the {what}"), || {
            let n = refusals(&hg.logs());
            async move { n > before }
        })
        .await;
        let stream = tls_connect(hg.proxy, config.clone())
            .await
            .unwrap_or_else(|e| panic!("after the {what}: {e}\n{}", hg.logs()));
        assert!(
            peer_cert(&stream) == original,
            "after the {what}, a new connection got another certificate"
        );
        let resp = tls_get(hg.proxy, config.clone(), "/app/y", &[])
            .await
            .unwrap_or_else(|e| panic!("after the {what}: {e}"));
        assert_eq!(resp.status, StatusCode::OK);
        old.ready().await.expect("the old connection is still open");
        assert_eq!(
            collect(old.send_request(get())).await.unwrap().status,
            StatusCode::OK,
            "the old connection after the {what}"
        );
    }
}

/// Runs hubgate with `args` expecting it to refuse to start: exit code 64 (or 2 for problems
/// found when the files are read) and one stderr line containing every string in `names`.
async fn assert_refused(args: &[&str], codes: &[i32], names: &[&str]) {
    let out = Hubgate::builder()
        .args(args.iter().copied())
        .run_to_exit()
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| codes.contains(&c)),
        "{args:?}: expected exit code {codes:?}, got {:?}; stderr:\n{err}",
        out.status
    );
    assert!(
        err.lines().any(|l| names.iter().all(|n| l.contains(n))),
        "{args:?}: no stderr line names {names:?}; stderr:\n{err}"
    );
}

#[tokio::test]
async fn bad_tls_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("start CA");
    let (key, cert) = ca.issue("server", 1).write(dir.path(), "server");
    let ca_file = ca.write(dir.path(), "ca");
    let (key, cert) = (path_str(&key), path_str(&cert));
    let missing = dir.path().join("missing.key");
    let encrypted = dir.path().join("encrypted.key");
    std::fs::write(
        &encrypted,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\n\
         MIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQIc2FsdHNhbHQCAggA\n\
         MAwGCCqGSIb3DQIJBQAwFAYIKoZIhvcNAwcECGl2aXZpdml2BIIEyA==\n\
         -----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    let not_pem = dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "hello\n").unwrap();

    assert_refused(
        &["--ssl-key", key],
        &[EX_USAGE],
        &["--ssl-key", "--ssl-cert"],
    )
    .await;
    assert_refused(
        &["--ssl-cert", cert],
        &[EX_USAGE],
        &["--ssl-cert", "--ssl-key"],
    )
    .await;
    assert_refused(
        &["--api-ssl-key", key],
        &[EX_USAGE],
        &["--api-ssl-key", "--api-ssl-cert"],
    )
    .await;
    assert_refused(
        &["--ssl-key", path_str(&missing), "--ssl-cert", cert],
        &[EX_USAGE, EX_START],
        &["--ssl-key", "missing.key"],
    )
    .await;
    assert_refused(
        &["--ssl-key", path_str(&encrypted), "--ssl-cert", cert],
        &[EX_USAGE, EX_START],
        &["encrypted.key", "passphrase"],
    )
    .await;
    assert_refused(
        &["--ssl-key", key, "--ssl-cert", path_str(&not_pem)],
        &[EX_USAGE, EX_START],
        &["not-pem.crt"],
    )
    .await;
    let port = free_port().to_string();
    assert_refused(
        &["--redirect-port", &port],
        &[EX_USAGE],
        &["--redirect-port"],
    )
    .await;
    assert_refused(
        &["--ssl-key", key, "--ssl-cert", cert, "--ssl-request-cert"],
        &[EX_USAGE],
        &["--ssl-request-cert", "--ssl-ca"],
    )
    .await;
    assert_refused(
        &[
            "--api-ssl-key",
            key,
            "--api-ssl-cert",
            cert,
            "--api-ssl-request-cert",
        ],
        &[EX_USAGE],
        &["--api-ssl-request-cert", "--api-ssl-ca"],
    )
    .await;
    // With a CA, asking for client certificates is fine.
    let hg = Hubgate::start(&[
        "--ssl-key",
        key,
        "--ssl-cert",
        cert,
        "--ssl-ca",
        path_str(&ca_file),
        "--ssl-request-cert",
    ])
    .await;
    assert!(hg.logs().contains("listening"));
}

#[tokio::test]
async fn chp_cipher_flags_start_with_one_warning_each() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path()).await;
    let dhparam = dir.path().join("dhparam.pem");
    std::fs::write(&dhparam, "unused\n").unwrap();
    let hg = https
        .start(&[
            "--ssl-ciphers",
            "ECDHE-RSA-AES128-GCM-SHA256:!RC4",
            "--ssl-allow-rc4",
            "--ssl-dhparam",
            path_str(&dhparam),
        ])
        .await;
    let logs = hg.logs();
    for flag in ["--ssl-ciphers", "--ssl-allow-rc4", "--ssl-dhparam"] {
        let warnings = logs
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(flag))
            .count();
        assert_eq!(warnings, 1, "warnings naming {flag}:\n{logs}");
    }
    let resp = tls_get(
        hg.proxy,
        client_config(ClientOptions::trusting(&https.ca)),
        "/app/x",
        &[],
    )
    .await
    .expect("HTTPS with the compatibility flags");
    assert_eq!(resp.status, StatusCode::OK);
}

#[tokio::test]
async fn ssl_protocol_tls12_refuses_tls13_only_clients() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path()).await;
    let hg = https.start(&["--ssl-protocol", "TLSv1_2"]).await;

    let mut only13 = ClientOptions::trusting(&https.ca);
    let tls13 = [&rustls::version::TLS13];
    only13.versions = &tls13;
    let refused = tls_get(hg.proxy, client_config(only13), "/app/x", &[]).await;
    assert!(
        refused_by_alert(&refused),
        "a TLS 1.3-only client must be refused by a TLS alert: {refused:?}"
    );

    let mut only12 = ClientOptions::trusting(&https.ca);
    let tls12 = [&rustls::version::TLS12];
    only12.versions = &tls12;
    let resp = tls_get(hg.proxy, client_config(only12), "/app/x", &[])
        .await
        .expect("a TLS 1.2 client");
    assert_eq!(resp.status, StatusCode::OK);

    let stream = tls_connect(hg.proxy, client_config(ClientOptions::trusting(&https.ca)))
        .await
        .expect("a client offering both versions");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn redirect_port_sends_plain_http_to_https() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path()).await;
    let https_port = free_port().to_string();
    let redirect_port = free_port();
    let redirect = redirect_port.to_string();
    let mut args = https.args();
    args.extend(
        [
            "--ip",
            "127.0.0.1",
            "--port",
            https_port.as_str(),
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            "0",
            "--redirect-port",
            redirect.as_str(),
        ]
        .map(String::from),
    );
    let hg = Hubgate::builder()
        .without_listen_args()
        .args(args)
        .start()
        .await;
    assert_eq!(hg.proxy.port().to_string(), https_port);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], redirect_port));
    eventually(WAIT, "the redirect listener", || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;

    let reply = raw_exchange(
        addr,
        b"GET /a/b?c=1 HTTP/1.1\r\nHost: example.org:8000\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 301, "{reply:?}");
    assert_eq!(
        reply.headers.get("location").map(String::as_str),
        Some(format!("https://example.org:{https_port}/a/b?c=1").as_str()),
        "{reply:?}"
    );

    let reply = raw_exchange(addr, b"GET /a/b?c=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    if let Ok(doc) = serde_json::from_slice::<Value>(&reply.body) {
        assert_eq!(doc["status"], 400, "{doc}");
    }
}
