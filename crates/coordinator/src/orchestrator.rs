//! Orchestration: the coordinator drives a saga as an explicit state
//! machine. Each outcome event of an orchestration saga decides the next
//! command: run the next step, or undo the successful steps newest first
//! (with the same [`CompensationPlan`] as the choreography compensation
//! handler), then end the saga.
//!
//! Decisions are written to the outbox in the same transaction as the view
//! update that saw the event, and an event already in the view is not seen
//! again, so each decision is made exactly once.

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails, Transaction};
use sagamesh_router_client::push_outbox;
use sagamesh_saga::{CompensationPlan, PlanAction};
use sagamesh_step::compensation::advance;
use sagamesh_store::{StoreError, Tx, values};

use crate::GROUP;

fn load(tx: &mut dyn Tx, tx_id: &str) -> Result<Option<CompensationPlan>, StoreError> {
    let plan = tx
        .query_opt(
            "SELECT plan FROM orchestrations WHERE transaction_id = $1",
            &values![tx_id],
        )?
        .map(|row| row.string(0))
        .transpose()?;
    Ok(plan.and_then(|p| CompensationPlan::decode(&p)))
}

fn save(tx: &mut dyn Tx, tx_id: &str, plan: &CompensationPlan) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO orchestrations (transaction_id, plan) VALUES ($1, $2)
         ON CONFLICT (transaction_id) DO UPDATE SET plan = excluded.plan",
        &values![tx_id, plan.encode()],
    )?;
    Ok(())
}

/// Reacts to one newly applied event of an orchestration saga; returns the
/// compensation actions taken, for the log.
pub(crate) fn react(
    tx: &mut dyn Tx,
    event: &Envelope,
    purchase: PurchaseDetails,
    view: &mut Transaction,
) -> Result<Vec<PlanAction>, StoreError> {
    let Some(payload) = event.payload.as_ref() else {
        return Ok(Vec::new());
    };
    let state = load(tx, &event.transaction_id)?;
    match sagamesh_saga::step_outcome(payload.event_type()) {
        // Once compensating (a late success after a timeout), no step runs
        // forward; the plan undoes this one too.
        Some((_, false)) if state.is_some() => return Ok(Vec::new()),
        Some((step, false)) => {
            if let Some(next) = sagamesh_saga::next_step(step) {
                let command = event.caused(GROUP, sagamesh_saga::execute_command(next, purchase));
                push_outbox(tx, &command)?;
                crate::view::apply(view, &command);
            }
            return Ok(Vec::new());
        }
        Some((_, true)) => {}
        None if matches!(
            payload,
            Payload::StepCompensated(_)
                | Payload::StepCompensationFailed(_)
                | Payload::SagaTimedOut(_)
                | Payload::DeadLettered(_)
        ) => {}
        None => return Ok(Vec::new()),
    }
    // The purchase comes from the saga's record; the stored plan needs only
    // its own progress.
    let state = state.map(|plan| (purchase, plan));
    let Some((_, plan, actions)) = advance(tx, event, GROUP, state)? else {
        return Ok(Vec::new());
    };
    save(tx, &event.transaction_id, &plan)?;
    Ok(actions)
}
