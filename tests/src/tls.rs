//! Throwaway certificate authorities made in the test, so that every TLS path (upstreams, the gateway's own
//! listener, gRPC, PostgreSQL, Redis) is tested with real certificates and real verification, and a wrong CA
//! can be shown to be refused.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority that lives for one test: its certificate as PEM (what clients trust) and the
/// means to issue leaf certificates for loopback names.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempdir::Dir,
}

/// A leaf certificate and its key, as PEM text and as files (servers read files).
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    /// Makes a new CA named `name`; its files live in a directory removed when the `TestCa` is dropped.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let dir = tempdir::Dir::new(name);
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write the CA certificate");
        Self { issuer, dir }
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate's file, for `*_CA_FILE` settings, `sslrootcert` and `--tls-ca-cert-file`.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the CA writes its files in (removed with the CA).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a server (and client) certificate for `names` (DNS names or IP addresses, e.g.
    /// `["localhost", "127.0.0.1"]`), writing it to `<file_stem>.pem` and `<file_stem>-key.pem`.
    pub fn issue(&self, file_stem: &str, names: &[&str]) -> IssuedCert {
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )
        .expect("leaf parameters");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("paygate-test"),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        let cert_file = self.dir.path().join(format!("{file_stem}.pem"));
        let key_file = self.dir.path().join(format!("{file_stem}-key.pem"));
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        std::fs::write(&cert_file, &cert_pem).expect("write the certificate");
        std::fs::write(&key_file, &key_pem).expect("write the key");
        // Servers that drop privileges (PostgreSQL runs as `postgres`) must be able to read them; the key
        // must not be readable by others, or PostgreSQL refuses it.
        set_mode(&cert_file, 0o644);
        set_mode(&key_file, 0o600);
        IssuedCert {
            cert_pem,
            key_pem,
            cert_file,
            key_file,
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory under the system temp dir, removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(name: &str) -> Self {
            let safe: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let path = std::env::temp_dir().join(format!(
                "paygate-tls-{safe}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&path).expect("create the CA directory");
            // World-traversable so that a server running as another user can reach the files.
            super::set_mode(&path, 0o755);
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
