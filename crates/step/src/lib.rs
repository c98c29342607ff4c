//! The frame each domain service's step runs in, so the four services share
//! one implementation of what the saga demands of every step:
//! - **once**: the step and each compensation attempt are claimed per
//!   transaction in the same local transaction as their effect, so a
//!   redelivered event has no second effect;
//! - **atomic, with its event**: the outcome event goes into the outbox in
//!   that same transaction (nothing half-done, nothing lost);
//! - **timed and logged**: the step's duration travels in its event and in a
//!   log line that carries the transaction id;
//! - **fault injection** from `SAGAMESH_FAULTS`.
//!
//! A service supplies only its business change, as a [`StepOwner`].

pub mod compensation;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    Envelope, PurchaseDetails, SagaMode, Step, StepCompensated, StepCompensationFailed, StepTiming,
};
use sagamesh_router_client::{
    BoxFuture, ClientError, Handler, HandlerConfig, OutboxRelay, RouterClient, claim, push_outbox,
};
use sagamesh_saga::{Fault, Faults};
use sagamesh_store::{Store, StoreError, Tx};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a step's business change decided.
pub enum Outcome {
    /// The step succeeded: its success event (timing is filled in) and a
    /// summary for the log line.
    Success { event: Payload, summary: String },
    /// A business failure, with the reason the user sees.
    Failure(String),
}

/// A domain service's part of the saga.
pub trait StepOwner: Send + Sync + 'static {
    /// The step this service owns.
    const STEP: Step;
    /// The router group, which is also the service name.
    const GROUP: &'static str;
    /// The handler name in logs, as in the seed system.
    const HANDLER: &'static str;

    /// Does the step inside the given transaction.
    fn execute(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Outcome, StoreError>;

    /// Undoes the step inside the given transaction: `Ok(summary)` when it
    /// is undone (or there was nothing to undo), `Err(reason)` when it cannot
    /// be. Must be safe to call again after it succeeded once.
    fn compensate(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Result<String, String>, StoreError>;
}

/// How a step service runs.
#[derive(Debug, Clone)]
pub struct StepConfig {
    pub mode: SagaMode,
    pub faults: Faults,
    /// Deliveries this instance takes at once.
    pub max_in_flight: u32,
}

/// Attaches `owner` to the router and relays its outbox.
pub async fn start<O: StepOwner>(
    owner: Arc<O>,
    store: Store,
    router: sagamesh_router_client::RouterLink,
    config: StepConfig,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let subscription =
        sagamesh_saga::subscription(O::GROUP).expect("every step owner's group is in the topology");
    let relay = OutboxRelay::new();
    let handler = Arc::new(StepHandler {
        owner,
        store: store.clone(),
        relay: relay.clone(),
        faults: config.faults,
    });
    let client = RouterClient::start(
        router,
        HandlerConfig {
            service: O::GROUP.to_owned(),
            group: O::GROUP.to_owned(),
            event_types: subscription.event_types,
            max_in_flight: config.max_in_flight,
            mode: config.mode,
        },
        handler,
        tasks,
        shutdown.clone(),
    )
    .await?;
    let drained = client.drained();
    relay.start(store, client.into_publisher(), tasks, drained);
    Ok(())
}

/// The handler `start` attaches, on its own: for benchmarks and tests that
/// drive a step without a router. Its outbox is not relayed.
pub fn handler<O: StepOwner>(owner: Arc<O>, store: Store, faults: Faults) -> impl Handler {
    StepHandler {
        owner,
        store,
        relay: OutboxRelay::new(),
        faults,
    }
}

struct StepHandler<O> {
    owner: Arc<O>,
    store: Store,
    relay: OutboxRelay,
    faults: Faults,
}

/// Errors inside a step's transaction; all are transient (the event is
/// nacked and delivered again).
struct StepError(String);

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError(e.to_string())
    }
}

/// What a committed step did, for its log line.
struct Done {
    failed: bool,
    summary: String,
    millis: f64,
}

