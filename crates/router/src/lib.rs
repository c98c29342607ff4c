//! The event router: the only way sagamesh services talk to each other.
//!
//! A handler instance attaches with one bidirectional stream, says hello, and
//! from then on receives deliveries, acks or nacks them and publishes on the
//! same stream. The router
//! - confirms a publish only once the event is durable in its log, and many
//!   concurrent publishes share one commit (`appender`);
//! - delivers each event at least once to every group subscribed to its type,
//!   sharing a group's events among its connected instances;
//! - keeps a transaction's events in publish order within a group: the next
//!   event of a transaction goes out only once the previous one is acked;
//! - redelivers what is not acked before the deadline, nacked, or in flight on
//!   a stream that broke, and moves an event to the dead-letter store after
//!   the maximum attempts (`core`).
//!
//! The subscriptions are fixed by the mesh's topology, not by whoever
//! attaches: a hello that does not match one is refused.
//!
//! The events live in one of two [`Backend`]s: the embedded log (one SQLite
//! file; the core reads it back after a restart and saves each group's
//! cursor) or NATS JetStream (a stream and a durable consumer per group; the
//! router itself keeps nothing). Either way the core does the same work:
//! per-transaction order, leases, retries and dead letters.

mod appender;
mod consumers;
mod core;
mod grpc;

use std::sync::Arc;
use std::time::Duration;

use sagamesh_jetstream::JetStream;
use sagamesh_log::{DeadLetterStore, EventLog, LogError};
use sagamesh_proto::v1::SagaMode;
use sagamesh_saga::Subscription;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use grpc::{AttachStream, RequireToken, RouterServer, RouterService};

/// How the router treats deliveries.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The saga mode of this mesh; a hello in another mode is refused.
    pub mode: SagaMode,
    /// The durable subscriptions of the mesh.
    pub subscriptions: Vec<Subscription>,
    /// How long a delivery may stay unacked before it goes out again.
    pub ack_deadline: Duration,
    /// Deliveries of one event to one group before it is dead-lettered.
    pub max_attempts: u32,
    /// The delay before a nacked event goes out again doubles per attempt
    /// from `retry_base` up to `retry_max`, with ±50% jitter so that a
    /// burst of failures does not come back as a burst.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Fault injection: the chance of breaking a stream as it is delivered
    /// to (0 in production).
    pub drop_stream_probability: f64,
}

impl RouterConfig {
    pub fn new(mode: SagaMode, subscriptions: Vec<Subscription>) -> RouterConfig {
        RouterConfig {
            mode,
            subscriptions,
            ack_deadline: Duration::from_secs(30),
            max_attempts: 5,
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            drop_stream_probability: 0.0,
        }
    }
}

/// Where the router keeps the events.
#[derive(Clone)]
pub enum Backend {
    /// The embedded log, in the router's own file.
    Embedded(Arc<dyn EventLog>),
    /// NATS JetStream: the router is stateless, and several can share it.
    JetStream(JetStream),
}

impl Backend {
    fn dead_letters(&self) -> Arc<dyn DeadLetterStore> {
        match self {
            Backend::Embedded(log) => log.clone(),
            Backend::JetStream(bus) => Arc::new(bus.clone()),
        }
    }
}

/// A running router: its core task, its appender and the handle to both.
#[derive(Clone)]
pub struct Router {
    core: mpsc::Sender<core::Command>,
    appender: mpsc::Sender<appender::Append>,
    dead_letters: Arc<dyn DeadLetterStore>,
}

impl Router {
    /// Recovers the unacked events (from the embedded log, or from JetStream's
    /// consumers as they redeliver) and starts the router's tasks on
    /// `tasks`; they stop when `shutdown` is cancelled.
    pub async fn start(
        backend: Backend,
        config: RouterConfig,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Router, LogError> {
        let config = Arc::new(config);
        let (core, core_rx) = mpsc::channel(core::COMMAND_QUEUE);
        let (appender, append_rx) = mpsc::channel(appender::APPEND_QUEUE);
        let dead_letters = backend.dead_letters();
        let (members, attached) = watch::channel(vec![0; config.subscriptions.len()]);
        let state =
            core::Core::recover(&backend, config.clone(), core.clone(), appender.clone(), members).await?;
        let target = appender::Target::of(&backend).await?;
        tasks.spawn(state.run(core_rx, shutdown.clone()));
        if let Backend::JetStream(bus) = &backend {
            consumers::start(
                bus,
                config.clone(),
                core.clone(),
                attached,
                tasks,
                shutdown.clone(),
            )
            .await?;
        }
        tasks.spawn(appender::run(target, append_rx, core.clone(), shutdown));
        Ok(Router {
            core,
            appender,
            dead_letters,
        })
    }

    /// The gRPC service of this router.
    pub fn service(&self) -> RouterService {
        RouterService::new(self.clone())
    }
}
