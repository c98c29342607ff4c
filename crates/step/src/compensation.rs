//! Driving a saga's compensation with a [`CompensationPlan`]: the events
//! each plan action puts in the outbox, and its log lines. The choreography
//! compensation handler and the orchestrating coordinator both use it, so
//! the two modes undo steps the same way.

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{CompensationCompleted, Envelope, EventType, PurchaseDetails, PurchaseFailed, Step};
use sagamesh_router_client::push_outbox;
use sagamesh_saga::{CompensationPlan, MAX_COMPENSATION_ATTEMPTS, PlanAction};
use sagamesh_store::{StoreError, Tx};
use std::sync::atomic::{AtomicU64, Ordering};

/// Compensations that could not succeed, since the process started.
pub static COMPENSATION_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Turns the plan's actions into events in the outbox; returns what to log.
pub fn perform(
    tx: &mut dyn Tx,
    cause: &Envelope,
    producer: &str,
    purchase: &PurchaseDetails,
    plan: &CompensationPlan,
    actions: Vec<PlanAction>,
) -> Result<Vec<PlanAction>, StoreError> {
    for action in &actions {
        match action {
            PlanAction::Compensate { step, attempt } => {
                let request = sagamesh_saga::compensation_request(*step, purchase.clone(), *attempt);
                push_outbox(tx, &cause.caused(producer, request))?;
            }
            PlanAction::GaveUp { .. } => {}
            PlanAction::Finish => {
                let steps = |steps: &[Step]| steps.iter().map(|s| *s as i32).collect();
                push_outbox(
                    tx,
                    &cause.caused(
                        producer,
                        Payload::CompensationCompleted(CompensationCompleted {
                            purchase: Some(purchase.clone()),
                            compensated: steps(&plan.compensated),
                            failed: steps(&plan.failed),
                        }),
                    ),
                )?;
                push_outbox(
                    tx,
                    &cause.caused(
                        producer,
                        Payload::PurchaseFailed(PurchaseFailed {
                            purchase: Some(purchase.clone()),
                            reason: plan.reason.clone(),
                            failed_step: plan.failed_step as i32,
                            needs_attention: plan.needs_attention(),
                        }),
                    ),
                )?;
            }
        }
    }
    Ok(actions)
}

/// Logs what a compensation step did, once it is committed.
pub fn log_actions(handler: &str, tx_id: &str, plan_actions: &[PlanAction]) {
    for action in plan_actions {
        match action {
            PlanAction::Compensate { step, attempt } => tracing::info!(
                tx_id = %tx_id,
                "[{handler}] Compensating {} (attempt {attempt})",
                step.name()
            ),
            PlanAction::GaveUp { step, reason } => {
                COMPENSATION_FAILURES.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    tx_id = %tx_id,
                    step = step.name(),
                    "[{handler}] Compensation of {} could not succeed after {MAX_COMPENSATION_ATTEMPTS} attempts: {reason}; the transaction needs attention",
                    step.name()
                );
            }
            PlanAction::Finish => tracing::info!(tx_id = %tx_id, "[{handler}] Compensation completed"),
        }
    }
}

/// Advances a saga's compensation by one event: starts it on a step's
/// failure, moves it on an undo's answer. Returns the actions taken.
pub fn advance(
    tx: &mut dyn Tx,
    event: &Envelope,
    producer: &str,
    state: Option<(PurchaseDetails, CompensationPlan)>,
) -> Result<Option<(PurchaseDetails, CompensationPlan, Vec<PlanAction>)>, StoreError> {
    let Some(payload) = event.payload.as_ref() else {
        return Ok(None);
    };
    let (purchase, mut plan, actions) = match (payload, state) {
        (Payload::StepCompensated(done), Some((purchase, mut plan))) => {
            let step = Step::try_from(done.step).unwrap_or(Step::Unspecified);
            let actions = plan.on_compensated(step);
            (purchase, plan, actions)
        }
        (Payload::StepCompensationFailed(failed), Some((purchase, mut plan))) => {
            let step = Step::try_from(failed.step).unwrap_or(Step::Unspecified);
            let actions = plan.on_compensation_failed(step, failed.attempt, &failed.reason);
            (purchase, plan, actions)
        }
        // A compensation request that could not be delivered or processed
        // counts as a failed attempt, so the plan retries or gives up
        // instead of waiting forever.
        (Payload::DeadLettered(letter), Some((purchase, mut plan))) => {
            let step = match EventType::try_from(letter.event) {
                Ok(EventType::CompensateUserValidation) => Step::UserValidation,
                Ok(EventType::CompensateItemGrant) => Step::ItemGrant,
                Ok(EventType::CompensateLogRecord) => Step::LogRecord,
                Ok(EventType::CompensateNotification) => Step::Notification,
                _ => return Ok(None),
            };
            let Some(attempt) = plan.attempt_of(step) else {
                return Ok(None);
            };
            let reason = format!("the request was dead-lettered: {}", letter.last_error);
            let actions = plan.on_compensation_failed(step, attempt, &reason);
            (purchase, plan, actions)
        }
        (Payload::SagaTimedOut(timed_out), None) => {
            let pending = Step::try_from(timed_out.pending_step).unwrap_or(Step::Unspecified);
            let purchase = timed_out.purchase.clone().unwrap_or_default();
            let (plan, actions) = CompensationPlan::timed_out(pending, timed_out.reason.clone());
            (purchase, plan, actions)
        }
        (payload, None) => {
            let Some((failed_step, true)) = sagamesh_saga::step_outcome(payload.event_type()) else {
                return Ok(None);
            };
            let reason = payload.failure_reason().to_owned();
            let purchase = payload.purchase().cloned().unwrap_or_default();
            let (plan, actions) = CompensationPlan::start(failed_step, reason);
            (purchase, plan, actions)
        }
        _ => return Ok(None),
    };
    let actions = perform(tx, event, producer, &purchase, &plan, actions)?;
    plan.finished |= actions.contains(&PlanAction::Finish);
    Ok(Some((purchase, plan, actions)))
}
