//! The coordinator: where a purchase starts and where its progress is seen.
//!
//! `Purchase` prices the order from the catalog, records the saga and its
//! `PurchaseInitiated` event in one local transaction (the outbox relays the
//! event to the router), and answers at once. The coordinator also
//! subscribes to every saga event and folds them into the transaction view
//! (`view`), which `GetTransaction`, `ListTransactions`, `StreamTransaction`
//! and `GetStats` serve.

mod catalog;
mod grpc;
mod live;
mod orchestrator;
mod queries;
mod stats;
mod store;
mod view;
mod watchers;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    Envelope, EventType, PurchaseDetails, PurchaseInitiated, SagaMode, Step, TraceContext, Transaction,
    TransactionStatus,
};
use sagamesh_router_client::{
    BoxFuture, ClientError, Handled, Handler, HandlerConfig, OutboxRelay, RouterClient,
};
use sagamesh_store::{Database, Store, StoreError, Synced};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use catalog::Catalog;
pub use grpc::CoordinatorService;
pub use view::is_terminal;

const GROUP: &str = "coordinator";

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Input(#[from] sagamesh_saga::InputError),
    #[error("transaction '{0}' does not exist")]
    NoSuchTransaction(String),
    #[error("idempotency key '{key}' was used for a different purchase ({existing})")]
    KeyReused { key: String, existing: String },
    #[error("the total price of {quantity} x {unit_price} is too large")]
    PriceOverflow { quantity: u32, unit_price: u64 },
    #[error("{in_flight} purchases are in progress, the most this coordinator takes at once; retry shortly")]
    Overloaded { in_flight: u64 },
    #[error("cannot price the purchase: the inventory service answered {0}")]
    Pricing(String),
    #[error("{0}")]
    BadPage(String),
    #[error("a stored transaction could not be decoded: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A purchase as asked for, before it is checked.
#[derive(Debug, Clone)]
pub struct PurchaseOrder {
    pub user_id: String,
    pub item_id: String,
    pub quantity: u32,
    pub idempotency_key: String,
}

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub mode: SagaMode,
    /// Deliveries of saga events this instance takes at once.
    pub max_in_flight: u32,
    /// A saga that makes no progress for this long is failed and
    /// compensated; `None` never gives up.
    pub saga_deadline: Option<Duration>,
}

/// The coordinator's state; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    relay: OutboxRelay,
    catalog: Catalog,
    mode: SagaMode,
    watchers: watchers::Watchers,
    /// The views of sagas in flight, where this instance alone writes them.
    live: live::LiveViews,
    steps: stats::StepStats,
    compensation_failures: AtomicU64,
    dead_letters: AtomicU64,
    /// Sagas recorded and not ended (approximate under races, never
    /// negative), for admission control.
    sagas_in_flight: AtomicU64,
    max_sagas_in_flight: u64,
}

impl Coordinator {
    /// Opens the coordinator's store in `database`.
    /// `max_sagas_in_flight` bounds the sagas that have not ended: past it,
    /// `Purchase` is refused at once, so a burst cannot grow every queue
    /// behind it without bound.
    pub async fn open(
        database: &Database,
        catalog: Catalog,
        mode: SagaMode,
        max_sagas_in_flight: u64,
    ) -> Result<Coordinator, StoreError> {
        let store = Store::open_service(database, "coordinator", &store::SCHEMA)?;
        // Counted before anything is served, so admission holds from the
        // first request.
        let unfinished = store.read(store::unfinished).await.map_err(|e| match e {
            CoordinatorError::Store(e) => e,
            other => StoreError::Commit(other.to_string()),
        })?;
        let live = live::LiveViews::new(!store.shared());
        Ok(Coordinator {
            inner: Arc::new(Inner {
                store,
                live,
                relay: OutboxRelay::new(),
                catalog,
                mode,
                watchers: watchers::Watchers::default(),
                steps: stats::StepStats::new(),
                compensation_failures: AtomicU64::new(0),
                dead_letters: AtomicU64::new(0),
                sagas_in_flight: AtomicU64::new(unfinished),
                max_sagas_in_flight,
            }),
        })
    }

