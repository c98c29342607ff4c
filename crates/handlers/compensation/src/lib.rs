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

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{CompensationCompleted, Envelope, PurchaseDetails, PurchaseFailed, SagaMode, Step};
use sagamesh_router_client::{
    BoxFuture, ClientError, Handler, HandlerConfig, OUTBOX_MIGRATION, OutboxRelay, PROCESSED_MIGRATION,
    RouterClient, claim, push_outbox,
};
use sagamesh_sqlite::{Durability, Store, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tries of one step's compensation before it is given up as failed.
pub const MAX_COMPENSATION_ATTEMPTS: u32 = 3;

/// Compensations that could not succeed, since the process started.
pub static COMPENSATION_FAILURES: AtomicU64 = AtomicU64::new(0);

const GROUP: &str = "compensation";

const MIGRATIONS: &[&str] = &[
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
];

/// The compensation handler's store, in `<data dir>/compensation.db`.
#[derive(Clone)]
pub struct Compensation {
    store: Store,
}

impl Compensation {
    pub fn open(data_dir: &Path, durability: Durability) -> Result<Compensation, StoreError> {
        let store = Store::open(&data_dir.join("compensation.db"), durability, MIGRATIONS)?;
        Ok(Compensation { store })
    }
}

/// Attaches the compensation handler to the router.
pub async fn start(
    compensation: &Compensation,
    router: tonic::transport::Channel,
    mode: SagaMode,
    max_in_flight: u32,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let subscription = sagamesh_saga::choreography()
        .into_iter()
        .find(|s| s.group == GROUP)
        .expect("the compensation group is in the topology");
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
    relay.start(compensation.store.clone(), client.publisher(), tasks, shutdown);
    Ok(())
}

struct CompensationHandler {
    store: Store,
    relay: OutboxRelay,
}

/// One transaction's compensation in progress.
struct Plan {
    purchase: PurchaseDetails,
    failed_step: Step,
    reason: String,
    /// Steps still to undo, newest first; the head is being undone.
    remaining: Vec<Step>,
    attempt: u32,
    compensated: Vec<Step>,
    failed: Vec<Step>,
    finished: bool,
}

struct Failure(String);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(e.to_string())
    }
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure(e.to_string())
    }
}

fn steps_text(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| (*s as i32).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_steps(text: &str) -> Vec<Step> {
    text.split(',')
        .filter_map(|n| n.parse::<i32>().ok())
        .filter_map(|n| Step::try_from(n).ok())
        .collect()
}

fn load(conn: &Connection, tx_id: &str) -> rusqlite::Result<Option<Plan>> {
    conn.prepare_cached(
        "SELECT purchase, failed_step, reason, remaining, attempt, compensated, failed, finished
         FROM compensations WHERE transaction_id = ?1",
    )?
    .query_row([tx_id], |row| {
        let purchase: Vec<u8> = row.get(0)?;
        Ok(Plan {
            purchase: PurchaseDetails::decode(purchase.as_slice()).unwrap_or_default(),
            failed_step: Step::try_from(row.get::<_, i32>(1)?).unwrap_or(Step::Unspecified),
            reason: row.get(2)?,
            remaining: parse_steps(&row.get::<_, String>(3)?),
            attempt: row.get(4)?,
            compensated: parse_steps(&row.get::<_, String>(5)?),
            failed: parse_steps(&row.get::<_, String>(6)?),
            finished: row.get(7)?,
        })
    })
    .optional()
}

fn save(conn: &Connection, tx_id: &str, plan: &Plan) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO compensations
            (transaction_id, purchase, failed_step, reason, remaining, attempt, compensated, failed, finished)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (transaction_id) DO UPDATE SET
            remaining = excluded.remaining, attempt = excluded.attempt,
            compensated = excluded.compensated, failed = excluded.failed, finished = excluded.finished",
    )?
    .execute(params![
        tx_id,
        plan.purchase.encode_to_vec(),
        plan.failed_step as i32,
        plan.reason,
        steps_text(&plan.remaining),
        plan.attempt,
        steps_text(&plan.compensated),
        steps_text(&plan.failed),
        plan.finished
    ])?;
    Ok(())
}

/// What a transition decided, for logs after the commit.
enum Logged {
    Requested(Step, u32),
    GaveUp(Step, String),
    Finished { compensated: usize, failed: usize },
}

