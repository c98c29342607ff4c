//! The transaction view: how each saga event changes what `GetTransaction`
//! shows. Pure, so it is the same whichever process applies it and easy to
//! test.

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::step_record::Status as StepStatus;
use sagamesh_proto::v1::{Envelope, HistoryEntry, Step, StepRecord, Transaction, TransactionStatus};

/// True once a saga can change no more.
pub fn is_terminal(status: TransactionStatus) -> bool {
    matches!(
        status,
        TransactionStatus::Completed | TransactionStatus::Failed | TransactionStatus::NeedsAttention
    )
}

/// A new view for a transaction first seen through one of its events (the
/// coordinator's own record normally exists already).
pub fn from_event(event: &Envelope) -> Transaction {
    let purchase = event
        .payload
        .as_ref()
        .and_then(|p| p.purchase())
        .cloned()
        .unwrap_or_default();
    Transaction {
        transaction_id: event.transaction_id.clone(),
        mode: sagamesh_saga::saga_mode(&purchase) as i32,
        user_id: purchase.user_id,
        item_id: purchase.item_id,
        quantity: purchase.quantity,
        total_price: purchase.total_price,
        unit_price: purchase.unit_price,
        status: TransactionStatus::Initiated as i32,
        created_at: event.occurred_at,
        updated_at: event.occurred_at,
        ..Default::default()
    }
}

/// Applies one event; false when it was applied before (a redelivery).
pub fn apply(view: &mut Transaction, event: &Envelope) -> bool {
    if view.history.iter().any(|h| h.event_id == event.event_id) {
        return false;
    }
    let event_type = event.event_type();
    view.history.push(HistoryEntry {
        event_id: event.event_id.clone(),
        event: event_type as i32,
        producer: event.producer.clone(),
        occurred_at: event.occurred_at,
    });
    view.updated_at = Some(sagamesh_proto::timestamp(std::time::SystemTime::now()));
    let Some(payload) = event.payload.as_ref() else {
        return true;
    };
    if let Payload::DeadLettered(letter) = payload {
        view.waiting_on_dead_letter = Some(letter.clone());
        return true;
    }
    // Any other event means the saga moves again.
    view.waiting_on_dead_letter = None;
    if let Some((step, failed)) = sagamesh_saga::step_outcome(event_type) {
        let timing = payload.timing().cloned().unwrap_or_default();
        let (status, error) = if failed {
            (StepStatus::Failed, payload.failure_reason().to_owned())
        } else {
            (StepStatus::Success, String::new())
        };
        set_step(
            view,
            StepRecord {
                step: step as i32,
                status: status as i32,
                executed_at: timing.executed_at,
                duration: timing.duration,
                error: error.clone(),
                attempts: timing.attempts.max(1),
            },
        );
        // Statuses only move forward: an outcome that comes late (after a
        // timeout started compensating) updates its step, not the saga.
        let moving = matches!(
            view.status(),
            TransactionStatus::Initiated | TransactionStatus::InProgress
        );
        if moving {
            if failed {
                view.status = TransactionStatus::Compensating as i32;
                view.failure_reason = error;
            } else if step == Step::Notification {
                view.status = TransactionStatus::Completed as i32;
            } else {
                view.status = TransactionStatus::InProgress as i32;
            }
        }
        return true;
    }
    match payload {
        Payload::SagaTimedOut(timed_out) if !is_terminal(view.status()) => {
            view.status = TransactionStatus::Compensating as i32;
            view.failure_reason = timed_out.reason.clone();
            if !view.steps.iter().any(|s| s.step == timed_out.pending_step) {
                set_step(
                    view,
                    StepRecord {
                        step: timed_out.pending_step,
                        status: StepStatus::Failed as i32,
                        executed_at: event.occurred_at,
                        duration: None,
                        error: timed_out.reason.clone(),
                        attempts: 0,
                    },
                );
            }
        }
        Payload::StepCompensated(done) => {
            // Only what ran can be undone; a step fenced off before it ran
            // keeps its record.
            if let Some(record) = view
                .steps
                .iter_mut()
                .find(|s| s.step == done.step && s.status() != StepStatus::Failed)
            {
                record.status = StepStatus::Compensated as i32;
                record.error.clear();
            }
        }
        Payload::StepCompensationFailed(failed) => {
            if let Some(record) = view.steps.iter_mut().find(|s| s.step == failed.step) {
                record.status = StepStatus::CompensationFailed as i32;
                record.error = format!(
                    "compensation attempt {} failed: {}",
                    failed.attempt, failed.reason
                );
            }
        }
        Payload::PurchaseFailed(_) if is_terminal(view.status()) => {}
        Payload::PurchaseFailed(failed) => {
            view.status = if failed.needs_attention {
                TransactionStatus::NeedsAttention
            } else {
                TransactionStatus::Failed
            } as i32;
            view.failure_reason = if failed.needs_attention {
                format!(
                    "{}; a compensation could not succeed and needs a person",
                    failed.reason
                )
            } else {
                failed.reason.clone()
            };
        }
        _ => {}
    }
    true
}

