//! TLS on the gRPC links between paygate's services and to the admin API (DESIGN §9:
//! `PAYGATE_GRPC_TLS_CERT_FILE`, `PAYGATE_GRPC_TLS_KEY_FILE`, `PAYGATE_GRPC_CA_FILE`), shared so that every
//! server reads its certificate the same way, every client verifies servers the same way, and every
//! service reports a refused certificate in the same words.
//!
//! An `https://` URL is verified against the CA file when one is given, else against the system roots;
//! an `http://` URL stays plaintext.

use std::{
    error::Error,
    path::{Path, PathBuf},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    // Not `source`: the message already says it, and callers print error chains.
    #[error("cannot read `{}`: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("`{}` holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("`{}` holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
}

impl TlsFileError {
    /// Returns the file at fault.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. } | Self::NoCertificate { path } | Self::NoKey { path } => path,
        }
    }
}

/// Returns the server TLS settings for the certificate chain in `cert_file` and the key in `key_file`
/// (PEM); fails when either cannot be read or holds nothing usable.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerTlsConfig, TlsFileError> {
    let cert = read_certificates(cert_file)?;
    let key = read(key_file)?;
    if PrivateKeyDer::from_pem_slice(&key).is_err() {
        return Err(TlsFileError::NoKey {
            path: key_file.to_owned(),
        });
    }
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

/// Why `PAYGATE_GRPC_TLS_CERT_FILE` / `PAYGATE_GRPC_TLS_KEY_FILE` cannot be served with.
#[derive(Debug, thiserror::Error)]
pub enum ServerSettingsError {
    #[error(
        "PAYGATE_GRPC_TLS_CERT_FILE and PAYGATE_GRPC_TLS_KEY_FILE must be set together (or neither, for plaintext gRPC)"
    )]
    OnlyOneSet,
    #[error("PAYGATE_GRPC_TLS_CERT_FILE: {0}")]
    Cert(TlsFileError),
    #[error("PAYGATE_GRPC_TLS_KEY_FILE: {0}")]
    Key(TlsFileError),
}

/// Returns the TLS a gRPC server serves from `PAYGATE_GRPC_TLS_CERT_FILE` and `PAYGATE_GRPC_TLS_KEY_FILE`:
/// `None` (plaintext) when neither is set; fails, naming the variable, when only one is set or a file
/// cannot be used.
pub fn server_config_from_settings(
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, ServerSettingsError> {
    match (cert_file, key_file) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => match server_config(cert, key) {
            Ok(tls) => Ok(Some(tls)),
            Err(error) if error.path() == key => Err(ServerSettingsError::Key(error)),
            Err(error) => Err(ServerSettingsError::Cert(error)),
        },
        _ => Err(ServerSettingsError::OnlyOneSet),
    }
}

/// Returns the CA certificates in `path` (PEM), which clients then trust instead of the system roots.
pub fn read_ca(path: &Path) -> Result<Certificate, TlsFileError> {
    read_certificates(path).map(Certificate::from_pem)
}

fn read_certificates(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let pem = read(path)?;
    let mut certificates = CertificateDer::pem_slice_iter(&pem);
    match certificates.next() {
        Some(Ok(_)) if certificates.all(|certificate| certificate.is_ok()) => Ok(pem),
        _ => Err(TlsFileError::NoCertificate {
            path: path.to_owned(),
        }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|cause| TlsFileError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Makes `endpoint` verify its server against `ca` when its URL is `https://` (tonic already verifies an
/// `https://` endpoint against the system roots when `ca` is `None`); an `http://` endpoint is left as it
/// is. Fails only when the TLS settings cannot be built.
pub fn trust(
    endpoint: Endpoint,
    ca: Option<&Certificate>,
) -> Result<Endpoint, tonic::transport::Error> {
    match ca {
        Some(ca) if endpoint.uri().scheme_str() == Some("https") => {
            endpoint.tls_config(ClientTlsConfig::new().ca_certificate(ca.clone()))
        }
        _ => Ok(endpoint),
    }
}

/// A listener for a gRPC server, with the TLS it serves (none: plaintext). A bare `TcpListener` converts
/// into a plaintext one.
pub struct GrpcListener {
    pub listener: TcpListener,
    pub tls: Option<ServerTlsConfig>,
}

impl GrpcListener {
    /// Returns a listener that serves TLS with `tls`, or plaintext when it is `None`.
    pub fn new(listener: TcpListener, tls: Option<ServerTlsConfig>) -> Self {
        Self { listener, tls }
    }
}

impl From<TcpListener> for GrpcListener {
    fn from(listener: TcpListener) -> Self {
        Self::new(listener, None)
    }
}

/// Returns rustls' reason when `error` (or one of its causes) is this side refusing the peer's certificate
/// (an unknown CA, a name mismatch, an expired certificate): `None` for any other failure.
pub fn certificate_rejection(error: &(dyn Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(reason) = rejection_of(error) {
            return Some(reason);
        }
        // `io::Error::source` skips the error it wraps, which is where TLS libraries put rustls' error.
        if let Some(wrapped) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(reason) = rejection_of(wrapped)
        {
            return Some(reason);
        }
        current = error.source();
    }
    None
}

fn rejection_of(error: &(dyn Error + 'static)) -> Option<String> {
    match error.downcast_ref::<rustls::Error>() {
        Some(rejection @ rustls::Error::InvalidCertificate(_)) => Some(rejection.to_string()),
        Some(_) => None,
        // The redis crate keeps the `io::Error` around rustls' error behind an `Arc<dyn Error>`, which no
        // downcast sees through; rustls' own wording is what is left.
        None => {
            let text = error.to_string();
            let at = text.find(INVALID_CERTIFICATE)?;
            Some(text[at..].to_owned())
        }
    }
}

/// How rustls' `Display` starts for `Error::InvalidCertificate`.
const INVALID_CERTIFICATE: &str = "invalid peer certificate: ";

#[cfg(test)]
mod tests {
    use super::*;

    /// PEM framing around a few bytes: reading a certificate file checks the framing, not the contents.
    const TEST_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn an_unknown_issuer_inside_an_io_error_is_a_rejection() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io_error = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);

        let reason = certificate_rejection(&io_error);

        assert_eq!(
            reason.as_deref(),
            Some("invalid peer certificate: UnknownIssuer")
        );
    }

    #[test]
    fn a_refused_connection_is_not_a_rejection() {
        let error = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);

        assert_eq!(certificate_rejection(&error), None);
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_naming_both_variables() {
        let cert = Path::new("/nonexistent/cert.pem");

        let error = server_config_from_settings(Some(cert), None).expect_err("refused");

        let message = error.to_string();
        assert!(message.contains("PAYGATE_GRPC_TLS_CERT_FILE"), "{message}");
        assert!(message.contains("PAYGATE_GRPC_TLS_KEY_FILE"), "{message}");
    }

    #[test]
    fn an_unreadable_key_file_is_named() {
        let dir = std::env::temp_dir().join(format!("paygate-proto-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, TEST_CERTIFICATE).expect("write");
        let key = dir.join("missing-key.pem");

        let error = server_config_from_settings(Some(&cert), Some(&key)).expect_err("refused");

        assert!(matches!(error, ServerSettingsError::Key(_)), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("PAYGATE_GRPC_TLS_KEY_FILE: cannot read"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_naming_it() {
        let dir = std::env::temp_dir().join(format!("paygate-proto-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").expect("write");

        let error = read_ca(&empty).expect_err("refused");

        assert!(matches!(error, TlsFileError::NoCertificate { .. }));
        assert_eq!(error.path(), empty.as_path());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
