//! Who subscribes to what. The router creates exactly these durable
//! subscriptions and refuses a handler whose hello does not match one, so a
//! mesh can never run a subscription it was not built for.
//!
//! Each group's subscription covers both saga modes (a saga finishes in the
//! mode it started in, even after the mesh restarts in the other), but what
//! a service does with an event depends on the mode of the saga the event
//! belongs to: a choreography trigger for an orchestration saga, or a command
//! for a choreography saga, never happens. The router refuses a hello whose
//! mode is not the mesh's, so one mesh never runs two patterns for new sagas.

use sagamesh_proto::v1::{EventType, SagaMode};

/// One durable subscription group of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The group name, which is also the service name.
    pub group: &'static str,
    /// The handler's name in logs, as in the seed system.
    pub handler: &'static str,
    pub event_types: Vec<EventType>,
}

/// The subscriptions of the mesh.
pub fn subscriptions() -> Vec<Subscription> {
    use EventType::*;
    vec![
        Subscription {
            group: "wallets",
            handler: "UserValidationHandler",
            event_types: vec![PurchaseInitiated, ExecuteUserValidation, CompensateUserValidation],
        },
        Subscription {
            group: "inventory",
            handler: "ItemGrantHandler",
            event_types: vec![UserValidated, ExecuteItemGrant, CompensateItemGrant],
        },
        Subscription {
            group: "purchase-log",
            handler: "LogRecordHandler",
            event_types: vec![ItemGranted, ExecuteLogRecord, CompensateLogRecord],
        },
        Subscription {
            group: "notifications",
            handler: "NotificationHandler",
            event_types: vec![LogRecorded, ExecuteNotification, CompensateNotification],
        },
        Subscription {
            group: "compensation",
            handler: "CompensationHandler",
            event_types: vec![
                UserValidationFailed,
                ItemGrantFailed,
                LogFailed,
                NotificationFailed,
                StepCompensated,
                StepCompensationFailed,
                SagaTimedOut,
                // A saga that completed is never timed out after the fact.
                PurchaseCompleted,
                // A compensation request that was dead-lettered counts as a
                // failed attempt.
                DeadLettered,
            ],
        },
        Subscription {
            group: "coordinator",
            handler: "PurchaseCoordinator",
            event_types: all_event_types(),
        },
    ]
}

/// The subscription of one group.
pub fn subscription(group: &str) -> Option<Subscription> {
    subscriptions().into_iter().find(|s| s.group == group)
}

/// What each handler reacts to in a mode, for the startup summary: one line
/// per handler, `(handler, events)`.
pub fn summary(mode: SagaMode) -> Vec<(&'static str, Vec<EventType>)> {
    use EventType::*;
    match mode {
        SagaMode::Orchestration => vec![
            (
                "PurchaseCoordinator (orchestrator)",
                vec![
                    UserValidated,
                    UserValidationFailed,
                    ItemGranted,
                    ItemGrantFailed,
                    LogRecorded,
                    LogFailed,
                    PurchaseCompleted,
                    NotificationFailed,
                    StepCompensated,
                    StepCompensationFailed,
                ],
            ),
            (
                "UserValidationHandler",
                vec![ExecuteUserValidation, CompensateUserValidation],
            ),
            ("ItemGrantHandler", vec![ExecuteItemGrant, CompensateItemGrant]),
            ("LogRecordHandler", vec![ExecuteLogRecord, CompensateLogRecord]),
            (
                "NotificationHandler",
                vec![ExecuteNotification, CompensateNotification],
            ),
        ],
        _ => vec![
            ("UserValidationHandler", vec![PurchaseInitiated]),
            ("ItemGrantHandler", vec![UserValidated]),
            ("LogRecordHandler", vec![ItemGranted]),
            ("NotificationHandler", vec![LogRecorded]),
            (
                "CompensationHandler",
                vec![
                    UserValidationFailed,
                    ItemGrantFailed,
                    LogFailed,
                    NotificationFailed,
                ],
            ),
        ],
    }
}

fn all_event_types() -> Vec<EventType> {
    (1..).map_while(|n| EventType::try_from(n).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinator_sees_every_event() {
        let coordinator = subscription("coordinator").unwrap();
        assert_eq!(coordinator.event_types.len(), 23);
        assert!(coordinator.event_types.contains(&EventType::ExecuteNotification));
    }

    #[test]
    fn every_step_command_has_one_owner() {
        for command in [
            EventType::ExecuteUserValidation,
            EventType::ExecuteItemGrant,
            EventType::ExecuteLogRecord,
            EventType::ExecuteNotification,
        ] {
            let owners = subscriptions()
                .into_iter()
                .filter(|s| s.group != "coordinator" && s.event_types.contains(&command))
                .count();
            assert_eq!(owners, 1, "{command:?}");
        }
    }
}