/// Whether folding `event` into a view only records it in the history,
/// leaving status and steps as they are: the saga's start and the commands
/// that ask a step to run or to be undone. The coordinator folds the ones
/// it writes itself into the view in the same transaction, so their return
/// from the router costs no write.
pub fn only_recorded(event: &Envelope) -> bool {
    matches!(
        event.payload,
        Some(
            Payload::PurchaseInitiated(_)
                | Payload::ExecuteUserValidation(_)
                | Payload::ExecuteItemGrant(_)
                | Payload::ExecuteLogRecord(_)
                | Payload::ExecuteNotification(_)
                | Payload::CompensateUserValidation(_)
                | Payload::CompensateItemGrant(_)
                | Payload::CompensateLogRecord(_)
                | Payload::CompensateNotification(_)
        )
    )
}

/// Replaces the record of a step, keeping the steps in saga order.
fn set_step(view: &mut Transaction, record: StepRecord) {
    match view.steps.iter_mut().find(|s| s.step == record.step) {
        Some(existing) => *existing = record,
        None => {
            view.steps.push(record);
            view.steps.sort_by_key(|s| s.step);
        }
    }
}

#[cfg(test)]
mod tests {
    use sagamesh_proto::v1::{
        ItemGrantFailed, PurchaseDetails, PurchaseFailed, StepCompensated, UserValidated,
    };

    use super::*;

    fn event(payload: Payload) -> Envelope {
        Envelope::new("tx-1", "", "test", payload)
    }

    #[test]
    fn events_only_recorded_leave_status_and_steps_alone() {
        use sagamesh_proto::v1::{CompensateStep, ExecuteStep, PurchaseInitiated};
        let execute = ExecuteStep::default();
        let compensate = CompensateStep::default();
        let payloads = [
            Payload::PurchaseInitiated(PurchaseInitiated::default()),
            Payload::ExecuteUserValidation(execute.clone()),
            Payload::ExecuteItemGrant(execute.clone()),
            Payload::ExecuteLogRecord(execute.clone()),
            Payload::ExecuteNotification(execute),
            Payload::CompensateUserValidation(compensate.clone()),
            Payload::CompensateItemGrant(compensate.clone()),
            Payload::CompensateLogRecord(compensate.clone()),
            Payload::CompensateNotification(compensate),
        ];
        let statuses = [
            TransactionStatus::Initiated,
            TransactionStatus::InProgress,
            TransactionStatus::Compensating,
            TransactionStatus::Completed,
            TransactionStatus::Failed,
        ];
        for status in statuses {
            for payload in payloads.clone() {
                let recorded = event(payload);
                assert!(only_recorded(&recorded));
                let mut view = Transaction {
                    status: status as i32,
                    failure_reason: "before".into(),
                    ..Default::default()
                };
                let before = view.clone();
                assert!(apply(&mut view, &recorded));
                assert_eq!(view.history.len(), 1, "{recorded:?}");
                assert_eq!(
                    (view.status, &view.steps, &view.failure_reason),
                    (before.status, &before.steps, &before.failure_reason),
                    "{recorded:?} changed the saga"
                );
            }
        }
        let outcome = event(Payload::UserValidated(UserValidated::default()));
        assert!(!only_recorded(&outcome));
    }

    #[test]
    fn a_failed_grant_compensates_the_payment() {
        let purchase = Some(PurchaseDetails::default());
        let first = event(Payload::UserValidated(UserValidated {
            purchase: purchase.clone(),
            ..Default::default()
        }));
        let mut view = from_event(&first);
        assert!(apply(&mut view, &first));
        assert!(!apply(&mut view, &first), "a redelivery changes nothing");
        assert_eq!(view.status(), TransactionStatus::InProgress);
        apply(
            &mut view,
            &event(Payload::ItemGrantFailed(ItemGrantFailed {
                purchase: purchase.clone(),
                timing: None,
                reason: "out of stock".into(),
            })),
        );
        assert_eq!(view.status(), TransactionStatus::Compensating);
        apply(
            &mut view,
            &event(Payload::StepCompensated(StepCompensated {
                purchase: purchase.clone(),
                step: Step::UserValidation as i32,
                timing: None,
            })),
        );
        apply(
            &mut view,
            &event(Payload::PurchaseFailed(PurchaseFailed {
                purchase,
                reason: "out of stock".into(),
                failed_step: Step::ItemGrant as i32,
                needs_attention: false,
            })),
        );
        assert_eq!(view.status(), TransactionStatus::Failed);
        assert_eq!(view.failure_reason, "out of stock");
        let statuses: Vec<_> = view.steps.iter().map(|s| (s.step(), s.status())).collect();
        assert_eq!(
            statuses,
            vec![
                (Step::UserValidation, StepStatus::Compensated),
                (Step::ItemGrant, StepStatus::Failed)
            ]
        );
        assert_eq!(view.history.len(), 4);
    }
}
