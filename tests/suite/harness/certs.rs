//! Certificates for TLS tests: a CA made in the test (rcgen) and what it issues, as PEM
//! files in a directory of their own.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;

use super::files::scratch_dir;

/// A test CA and what it issued, as PEM files in a directory of their own (removed on drop).
pub struct TestCa {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, on disk.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    /// A new CA named `name`, in a scratch directory of its own.
    pub fn new(name: &str) -> Self {
        let dir = scratch_dir(&format!("tls-{name}"));
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    /// The CA certificate (PEM), for clients and servers to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate named `cn` for `localhost` and `127.0.0.1`, in `<file>.crt` and
    /// `<file>.key`. Replaces files already there the way certificate tools do: written
    /// beside them, then renamed over them.
    pub fn issue(&self, file: &str, cn: &str) -> Issued {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        replace(&cert_path, cert.pem().as_bytes());
        replace(&key_path, key.serialize_pem().as_bytes());
        Issued {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replace(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
