//! Certificates and keys from the files the config names, kept current.
//!
//! Each TLS block (`edge.tls`, `coordinator.tls`, `cluster.tls`) becomes a rustls config
//! behind a [`watch`] channel: listeners and dialers take the config current at each
//! handshake. [`Tls::spawn_reloader`] re-reads the files when one of them changes (their
//! metadata is polled every [`POLL`]) or on SIGHUP. A file that does not load keeps the last
//! good config and logs a warning naming the key and the file; key material never appears in
//! a message.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bus::tls::{ClientTls, Dialer, ServerTls};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterTls, Config, ConfigError, Mode};

/// How often the certificate files' metadata is compared with what was last read.
pub const POLL: Duration = Duration::from_secs(3);

/// The TLS configs of one process, each kept current by [`Tls::spawn_reloader`].
#[derive(Clone, Default)]
pub struct Tls {
    /// `edge.tls`: the WebSocket listener.
    pub edge: Option<ServerTls>,
    /// `coordinator.tls`: the gRPC listener.
    pub grpc: Option<ServerTls>,
    /// `cluster.tls`: how edges and coordinators dial coordinators.
    pub dialer: Dialer,
    sources: Vec<Arc<Source>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("edge", &self.edge.is_some())
            .field("grpc", &self.grpc.is_some())
            .field("dialer_tls", &self.dialer.is_tls())
            .finish()
    }
}

/// A TLS block's files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    /// The dotted config key of the file at fault, e.g. `edge.tls.cert_file`.
    pub key: String,
    pub message: String,
}

/// A listener's files: certificate chain, key, and the client CA for mutual TLS.
#[derive(Debug, Clone)]
struct ServerFiles {
    /// The block's dotted key, e.g. `edge.tls`.
    block: &'static str,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    /// ALPN protocols offered (`h2` for gRPC, `http/1.1` for WebSockets).
    alpn: &'static [&'static [u8]],
}

/// One block's files and how to rebuild its config from them.
struct Source {
    block: &'static str,
    files: Vec<PathBuf>,
    reload: Box<dyn Fn() -> Result<(), TlsError> + Send + Sync>,
}

impl Tls {
    /// Reads the TLS blocks `mode` uses: a coordinator does not read `edge.tls`, an edge not
    /// `coordinator.tls`, and only cluster modes dial with `cluster.tls`.
    pub fn load(mode: Mode, config: &Config) -> Result<Self, ConfigError> {
        let mut tls = Self::default();
        if mode != Mode::Coordinator
            && let Some(t) = &config.edge.tls
        {
            let files = ServerFiles {
                block: "edge.tls",
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
                client_ca: t.client_ca_file.clone(),
                alpn: &[b"http/1.1"],
            };
            tls.edge = Some(tls.server(files)?);
        }
        if mode != Mode::Edge
            && let Some(t) = &config.coordinator.tls
        {
            let files = ServerFiles {
                block: "coordinator.tls",
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
                client_ca: t.client_ca_file.clone(),
                alpn: &[b"h2"],
            };
            tls.grpc = Some(tls.server(files)?);
        }
        if mode != Mode::Dev
            && let Some(t) = &config.cluster.tls
        {
            let server_name = match &t.server_name {
                None => None,
                Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                    ConfigError::key("cluster.tls.server_name", "not a DNS name or IP address")
                })?),
            };
            let client = tls.client(t)?;
            tls.dialer = Dialer::tls(client, server_name);
        }
        Ok(tls)
    }

    /// Whether any TLS block is in use (then SIGHUP reloads instead of ending the process).
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Re-reads every block now; a block whose files do not load keeps its config.
    pub fn reload_all(&self) -> Vec<TlsError> {
        self.sources
            .iter()
            .filter_map(|s| (s.reload)().err())
            .collect()
    }

    /// Re-reads a block's files when their metadata changes or on SIGHUP, until `shutdown`.
    /// Installs the SIGHUP handler before it returns (only when a block is in use).
    pub fn spawn_reloader(&self, shutdown: CancellationToken) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        if self.sources.is_empty() {
            return Ok(());
        }
        let mut hangup = signal(SignalKind::hangup())?;
        let sources = self.sources.clone();
        tokio::spawn(async move {
            let mut seen: Vec<Vec<Option<Stamp>>> =
                sources.iter().map(|s| stamps(&s.files)).collect();
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = hangup.recv() => true,
                    _ = tick.tick() => false,
                };
                if forced {
                    tracing::info!("SIGHUP: reloading tls certificates");
                }
                for (source, seen) in sources.iter().zip(seen.iter_mut()) {
                    // Read the metadata before the files: a change made while they are read
                    // is seen on the next round.
                    let now = stamps(&source.files);
                    if !forced && now == *seen {
                        continue;
                    }
                    *seen = now;
                    match (source.reload)() {
                        Ok(()) => {
                            let trigger = if forced { "sighup" } else { "change" };
                            tracing::info!(block = %source.block, trigger = %trigger, "tls certificates reloaded");
                        }
                        Err(e) => tracing::warn!(
                            key = %e.key,
                            error = %e.message,
                            "tls files not reloaded; keeping the last good ones"
                        ),
                    }
                }
            }
        });
        Ok(())
    }

    fn server(&mut self, files: ServerFiles) -> Result<ServerTls, ConfigError> {
        let first = server_config(&files).map_err(|e| ConfigError::key(e.key, e.message))?;
        let (tx, rx) = watch::channel(first);
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        self.sources.push(Arc::new(Source {
            block: files.block,
            files: paths,
            reload: Box::new(move || {
                tx.send_replace(server_config(&files)?);
                Ok(())
            }),
        }));
        Ok(rx)
    }

    fn client(&mut self, t: &ClusterTls) -> Result<ClientTls, ConfigError> {
        let first = client_config(t).map_err(|e| ConfigError::key(e.key, e.message))?;
        let (tx, rx) = watch::channel(first);
        let mut paths = vec![t.ca_file.clone()];
        paths.extend(t.cert_file.clone());
        paths.extend(t.key_file.clone());
        let t = t.clone();
        self.sources.push(Arc::new(Source {
            block: "cluster.tls",
            files: paths,
            reload: Box::new(move || {
                tx.send_replace(client_config(&t)?);
                Ok(())
            }),
        }));
        Ok(rx)
    }
}

