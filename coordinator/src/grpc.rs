//! The gRPC server: Messaging, Placement, Resources, Admin, `grpc.health.v1.Health`, and
//! server reflection (v1 and v1alpha, so that every grpcurl build can list and describe with
//! no .proto files).

use proto::v1::admin_server::AdminServer;
use proto::v1::edge_report_server::EdgeReportServer;
use proto::v1::messaging_server::MessagingServer;
use proto::v1::placement_server::PlacementServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

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

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
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
    tonic::transport::Server::builder()
        // A report stream from an edge that vanished without a FIN must still break.
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(EdgeReportServer::new(ReportService(coordinator.clone())))
        .add_service(ResourcesServer::new(resources))
        .add_service(AdminServer::new(admin))
        .add_service(MessagingServer::new(MessagingService(coordinator.clone())))
        .add_service(PlacementServer::new(PlacementService(coordinator)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