impl<O: StepOwner> Handler for StepHandler<O> {
    fn handle(&self, event: Envelope, attempt: u32) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let Some(payload) = event.payload.as_ref() else {
                return Ok(());
            };
            if let Some((step, request)) = sagamesh_saga::compensation_of(payload) {
                if step != O::STEP {
                    return Ok(());
                }
                let purchase = request.purchase.clone().unwrap_or_default();
                let attempt = request.attempt;
                return self.compensate(&event, purchase, attempt).await;
            }
            // The step runs on its choreography trigger for a choreography
            // saga, or on the coordinator's command for an orchestration one.
            let purchase = payload.purchase().cloned().unwrap_or_default();
            let triggered = match sagamesh_saga::saga_mode(&purchase) {
                SagaMode::Orchestration => {
                    sagamesh_saga::execution_of(payload).is_some_and(|(step, _)| step == O::STEP)
                }
                _ => payload.event_type() == sagamesh_saga::step_input(O::STEP),
            };
            if triggered {
                return self.execute(&event, purchase, attempt).await;
            }
            Ok(())
        })
    }
}

impl<O: StepOwner> StepHandler<O> {
    /// Runs `body` once per transaction and `action`: in one local
    /// transaction it claims the action, runs the business change and puts
    /// the outcome event in the outbox; then it nudges the relay. `None`
    /// when the action was done before (a redelivery). (The store may run
    /// the closure twice within one write, only the last run kept, so
    /// `body` only runs statements.)
    async fn once(
        &self,
        cause: &Envelope,
        action: String,
        mut body: impl FnMut(&mut dyn Tx, &str) -> Result<(Payload, Done), StepError> + Send + 'static,
    ) -> Result<Option<Done>, String> {
        let cause = cause.clone();
        let done = self
            .store
            .write(move |tx| {
                if !claim(tx, &cause.transaction_id, &action)? {
                    return Ok::<_, StepError>(None);
                }
                let (payload, done) = body(tx, &cause.transaction_id)?;
                push_outbox(tx, &cause.caused(O::GROUP, payload))?;
                Ok(Some(done))
            })
            .await
            .map_err(|e| e.0)?;
        self.relay.nudge();
        Ok(done)
    }

    async fn execute(
        &self,
        cause: &Envelope,
        purchase: PurchaseDetails,
        attempts: u32,
    ) -> Result<(), String> {
        let fault = self.faults.step(O::STEP, &cause.transaction_id);
        if fault == Some(Fault::Error) {
            return Err(format!("injected error in {}", O::STEP.name()));
        }
        let tx_id = cause.transaction_id.clone();
        let owner = self.owner.clone();
        tracing::debug!(
            "[{}] Starting {} for transaction: {tx_id}",
            O::HANDLER,
            O::STEP.name()
        );
        let done = self
            .once(cause, "step".to_owned(), move |tx, tx_id| {
                let (outcome, timing, millis) = timed(attempts, || match fault {
                    Some(_) => Ok(Outcome::Failure(format!(
                        "injected failure in {}",
                        O::STEP.name()
                    ))),
                    None => owner.execute(tx, tx_id, &purchase),
                });
                let outcome = outcome?;
                let (payload, failed, summary) = match outcome {
                    Outcome::Success { mut event, summary } => {
                        event.set_timing(timing);
                        (event, false, summary)
                    }
                    Outcome::Failure(reason) => (
                        sagamesh_saga::failure_event(O::STEP, purchase.clone(), timing, reason.clone()),
                        true,
                        reason,
                    ),
                };
                Ok((
                    payload,
                    Done {
                        failed,
                        summary,
                        millis,
                    },
                ))
            })
            .await?;
        match done {
            None => tracing::info!(
                "[{}] Already done for transaction {tx_id}; redelivery ignored",
                O::HANDLER
            ),
            Some(Done {
                failed: false,
                summary,
                millis,
            }) => tracing::info!(
                tx_id = %tx_id,
                duration_ms = millis,
                "[{}] {} successful: {summary} (duration: {millis:.1}ms)",
                O::HANDLER,
                title(O::STEP),
            ),
            Some(Done {
                failed: true,
                summary,
                millis,
            }) => tracing::warn!(
                tx_id = %tx_id,
                duration_ms = millis,
                "[{}] {} failed: {summary} (duration: {millis:.1}ms)",
                O::HANDLER,
                title(O::STEP),
            ),
        }
        Ok(())
    }