/// What identifies a file's content cheaply: replaced files (also through a symlink swap,
/// as Kubernetes does for mounted secrets) change it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamps(files: &[PathBuf]) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt as _;
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some(Stamp {
                modified: m.modified().ok(),
                len: m.len(),
                inode: m.ino(),
            })
        })
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn error(key: &str, message: impl Into<String>) -> TlsError {
    TlsError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The certificates in a PEM file; at least one.
fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = std::fs::read(path)
        .map_err(|e| error(key, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&read)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(key, format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(error(key, format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// The private key in a PEM file. Its errors never quote the file.
fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read = std::fs::read(path)
        .map_err(|e| error(key, format!("cannot read {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&read).map_err(|_| {
        error(
            key,
            format!(
                "no PKCS#8, PKCS#1 or SEC1 private key in {}",
                path.display()
            ),
        )
    })
}

fn roots(key: &str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(key, path)? {
        store
            .add(cert)
            .map_err(|e| error(key, format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let at = |k: &str| format!("{}.{k}", files.block);
    let chain = certs(&at("cert_file"), &files.cert)?;
    let key = private_key(&at("key_file"), &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(files.block, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = roots(&at("client_ca_file"), path)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| error(&at("client_ca_file"), e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        error(
            &at("key_file"),
            format!(
                "{} and {} do not make a certificate and its key: {e}",
                files.cert.display(),
                files.key.display()
            ),
        )
    })?;
    config.alpn_protocols = files.alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn client_config(t: &ClusterTls) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots("cluster.tls.ca_file", &t.ca_file)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("cluster.tls", e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&t.cert_file, &t.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certs("cluster.tls.cert_file", cert)?;
            let private = private_key("cluster.tls.key_file", key)?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                error(
                    "cluster.tls.key_file",
                    format!(
                        "{} and {} do not make a certificate and its key: {e}",
                        cert.display(),
                        key.display()
                    ),
                )
            })?
        }
        (Some(_), None) => {
            return Err(error("cluster.tls.key_file", "cert_file needs key_file"));
        }
        (None, Some(_)) => {
            return Err(error("cluster.tls.cert_file", "key_file needs cert_file"));
        }
    };
    // gRPC is HTTP/2: coordinators (and grpc-go) insist on ALPN `h2`.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    /// A directory of PEM files made with rcgen, removed on drop.
    struct Files {
        dir: PathBuf,
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Files {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("sb-tls-{}", ulid::Ulid::new()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                    .unwrap();
            std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
            Self { dir, ca }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        /// Writes `<name>.crt` and `<name>.key`; returns the key's PEM.
        fn issue(&self, name: &str) -> String {
            let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            std::fs::write(self.path(&format!("{name}.crt")), cert.pem()).unwrap();
            std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
            key.serialize_pem()
        }

        fn edge_tls(&self, cert: &str, key: &str) -> edge::config::TlsFiles {
            edge::config::TlsFiles {
                cert_file: self.path(cert),
                key_file: self.path(key),
                client_ca_file: Some(self.path("ca.pem")),
            }
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn load_edge(files: &Files, cert: &str, key: &str) -> Result<Tls, ConfigError> {
        let mut config = Config::default();
        config.edge.tls = Some(files.edge_tls(cert, key));
        Tls::load(Mode::Dev, &config)
    }

    #[test]
    fn each_bad_file_is_named_by_its_key() {
        let files = Files::new();
        let key_pem = files.issue("a");
        files.issue("b");
        std::fs::write(files.path("junk"), "not pem").unwrap();
        assert!(load_edge(&files, "a.crt", "a.key").is_ok());
        for (cert, key, expect) in [
            ("missing.crt", "a.key", "edge.tls.cert_file: cannot read"),
            ("junk", "a.key", "edge.tls.cert_file: no certificate in"),
            ("a.crt", "missing.key", "edge.tls.key_file: cannot read"),
            ("a.crt", "junk", "edge.tls.key_file: no PKCS#8"),
            ("a.crt", "b.key", "edge.tls.key_file:"),
        ] {
            let e = load_edge(&files, cert, key).unwrap_err().to_string();
            assert!(e.starts_with(expect), "{cert} + {key}: {e}");
            assert!(!e.contains("PRIVATE KEY"), "{e}");
            let body = key_pem.lines().nth(1).unwrap();
            assert!(!e.contains(body), "key material in {e}");
        }
        let mut config = Config::default();
        config.coordinator.tls = Some(coordinator::config::TlsFiles {
            cert_file: files.path("a.crt"),
            key_file: files.path("a.key"),
            client_ca_file: Some(files.path("junk")),
        });
        let e = Tls::load(Mode::Dev, &config).unwrap_err().to_string();
        assert!(e.starts_with("coordinator.tls.client_ca_file:"), "{e}");
        // An edge does not read the coordinator's block, and the other way round.
        assert!(Tls::load(Mode::Edge, &config).is_ok());
        config.edge.tls = Some(files.edge_tls("junk", "a.key"));
        config.coordinator.tls = None;
        assert!(Tls::load(Mode::Coordinator, &config).is_ok());
    }

    #[test]
    fn cluster_tls_wants_a_key_with_its_certificate() {
        let files = Files::new();
        files.issue("a");
        let mut config = Config::default();
        let tls = ClusterTls {
            ca_file: files.path("ca.pem"),
            cert_file: Some(files.path("a.crt")),
            key_file: None,
            server_name: None,
        };
        config.cluster.tls = Some(tls.clone());
        let e = Tls::load(Mode::Edge, &config).unwrap_err().to_string();
        assert!(e.starts_with("cluster.tls.key_file:"), "{e}");
        config.cluster.tls = Some(ClusterTls {
            key_file: Some(files.path("a.key")),
            server_name: Some("not a name!".into()),
            ..tls.clone()
        });
        let e = Tls::load(Mode::Edge, &config).unwrap_err().to_string();
        assert!(e.starts_with("cluster.tls.server_name:"), "{e}");
        config.cluster.tls = Some(ClusterTls {
            key_file: Some(files.path("a.key")),
            ..tls
        });
        let loaded = Tls::load(Mode::Edge, &config).unwrap();
        assert!(loaded.dialer.is_tls());
        // Dev mode dials nobody.
        assert!(!Tls::load(Mode::Dev, &config).unwrap().dialer.is_tls());
    }

    #[test]
    fn a_bad_file_keeps_the_last_good_config() {
        let files = Files::new();
        files.issue("a");
        let tls = load_edge(&files, "a.crt", "a.key").unwrap();
        let rx = tls.edge.clone().unwrap();
        let first = Arc::clone(&rx.borrow());
        std::fs::write(files.path("a.crt"), "garbage").unwrap();
        let errors = tls.reload_all();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "edge.tls.cert_file");
        assert!(
            Arc::ptr_eq(&first, &rx.borrow()),
            "a bad file replaced the config"
        );
        files.issue("a");
        assert!(tls.reload_all().is_empty());
        assert!(
            !Arc::ptr_eq(&first, &rx.borrow()),
            "a good file was not taken"
        );
        assert_eq!(rx.borrow().alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn environment_variables_switch_a_tls_block_on() {
        let files = Files::new();
        files.issue("a");
        let env = [
            ("SWITCHBOARD_EDGE__TLS__CERT_FILE", files.path("a.crt")),
            ("SWITCHBOARD_EDGE__TLS__KEY_FILE", files.path("a.key")),
        ]
        .map(|(k, v)| (k.to_owned(), v.display().to_string()));
        let base = Config {
            edge: edge::EdgeConfig::dev(),
            ..Config::default()
        };
        let r = Config::load(Mode::Dev, &base, None, env, &Overrides::default()).unwrap();
        assert!(r.tls.edge.is_some());
        assert!(r.tls.grpc.is_none());
        assert!(!r.tls.is_empty());
    }
}
