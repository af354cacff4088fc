//! TLS with rustls: the public and API listeners (certificates that reload without dropping
//! connections), and client certificates and CAs for `https://` targets (JupyterHub's
//! `internal_ssl`).
//!
//! A listener's configuration sits behind an `ArcSwap`: each new handshake takes the current one,
//! so a reload (SIGHUP, or the files changing) affects only new connections. A replacement that
//! does not load or does not match its key is refused with a log line and the old one stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};

/// Why a certificate, key or CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error(
        "{path} is protected by a passphrase, which rustls cannot read; decrypt it first \
         (openssl pkey -in {path} -out plain.pem)"
    )]
    Encrypted { path: PathBuf },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(String),
}

/// Files and options of one TLS server (public or API), as CHP's flags give them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: Option<PathBuf>,
    pub request_cert: bool,
    pub reject_unauthorized: bool,
    /// ALPN protocols, most preferred first.
    pub alpn: Vec<Vec<u8>>,
    pub versions: Versions,
}

/// Which TLS versions to speak (from `--ssl-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.2 and 1.3.
    Default,
    Only12,
    Only13,
}

impl Versions {
    fn list(self) -> &'static [&'static SupportedProtocolVersion] {
        static BOTH: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static V12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
        static V13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            Versions::Default => &BOTH,
            Versions::Only12 => &V12,
            Versions::Only13 => &V13,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file.
///
/// # Errors
/// When the file cannot be read or holds none.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// When the file cannot be read, holds no key, or holds an encrypted one.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(TlsError::Encrypted {
            path: path.to_owned(),
        });
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

/// A root store holding every certificate in a CA file.
///
/// # Errors
/// When the file cannot be read or a certificate is not a valid trust anchor.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// Builds a server configuration from files, checking that the key matches the certificate.
///
/// # Errors
/// [`TlsError`] naming the file or the mismatch.
pub fn server_config(files: &ServerFiles) -> Result<ServerConfig, TlsError> {
    let certs = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(files.versions.list())?;
    let builder = match (&files.ca, files.request_cert) {
        (Some(ca), true) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let verifier = if files.reject_unauthorized {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?,
            )
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

/// A listener's TLS configuration, swappable while connections are open.
pub struct Reloadable {
    files: ServerFiles,
    name: &'static str,
    current: ArcSwap<ServerConfig>,
    /// When the certificate in use stops being valid (seconds since the epoch), if readable.
    not_after: std::sync::atomic::AtomicI64,
    /// Modification times of the files the current configuration came from.
    stamps: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

impl Reloadable {
    /// Loads the configuration; a failure here fails the start.
    ///
    /// # Errors
    /// [`TlsError`] when the files do not make a configuration.
    pub fn load(name: &'static str, files: ServerFiles) -> Result<Arc<Self>, TlsError> {
        let config = server_config(&files)?;
        let stamps = stamps(&files);
        let expiry = not_after(&files.cert).unwrap_or(0);
        Ok(Arc::new(Reloadable {
            files,
            name,
            current: ArcSwap::from_pointee(config),
            not_after: std::sync::atomic::AtomicI64::new(expiry),
            stamps: std::sync::Mutex::new(stamps),
        }))
    }

    /// The configuration for a new handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Loads the files again; on success new handshakes use them, on failure nothing changes.
    pub fn reload(&self) -> bool {
        match server_config(&self.files) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                self.not_after.store(
                    not_after(&self.files.cert).unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.files);
                tracing::info!(listener = self.name, cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(listener = self.name, error = %e, "new TLS certificate refused; keeping the current one");
                // Remember these stamps too, so a broken file is reported once, not every poll.
                *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.files);
                false
            }
        }
    }

    /// Whether any of the files changed since the last (attempted) load.
    fn changed(&self) -> bool {
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != stamps(&self.files)
    }

    /// The listener this configuration serves (`proxy`, `api`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// When the certificate in use expires, seconds since the epoch (`None` if unreadable).
    pub fn not_after(&self) -> Option<i64> {
        Some(self.not_after.load(std::sync::atomic::Ordering::Relaxed)).filter(|t| *t > 0)
    }
}

/// The `notAfter` of the first (leaf) certificate in a PEM file.
fn not_after(path: &Path) -> Option<i64> {
    let cert = certificates(path).ok()?.into_iter().next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

fn stamps(files: &ServerFiles) -> Vec<Option<SystemTime>> {
    [Some(&files.key), Some(&files.cert), files.ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Reloads every TLS listener on SIGHUP, and whenever its files change (checked every 2 s).
pub async fn watch(listeners: Vec<Arc<Reloadable>>) {
    if listeners.is_empty() {
        return;
    }
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload on file changes only");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hangup = async {
            match &mut hup {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hangup => {
                tracing::info!("received SIGHUP: reloading TLS certificates");
                for l in &listeners {
                    l.reload();
                }
            }
            _ = tick.tick() => {
                for l in listeners.iter().filter(|l| l.changed()) {
                    l.reload();
                }
            }
        }
    }
}

/// Client TLS for `https://` targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    pub key: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    /// Trust only this CA for targets (as CHP's `ca` option replaces the defaults).
    pub ca: Option<PathBuf>,
}

/// The client configuration for targets: the system's CAs (or `--client-ssl-ca` alone), a client
/// certificate when given, or no verification at all with `--insecure`.
///
/// # Errors
/// [`TlsError`] naming the bad file.
pub fn client_config(
    files: &ClientFiles,
    insecure: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let store = match &files.ca {
            Some(ca) => roots(ca)?,
            None => {
                let mut store = RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for err in &native.errors {
                    tracing::warn!(error = %err, "could not load a system CA certificate");
                }
                store.add_parsable_certificates(native.certs);
                store
            }
        };
        builder.with_root_certificates(store)
    };
    let mut config = match (&files.key, &files.cert) {
        (Some(key), Some(cert)) => {
            builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts any certificate: what `--insecure` asks for. Signatures are still checked so the
/// handshake itself stays sound.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