    async fn compensate(
        &self,
        cause: &Envelope,
        purchase: PurchaseDetails,
        attempt: u32,
    ) -> Result<(), String> {
        let fault = self.faults.compensation(O::STEP, &cause.transaction_id);
        if fault == Some(Fault::Error) {
            return Err(format!(
                "injected error in the compensation of {}",
                O::STEP.name()
            ));
        }
        let tx_id = cause.transaction_id.clone();
        let owner = self.owner.clone();
        let done = self
            .once(cause, format!("compensate#{attempt}"), move |tx, tx_id| {
                // A step that never ran is fenced off instead: its trigger,
                // should it still come (a saga that timed out), finds the
                // step claimed and does nothing.
                let never_ran = claim(tx, tx_id, "step")?;
                let (result, timing, millis) = timed(1, || match fault {
                    _ if never_ran => Ok(Ok("the step never ran; fenced off".to_owned())),
                    Some(_) => Ok(Err(format!(
                        "injected failure in the compensation of {}",
                        O::STEP.name()
                    ))),
                    None => owner.compensate(tx, tx_id, &purchase),
                });
                let result = result?;
                let timing = Some(timing);
                let step = O::STEP as i32;
                let purchase = Some(purchase.clone());
                let (payload, failed, summary) = match result {
                    Ok(summary) => (
                        Payload::StepCompensated(StepCompensated {
                            purchase,
                            step,
                            timing,
                        }),
                        false,
                        summary,
                    ),
                    Err(reason) => (
                        Payload::StepCompensationFailed(StepCompensationFailed {
                            purchase,
                            step,
                            timing,
                            reason: reason.clone(),
                            attempt,
                        }),
                        true,
                        reason,
                    ),
                };
                Ok((
                    payload,
                    Done {
                        failed,
                        summary,
                        millis,
                    },
                ))
            })
            .await?;
        match done {
            None => {}
            Some(Done {
                failed: false,
                summary,
                millis,
            }) => tracing::info!(
                tx_id = %tx_id,
                duration_ms = millis,
                "[{}] Compensated {}: {summary} (duration: {millis:.1}ms)",
                O::HANDLER,
                O::STEP.name(),
            ),
            Some(Done {
                failed: true,
                summary,
                millis,
            }) => tracing::error!(
                tx_id = %tx_id,
                duration_ms = millis,
                attempt,
                "[{}] Compensation of {} failed: {summary} (duration: {millis:.1}ms)",
                O::HANDLER,
                O::STEP.name(),
            ),
        }
        Ok(())
    }
}

/// Runs `f` and says when it ran and for how long (also in milliseconds,
/// for the log line).
fn timed<T>(attempts: u32, f: impl FnOnce() -> T) -> (T, StepTiming, f64) {
    let executed_at = SystemTime::now();
    let started = Instant::now();
    let value = f();
    let elapsed = started.elapsed();
    let timing = StepTiming {
        executed_at: Some(sagamesh_proto::timestamp(executed_at)),
        duration: Some(sagamesh_proto::duration(elapsed)),
        attempts,
    };
    (value, timing, elapsed.as_secs_f64() * 1000.0)
}

fn title(step: Step) -> &'static str {
    match step {
        Step::UserValidation => "User validation",
        Step::ItemGrant => "Item grant",
        Step::LogRecord => "Log record",
        Step::Notification => "Notification",
        Step::Unspecified => "Step",
    }
}
