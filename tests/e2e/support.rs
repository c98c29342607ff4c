//! Starting meshes (in this process or as processes of the built binary),
//! clients, and waiting with deadlines instead of sleeps.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use sagamesh_mesh::{Bus, MeshConfig, Postgres, Role};
use sagamesh_proto::v1::event_router_client::EventRouterClient;
use sagamesh_proto::v1::inventory_client::InventoryClient;
use sagamesh_proto::v1::notifications_client::NotificationsClient;
use sagamesh_proto::v1::purchase_coordinator_client::PurchaseCoordinatorClient;
use sagamesh_proto::v1::purchase_logs_client::PurchaseLogsClient;
use sagamesh_proto::v1::wallets_client::WalletsClient;
use sagamesh_proto::v1::{
    CreateItemRequest, CreateUserRequest, GetItemRequest, GetTransactionRequest, GetUserItemsRequest,
    GetUserRequest, PurchaseRequest, SagaMode, StreamTransactionRequest, Transaction, TransactionStatus,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Declares, for each named `async fn(SagaMode)` test body in scope, a
/// module with one test per saga mode and backend: one body, both modes, on
/// the embedded stores and on NATS JetStream with PostgreSQL.
macro_rules! in_both_modes {
    ($($body:ident),* $(,)?) => {
        $(
            mod $body {
                use sagamesh_proto::v1::SagaMode;

                #[tokio::test]
                async fn choreography() {
                    super::$body(SagaMode::Choreography).await
                }

                #[tokio::test]
                async fn orchestration() {
                    super::$body(SagaMode::Orchestration).await
                }

                #[tokio::test]
                async fn choreography_on_nats_and_postgres() {
                    let name = concat!(stringify!($body), "::choreography_on_nats_and_postgres");
                    crate::support::distributed(name, super::$body(SagaMode::Choreography)).await
                }

                #[tokio::test]
                async fn orchestration_on_nats_and_postgres() {
                    let name = concat!(stringify!($body), "::orchestration_on_nats_and_postgres");
                    crate::support::distributed(name, super::$body(SagaMode::Orchestration)).await
                }
            }
        )*
    };
}
pub(crate) use in_both_modes;

/// Declares, for each named `async fn()` test body in scope, a module with
/// one test on the embedded stores and one on NATS JetStream with
/// PostgreSQL.
macro_rules! on_both_backends {
    ($($body:ident),* $(,)?) => {
        $(
            mod $body {
                #[tokio::test]
                async fn embedded() {
                    super::$body().await
                }

                #[tokio::test]
                async fn on_nats_and_postgres() {
                    let name = concat!(stringify!($body), "::on_nats_and_postgres");
                    crate::support::distributed(name, super::$body()).await
                }
            }
        )*
    };
}
pub(crate) use on_both_backends;

/// Where the meshes a test starts keep their events and state.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The router's log and every service's store in files.
    Embedded,
    /// The router on NATS JetStream, in a namespace of the test's own, and
    /// the services on PostgreSQL, in schemas of the test's own.
    Distributed {
        nats: String,
        namespace: String,
        postgres: String,
        schema_prefix: String,
    },
}

tokio::task_local! {
    /// The backend of the test body running in this task (see [`distributed`]).
    static BACKEND: Backend;
}

/// The backend of the running test body: embedded unless the body runs
/// inside [`distributed`].
pub fn backend() -> Backend {
    BACKEND.try_with(Backend::clone).unwrap_or(Backend::Embedded)
}

