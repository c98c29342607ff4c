//! Orchestration: the coordinator drives a saga as an explicit state
//! machine. Each outcome event of an orchestration saga decides the next
//! command: run the next step, or undo the successful steps newest first
//! (with the same [`CompensationPlan`] as the choreography compensation
//! handler), then end the saga.
//!
//! Decisions are written to the outbox in the same transaction as the view
//! update that saw the event, and an event already in the view is not seen
//! again, so each decision is made exactly once.

use rusqlite::{Connection, OptionalExtension, params};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails};
use sagamesh_router_client::push_outbox;
use sagamesh_saga::{CompensationPlan, PlanAction};
use sagamesh_step::compensation::advance;

use crate::GROUP;

fn load(conn: &Connection, tx_id: &str) -> rusqlite::Result<Option<CompensationPlan>> {
    let plan: Option<String> = conn
        .prepare_cached("SELECT plan FROM orchestrations WHERE transaction_id = ?1")?
        .query_row([tx_id], |row| row.get(0))
        .optional()?;
    Ok(plan.and_then(|p| CompensationPlan::decode(&p)))
}

fn save(conn: &Connection, tx_id: &str, plan: &CompensationPlan) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO orchestrations (transaction_id, plan) VALUES (?1, ?2)
         ON CONFLICT (transaction_id) DO UPDATE SET plan = excluded.plan",
    )?
    .execute(params![tx_id, plan.encode()])?;
    Ok(())
}

/// Reacts to one newly applied event of an orchestration saga; returns the
/// compensation actions taken, for the log.
pub(crate) fn react(
    conn: &Connection,
    event: &Envelope,
    purchase: PurchaseDetails,
) -> rusqlite::Result<Vec<PlanAction>> {
    let Some(payload) = event.payload.as_ref() else {
        return Ok(Vec::new());
    };
    let state = load(conn, &event.transaction_id)?;
    match sagamesh_saga::step_outcome(payload.event_type()) {
        // Once compensating (a late success after a timeout), no step runs
        // forward; the plan undoes this one too.
        Some((_, false)) if state.is_some() => return Ok(Vec::new()),
        Some((step, false)) => {
            if let Some(next) = sagamesh_saga::next_step(step) {
                let command = sagamesh_saga::execute_command(next, purchase);
                push_outbox(conn, &event.caused(GROUP, command))?;
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
    let Some((_, plan, actions)) = advance(conn, event, GROUP, state)? else {
        return Ok(Vec::new());
    };
    save(conn, &event.transaction_id, &plan)?;
    Ok(actions)
}