impl CompensationHandler {
    fn transition(conn: &Connection, event: &Envelope) -> Result<Vec<Logged>, Failure> {
        let Some(payload) = event.payload.as_ref() else {
            return Ok(vec![]);
        };
        let tx_id = &event.transaction_id;
        let publish =
            |payload: Payload| push_outbox(conn, &Envelope::new(tx_id, &event.event_id, GROUP, payload));
        let mut logged = Vec::new();
        let mut plan = match payload {
            Payload::UserValidationFailed(_)
            | Payload::ItemGrantFailed(_)
            | Payload::LogFailed(_)
            | Payload::NotificationFailed(_) => {
                if !claim(conn, tx_id, "start")? {
                    return Ok(logged);
                }
                let (failed_step, _) =
                    sagamesh_saga::step_outcome(payload.event_type()).unwrap_or((Step::Unspecified, true));
                let reason = match payload {
                    Payload::UserValidationFailed(e) => e.reason.clone(),
                    Payload::ItemGrantFailed(e) => e.reason.clone(),
                    Payload::LogFailed(e) => e.reason.clone(),
                    Payload::NotificationFailed(e) => e.reason.clone(),
                    _ => String::new(),
                };
                let plan = Plan {
                    purchase: payload.purchase().cloned().unwrap_or_default(),
                    failed_step,
                    reason,
                    remaining: sagamesh_saga::steps_to_compensate(failed_step),
                    attempt: 1,
                    compensated: Vec::new(),
                    failed: Vec::new(),
                    finished: false,
                };
                if let Some(first) = plan.remaining.first() {
                    publish(sagamesh_saga::compensation_request(
                        *first,
                        plan.purchase.clone(),
                        1,
                    ))?;
                    logged.push(Logged::Requested(*first, 1));
                }
                plan
            }
            Payload::StepCompensated(done) => {
                let Some(mut plan) = load(conn, tx_id)? else {
                    return Ok(logged);
                };
                if plan.finished || plan.remaining.first().map(|s| *s as i32) != Some(done.step) {
                    return Ok(logged);
                }
                let step = plan.remaining.remove(0);
                plan.compensated.push(step);
                plan.attempt = 1;
                if let Some(next) = plan.remaining.first() {
                    publish(sagamesh_saga::compensation_request(
                        *next,
                        plan.purchase.clone(),
                        1,
                    ))?;
                    logged.push(Logged::Requested(*next, 1));
                }
                plan
            }
            Payload::StepCompensationFailed(failed) => {
                let Some(mut plan) = load(conn, tx_id)? else {
                    return Ok(logged);
                };
                if plan.finished
                    || plan.remaining.first().map(|s| *s as i32) != Some(failed.step)
                    || failed.attempt != plan.attempt
                {
                    return Ok(logged);
                }
                let step = plan.remaining[0];
                if plan.attempt < MAX_COMPENSATION_ATTEMPTS {
                    plan.attempt += 1;
                    publish(sagamesh_saga::compensation_request(
                        step,
                        plan.purchase.clone(),
                        plan.attempt,
                    ))?;
                    logged.push(Logged::Requested(step, plan.attempt));
                } else {
                    plan.remaining.remove(0);
                    plan.failed.push(step);
                    plan.attempt = 1;
                    logged.push(Logged::GaveUp(step, failed.reason.clone()));
                    if let Some(next) = plan.remaining.first() {
                        publish(sagamesh_saga::compensation_request(
                            *next,
                            plan.purchase.clone(),
                            1,
                        ))?;
                        logged.push(Logged::Requested(*next, 1));
                    }
                }
                plan
            }
            _ => return Ok(logged),
        };
        if plan.remaining.is_empty() && !plan.finished {
            plan.finished = true;
            let needs_attention = !plan.failed.is_empty();
            publish(Payload::CompensationCompleted(CompensationCompleted {
                purchase: Some(plan.purchase.clone()),
                compensated: plan.compensated.iter().map(|s| *s as i32).collect(),
                failed: plan.failed.iter().map(|s| *s as i32).collect(),
            }))?;
            publish(Payload::PurchaseFailed(PurchaseFailed {
                purchase: Some(plan.purchase.clone()),
                reason: plan.reason.clone(),
                failed_step: plan.failed_step as i32,
                needs_attention,
            }))?;
            logged.push(Logged::Finished {
                compensated: plan.compensated.len(),
                failed: plan.failed.len(),
            });
        }
        save(conn, tx_id, &plan)?;
        Ok(logged)
    }
}

impl Handler for CompensationHandler {
    fn handle(&self, event: Envelope, _attempt: u32) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let tx_id = event.transaction_id.clone();
            let logged = self
                .store
                .write(move |conn| CompensationHandler::transition(conn, &event))
                .await
                .map_err(|f| f.0)?;
            if !logged.is_empty() {
                self.relay.nudge();
            }
            for entry in logged {
                match entry {
                    Logged::Requested(step, attempt) => tracing::info!(
                        tx_id = %tx_id,
                        "[CompensationHandler] Compensating {} (attempt {attempt})",
                        step.name()
                    ),
                    Logged::GaveUp(step, reason) => {
                        COMPENSATION_FAILURES.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            tx_id = %tx_id,
                            step = step.name(),
                            "[CompensationHandler] Compensation of {} could not succeed after {MAX_COMPENSATION_ATTEMPTS} attempts: {reason}; the transaction needs attention",
                            step.name()
                        );
                    }
                    Logged::Finished { compensated, failed } => tracing::info!(
                        tx_id = %tx_id,
                        "[CompensationHandler] Compensation completed: {compensated} undone, {failed} failed"
                    ),
                }
            }
            Ok(())
        })
    }
}