    /// Subscribes to every saga event and starts relaying the outbox.
    pub async fn start(
        &self,
        router: sagamesh_router_client::RouterLink,
        config: CoordinatorConfig,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<(), ClientError> {
        let subscription =
            sagamesh_saga::subscription(GROUP).expect("the coordinator group is in the topology");
        let client = RouterClient::start(
            router,
            HandlerConfig {
                service: GROUP.to_owned(),
                group: GROUP.to_owned(),
                event_types: subscription.event_types,
                max_in_flight: config.max_in_flight,
                mode: config.mode,
            },
            Arc::new(self.clone()),
            tasks,
            shutdown.clone(),
        )
        .await?;
        let drained = client.drained();
        self.inner
            .relay
            .start(self.inner.store.clone(), client.into_publisher(), tasks, drained);
        if self.inner.store.shared() {
            tasks.spawn(self.clone().count_unfinished(shutdown.clone()));
        }
        if let Some(deadline) = config.saga_deadline {
            tasks.spawn(self.clone().watch_deadlines(deadline, shutdown));
        }
        Ok(())
    }

    /// With replicas, a saga admitted here may end on another coordinator:
    /// the count of sagas in flight is taken from the shared store now and
    /// then, so admission holds for the whole mesh.
    async fn count_unfinished(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(COUNT_UNFINISHED_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.inner.store.read(store::unfinished).await {
                Ok(unfinished) => self.inner.sagas_in_flight.store(unfinished, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "could not count the sagas in flight"),
            }
        }
    }

    /// Fails the sagas that stopped moving: a step whose service is down
    /// for good must not hold money forever.
    async fn watch_deadlines(self, deadline: Duration, shutdown: CancellationToken) {
        let every = (deadline / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let before_ms = SystemTime::now()
                .checked_sub(deadline)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            let stalled = match self
                .inner
                .store
                .read(move |tx| store::stalled(tx, before_ms, 256))
                .await
            {
                Ok(stalled) => stalled,
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for stalled sagas");
                    continue;
                }
            };
            for tx_id in stalled {
                let id = tx_id.clone();
                let timed_out = self
                    .inner
                    .store
                    .write(move |tx| store::time_out(tx, &id, before_ms, deadline))
                    .await;
                match timed_out {
                    Ok(true) => {
                        tracing::error!(
                            tx_id = %tx_id,
                            "saga made no progress within {deadline:?}; failing and compensating it"
                        );
                        self.inner.relay.nudge();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(tx_id = %tx_id, error = %e, "could not time a saga out"),
                }
            }
        }
    }

    /// Starts a purchase saga; returns its transaction (an existing one when
    /// the idempotency key was used before).
    pub async fn purchase(&self, order: PurchaseOrder) -> Result<Transaction, CoordinatorError> {
        sagamesh_saga::validate_id("user_id", &order.user_id)?;
        sagamesh_saga::validate_id("item_id", &order.item_id)?;
        sagamesh_saga::validate_quantity(order.quantity)?;
        if !order.idempotency_key.is_empty() {
            sagamesh_saga::validate_id("idempotency_key", &order.idempotency_key)?;
            let (user, key) = (order.user_id.clone(), order.idempotency_key.clone());
            let existing = self
                .inner
                .store
                .read(move |tx| store::by_key(tx, &user, &key))
                .await?;
            if let Some(existing) = existing {
                return same_order(existing, &order);
            }
        }
        // Reserve a place first, so concurrent purchases cannot all slip
        // past the check; the reservation is released unless a saga starts.
        let reservation = Reservation::take(self.inner.clone())?;
        let unit_price = self.price(&order.item_id).await?;
        let total_price = unit_price
            .checked_mul(u64::from(order.quantity))
            .filter(|t| *t <= i64::MAX as u64)
            .ok_or(CoordinatorError::PriceOverflow {
                quantity: order.quantity,
                unit_price,
            })?;
        let transaction_id = uuid::Uuid::now_v7().to_string();
        let now = Some(sagamesh_proto::timestamp(SystemTime::now()));
        let transaction = Transaction {
            transaction_id: transaction_id.clone(),
            user_id: order.user_id.clone(),
            item_id: order.item_id.clone(),
            quantity: order.quantity,
            unit_price,
            total_price,
            status: TransactionStatus::Initiated as i32,
            mode: self.inner.mode as i32,
            created_at: now,
            updated_at: now,
            idempotency_key: order.idempotency_key.clone(),
            ..Default::default()
        };
        let purchase = PurchaseDetails {
            user_id: order.user_id.clone(),
            item_id: order.item_id.clone(),
            quantity: order.quantity,
            unit_price,
            total_price,
            mode: self.inner.mode as i32,
        };
        let mut initiated = Envelope::new(
            &transaction_id,
            "",
            GROUP,
            Payload::PurchaseInitiated(PurchaseInitiated {
                purchase: Some(purchase.clone()),
            }),
        );
        initiated.trace = Some(TraceContext::root(&transaction_id));
        let mut first_events = vec![initiated];
        if self.inner.mode == SagaMode::Orchestration {
            // The orchestrator's first command goes out with the saga.
            let command = sagamesh_saga::execute_command(Step::UserValidation, purchase);
            first_events.push(first_events[0].caused(GROUP, command));
        }
        let record = transaction.clone();
        // The write and its effect on the count finish together even if the
        // caller goes away meanwhile.
        let inner = self.inner.clone();
        let existing = tokio::spawn(async move {
            let recorded = inner
                .store
                .write(move |tx| store::insert(tx, record.clone(), &first_events))
                .await?;
            match recorded {
                store::Recorded::New(live) => {
                    // The saga's first event is durable: off it goes, while
                    // the caller is being woken.
                    inner.relay.nudge();
                    reservation.keep();
                    if let Some(live) = live {
                        inner.live.keep_new(live);
                    }
                    Ok::<_, CoordinatorError>(None)
                }
                store::Recorded::Existing(existing) => Ok(Some(*existing)),
            }
        })
        .await
        .map_err(|e| CoordinatorError::Store(StoreError::Commit(e.to_string())))??;
        if let Some(existing) = existing {
            return same_order(existing, &order);
        }
        tracing::info!(
            tx_id = %transaction_id,
            user = %order.user_id,
            item = %order.item_id,
            quantity = order.quantity,
            total_price,
            "purchase initiated"
        );
        Ok(transaction)
    }

    /// The catalog price of an item; 0 for an item the catalog does not have,
    /// so the saga runs and fails at the item-grant step, which owns the
    /// catalog and says why (and grants nothing at 0 should the item be
    /// created meanwhile).
    async fn price(&self, item_id: &str) -> Result<u64, CoordinatorError> {
        match self.inner.catalog.get_item(item_id).await {
            Ok(item) => Ok(item.price),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(0),
            Err(status) => Err(CoordinatorError::Pricing(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        }
    }

    pub async fn transaction(&self, transaction_id: String) -> Result<Transaction, CoordinatorError> {
        self.inner
            .store
            .read(move |tx| {
                store::get(tx, &transaction_id)?.ok_or(CoordinatorError::NoSuchTransaction(transaction_id))
            })
            .await
    }

    /// Folds an event into the view. Returns once it is committed, with
    /// what resolves once it is durable (`None`: nothing was written).
    async fn apply(&self, event: Envelope) -> Result<Option<Synced>, CoordinatorError> {
        let event_type = event.event_type();
        if event.producer == GROUP && view::only_recorded(&event) {
            // Folded into the view when this coordinator (or a replica)
            // wrote it: watchers hear of it, and nothing is written.
            let has_event = |view: &Transaction| view.history.iter().any(|h| h.event_id == event.event_id);
            let recorded = match self.inner.live.get(&event.transaction_id) {
                Some(live) if has_event(&live.view) => Some(live.view.clone()),
                _ => {
                    let tx_id = event.transaction_id.clone();
                    let stored = self.inner.store.read(move |tx| store::get(tx, &tx_id)).await?;
                    stored.map(Arc::new)
                }
            };
            if let Some(transaction) = recorded
                && has_event(&transaction)
            {
                self.inner.watchers.publish(transaction, event_type);
                return Ok(None);
            }
        }
        let timing = event
            .payload
            .as_ref()
            .and_then(|p| p.timing())
            .and_then(|t| t.duration)
            .map(|d| sagamesh_proto::std_duration(&d));
        let compensation_failures = match &event.payload {
            Some(Payload::CompensationCompleted(done)) => done.failed.len() as u64,
            _ => 0,
        };
        let dead_lettered = u64::from(event_type == EventType::DeadLettered);
        let tx_id = event.transaction_id.clone();
        // Deferred: watchers see the new status before the fsync, which
        // the next write that needs one shares (or the relay's durable
        // read of the orchestrator's command hurries). The event is
        // reported processed at once and acked only once durable, so a
        // machine crash in between redelivers it and the view is rebuilt
        // from it. A command the orchestrator wrote here and that got out
        // before a crash is written again on redelivery; the step's claim
        // absorbs the repeat.
        let kept = self.inner.live.get(&tx_id);
        let (applied, synced) = self
            .inner
            .store
            .write_deferred(move |tx| store::apply(tx, &event, kept.as_deref()))
            .await?;
        let Some(applied) = applied else {
            return Ok(Some(synced));
        };
        let store::Applied {
            transaction,
            body,
            seq,
            actions,
            ended,
        } = applied;
        // One copy for the live view and the watchers.
        let transaction = Arc::new(transaction);
        if let Some(seq) = seq.filter(|_| self.inner.live.enabled()) {
            self.inner.live.keep(live::LiveView {
                seq,
                view: transaction.clone(),
                body,
            });
        }
        if ended {
            let _ = self
                .inner
                .sagas_in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
        }
        let orchestrating =
            transaction.mode() == SagaMode::Orchestration && !view::is_terminal(transaction.status());
        sagamesh_step::compensation::log_actions("PurchaseCoordinator", &tx_id, &actions);
        if let (Some((step, _)), Some(duration)) = (sagamesh_saga::step_outcome(event_type), timing) {
            self.inner.steps.record(step, duration);
        }
        self.inner
            .compensation_failures
            .fetch_add(compensation_failures, Ordering::Relaxed);
        self.inner
            .dead_letters
            .fetch_add(dead_lettered, Ordering::Relaxed);
        self.inner.watchers.publish(transaction, event_type);
        if orchestrating {
            // The orchestrator wrote its next command; the relay publishes
            // it once durable.
            self.inner.relay.nudge();
        }
        Ok(Some(synced))
    }
}

/// How often replicas sharing a store recount the sagas in flight.
const COUNT_UNFINISHED_EVERY: Duration = Duration::from_secs(1);

/// A place among the sagas in flight, given back on drop unless kept.
struct Reservation {
    inner: Arc<Inner>,
    kept: bool,
}

impl Reservation {
    fn take(inner: Arc<Inner>) -> Result<Reservation, CoordinatorError> {
        let before = inner.sagas_in_flight.fetch_add(1, Ordering::Relaxed);
        let limit = inner.max_sagas_in_flight;
        let reservation = Reservation { inner, kept: false };
        if before >= limit {
            return Err(CoordinatorError::Overloaded { in_flight: before });
        }
        Ok(reservation)
    }

    /// The saga started: it holds the place until it ends.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.kept {
            // Never below zero: where replicas share a store, the count is
            // replaced now and then by one that leaves out reservations
            // whose saga is not recorded yet, such as this one.
            let _ = self
                .inner
                .sagas_in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
        }
    }
}

/// The existing saga for an idempotency key, if it is the same purchase.
fn same_order(existing: Transaction, order: &PurchaseOrder) -> Result<Transaction, CoordinatorError> {
    if existing.item_id != order.item_id || existing.quantity != order.quantity {
        return Err(CoordinatorError::KeyReused {
            key: order.idempotency_key.clone(),
            existing: format!(
                "transaction {} bought {} x{}",
                existing.transaction_id, existing.item_id, existing.quantity
            ),
        });
    }
    Ok(existing)
}

impl Handler for Coordinator {
    fn handle(&self, event: Envelope, attempt: u32) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.handle_staged(event, attempt).await?.durable().await })
    }

    /// Reported processed once the view is committed, so the router sends
    /// the saga's next event without waiting for the fsync.
    fn handle_staged(&self, event: Envelope, _attempt: u32) -> BoxFuture<'_, Result<Handled, String>> {
        Box::pin(async move {
            Ok(match self.apply(event).await.map_err(|e| e.to_string())? {
                None => Handled::Durable,
                Some(synced) => Handled::Committed(Box::pin(async move {
                    synced.durable().await.map_err(|e| e.to_string())
                })),
            })
        })
    }
}