/// Runs a test body with every mesh it starts on NATS JetStream and
/// PostgreSQL, in streams and schemas of its own that are deleted
/// afterwards. Without the servers the body is skipped with a printed
/// reason, except in CI, where that is a failure.
pub async fn distributed(name: &str, body: impl std::future::Future<Output = ()>) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let nats = std::env::var("SAGAMESH_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let postgres = std::env::var("SAGAMESH_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let namespace = format!("e2e-{}-{run}", std::process::id());
    let schema_prefix = format!("e2e_{}_{run}", std::process::id());
    let streams = match set_up_streams(&nats, &namespace).await {
        Ok(streams) => streams,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping {name}: no NATS server ({e})");
            return;
        }
        Err(e) => panic!("{name}: NATS must run in CI: {e}"),
    };
    if let Err(e) = drop_schemas(&postgres, &schema_prefix).await {
        if std::env::var_os("CI").is_none() {
            eprintln!("skipping {name}: no PostgreSQL ({e})");
            return;
        }
        panic!("{name}: PostgreSQL must run in CI: {e}");
    }
    let backend = Backend::Distributed {
        nats,
        namespace,
        postgres: postgres.clone(),
        schema_prefix: schema_prefix.clone(),
    };
    BACKEND.scope(backend, body).await;
    if let Err(e) = streams.delete().await {
        eprintln!("{name}: could not delete its streams: {e}");
    }
    if let Err(e) = drop_schemas(&postgres, &schema_prefix).await {
        eprintln!("{name}: could not drop its schemas: {e}");
    }
}

/// Creates the test's streams. The NATS server (2.9) removes an account's
/// stream directory when its last stream is deleted, and a stream created
/// at that moment fails ("could not create storage directory"); tests
/// delete their streams all the time, so a refused setup is polled for a
/// while before it counts (an unreachable server is not).
async fn set_up_streams(nats: &str, namespace: &str) -> Result<sagamesh_jetstream::JetStream, String> {
    let started = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    loop {
        poll.tick().await;
        match sagamesh_jetstream::JetStream::connect(nats, namespace).await {
            Ok(streams) => return Ok(streams),
            Err(e @ sagamesh_jetstream::BusError::Unreachable { .. }) => return Err(e.to_string()),
            Err(e) if started.elapsed() >= STREAM_SETUP_DEADLINE => return Err(e.to_string()),
            Err(_) => {}
        }
    }
}

/// How long a test's stream setup may be refused before it counts.
const STREAM_SETUP_DEADLINE: Duration = Duration::from_millis(500);

/// Drops every schema `<prefix>_*` (a test run's services).
async fn drop_schemas(url: &str, prefix: &str) -> Result<(), String> {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).map_err(|e| e.to_string())?;
        let schemas = client
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, $1)",
                &[&format!("{prefix}_")],
            )
            .map_err(|e| e.to_string())?;
        for schema in schemas {
            let name: String = schema.get(0);
            client
                .batch_execute(&format!("DROP SCHEMA {name} CASCADE"))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The `--mode` value of a saga mode.
pub fn mode_arg(mode: SagaMode) -> &'static str {
    mode.name()
}

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with a deadline of its own, for conditions that need a
/// whole deployment to settle.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    loop {
        poll.tick().await;
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
    }
}

/// Clients for every public service of one address.
#[derive(Clone)]
pub struct Clients {
    pub address: SocketAddr,
    pub coordinator: PurchaseCoordinatorClient<Channel>,
    pub wallets: WalletsClient<Channel>,
    pub inventory: InventoryClient<Channel>,
    pub logs: PurchaseLogsClient<Channel>,
    pub notifications: NotificationsClient<Channel>,
    pub router: EventRouterClient<Channel>,
}

impl Clients {
    pub fn new(address: SocketAddr) -> Clients {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("a socket address is a valid URI")
            .tcp_nodelay(true)
            .connect_lazy();
        Clients {
            address,
            coordinator: PurchaseCoordinatorClient::new(channel.clone()),
            wallets: WalletsClient::new(channel.clone()),
            inventory: InventoryClient::new(channel.clone()),
            logs: PurchaseLogsClient::new(channel.clone()),
            notifications: NotificationsClient::new(channel.clone()),
            router: EventRouterClient::new(channel),
        }
    }

    pub async fn create_user(&self, user_id: &str, balance: u64) {
        self.wallets
            .clone()
            .create_user(CreateUserRequest {
                user_id: user_id.into(),
                balance,
            })
            .await
            .expect("create user");
    }

