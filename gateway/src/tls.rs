//! TLS at the gateway's two HTTP edges: the client toward upstreams (`https://` verified against the system
//! roots or a route's `ca_file`, SNI from the host, HTTP/2 when the upstream offers it by ALPN) and the
//! optional HTTPS listener (`GATEWAY_TLS_CERT_FILE` / `GATEWAY_TLS_KEY_FILE`), whose certificate is
//! reloaded from its files without a restart.

use std::{
    collections::HashMap,
    fmt, io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The pooled client a route forwards with: `http://` and `https://`, HTTP/1.1 or HTTP/2 by ALPN.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, crate::proxy::Body>;

/// How long connecting to an upstream (TCP, not the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle upstream connection stays pooled, and how many per upstream.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// How often the listener's certificate files are checked for a new pair.
pub const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

fn crypto_provider() -> Arc<CryptoProvider> {
    // Named explicitly rather than taken from the process default: only ring is built (never aws-lc).
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What an upstream's certificate is verified against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Trust {
    /// An `http://` upstream: no certificate to verify.
    None,
    SystemRoots,
    CaFile(PathBuf),
}

/// The upstream clients of one routes file: one per distinct trust (the system roots, each `ca_file`), so
/// routes that trust the same CAs share a connection pool, and a route table built from a new file
/// carries its own clients.
#[derive(Default)]
pub struct UpstreamClients {
    built: HashMap<Trust, UpstreamClient>,
}

impl UpstreamClients {
    /// Returns the client for an upstream of `scheme` (`http` or `https`) trusting `ca_file`, or the
    /// system roots when `None`. Fails, with a message naming the file, when the file cannot be read or
    /// holds no certificate, or when the system has no root certificates.
    pub fn client(
        &mut self,
        https: bool,
        ca_file: Option<&Path>,
    ) -> Result<UpstreamClient, String> {
        let trust = match (https, ca_file) {
            (false, _) => Trust::None,
            (true, None) => Trust::SystemRoots,
            (true, Some(path)) => Trust::CaFile(path.to_owned()),
        };
        if let Some(client) = self.built.get(&trust) {
            return Ok(client.clone());
        }
        let roots = match &trust {
            Trust::None => RootCertStore::empty(),
            Trust::SystemRoots => system_roots()?,
            Trust::CaFile(path) => ca_file_roots(path)?,
        };
        let client = upstream_client(roots)?;
        self.built.insert(trust, client.clone());
        Ok(client)
    }
}

/// Returns a client for upstreams trusting `roots`: pooled keep-alive connections, no body buffering,
/// TLS with SNI for `https://` and HTTP/2 when the upstream's ALPN offers it.
fn upstream_client(roots: RootCertStore) -> Result<UpstreamClient, String> {
    let mut connector = HttpConnector::new();
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS client settings refused: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(connector))
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unusable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|error| format!(" ({error})"))
            .unwrap_or_default();
        return Err(format!(
            "`upstream` is https:// but no system root certificates were found{why}; install the \
             ca-certificates package or set `ca_file`"
        ));
    }
    Ok(roots)
}

fn ca_file_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|error| format!("`ca_file` `{shown}`: {error}"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|error| format!("`ca_file` `{shown}`: {error}"))?;
        roots
            .add(cert)
            .map_err(|error| format!("`ca_file` `{shown}`: {error}"))?;
    }
    if roots.is_empty() {
        return Err(format!("`ca_file` `{shown}` holds no PEM certificate"));
    }
    Ok(roots)
}

/// Returns the TLS error behind a failed upstream request, when TLS is why it failed (the upstream's
/// certificate was not trusted, named another host, or the handshake broke).
pub fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error is transparent to `source()`, which skips the error it wraps; tokio-rustls wraps
        // the rustls error in one, and hyper-rustls wraps that in another.
        cause = match current
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

/// Why a certificate and key pair for the listener was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{file}`: {cause}")]
    Read { file: PathBuf, cause: io::Error },
    #[error("`{file}` holds no PEM certificate ({cause})")]
    NoCertificate {
        file: PathBuf,
        cause: rustls_pki_types::pem::Error,
    },
    #[error("`{file}` holds no PEM private key ({cause})")]
    NoKey {
        file: PathBuf,
        cause: rustls_pki_types::pem::Error,
    },
    #[error(
        "the certificate in `{cert_file}` and the key in `{key_file}` do not make a pair: {cause}"
    )]
    Unusable {
        cert_file: PathBuf,
        key_file: PathBuf,
        cause: rustls::Error,
    },
}

