//! The one function that builds a gRPC server for any set of services, so
//! every process gets the same stack.

use std::time::Duration;

use sagamesh_coordinator::CoordinatorService;
use sagamesh_inventory::InventoryService;
use sagamesh_notifications::NotificationsService;
use sagamesh_proto::v1::inventory_server::InventoryServer;
use sagamesh_proto::v1::notifications_server::NotificationsServer;
use sagamesh_proto::v1::purchase_coordinator_server::PurchaseCoordinatorServer;
use sagamesh_proto::v1::purchase_logs_server::PurchaseLogsServer;
use sagamesh_proto::v1::wallets_server::WalletsServer;
use sagamesh_purchase_log::PurchaseLogsService;
use sagamesh_router::RouterServer;
use sagamesh_wallets::WalletsService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::MeshError;

/// Requests served at once on one connection; past it, load shedding
/// answers RESOURCE_EXHAUSTED at once instead of queueing without bound.
const CONCURRENCY_PER_CONNECTION: usize = 1024;
/// Bounds the time to a response head; a stream's body is not bounded.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The services one process serves.
#[derive(Default)]
pub struct Services {
    pub router: Option<RouterServer>,
    pub coordinator: Option<PurchaseCoordinatorServer<CoordinatorService>>,
    pub wallets: Option<WalletsServer<WalletsService>>,
    pub inventory: Option<InventoryServer<InventoryService>>,
    pub purchase_logs: Option<PurchaseLogsServer<PurchaseLogsService>>,
    pub notifications: Option<NotificationsServer<NotificationsService>>,
}

fn name<S: NamedService>(service: &Option<S>) -> Option<&'static str> {
    service.as_ref().map(|_| S::NAME)
}

impl Services {
    /// The full gRPC names of the services present.
    pub fn names(&self) -> Vec<&'static str> {
        [
            name(&self.router),
            name(&self.coordinator),
            name(&self.wallets),
            name(&self.inventory),
            name(&self.purchase_logs),
            name(&self.notifications),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Serves `services` with health and reflection on `listener` until
/// `shutdown`.
pub(crate) async fn serve(
    services: Services,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), MeshError> {
    let names = services.names();
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in &names {
        health.set_service_status(*name, ServingStatus::Serving).await;
    }
    let reflection = |e: tonic_reflection::server::Error| MeshError::Serve(e.to_string());
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagamesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection)?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagamesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection)?;

    let mut routes = RoutesBuilder::default();
    routes.add_service(health_service);
    routes.add_service(reflection_v1);
    routes.add_service(reflection_v1alpha);
    if let Some(s) = services.router {
        routes.add_service(s);
    }
    if let Some(s) = services.coordinator {
        routes.add_service(s);
    }
    if let Some(s) = services.wallets {
        routes.add_service(s);
    }
    if let Some(s) = services.inventory {
        routes.add_service(s);
    }
    if let Some(s) = services.purchase_logs {
        routes.add_service(s);
    }
    if let Some(s) = services.notifications {
        routes.add_service(s);
    }

    let stopping = shutdown.clone();
    let health_on_stop = health.clone();
    let signal = async move {
        stopping.cancelled().await;
        // Tell load balancers first, then stop accepting.
        for name in names {
            health_on_stop
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };
    server()
        .add_routes(routes.routes())
        // Small messages: latency matters more than packing (no Nagle).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal)
        .await
        .map_err(|e| MeshError::Serve(e.to_string()))
}

/// The server stack, the same for every connection.
fn server() -> Server {
    Server::builder()
        // Overload answers at once rather than queueing: a full connection
        // gets RESOURCE_EXHAUSTED.
        .load_shed(true)
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
}