    pub async fn create_item(&self, item_id: &str, price: u64, stock: u64) {
        self.inventory
            .clone()
            .create_item(CreateItemRequest {
                item_id: item_id.into(),
                name: format!("Item {item_id}"),
                price,
                stock,
            })
            .await
            .expect("create item");
    }

    pub async fn stats(&self) -> sagamesh_proto::v1::Stats {
        self.coordinator
            .clone()
            .get_stats(sagamesh_proto::v1::GetStatsRequest {})
            .await
            .expect("get stats")
            .into_inner()
    }

    pub async fn balance(&self, user_id: &str) -> u64 {
        self.wallets
            .clone()
            .get_user(GetUserRequest {
                user_id: user_id.into(),
            })
            .await
            .expect("get user")
            .into_inner()
            .balance
    }

    pub async fn stock(&self, item_id: &str) -> u64 {
        self.inventory
            .clone()
            .get_item(GetItemRequest {
                item_id: item_id.into(),
            })
            .await
            .expect("get item")
            .into_inner()
            .stock
    }

    /// How many of `item_id` the user holds.
    pub async fn held(&self, user_id: &str, item_id: &str) -> u64 {
        self.inventory
            .clone()
            .get_user_items(GetUserItemsRequest {
                user_id: user_id.into(),
            })
            .await
            .expect("get user items")
            .into_inner()
            .items
            .iter()
            .find(|i| i.item_id == item_id)
            .map_or(0, |i| i.quantity)
    }

    pub async fn purchase(&self, user_id: &str, item_id: &str, quantity: u32) -> String {
        self.purchase_with_key(user_id, item_id, quantity, "").await
    }

    pub async fn purchase_with_key(&self, user_id: &str, item_id: &str, quantity: u32, key: &str) -> String {
        let response = self
            .coordinator
            .clone()
            .purchase(PurchaseRequest {
                user_id: user_id.into(),
                item_id: item_id.into(),
                quantity,
                idempotency_key: key.into(),
            })
            .await
            .expect("purchase")
            .into_inner();
        if key.is_empty() {
            assert_eq!(response.status(), TransactionStatus::Initiated);
        }
        response.transaction_id
    }

    /// Follows `StreamTransaction` to its end; returns every update's status
    /// and the last transaction.
    pub async fn follow(&self, transaction_id: &str) -> (Vec<TransactionStatus>, Transaction) {
        let follow = async {
            let mut stream = self
                .coordinator
                .clone()
                .stream_transaction(StreamTransactionRequest {
                    transaction_id: transaction_id.into(),
                })
                .await
                .expect("stream transaction")
                .into_inner();
            let mut statuses = Vec::new();
            let mut last = None;
            while let Some(update) = stream.message().await.expect("stream message") {
                let transaction = update.transaction.expect("updates carry the transaction");
                statuses.push(transaction.status());
                last = Some(transaction);
            }
            (statuses, last.expect("the stream sends the current state first"))
        };
        tokio::time::timeout(DEADLINE, follow)
            .await
            .unwrap_or_else(|_| panic!("transaction {transaction_id} did not end within {DEADLINE:?}"))
    }

    pub async fn transaction(&self, transaction_id: &str) -> Transaction {
        self.coordinator
            .clone()
            .get_transaction(GetTransactionRequest {
                transaction_id: transaction_id.into(),
            })
            .await
            .expect("get transaction")
            .into_inner()
    }
}

/// A whole mesh in this process, on an ephemeral port and a temporary
/// directory; stopped when dropped.
pub struct Mesh {
    pub clients: Clients,
    shutdown: CancellationToken,
    _dir: Option<tempfile::TempDir>,
}

impl Mesh {
    pub async fn start(mode: SagaMode) -> Mesh {
        Mesh::start_with(mode, |_| {}).await
    }

    pub async fn start_with(mode: SagaMode, configure: impl FnOnce(&mut MeshConfig)) -> Mesh {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut mesh = Mesh::start_in(dir.path(), mode, configure).await;
        mesh._dir = Some(dir);
        mesh
    }