/// What a reload of the listener's certificate did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the pair already in use.
    Unchanged,
    /// New connections get the pair the files now hold.
    Replaced,
}

/// The HTTPS side of the gateway's listener: the certificate and key it presents (from two PEM files,
/// reloaded without a restart) and ALPN `h2` and `http/1.1`. Clones share the certificate.
#[derive(Clone)]
pub struct ServerTls {
    certificate: Arc<ListenerCertificate>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ServerTls")
            .field("cert_file", &self.certificate.cert_file)
            .field("key_file", &self.certificate.key_file)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate chain in `cert_file` (leaf first) and the private key in `key_file`; fails
    /// when either cannot be read or parsed, or when the key is not the certificate's.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let files = read_pair(cert_file, key_file)?;
        let key = certified_key(cert_file, key_file, &files)?;
        let certificate = Arc::new(ListenerCertificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Current {
                key,
                digest: files.digest,
            }),
        });
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|cause| TlsError::Unusable {
                cert_file: cert_file.to_owned(),
                key_file: key_file.to_owned(),
                cause,
            })?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            certificate,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the two files again; when they hold a new, valid pair, connections from now on are served
    /// with it (connections already open keep theirs). A pair that cannot be used (unreadable, not PEM,
    /// a key of another certificate, half-replaced) is refused with the reason and the pair in use
    /// stays. Meant for SIGHUP as well as for [`ServerTls::watch`].
    pub fn reload(&self) -> Result<Reload, TlsError> {
        let certificate = &self.certificate;
        let files = read_pair(&certificate.cert_file, &certificate.key_file)?;
        if certificate.current().digest == files.digest {
            return Ok(Reload::Unchanged);
        }
        let key = certified_key(&certificate.cert_file, &certificate.key_file, &files)?;
        *certificate
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Current {
            key,
            digest: files.digest,
        };
        Ok(Reload::Replaced)
    }

    /// Checks the files every `every` until `stop` is cancelled, reloading them when they change (see
    /// [`ServerTls::reload`]). A replacement is logged once; a refused pair is logged once with why, not
    /// at every check, until the files change again.
    pub async fn watch(self, every: Duration, stop: CancellationToken) {
        let mut last_refusal: Option<String> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload() {
                Ok(Reload::Replaced) => {
                    tracing::info!(
                        cert_file = %self.certificate.cert_file.display(),
                        "TLS certificate reloaded"
                    );
                    last_refusal = None;
                }
                Ok(Reload::Unchanged) => last_refusal = None,
                Err(error) => {
                    let reason = error.to_string();
                    if last_refusal.as_ref() != Some(&reason) {
                        tracing::warn!(%error, "new TLS certificate refused; still serving the previous one");
                    }
                    last_refusal = Some(reason);
                }
            }
        }
    }

    /// Returns the acceptor that runs the TLS handshake of a client connection.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// The listener's certificate in use and the files it comes from; rustls asks it at every handshake.
#[derive(Debug)]
struct ListenerCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    /// SHA-256 of both files' bytes, so an unchanged pair is not parsed again at every check.
    digest: [u8; 32],
}

impl ListenerCertificate {
    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ResolvesServerCert for ListenerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

struct PairFiles {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    digest: [u8; 32],
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<PairFiles, TlsError> {
    let read = |file: &Path| {
        std::fs::read(file).map_err(|cause| TlsError::Read {
            file: file.to_owned(),
            cause,
        })
    };
    let (cert_pem, key_pem) = (read(cert_file)?, read(key_file)?);
    let mut digest = Sha256::new();
    digest.update((cert_pem.len() as u64).to_be_bytes());
    digest.update(&cert_pem);
    digest.update(&key_pem);
    Ok(PairFiles {
        cert_pem,
        key_pem,
        digest: digest.finalize().into(),
    })
}

fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    files: &PairFiles,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&files.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|chain| {
            if chain.is_empty() {
                Err(rustls_pki_types::pem::Error::NoItemsFound)
            } else {
                Ok(chain)
            }
        })
        .map_err(|cause| TlsError::NoCertificate {
            file: cert_file.to_owned(),
            cause,
        })?;
    let key = PrivateKeyDer::from_pem_slice(&files.key_pem).map_err(|cause| TlsError::NoKey {
        file: key_file.to_owned(),
        cause,
    })?;
    let key = CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|cause| {
        TlsError::Unusable {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            cause,
        }
    })?;
    Ok(Arc::new(key))
}
