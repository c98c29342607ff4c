//! Who subscribes to what. The router creates exactly these durable
//! subscriptions and refuses a handler whose hello does not match one, so a
//! mesh can never run a subscription it was not built for.

use sagamesh_proto::v1::EventType;

/// One durable subscription group of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The group name, which is also the service name.
    pub group: &'static str,
    /// The handler's name in logs, as in the seed system.
    pub handler: &'static str,
    pub event_types: Vec<EventType>,
}

/// The subscriptions of the choreography mode.
pub fn choreography() -> Vec<Subscription> {
    use EventType::*;
    vec![
        Subscription {
            group: "wallets",
            handler: "UserValidationHandler",
            event_types: vec![PurchaseInitiated, CompensateUserValidation],
        },
        Subscription {
            group: "inventory",
            handler: "ItemGrantHandler",
            event_types: vec![UserValidated, CompensateItemGrant],
        },
        Subscription {
            group: "purchase-log",
            handler: "LogRecordHandler",
            event_types: vec![ItemGranted, CompensateLogRecord],
        },
        Subscription {
            group: "notifications",
            handler: "NotificationHandler",
            event_types: vec![LogRecorded, CompensateNotification],
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
            ],
        },
        Subscription {
            group: "coordinator",
            handler: "TransactionView",
            event_types: all_event_types(),
        },
    ]
}

fn all_event_types() -> Vec<EventType> {
    (1..).map_while(|n| EventType::try_from(n).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinator_sees_every_event() {
        let coordinator = choreography().pop().unwrap();
        assert_eq!(coordinator.event_types.len(), 17);
        assert!(coordinator.event_types.contains(&EventType::PurchaseFailed));
    }
}
