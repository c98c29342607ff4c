//! The compensation handler: when a step fails, it undoes the steps that
//! succeeded before it, newest first (LIFO), by asking each owning service in
//! turn and waiting for its answer. Best effort: a compensation that reports
//! failure is retried a few times, then recorded as failed and the others
//! still run. At the end it publishes `CompensationCompleted` and
//! `PurchaseFailed`; a failed compensation marks the purchase as needing a
//! person (`NEEDS_ATTENTION`), with an error log line and a counter.
//!
//! Its progress per transaction lives in its own store, so a crash anywhere
//! resumes where it was; every transition is claimed against the event that
//! caused it, so redeliveries change nothing.

use std::sync::Arc;

use prost::Message;
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails, SagaMode};
use sagamesh_router_client::{
    BoxFuture, ClientError, Handled, Handler, HandlerConfig, OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES,
    OUTBOX_WRITER_MIGRATION, OutboxRelay, PROCESSED_MIGRATION, PROCESSED_MIGRATION_POSTGRES, RouterClient,
    claim, claimed,
};
use sagamesh_saga::{CompensationPlan, PlanAction};
use sagamesh_step::compensation::{advance, log_actions};
use sagamesh_store::{Database, Schema, Store, StoreError, Tx, values};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const GROUP: &str = "compensation";

const SCHEMA: Schema = Schema {
    sqlite: &[
        "CREATE TABLE compensations (
        transaction_id TEXT PRIMARY KEY,
        purchase BLOB NOT NULL,
        failed_step INTEGER NOT NULL,
        reason TEXT NOT NULL,
        remaining TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        compensated TEXT NOT NULL,
        failed TEXT NOT NULL,
        finished INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID",
        PROCESSED_MIGRATION,
        OUTBOX_MIGRATION,
        // The plan became one column, written by `CompensationPlan::encode`.
        "DROP TABLE compensations;
     CREATE TABLE compensations (
        transaction_id TEXT PRIMARY KEY,
        purchase BLOB NOT NULL,
        plan TEXT NOT NULL
    ) WITHOUT ROWID",
        // Each outbox row's writer, for replicas sharing a database.
        OUTBOX_WRITER_MIGRATION,
    ],
    postgres: &[
        "CREATE TABLE compensations (
        transaction_id TEXT PRIMARY KEY,
        purchase BYTEA NOT NULL,
        plan TEXT NOT NULL
    )",
        PROCESSED_MIGRATION_POSTGRES,
        OUTBOX_MIGRATION_POSTGRES,
    ],
};

/// The compensation handler's store, in `<data dir>/compensation.db`.
#[derive(Clone)]
pub struct Compensation {
    store: Store,
}

impl Compensation {
    pub fn open(database: &Database) -> Result<Compensation, StoreError> {
        let store = Store::open_service(database, "compensation", &SCHEMA)?;
        Ok(Compensation { store })
    }
}

/// Attaches the compensation handler to the router.
pub async fn start(
    compensation: &Compensation,
    router: sagamesh_router_client::RouterLink,
    mode: SagaMode,
    max_in_flight: u32,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let subscription = sagamesh_saga::subscription(GROUP).expect("the compensation group is in the topology");
    let relay = OutboxRelay::new();
    let handler = Arc::new(CompensationHandler {
        store: compensation.store.clone(),
        relay: relay.clone(),
    });
    let client = RouterClient::start(
        router,
        HandlerConfig {
            service: GROUP.to_owned(),
            group: GROUP.to_owned(),
            event_types: subscription.event_types,
            max_in_flight,
            mode,
        },
        handler,
        tasks,
        shutdown.clone(),
    )
    .await?;
    let drained = client.drained();
    relay.start(
        compensation.store.clone(),
        client.into_publisher(),
        tasks,
        drained,
    );
    Ok(())
}

struct CompensationHandler {
    store: Store,
    relay: OutboxRelay,
}

struct Failure(String);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(e.to_string())
    }
}

fn load(tx: &mut dyn Tx, tx_id: &str) -> Result<Option<(PurchaseDetails, CompensationPlan)>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT purchase, plan FROM compensations WHERE transaction_id = $1",
        &values![tx_id],
    )?
    else {
        return Ok(None);
    };
    let (purchase, plan) = (row.blob(0)?, row.string(1)?);
    Ok(PurchaseDetails::decode(purchase)
        .ok()
        .zip(CompensationPlan::decode(&plan)))
}

fn save(
    tx: &mut dyn Tx,
    tx_id: &str,
    purchase: &PurchaseDetails,
    plan: &CompensationPlan,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO compensations (transaction_id, purchase, plan) VALUES ($1, $2, $3)
         ON CONFLICT (transaction_id) DO UPDATE SET plan = excluded.plan",
        &values![tx_id, purchase.encode_to_vec(), plan.encode()],
    )?;
    Ok(())
}

impl CompensationHandler {
    fn transition(tx: &mut dyn Tx, event: &Envelope) -> Result<Vec<PlanAction>, Failure> {
        let purchase = event.payload.as_ref().and_then(|p| p.purchase());
        // Orchestration sagas are compensated by the coordinator.
        if purchase.is_some_and(|p| sagamesh_saga::saga_mode(p) != SagaMode::Choreography) {
            return Ok(Vec::new());
        }
        let tx_id = &event.transaction_id;
        match event.payload.as_ref() {
            Some(Payload::PurchaseCompleted(_)) => {
                claim(tx, tx_id, "completed")?;
                return Ok(Vec::new());
            }
            // Per-transaction order: a completion published first is seen
            // first, so a timeout decided on a lagging view undoes nothing.
            Some(Payload::SagaTimedOut(_)) if claimed(tx, tx_id, "completed")? => return Ok(Vec::new()),
            _ => {}
        }
        let state = load(tx, tx_id)?;
        let starting = state.is_none();
        if starting {
            // Only a step's failure or a timeout starts a compensation.
            let starts = matches!(event.payload, Some(Payload::SagaTimedOut(_)))
                || event
                    .payload
                    .as_ref()
                    .and_then(|p| sagamesh_saga::step_outcome(p.event_type()))
                    .is_some_and(|(_, failed)| failed);
            if !starts || !claim(tx, tx_id, "start")? {
                return Ok(Vec::new());
            }
        }
        let Some((purchase, plan, actions)) = advance(tx, event, GROUP, state)? else {
            return Ok(Vec::new());
        };
        save(tx, tx_id, &purchase, &plan)?;
        Ok(actions)
    }
}

impl Handler for CompensationHandler {
    fn handle(&self, event: Envelope, attempt: u32) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.handle_staged(event, attempt).await?.durable().await })
    }

    /// Reported processed once its transition is committed: most events
    /// (a step's success, a completion) change little or nothing, and
    /// their writes share the next fsync instead of making one each. The
    /// compensation requests it writes go out once durable, through the
    /// relay's durable read.
    fn handle_staged(&self, event: Envelope, _attempt: u32) -> BoxFuture<'_, Result<Handled, String>> {
        Box::pin(async move {
            let tx_id = event.transaction_id.clone();
            let (actions, synced) = self
                .store
                .write_deferred(move |tx| CompensationHandler::transition(tx, &event))
                .await
                .map_err(|f| f.0)?;
            if !actions.is_empty() {
                self.relay.nudge();
            }
            log_actions("CompensationHandler", &tx_id, &actions);
            Ok(Handled::Committed(Box::pin(async move {
                synced.durable().await.map_err(|e| e.to_string())
            })))
        })
    }
}
