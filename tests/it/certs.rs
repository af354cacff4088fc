//! Certificates and TLS peers for the TLS tests: CAs, server and client certificates made by
//! rcgen and written into a temporary directory, rustls clients that talk to hubgate (HTTP/1.1
//! or HTTP/2 by ALPN), and rustls servers that stand in for `https://` targets.
//!
//! Every certificate names `localhost` and `127.0.0.1`, so a target URL may use either.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion,
};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

use crate::support::{collect, full, Body, Resp, WAIT};

/// The server name every test client asks for.
pub const SERVER_NAME: &str = "localhost";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority that issues server and client certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/<stem>.pem`.
    pub fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, self.pem()).expect("write CA certificate");
        path
    }

    /// A root store trusting this CA only.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert.der().clone())
            .expect("the CA is a valid trust anchor");
        roots
    }

    /// A certificate for `localhost` and `127.0.0.1`, usable by servers and clients alike, with
    /// common name `name` and this serial number.
    pub fn issue(&self, name: &str, serial: u64) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = leaf_params(name, serial)
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign a leaf certificate");
        Leaf::from_parts(&cert, &key)
    }
}

fn leaf_params(name: &str, serial: u64) -> CertificateParams {
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])
        .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.serial_number = Some(SerialNumber::from(serial));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// A certificate and its private key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Leaf {
    /// A certificate signed by its own key: trusted by nobody.
    pub fn self_signed(name: &str) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let cert = leaf_params(name, 1)
            .self_signed(&key)
            .expect("self-sign a leaf");
        Leaf::from_parts(&cert, &key)
    }

    fn from_parts(cert: &rcgen::Certificate, key: &KeyPair) -> Leaf {
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Writes `dir/<stem>.key` and `dir/<stem>.crt`; returns (key, cert) paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let key = dir.join(format!("{stem}.key"));
        let cert = dir.join(format!("{stem}.crt"));
        std::fs::write(&key, &self.key_pem).expect("write key");
        std::fs::write(&cert, &self.cert_pem).expect("write certificate");
        (key, cert)
    }

    /// The chain and key, for a rustls configuration.
    pub fn identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("parse key");
        (vec![self.der.clone()], key)
    }
}

/// Replaces `path` with `contents` in one rename, so a watcher never reads half a file.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("swap");
    std::fs::write(&tmp, contents).expect("write replacement");
    std::fs::rename(&tmp, path).expect("rename replacement into place");
}

/// How a test client proves itself and what it offers.
pub struct ClientOptions<'a> {
    pub roots: RootCertStore,
    pub identity: Option<&'a Leaf>,
    pub alpn: &'a [&'a [u8]],
    pub versions: &'a [&'static SupportedProtocolVersion],
}

/// ALPN offering HTTP/1.1 only.
pub const HTTP1_ONLY: &[&[u8]] = &[b"http/1.1"];
/// ALPN offering HTTP/2 first, then HTTP/1.1.
pub const H2_AND_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

impl<'a> ClientOptions<'a> {
    /// Trusting `ca`, no client certificate, HTTP/1.1 only, TLS 1.2 and 1.3.
    pub fn trusting(ca: &Ca) -> ClientOptions<'a> {
        ClientOptions {
            roots: ca.roots(),
            identity: None,
            alpn: HTTP1_ONLY,
            versions: rustls::ALL_VERSIONS,
        }
    }
}

pub fn client_config(opts: ClientOptions<'_>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(opts.versions)
        .expect("protocol versions")
        .with_root_certificates(opts.roots);
    let mut config = match opts.identity {
        Some(leaf) => {
            let (chain, key) = leaf.identity();
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = opts.alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS handshake with `addr` for `localhost`. The error is the handshake's (or a timeout).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(SERVER_NAME).expect("valid server name");
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(WAIT, connect)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS connect")))
}

/// The certificate the server presented on this connection.
pub fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned()
        .expect("the server presented a certificate")
}

/// An HTTP/1.1 connection over `io`, driven by a task of its own.
pub async fn h1<I>(io: I) -> hyper::Result<hyper::client::conn::http1::SendRequest<Body>>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// An HTTP/2 connection over `io`, driven by a task of its own.
pub async fn h2<I>(io: I) -> hyper::Result<hyper::client::conn::http2::SendRequest<Body>>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `GET path` with `Host: localhost` over a fresh HTTP/1.1 TLS connection.
pub async fn tls_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let stream = tls_connect(addr, config)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let mut sender = h1(stream).await.map_err(|e| format!("{e:?}"))?;
    let mut req = Request::get(path).header(header::HOST, SERVER_NAME);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    collect(sender.send_request(req.body(full("")).unwrap())).await
}

/// A rustls server configuration presenting `leaf`; with `client_ca`, clients must present a
/// certificate issued by it.
pub fn server_config(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider())
                .build()
                .expect("client verifier"),
        ),
        None => builder.with_no_client_auth(),
    };
    let (chain, key) = leaf.identity();
    let mut config = builder
        .with_single_cert(chain, key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// An `https://` target answering every request with `echo_versioned`; stopped on drop.
pub struct TlsTarget {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsTarget {
    pub async fn start(config: Arc<ServerConfig>) -> TlsTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake is the point of some tests: nothing to do then.
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(|req| async move {
                        Ok::<_, Infallible>(echo_versioned(req).await)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TlsTarget { addr, task }
    }

    /// `https://localhost:PORT`.
    pub fn url(&self) -> String {
        format!("https://{SERVER_NAME}:{}", self.addr.port())
    }
}

/// 200 `{"path", "version", "headers": {name: value}}` describing the request.
pub async fn echo_versioned(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let _ = body.collect().await;
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into(),
            )
        })
        .collect();
    let doc = json!({
        "path": parts.uri.path_and_query().map_or("", |pq| pq.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(doc.to_string()))
        .unwrap()
}