    pub async fn start_in(dir: &Path, mode: SagaMode, configure: impl FnOnce(&mut MeshConfig)) -> Mesh {
        let mut config = MeshConfig::new(dir.to_path_buf());
        config.mode = mode;
        config.demo_data = false;
        config.grace = Duration::from_secs(2);
        if let Backend::Distributed {
            nats,
            namespace,
            postgres,
            schema_prefix,
        } = backend()
        {
            config.bus = Some(Bus { url: nats, namespace });
            config.database = Some(Postgres {
                url: postgres,
                schema_prefix,
            });
        }
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        tokio::spawn(sagamesh_mesh::run(Role::All, config, listener, shutdown.clone()));
        let clients = Clients::new(address);
        wait_serving(&clients).await;
        Mesh {
            clients,
            shutdown,
            _dir: None,
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the coordinator answers (its saga handlers attach first).
pub async fn wait_serving(clients: &Clients) {
    eventually("the mesh to answer", || {
        let mut coordinator = clients.coordinator.clone();
        async move {
            coordinator
                .get_stats(sagamesh_proto::v1::GetStatsRequest {})
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

/// A process of the built `sagamesh` binary; killed when dropped.
pub struct Process {
    pub address: SocketAddr,
    child: Child,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sagamesh"))
}

/// The handler services, as `sagamesh handler <name>` names them.
pub const HANDLERS: [&str; 5] = [
    "wallets",
    "inventory",
    "purchase-log",
    "notifications",
    "compensation",
];

/// Log lines a test may want to count, by a phrase they contain.
pub const LOG_MARKERS: [&str; 6] = [
    "fault injection: dropping",
    "delivering again",
    "moved to the dead-letter store",
    "drained:",
    // A step done, and a compensation's progress: an instance did work.
    "successful: ",
    "] Compensat",
];

/// How often each of [`LOG_MARKERS`] appeared in a process's log.
pub type MarkerCounts = Arc<[AtomicUsize; 6]>;

impl Process {
    /// Starts `sagamesh <args>` listening on an ephemeral port and waits
    /// until it logs its address.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::try_start(name, args, env, "127.0.0.1:0", None)
            .unwrap_or_else(|e| panic!("{name} did not start: {e}"))
    }

    /// Starts `sagamesh <args> --listen <listen>`; `Err` when it does not log
    /// its address in time (for instance because the port is still taken).
    pub fn try_start(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        listen: &str,
        counts: Option<MarkerCounts>,
    ) -> Result<Process, String> {
        let mut command = Command::new(binary());
        command
            .args(args)
            .args(["--listen", listen])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("SAGAMESH_FAULTS")
            .env_remove("SAGAMESH_BUS")
            .env_remove("SAGAMESH_DATABASE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Backend::Distributed {
            nats,
            namespace,
            postgres,
            schema_prefix,
        } = backend()
        {
            command
                .env("SAGAMESH_BUS", nats)
                .env("SAGAMESH_BUS_NAMESPACE", namespace)
                .env("SAGAMESH_DATABASE", postgres)
                .env("SAGAMESH_DATABASE_SCHEMA", schema_prefix);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let label = name.to_owned();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.split("sagamesh listening on ").nth(1) {
                    let address = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(address);
                    sent = true;
                }
                if let Some(counts) = &counts {
                    for (marker, count) in LOG_MARKERS.iter().zip(counts.iter()) {
                        if line.contains(marker) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if std::env::var_os("SAGAMESH_TEST_LOGS").is_some() {
                    eprintln!("[{label}] {line}");
                }
            }
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(address) => Ok(Process {
                address: address
                    .parse()
                    .map_err(|_| format!("bad address {address} in the log"))?,
                child,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("no address logged within {DEADLINE:?}"))
            }
        }
    }

    /// SIGTERM: a graceful stop.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit by itself; returns its exit status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        eventually("the process to exit", || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
