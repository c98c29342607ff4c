//! The purchase saga's flows: success, each business failure with its
//! compensations, and a compensation that cannot succeed.

use sagamesh_proto::v1::step_record::Status as StepStatus;
use sagamesh_proto::v1::{
    EventType, GetLogRequest, ListNotificationsRequest, LogStatus, NotificationKind, SagaMode, Step,
    TransactionStatus,
};

use crate::support::{Clients, Mesh, in_both_modes};

fn is_command(event: EventType) -> bool {
    matches!(
        event,
        EventType::ExecuteUserValidation
            | EventType::ExecuteItemGrant
            | EventType::ExecuteLogRecord
            | EventType::ExecuteNotification
    )
}

fn steps(transaction: &sagamesh_proto::v1::Transaction) -> Vec<(Step, StepStatus)> {
    transaction.steps.iter().map(|s| (s.step(), s.status())).collect()
}

async fn a_purchase_completes_and_moves_money_and_stock(mode: SagaMode) {
    let mesh = Mesh::start(mode).await;
    let c = &mesh.clients;
    c.create_user("alice", 1_000).await;
    c.create_item("sword", 150, 10).await;

    let id = c.purchase("alice", "sword", 2).await;
    let (statuses, done) = c.follow(&id).await;

    // The stream starts with the state the saga is in when it is asked
    // for: the first step may have run already.
    assert!(
        matches!(
            statuses.first(),
            Some(TransactionStatus::Initiated | TransactionStatus::InProgress)
        ),
        "the stream starts with the current state, the saga still moving: {statuses:?}"
    );
    assert!(
        statuses.is_sorted_by_key(|status| match status {
            TransactionStatus::Initiated => 0,
            TransactionStatus::InProgress => 1,
            _ => 2,
        }),
        "statuses only move forward: {statuses:?}"
    );
    assert_eq!(
        statuses.last(),
        Some(&TransactionStatus::Completed),
        "the stream ends after COMPLETED"
    );
    assert_eq!(done.total_price, 300, "the price comes from the catalog");
    assert_eq!(
        steps(&done),
        vec![
            (Step::UserValidation, StepStatus::Success),
            (Step::ItemGrant, StepStatus::Success),
            (Step::LogRecord, StepStatus::Success),
            (Step::Notification, StepStatus::Success),
        ]
    );
    assert!(
        done.steps
            .iter()
            .all(|s| s.executed_at.is_some() && s.duration.is_some())
    );
    assert_eq!(done.mode(), mode, "the transaction says which mode ran it");
    let events: Vec<EventType> = done.history.iter().map(|h| h.event()).collect();
    let saga_events: Vec<EventType> = events.iter().copied().filter(|e| !is_command(*e)).collect();
    assert_eq!(
        saga_events,
        vec![
            EventType::PurchaseInitiated,
            EventType::UserValidated,
            EventType::ItemGranted,
            EventType::LogRecorded,
            EventType::PurchaseCompleted
        ]
    );
    let commands = events.len() - saga_events.len();
    match mode {
        SagaMode::Orchestration => assert_eq!(commands, 4, "the coordinator commanded each step: {events:?}"),
        _ => assert_eq!(commands, 0, "choreography has no commands: {events:?}"),
    }
    assert_eq!(c.balance("alice").await, 700);
    assert_eq!(c.stock("sword").await, 8);
    assert_eq!(c.held("alice", "sword").await, 2);
    let log = c
        .logs
        .clone()
        .get_log(GetLogRequest {
            transaction_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.status(), LogStatus::Recorded);
    assert_eq!(log.total_price, 300);
    let sent = c
        .notifications
        .clone()
        .list_notifications(ListNotificationsRequest {
            user_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .notifications;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind(), NotificationKind::PurchaseConfirmation);
    assert_eq!(sent[0].transaction_id, id);
}

/// Runs one failing purchase and checks nothing moved.
async fn fails(
    c: &Clients,
    user: &str,
    item: &str,
    quantity: u32,
    reason: &str,
) -> sagamesh_proto::v1::Transaction {
    let id = c.purchase(user, item, quantity).await;
    let (statuses, done) = c.follow(&id).await;
    assert_eq!(statuses.last(), Some(&TransactionStatus::Failed), "{done:?}");
    assert!(
        done.failure_reason.contains(reason),
        "failure reason {:?} should mention {reason:?}",
        done.failure_reason
    );
    done
}

async fn business_failures_undo_what_succeeded(mode: SagaMode) {
    let mesh = Mesh::start(mode).await;
    let c = &mesh.clients;
    c.create_user("bob", 500).await;
    c.create_user("poor", 10).await;
    c.create_item("shield", 100, 3).await;

    let unknown_user = fails(c, "nobody", "shield", 1, "does not exist").await;
    assert_eq!(
        steps(&unknown_user),
        vec![(Step::UserValidation, StepStatus::Failed)]
    );

    let broke = fails(c, "poor", "shield", 1, "insufficient balance").await;
    assert_eq!(steps(&broke), vec![(Step::UserValidation, StepStatus::Failed)]);
    assert_eq!(c.balance("poor").await, 10);

    let unknown_item = fails(c, "bob", "no-such-item", 1, "not in the catalog").await;
    assert_eq!(
        steps(&unknown_item),
        vec![
            (Step::UserValidation, StepStatus::Compensated),
            (Step::ItemGrant, StepStatus::Failed)
        ]
    );

    let sold_out = fails(c, "bob", "shield", 4, "out of stock").await;
    assert_eq!(
        steps(&sold_out),
        vec![
            (Step::UserValidation, StepStatus::Compensated),
            (Step::ItemGrant, StepStatus::Failed)
        ]
    );

    assert_eq!(c.balance("bob").await, 500, "every deduction was refunded");
    assert_eq!(c.stock("shield").await, 3);
    assert_eq!(c.held("bob", "shield").await, 0);
}

async fn a_failed_log_record_undoes_grant_and_payment_newest_first(mode: SagaMode) {
    let mesh = Mesh::start_with(mode, |config| {
        config.faults = sagamesh_saga::Faults::parse("log_record=fail").unwrap();
    })
    .await;
    let c = &mesh.clients;
    c.create_user("carol", 1_000).await;
    c.create_item("bow", 250, 5).await;

    let done = fails(c, "carol", "bow", 1, "injected failure in log_record").await;
    assert_eq!(
        steps(&done),
        vec![
            (Step::UserValidation, StepStatus::Compensated),
            (Step::ItemGrant, StepStatus::Compensated),
            (Step::LogRecord, StepStatus::Failed),
        ]
    );
    let compensated_order: Vec<_> = done
        .history
        .iter()
        .filter_map(|h| match h.event() {
            EventType::CompensateItemGrant => Some(Step::ItemGrant),
            EventType::CompensateUserValidation => Some(Step::UserValidation),
            _ => None,
        })
        .collect();
    assert_eq!(
        compensated_order,
        vec![Step::ItemGrant, Step::UserValidation],
        "LIFO"
    );
    assert_eq!(c.balance("carol").await, 1_000);
    assert_eq!(c.stock("bow").await, 5);
    assert_eq!(c.held("carol", "bow").await, 0);
}

async fn a_failed_notification_undoes_every_earlier_step(mode: SagaMode) {
    let mesh = Mesh::start_with(mode, |config| {
        config.faults = sagamesh_saga::Faults::parse("notification=fail").unwrap();
    })
    .await;
    let c = &mesh.clients;
    c.create_user("dave", 1_000).await;
    c.create_item("axe", 300, 2).await;

    let done = fails(c, "dave", "axe", 2, "injected failure in notification").await;
    assert_eq!(
        steps(&done),
        vec![
            (Step::UserValidation, StepStatus::Compensated),
            (Step::ItemGrant, StepStatus::Compensated),
            (Step::LogRecord, StepStatus::Compensated),
            (Step::Notification, StepStatus::Failed),
        ]
    );
    let log = c
        .logs
        .clone()
        .get_log(GetLogRequest {
            transaction_id: done.transaction_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.status(), LogStatus::LogFailedByCompensation);
    assert_eq!(c.balance("dave").await, 1_000);
    assert_eq!(c.stock("axe").await, 2);
    assert_eq!(c.held("dave", "axe").await, 0);
}

async fn a_compensation_that_cannot_succeed_needs_attention(mode: SagaMode) {
    let mesh = Mesh::start_with(mode, |config| {
        config.faults = sagamesh_saga::Faults::parse("log_record=fail,item_grant.compensation=fail").unwrap();
    })
    .await;
    let c = &mesh.clients;
    c.create_user("erin", 1_000).await;
    c.create_item("staff", 100, 5).await;

    let id = c.purchase("erin", "staff", 1).await;
    let (statuses, done) = c.follow(&id).await;
    assert_eq!(statuses.last(), Some(&TransactionStatus::NeedsAttention));
    assert!(
        done.failure_reason.contains("needs a person"),
        "{}",
        done.failure_reason
    );
    assert_eq!(
        steps(&done),
        vec![
            (Step::UserValidation, StepStatus::Compensated),
            (Step::ItemGrant, StepStatus::CompensationFailed),
            (Step::LogRecord, StepStatus::Failed),
        ],
        "best effort: the payment is refunded although the grant could not be undone"
    );
    assert_eq!(c.balance("erin").await, 1_000);
    let stats = c.stats().await;
    assert_eq!(stats.compensation_failures, 1);
}

async fn stats_and_lists_reflect_the_sagas(mode: SagaMode) {
    let mesh = Mesh::start(mode).await;
    let c = &mesh.clients;
    c.create_user("frank", 1_000).await;
    c.create_item("gem", 1, 100).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = c.purchase("frank", "gem", 1).await;
        c.follow(&id).await;
        ids.push(id);
    }
    let failed = c.purchase("frank", "gem", 200).await;
    c.follow(&failed).await;

    let stats = c.stats().await;
    assert_eq!(stats.total, 4);
    assert!((stats.success_rate - 0.75).abs() < 1e-9, "{}", stats.success_rate);
    let grant = stats
        .step_durations
        .iter()
        .find(|s| s.step() == Step::ItemGrant)
        .unwrap();
    assert_eq!(grant.count, 4, "three grants and one failed grant were timed");

    let mut list = sagamesh_proto::v1::ListTransactionsRequest {
        user_id: "frank".into(),
        page_size: 2,
        ..Default::default()
    };
    let first = c
        .coordinator
        .clone()
        .list_transactions(list.clone())
        .await
        .unwrap()
        .into_inner();
    let first_ids: Vec<_> = first
        .transactions
        .iter()
        .map(|t| t.transaction_id.clone())
        .collect();
    assert_eq!(first_ids, vec![failed.clone(), ids[2].clone()], "newest first");
    list.page_token = first.next_page_token;
    let second = c
        .coordinator
        .clone()
        .list_transactions(list)
        .await
        .unwrap()
        .into_inner();
    let second_ids: Vec<_> = second
        .transactions
        .iter()
        .map(|t| t.transaction_id.clone())
        .collect();
    assert_eq!(second_ids, vec![ids[1].clone(), ids[0].clone()]);

    let only_failed = c
        .coordinator
        .clone()
        .list_transactions(sagamesh_proto::v1::ListTransactionsRequest {
            status: TransactionStatus::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_failed.transactions.len(), 1);
    assert_eq!(only_failed.transactions[0].transaction_id, failed);
}

/// Transient errors are retried with backoff and show as attempts on the
/// step; they never turn into business failures.
async fn transient_errors_are_retried_and_shown(mode: SagaMode) {
    let mesh = Mesh::start_with(mode, |config| {
        config.faults = sagamesh_saga::Faults::parse("item_grant=error@0.7").unwrap();
        config.max_attempts = 60;
        config.retry_base = std::time::Duration::from_millis(1);
        config.retry_max = std::time::Duration::from_millis(5);
    })
    .await;
    let c = &mesh.clients;
    c.create_user("ivan", 1_000).await;
    c.create_item("cape", 10, 100).await;
    let mut retried = 0;
    for _ in 0..10 {
        let id = c.purchase("ivan", "cape", 1).await;
        let (_, done) = c.follow(&id).await;
        assert_eq!(done.status(), TransactionStatus::Completed, "{done:?}");
        let grant = done.steps.iter().find(|s| s.step() == Step::ItemGrant).unwrap();
        assert!(grant.attempts >= 1);
        if grant.attempts > 1 {
            retried += 1;
        }
    }
    assert!(
        retried > 0,
        "with 70% transient errors some grants took more than one attempt"
    );
    assert_eq!(c.balance("ivan").await, 900);
}

/// A compensation request that keeps failing transiently is dead-lettered;
/// that counts as a failed attempt, so the plan retries, gives up, undoes
/// the rest and ends the saga NEEDS_ATTENTION instead of waiting forever.
async fn a_dead_lettered_compensation_ends_in_needs_attention(mode: SagaMode) {
    let mesh = Mesh::start_with(mode, |config| {
        config.faults =
            sagamesh_saga::Faults::parse("log_record=fail,item_grant.compensation=error").unwrap();
        config.max_attempts = 2;
        config.retry_base = std::time::Duration::from_millis(1);
        config.retry_max = std::time::Duration::from_millis(5);
    })
    .await;
    let c = &mesh.clients;
    c.create_user("jude", 1_000).await;
    c.create_item("orb", 100, 5).await;
    let id = c.purchase("jude", "orb", 1).await;
    let (_, done) = c.follow(&id).await;
    assert_eq!(done.status(), TransactionStatus::NeedsAttention, "{done:?}");
    assert_eq!(
        c.balance("jude").await,
        1_000,
        "the payment is refunded all the same"
    );
    let stats = c.stats().await;
    assert_eq!(stats.compensation_failures, 1);
    assert_eq!(
        stats.dead_letters,
        u64::from(sagamesh_saga::MAX_COMPENSATION_ATTEMPTS),
        "each attempt was dead-lettered"
    );
}

in_both_modes!(
    a_purchase_completes_and_moves_money_and_stock,
    business_failures_undo_what_succeeded,
    a_failed_log_record_undoes_grant_and_payment_newest_first,
    a_failed_notification_undoes_every_earlier_step,
    a_compensation_that_cannot_succeed_needs_attention,
    stats_and_lists_reflect_the_sagas,
    transient_errors_are_retried_and_shown,
    a_dead_lettered_compensation_ends_in_needs_attention,
);
