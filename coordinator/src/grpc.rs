//! The gRPC server: Messaging, Placement, Resources, Admin, `grpc.health.v1.Health`, and
//! server reflection (v1 and v1alpha, so that every grpcurl build can list and describe with
//! no .proto files).

use proto::v1::admin_server::AdminServer;
use std::sync::Arc;
use std::task::{Context, Poll};

use bus::tls::ServerTls;
use futures::future::BoxFuture;
use proto::v1::edge_report_server::EdgeReportServer;
use proto::v1::messaging_server::MessagingServer;
use proto::v1::placement_server::PlacementServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, Refusal};
use crate::admin::AdminService;
use crate::api::{MessagingService, PlacementService};
use crate::messaging::Coordinator;
use crate::report::ReportService;
use crate::resources::ResourcesService;
use proto::v1::resources_server::ResourcesServer;

/// HTTP/2 keepalive ping interval and timeout.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the gRPC server stopped.

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("reflection descriptor is invalid")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("grpc server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` is cancelled; with `tls`, every connection is TLS. Every call
/// passes `access` first.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ServerTls>,
    access: Arc<Access>,
    coordinator: Coordinator,
    resources: ResourcesService,
    admin: AdminService,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<MessagingServer<MessagingService>>()
        .await;
    health
        .set_serving::<PlacementServer<PlacementService>>()
        .await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let guard = GuardLayer {
        access,
        coordinator: coordinator.clone(),
    };
    let router = tonic::transport::Server::builder()
        // A report stream from an edge that vanished without a FIN must still break.
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .layer(guard)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(EdgeReportServer::new(ReportService::new(
            coordinator.clone(),
        )))
        .add_service(ResourcesServer::new(resources))
        .add_service(AdminServer::new(admin))
        .add_service(MessagingServer::new(MessagingService(coordinator.clone())))
        .add_service(PlacementServer::new(PlacementService(coordinator)));
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await?;
        }
        Some(tls) => {
            let incoming = crate::tls::incoming(listener, tls, shutdown.clone());
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await?;
        }
    }
    Ok(())
}

/// Applies [`Access::check`] to every call before routing: a refused call is answered
/// `UNAUTHENTICATED` or `PERMISSION_DENIED` here and no service sees it; an admitted one
/// carries its [`Caller`] in its extensions.
#[derive(Debug, Clone)]
struct GuardLayer {
    access: Arc<Access>,
    coordinator: Coordinator,
}

impl<S> tower_layer::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Guard<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes);
        match self.layer.access.check(req.uri().path(), auth) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(refusal) => {
                // The key is never logged: only the method and why.
                tracing::debug!(
                    method = req.uri().path(),
                    reason = refusal.reason(),
                    "grpc call refused"
                );
                self.layer
                    .coordinator
                    .metrics()
                    .grpc_refused
                    .inc(refusal.reason());
                let status = status_of(&refusal);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

fn status_of(refusal: &Refusal) -> tonic::Status {
    if refusal.permission_denied() {
        tonic::Status::permission_denied(refusal.to_string())
    } else {
        tonic::Status::unauthenticated(refusal.to_string())
    }
}
