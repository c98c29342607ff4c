//! Builds sagamesh's services and serves them: the whole mesh on one
//! listener (`sagamesh up`, the tests), or one service per process
//! (`sagamesh router`, `coordinator`, `handler <name>`).
//!
//! Every server gets the same stack (see `server`): load shedding, a
//! concurrency limit, a timeout on the response head, health and reflection.

mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sagamesh_coordinator::{Catalog, Coordinator, CoordinatorConfig, CoordinatorService};
use sagamesh_inventory::{Inventory, InventoryService};
use sagamesh_jetstream::JetStream;
use sagamesh_log_sqlite::SqliteLog;
use sagamesh_notifications::{Notifications, NotificationsService};
use sagamesh_proto::v1::{AttachRequest, Item, SagaMode};
use sagamesh_purchase_log::{PurchaseLog, PurchaseLogsService};
use sagamesh_router::{Backend, Router, RouterConfig, RouterService};
use sagamesh_router_client::{Attach, BoxFuture, Inbound, RouterLink};
use sagamesh_saga::Faults;
use sagamesh_step::StepConfig;
use sagamesh_store::Database;
use sagamesh_store::Durability;
use sagamesh_wallets::{Wallets, WalletsService};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

pub use server::Services;

/// A service that runs in its own process with `sagamesh handler <name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerService {
    Wallets,
    Inventory,
    PurchaseLog,
    Notifications,
    Compensation,
}

impl HandlerService {
    pub const ALL: [HandlerService; 5] = [
        HandlerService::Wallets,
        HandlerService::Inventory,
        HandlerService::PurchaseLog,
        HandlerService::Notifications,
        HandlerService::Compensation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandlerService::Wallets => "wallets",
            HandlerService::Inventory => "inventory",
            HandlerService::PurchaseLog => "purchase-log",
            HandlerService::Notifications => "notifications",
            HandlerService::Compensation => "compensation",
        }
    }
}

/// What one process runs.
#[derive(Debug, Clone)]
pub enum Role {
    /// Every service and the router on one listener.
    All,
    Router,
    Coordinator {
        router: String,
        inventory: String,
    },
    Handler {
        service: HandlerService,
        router: String,
    },
}

/// A NATS JetStream server holding the router's events instead of the
/// embedded log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bus {
    /// `nats://host:port`.
    pub url: String,
    /// Names this mesh's streams, so several meshes share one server.
    pub namespace: String,
}

/// A PostgreSQL database holding the services' state instead of their
/// embedded files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Postgres {
    /// `postgres://user@host:port/database`.
    pub url: String,
    /// Each service's tables go in the schema `<prefix>_<service>`.
    pub schema_prefix: String,
}

/// Settings shared by every role.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub data_dir: PathBuf,
    /// Where the router keeps events: JetStream, or the embedded log (`None`).
    pub bus: Option<Bus>,
    /// Where the services keep their state: PostgreSQL, or embedded files
    /// in `data_dir` (`None`).
    pub database: Option<Postgres>,
    pub durability: Durability,
    pub mode: SagaMode,
    pub faults: Faults,
    /// Creates the demo user and item on start (only with `Role::All`).
    pub demo_data: bool,
    pub ack_deadline: Duration,
    pub max_attempts: u32,
    /// Redelivery backoff after a nack: doubles from base to max, jittered.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Deliveries each handler instance takes at once.
    pub max_in_flight: u32,
    /// Sagas in progress at once; past it `Purchase` answers
    /// RESOURCE_EXHAUSTED.
    pub max_sagas_in_flight: u64,
    /// A saga without progress for this long is failed and compensated.
    pub saga_deadline: Option<Duration>,
    /// How long a stop waits for work in progress.
    pub grace: Duration,
    /// The secret the router requires of every gRPC caller, and that this
    /// process's services send to a router elsewhere (`None`: the router
    /// takes any caller).
    pub router_token: Option<String>,
}

