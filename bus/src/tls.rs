//! TLS as the binary hands it down: the current server config of a listener, and the
//! [`Dialer`] every process uses to reach the coordinators' gRPC listener.
//!
//! The binary reads the certificate files and re-reads them when they change (or on SIGHUP);
//! libraries see only a [`watch`] receiver of the current config. A listener takes the
//! config that is current at each handshake, so a new certificate serves new connections
//! while the open ones go on with theirs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

/// A listener's certificate and, for mutual TLS, the CA its clients' certificates must
/// chain to (`edge.tls`, `coordinator.tls`). The binary reads the files, and reads them again
/// when they change.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM: this server's certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
    /// PEM: CA certificates. When set, a client without a certificate signed by one of them
    /// is refused at the handshake.
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// A listener's TLS: the server config current at each handshake.
pub type ServerTls = watch::Receiver<Arc<rustls::ServerConfig>>;

/// A dialer's TLS: the client config (trusted CA, client certificate) current at each
/// connect. It must offer ALPN `h2`.
pub type ClientTls = watch::Receiver<Arc<rustls::ClientConfig>>;

/// How this process dials a coordinator's gRPC listener: plain HTTP/2 (tonic's own
/// connector), or TLS through [`ClientTls`].
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<TlsDial>,
}

#[derive(Debug, Clone)]
struct TlsDial {
    config: ClientTls,
    /// The name verified on every coordinator's certificate instead of the dialed host.
    server_name: Option<ServerName<'static>>,
}

impl Dialer {
    /// TLS with the config `tls` holds at each connect; `server_name` (if any) is checked on
    /// the coordinators' certificates instead of the host of the address dialed.
    pub fn tls(tls: ClientTls, server_name: Option<ServerName<'static>>) -> Self {
        Self {
            tls: Some(TlsDial {
                config: tls,
                server_name,
            }),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint of `address` (`host:port`, or a URL with a scheme). With TLS the scheme
    /// says nothing: every connection is TLS.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        Endpoint::from_shared(url)
    }

    /// Connects now.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            None => endpoint.connect().await,
            Some(tls) => endpoint.connect_with_connector(tls.connector()).await,
        }
    }

    /// A channel that connects on first use (and reconnects after a failure).
    pub fn connect_lazy(&self, endpoint: &Endpoint) -> Channel {
        match &self.tls {
            None => endpoint.connect_lazy(),
            Some(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
        }
    }
}

impl TlsDial {
    fn connector(&self) -> TlsConnector {
        TlsConnector {
            config: self.config.clone(),
            server_name: self.server_name.clone(),
        }
    }
}

/// Why a TLS connection to a coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no host in {0}")]
    NoHost(Uri),
    #[error("{0} is not a valid TLS server name")]
    ServerName(String),
    #[error("connect failed")]
    Io(#[from] std::io::Error),
}

/// tonic's connector for TLS: TCP, then a TLS handshake with the current client config.
#[derive(Debug, Clone)]
struct TlsConnector {
    config: ClientTls,
    server_name: Option<ServerName<'static>>,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, DialError>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = DialError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = Arc::clone(&self.config.borrow());
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| DialError::NoHost(uri.clone()))?;
            let port = uri.port_u16().unwrap_or(443);
            let name = match server_name {
                Some(name) => name,
                None => ServerName::try_from(host.clone())
                    .map_err(|_| DialError::ServerName(host.clone()))?,
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
