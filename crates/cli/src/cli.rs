//! The command line: subcommands, flags and their environment variables,
//! turned into typed configuration for the mesh and the bench.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sagamesh_mesh::{Bus, HandlerService, MeshConfig, Postgres, Role};
use sagamesh_proto::v1::SagaMode;
use sagamesh_saga::Faults;
use tokio_util::sync::CancellationToken;

use crate::bench;

#[derive(Parser)]
#[command(
    name = "sagamesh",
    version,
    about = "A saga service mesh: durable purchase sagas over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the whole mesh in one process: router, coordinator and every
    /// service on one address, with demo data.
    Up {
        #[arg(long, env = "SAGAMESH_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Skips creating the demo user and item.
        #[arg(long)]
        no_demo_data: bool,
        #[command(flatten)]
        bus: BusArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Runs only the event router.
    Router {
        #[arg(long, env = "SAGAMESH_LISTEN", default_value = "127.0.0.1:50060")]
        listen: SocketAddr,
        #[command(flatten)]
        bus: BusArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Runs only the coordinator.
    Coordinator {
        #[arg(long, env = "SAGAMESH_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// The router's address.
        #[arg(long, env = "SAGAMESH_ROUTER", default_value = "127.0.0.1:50060")]
        router: String,
        /// The inventory service's address, for prices.
        #[arg(long, env = "SAGAMESH_INVENTORY", default_value = "127.0.0.1:50062")]
        inventory: String,
        #[command(flatten)]
        common: Common,
    },
    /// Runs one domain service and its saga handler.
    Handler {
        name: HandlerName,
        #[arg(long, env = "SAGAMESH_LISTEN")]
        listen: Option<SocketAddr>,
        /// The router's address.
        #[arg(long, env = "SAGAMESH_ROUTER", default_value = "127.0.0.1:50060")]
        router: String,
        #[command(flatten)]
        common: Common,
    },
    /// Runs purchases against a running mesh and prints how fast they went.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct Common {
    /// Where the embedded stores live.
    #[arg(long, env = "SAGAMESH_DATA_DIR", default_value = "sagamesh-data")]
    data_dir: PathBuf,
    /// Keeps the services' state in PostgreSQL at this URL (e.g.
    /// `postgres://postgres@127.0.0.1:5432/test`) instead of embedded files.
    #[arg(long, env = "SAGAMESH_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// Each service's tables go in the PostgreSQL schema `<this>_<service>`.
    #[arg(long, env = "SAGAMESH_DATABASE_SCHEMA", default_value = "sagamesh")]
    database_schema: String,
    /// The saga pattern (SAGA_PATTERN_MODE).
    #[arg(long, env = "SAGA_PATTERN_MODE", default_value = "choreography")]
    mode: Mode,
    /// `machine`: every commit is fsynced; `process`: commits survive the
    /// process dying, not the machine.
    #[arg(long, env = "SAGAMESH_DURABILITY", default_value = "machine")]
    durability: DurabilityArg,
    /// Fault injection, e.g. `log_record=fail,item_grant.compensation=fail`.
    #[arg(long, env = "SAGAMESH_FAULTS", default_value = "")]
    faults: String,
    /// How long a delivery may stay unacked before it goes out again.
    #[arg(long, env = "SAGAMESH_ACK_DEADLINE_MS", default_value_t = 30_000)]
    ack_deadline_ms: u64,
    /// Deliveries of one event to one group before it is dead-lettered.
    #[arg(long, env = "SAGAMESH_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// First delay before a nacked delivery goes out again; it doubles per
    /// attempt (with ±50% jitter) up to --retry-max-ms.
    #[arg(long, env = "SAGAMESH_RETRY_BASE_MS", default_value_t = 50)]
    retry_base_ms: u64,
    #[arg(long, env = "SAGAMESH_RETRY_MAX_MS", default_value_t = 5_000)]
    retry_max_ms: u64,
    /// Sagas in progress at once; past it Purchase answers
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "SAGAMESH_MAX_SAGAS_IN_FLIGHT", default_value_t = 10_000)]
    max_sagas_in_flight: u64,
    /// A saga that makes no progress for this long is failed and
    /// compensated (0: never).
    #[arg(long, env = "SAGAMESH_SAGA_DEADLINE_MS", default_value_t = 300_000)]
    saga_deadline_ms: u64,
    /// A shared secret: the router takes gRPC calls only with it (as
    /// `authorization: Bearer <token>`), and the services send it. Without
    /// one, anyone who reaches the router can publish events.
    #[arg(long, env = "SAGAMESH_ROUTER_TOKEN", hide_env_values = true)]
    router_token: Option<String>,
}

/// Where the router keeps its events.
#[derive(Args)]
struct BusArgs {
    /// Keeps the router's events in NATS JetStream at this address (e.g.
    /// `nats://127.0.0.1:4222`) instead of the embedded log; the router is
    /// then stateless.
    #[arg(long, env = "SAGAMESH_BUS", hide_env_values = true)]
    bus: Option<String>,
    /// Names this mesh's JetStream streams, so meshes can share a server.
    #[arg(long, env = "SAGAMESH_BUS_NAMESPACE", default_value = "sagamesh")]
    bus_namespace: String,
}

