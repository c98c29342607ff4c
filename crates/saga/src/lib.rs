//! The saga's vocabulary, shared by the coordinator and every handler: the
//! order of the steps, who subscribes to what, the input rules, and fault
//! injection. It knows nothing of storage or gRPC.

mod compensation;
mod faults;
mod input;
mod topology;

pub use compensation::{CompensationPlan, MAX_COMPENSATION_ATTEMPTS, PlanAction};
pub use faults::{Fault, FaultError, Faults};
pub use input::{InputError, MAX_ID_LEN, MAX_QUANTITY, validate_id, validate_purchase, validate_quantity};
pub use topology::{Subscription, subscription, subscriptions, summary};

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    CompensateStep, EventType, ExecuteStep, ItemGrantFailed, LogFailed, NotificationFailed, PurchaseDetails,
    SagaMode, Step, StepTiming, UserValidationFailed,
};

/// The business steps in the order they run.
pub const STEPS: [Step; 4] = [
    Step::UserValidation,
    Step::ItemGrant,
    Step::LogRecord,
    Step::Notification,
];

/// The steps that succeeded before `failed` failed, newest first: the order
/// in which they are compensated (LIFO).
pub fn steps_to_compensate(failed: Step) -> Vec<Step> {
    let position = STEPS.iter().position(|s| *s == failed).unwrap_or(0);
    STEPS[..position].iter().rev().copied().collect()
}

/// The mode a saga runs in; sagas recorded before modes existed are
/// choreography sagas.
pub fn saga_mode(purchase: &PurchaseDetails) -> SagaMode {
    match purchase.mode() {
        SagaMode::Orchestration => SagaMode::Orchestration,
        _ => SagaMode::Choreography,
    }
}

/// The step after `step`, if any.
pub fn next_step(step: Step) -> Option<Step> {
    let position = STEPS.iter().position(|s| *s == step)?;
    STEPS.get(position + 1).copied()
}

/// Orchestration: the command to run a step.
pub fn execute_command(step: Step, purchase: PurchaseDetails) -> Payload {
    let command = ExecuteStep {
        purchase: Some(purchase),
    };
    match step {
        Step::UserValidation | Step::Unspecified => Payload::ExecuteUserValidation(command),
        Step::ItemGrant => Payload::ExecuteItemGrant(command),
        Step::LogRecord => Payload::ExecuteLogRecord(command),
        Step::Notification => Payload::ExecuteNotification(command),
    }
}

/// The step a command runs, with the command.
pub fn execution_of(payload: &Payload) -> Option<(Step, &ExecuteStep)> {
    match payload {
        Payload::ExecuteUserValidation(c) => Some((Step::UserValidation, c)),
        Payload::ExecuteItemGrant(c) => Some((Step::ItemGrant, c)),
        Payload::ExecuteLogRecord(c) => Some((Step::LogRecord, c)),
        Payload::ExecuteNotification(c) => Some((Step::Notification, c)),
        _ => None,
    }
}

/// The event a step reacts to in choreography.
pub fn step_input(step: Step) -> EventType {
    match step {
        Step::UserValidation | Step::Unspecified => EventType::PurchaseInitiated,
        Step::ItemGrant => EventType::UserValidated,
        Step::LogRecord => EventType::ItemGranted,
        Step::Notification => EventType::LogRecorded,
    }
}

/// The step whose outcome an event reports, with whether it failed.
pub fn step_outcome(event: EventType) -> Option<(Step, bool)> {
    Some(match event {
        EventType::UserValidated => (Step::UserValidation, false),
        EventType::UserValidationFailed => (Step::UserValidation, true),
        EventType::ItemGranted => (Step::ItemGrant, false),
        EventType::ItemGrantFailed => (Step::ItemGrant, true),
        EventType::LogRecorded => (Step::LogRecord, false),
        EventType::LogFailed => (Step::LogRecord, true),
        EventType::PurchaseCompleted => (Step::Notification, false),
        EventType::NotificationFailed => (Step::Notification, true),
        _ => return None,
    })
}

/// The failure event of a step.
pub fn failure_event(step: Step, purchase: PurchaseDetails, timing: StepTiming, reason: String) -> Payload {
    let (purchase, timing) = (Some(purchase), Some(timing));
    match step {
        Step::UserValidation | Step::Unspecified => Payload::UserValidationFailed(UserValidationFailed {
            purchase,
            timing,
            reason,
        }),
        Step::ItemGrant => Payload::ItemGrantFailed(ItemGrantFailed {
            purchase,
            timing,
            reason,
        }),
        Step::LogRecord => Payload::LogFailed(LogFailed {
            purchase,
            timing,
            reason,
        }),
        Step::Notification => Payload::NotificationFailed(NotificationFailed {
            purchase,
            timing,
            reason,
        }),
    }
}

/// The request to undo a step, sent to the service that owns it.
pub fn compensation_request(step: Step, purchase: PurchaseDetails, attempt: u32) -> Payload {
    let request = CompensateStep {
        purchase: Some(purchase),
        attempt,
    };
    match step {
        Step::UserValidation | Step::Unspecified => Payload::CompensateUserValidation(request),
        Step::ItemGrant => Payload::CompensateItemGrant(request),
        Step::LogRecord => Payload::CompensateLogRecord(request),
        Step::Notification => Payload::CompensateNotification(request),
    }
}

/// The step a compensation request is for, with the request.
pub fn compensation_of(payload: &Payload) -> Option<(Step, &CompensateStep)> {
    match payload {
        Payload::CompensateUserValidation(r) => Some((Step::UserValidation, r)),
        Payload::CompensateItemGrant(r) => Some((Step::ItemGrant, r)),
        Payload::CompensateLogRecord(r) => Some((Step::LogRecord, r)),
        Payload::CompensateNotification(r) => Some((Step::Notification, r)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compensation_runs_newest_first() {
        assert_eq!(steps_to_compensate(Step::UserValidation), vec![]);
        assert_eq!(
            steps_to_compensate(Step::Notification),
            vec![Step::LogRecord, Step::ItemGrant, Step::UserValidation]
        );
    }
}