impl MeshConfig {
    pub fn new(data_dir: PathBuf) -> MeshConfig {
        MeshConfig {
            data_dir,
            bus: None,
            database: None,
            durability: Durability::Machine,
            mode: SagaMode::Choreography,
            faults: Faults::default(),
            demo_data: true,
            ack_deadline: Duration::from_secs(30),
            max_attempts: 5,
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            max_in_flight: 256,
            max_sagas_in_flight: 10_000,
            saga_deadline: Some(Duration::from_secs(300)),
            grace: Duration::from_secs(10),
            router_token: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] sagamesh_store::StoreError),
    #[error(transparent)]
    Log(#[from] sagamesh_log::LogError),
    #[error(transparent)]
    Bus(#[from] sagamesh_jetstream::BusError),
    #[error(transparent)]
    Router(#[from] sagamesh_router_client::ClientError),
    #[error("{0} is not a valid address: {1}")]
    Address(String, String),
    #[error("could not create the demo data: {0}")]
    DemoData(String),
    #[error("the gRPC server failed: {0}")]
    Serve(String),
    #[error("invalid router token: {0}")]
    Token(String),
}

/// The demo user and item of the spec.
pub const DEMO_USER: (&str, u64) = ("user-123", 10_000);
pub const DEMO_ITEM: (&str, &str, u64, u64) = ("item-sword", "Sword", 100, 1_000);

fn channel(address: &str) -> Result<Channel, MeshError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| MeshError::Address(address.to_owned(), e.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect_lazy())
}

fn step_config(config: &MeshConfig) -> StepConfig {
    StepConfig {
        mode: config.mode,
        faults: config.faults.clone(),
        max_in_flight: config.max_in_flight,
    }
}

/// Runs `role` on `listener` until `shutdown` is cancelled, then drains.
pub async fn run(
    role: Role,
    config: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), MeshError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| MeshError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let address = listener
        .local_addr()
        .map_err(|e| MeshError::Serve(e.to_string()))?;
    let tasks = TaskTracker::new();
    // A stop runs in order: the servers stop accepting and finish the
    // requests in hand (a purchase accepted then is recorded, and its saga
    // goes on meanwhile); then the instances drain: they finish the
    // deliveries in hand, hand the rest back and flush their outboxes
    // through the router, which (needed by those last publishes) stops last.
    let drain = CancellationToken::new();
    let router_stop = CancellationToken::new();
    let mut services = Services::default();
    let dir = &config.data_dir;
    let durability = config.durability;
    let database = match &config.database {
        Some(postgres) => Database::Postgres {
            url: postgres.url.clone(),
            schema_prefix: postgres.schema_prefix.clone(),
        },
        None => Database::Embedded {
            dir: dir.clone(),
            durability,
        },
    };

    let runs_router = matches!(role, Role::All | Role::Router);
    let mut in_process_router = None;
    if runs_router {
        let backend = match &config.bus {
            Some(bus) => {
                let streams = JetStream::connect(&bus.url, &bus.namespace).await?;
                tracing::info!(
                    url = %sagamesh_jetstream::without_credentials(&bus.url),
                    namespace = %bus.namespace,
                    "the router keeps its events in NATS JetStream"
                );
                Backend::JetStream(streams)
            }
            None => Backend::Embedded(Arc::new(SqliteLog::open(&dir.join("router.db"), durability)?)),
        };
        let mut router_config = RouterConfig::new(config.mode, sagamesh_saga::subscriptions());
        router_config.ack_deadline = config.ack_deadline;
        router_config.max_attempts = config.max_attempts;
        router_config.retry_base = config.retry_base;
        router_config.retry_max = config.retry_max;
        router_config.drop_stream_probability = config.faults.drop_stream_probability();
        let router = Router::start(backend, router_config, &tasks, router_stop.clone()).await?;
        in_process_router = Some(router.service());
        services.router = Some(router.service().into_server(config.router_token.as_deref()));
    }
    // Services of this process reach each other in-process.
    let router_link = match (&role, in_process_router) {
        (Role::Coordinator { router, .. } | Role::Handler { router, .. }, _) => {
            RouterLink::grpc(channel(router)?, config.router_token.as_deref()).map_err(MeshError::Token)?
        }
        (Role::All | Role::Router, Some(router)) => RouterLink::new(InProcessRouter(router)),
        (Role::All | Role::Router, None) => unreachable!("this process runs the router"),
    };
    let wants = |service: HandlerService| match &role {
        Role::All => true,
        Role::Handler { service: s, .. } => *s == service,
        _ => false,
    };
    let wallets = if wants(HandlerService::Wallets) {
        let wallets = Wallets::open(&database)?;
        services.wallets = Some(WalletsService::new(wallets.clone()));
        Some(wallets)
    } else {
        None
    };
    let mut catalog = None;
    let inventory = if wants(HandlerService::Inventory) {
        let inventory = Inventory::open(&database)?;
        let service = Arc::new(InventoryService::new(inventory.clone()));
        catalog = Some(Catalog::InProcess(service.clone()));
        services.inventory = Some(InventoryService::server(service));
        Some(inventory)
    } else {
        None
    };
    let purchase_log = if wants(HandlerService::PurchaseLog) {
        let log = PurchaseLog::open(&database)?;
        services.purchase_logs = Some(PurchaseLogsService::new(log.clone()));
        Some(log)
    } else {
        None
    };
    let notifications = if wants(HandlerService::Notifications) {
        let notifications = Notifications::open(&database)?;
        services.notifications = Some(NotificationsService::new(notifications.clone()));
        Some(notifications)
    } else {
        None
    };
    let compensation = if wants(HandlerService::Compensation) {
        Some(sagamesh_compensation::Compensation::open(&database)?)
    } else {
        None
    };
    if let Role::Coordinator { inventory, .. } = &role {
        catalog = Some(Catalog::remote(channel(inventory)?));
    }
    let coordinator = if let (Role::All | Role::Coordinator { .. }, Some(catalog)) = (&role, catalog) {
        let coordinator =
            Coordinator::open(&database, catalog, config.mode, config.max_sagas_in_flight).await?;
        services.coordinator = Some(CoordinatorService::new(coordinator.clone()));
        Some(coordinator)
    } else {
        None
    };

    let names = services.names();
    // The server must be up before in-process handlers attach to it.
    let server = tasks.spawn(server::serve(services, listener, shutdown.clone()));
    tracing::info!(%address, mode = config.mode.name(), services = ?names, "sagamesh listening on {address}");

    // Instances of this process attached to a router; on a stop they drain
    // before the router stops.
    let clients = TaskTracker::new();
    let attached = attach(
        &config,
        router_link,
        &wallets,
        &inventory,
        &purchase_log,
        &notifications,
        &compensation,
        &coordinator,
        &clients,
        &drain,
    )
    .await;
    let outcome = match attached {
        Ok(()) => {
            if matches!(role, Role::All) && config.demo_data {
                demo_data(wallets.as_ref(), inventory.as_ref()).await?;
            }
            log_summary(&role, config.mode);
            let grace = async {
                shutdown.cancelled().await;
                tokio::time::sleep(config.grace).await;
            };
            tokio::select! {
                served = server => match served {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(MeshError::Serve(e.to_string())),
                },
                _ = grace => {
                    tracing::warn!("open streams did not end within the grace period; stopping anyway");
                    Ok(())
                }
            }
        }
        Err(e) => {
            shutdown.cancel();
            let _ = server.await;
            Err(e)
        }
    };
    // Servers are down: the instances drain, the router stops, and every
    // task is waited for.
    drain.cancel();
    clients.close();
    if tokio::time::timeout(config.grace, clients.wait()).await.is_err() {
        tracing::warn!("some instances did not drain within the grace period");
    }
    router_stop.cancel();
    tasks.close();
    if tokio::time::timeout(config.grace, tasks.wait()).await.is_err() {
        tracing::warn!("some tasks did not stop within the grace period");
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn attach(
    config: &MeshConfig,
    router: RouterLink,
    wallets: &Option<Wallets>,
    inventory: &Option<Inventory>,
    purchase_log: &Option<PurchaseLog>,
    notifications: &Option<Notifications>,
    compensation: &Option<sagamesh_compensation::Compensation>,
    coordinator: &Option<Coordinator>,
    tasks: &TaskTracker,
    drain: &CancellationToken,
) -> Result<(), MeshError> {
    let step = step_config(config);
    if let Some(wallets) = wallets {
        sagamesh_wallets::start(wallets, router.clone(), step.clone(), tasks, drain.clone()).await?;
    }
    if let Some(inventory) = inventory {
        sagamesh_inventory::start(inventory, router.clone(), step.clone(), tasks, drain.clone()).await?;
    }
    if let Some(log) = purchase_log {
        sagamesh_purchase_log::start(log, router.clone(), step.clone(), tasks, drain.clone()).await?;
    }
    if let Some(notifications) = notifications {
        sagamesh_notifications::start(notifications, router.clone(), step.clone(), tasks, drain.clone())
            .await?;
    }
    if let Some(compensation) = compensation {
        sagamesh_compensation::start(
            compensation,
            router.clone(),
            config.mode,
            config.max_in_flight,
            tasks,
            drain.clone(),
        )
        .await?;
    }
    if let Some(coordinator) = coordinator {
        let coordinator_config = CoordinatorConfig {
            mode: config.mode,
            max_in_flight: config.max_in_flight,
            saga_deadline: config.saga_deadline,
        };
        coordinator
            .start(router, coordinator_config, tasks, drain.clone())
            .await?;
    }
    Ok(())
}

async fn demo_data(wallets: Option<&Wallets>, inventory: Option<&Inventory>) -> Result<(), MeshError> {
    if let Some(wallets) = wallets {
        wallets
            .ensure_user(DEMO_USER.0.to_owned(), DEMO_USER.1)
            .await
            .map_err(|e| MeshError::DemoData(e.to_string()))?;
    }
    if let Some(inventory) = inventory {
        let (item_id, name, price, stock) = DEMO_ITEM;
        inventory
            .ensure_item(Item {
                item_id: item_id.to_owned(),
                name: name.to_owned(),
                price,
                stock,
            })
            .await
            .map_err(|e| MeshError::DemoData(e.to_string()))?;
    }
    tracing::info!(
        "demo data ready: user {} (balance {}), item {} (price {}, stock {})",
        DEMO_USER.0,
        DEMO_USER.1,
        DEMO_ITEM.0,
        DEMO_ITEM.2,
        DEMO_ITEM.3
    );
    Ok(())
}

/// The seed's startup summary: the active mode, and which handler reacts to
/// which events in it.
fn log_summary(role: &Role, mode: SagaMode) {
    tracing::info!("Current saga pattern mode = {}", mode.name());
    let shown: Vec<&str> = match role {
        Role::All | Role::Router => vec![],
        Role::Coordinator { .. } => vec!["PurchaseCoordinator (orchestrator)"],
        Role::Handler { service, .. } => vec![match service {
            HandlerService::Wallets => "UserValidationHandler",
            HandlerService::Inventory => "ItemGrantHandler",
            HandlerService::PurchaseLog => "LogRecordHandler",
            HandlerService::Notifications => "NotificationHandler",
            HandlerService::Compensation => "CompensationHandler",
        }],
    };
    let title = match mode {
        SagaMode::Orchestration => "Orchestration command summary:",
        _ => "Choreography event subscription summary:",
    };
    let mut summary = String::from(title);
    let lines: Vec<_> = sagamesh_saga::summary(mode)
        .into_iter()
        .filter(|(handler, _)| shown.is_empty() || shown.contains(handler))
        .collect();
    for (handler, events) in &lines {
        let events: Vec<String> = events.iter().map(|t| pascal_case(t.as_str_name())).collect();
        summary.push_str(&format!("\n  - {handler} → {}", events.join(", ")));
    }
    // The coordinator in choreography, the compensation handler in
    // orchestration: this process has no step to run in this mode.
    if lines.is_empty()
        && let Some(role) = shown.first()
    {
        let name = role.split(" (").next().unwrap_or(role);
        summary.push_str(&format!("\n  - {name} → no saga step in this mode"));
    }
    tracing::info!("{summary}");
}

/// `PURCHASE_INITIATED` → `PurchaseInitiated`, as the seed names events.
fn pascal_case(name: &str) -> String {
    name.split('_')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_string() + &chars.as_str().to_lowercase(),
                None => String::new(),
            }
        })
        .collect()
}

/// The router of this process, attached to through channels: the same
/// Attach protocol and router code, without gRPC's framing and encoding.
struct InProcessRouter(RouterService);

impl Attach for InProcessRouter {
    fn attach(&self, outbound: ReceiverStream<AttachRequest>) -> BoxFuture<'_, Result<Inbound, Status>> {
        Box::pin(self.0.attach_stream(outbound.map(Ok::<_, Status>)))
    }
}