impl BusArgs {
    fn apply(&self, config: &mut MeshConfig) -> Result<(), String> {
        let Some(url) = &self.bus else { return Ok(()) };
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            return Err(format!(
                "--bus must be a NATS address, starting nats:// or tls:// (such as nats://127.0.0.1:4222); {}",
                given(url)
            ));
        }
        config.bus = Some(Bus {
            url: url.clone(),
            namespace: self.bus_namespace.clone(),
        });
        Ok(())
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Independent handlers react to each other's events.
    Choreography,
    /// The coordinator drives the steps with commands.
    Orchestration,
}

impl Mode {
    pub fn saga_mode(self) -> SagaMode {
        match self {
            Mode::Choreography => SagaMode::Choreography,
            Mode::Orchestration => SagaMode::Orchestration,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Machine,
    Process,
}

#[derive(Clone, Copy, ValueEnum)]
enum HandlerName {
    Wallets,
    Inventory,
    PurchaseLog,
    Notifications,
    Compensation,
}

impl HandlerName {
    fn service(self) -> HandlerService {
        match self {
            HandlerName::Wallets => HandlerService::Wallets,
            HandlerName::Inventory => HandlerService::Inventory,
            HandlerName::PurchaseLog => HandlerService::PurchaseLog,
            HandlerName::Notifications => HandlerService::Notifications,
            HandlerName::Compensation => HandlerService::Compensation,
        }
    }

    /// Where each service listens by default when run on its own.
    fn default_listen(self) -> SocketAddr {
        let port = match self {
            HandlerName::Wallets => 50061,
            HandlerName::Inventory => 50062,
            HandlerName::PurchaseLog => 50063,
            HandlerName::Notifications => 50064,
            HandlerName::Compensation => 50065,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// Says what a URL given on the command line starts with, for an error
/// message that must not repeat the rest (it may hold a password).
fn given(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _)) => format!("the one given starts '{scheme}://'"),
        None => "the one given is not a URL".to_owned(),
    }
}

impl Common {
    fn config(&self) -> Result<MeshConfig, String> {
        let mode = self.mode.saga_mode();
        let faults = Faults::parse(&self.faults).map_err(|e| e.to_string())?;
        if self.max_attempts == 0 {
            return Err("--max-attempts must be at least 1".into());
        }
        if self.ack_deadline_ms == 0 {
            return Err("--ack-deadline-ms must be at least 1".into());
        }
        let mut config = MeshConfig::new(self.data_dir.clone());
        if let Some(url) = &self.database {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!(
                    "--database must be a PostgreSQL URL, starting postgres:// or postgresql:// (such as postgres://postgres@127.0.0.1:5432/test); {}",
                    given(url)
                ));
            }
            let schema = &self.database_schema;
            if schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(format!(
                    "--database-schema must be lowercase letters, digits or '_', not '{schema}'"
                ));
            }
            config.database = Some(Postgres {
                url: url.clone(),
                schema_prefix: schema.clone(),
            });
        }
        config.mode = mode;
        config.faults = faults;
        config.durability = match self.durability {
            DurabilityArg::Machine => sagamesh_store::Durability::Machine,
            DurabilityArg::Process => sagamesh_store::Durability::Process,
        };
        config.ack_deadline = Duration::from_millis(self.ack_deadline_ms);
        config.max_attempts = self.max_attempts;
        if self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            return Err("--retry-base-ms must be at least 1 and at most --retry-max-ms".into());
        }
        config.retry_base = Duration::from_millis(self.retry_base_ms);
        config.max_sagas_in_flight = self.max_sagas_in_flight;
        config.saga_deadline =
            (self.saga_deadline_ms > 0).then(|| Duration::from_millis(self.saga_deadline_ms));
        config.retry_max = Duration::from_millis(self.retry_max_ms);
        if let Some(token) = &self.router_token {
            if token.is_empty() || token.len() > 256 || !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(
                    "--router-token must be 1 to 256 printable ASCII characters without spaces".into(),
                );
            }
            config.router_token = Some(token.clone());
        }
        Ok(config)
    }
}

impl Cli {
    pub fn is_bench(&self) -> bool {
        matches!(self.command, Command::Bench(_))
    }

    /// Whether this command is only a load generator for a mesh in
    /// another process.
    pub fn is_remote_bench(&self) -> bool {
        matches!(&self.command, Command::Bench(args) if args.drives_a_remote_mesh())
    }
}

pub async fn run(cli: Cli) -> Result<(), String> {
    let (role, listen, config) = match cli.command {
        Command::Bench(args) => return bench::run(args).await,
        Command::Up {
            listen,
            no_demo_data,
            bus,
            common,
        } => {
            let mut config = common.config()?;
            config.demo_data = !no_demo_data;
            bus.apply(&mut config)?;
            (Role::All, listen, config)
        }
        Command::Router { listen, bus, common } => {
            let mut config = common.config()?;
            bus.apply(&mut config)?;
            (Role::Router, listen, config)
        }
        Command::Coordinator {
            listen,
            router,
            inventory,
            common,
        } => (Role::Coordinator { router, inventory }, listen, common.config()?),
        Command::Handler {
            name,
            listen,
            router,
            common,
        } => (
            Role::Handler {
                service: name.service(),
                router,
            },
            listen.unwrap_or_else(|| name.default_listen()),
            common.config()?,
        ),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    sagamesh_mesh::run(role, config, listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// The first SIGINT or SIGTERM starts a graceful stop; a second exits now.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    for round in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        if round == 0 {
            tracing::info!("stopping: finishing work in progress (signal again to stop now)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
