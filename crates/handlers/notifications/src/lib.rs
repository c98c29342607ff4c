//! The notifications service: what was sent to each user. It owns the
//! notification step (confirm the purchase to the user, which completes it)
//! and its compensation (send a cancellation notice).
//!
//! "Sending" is recording the message in the user's notification list, which
//! `ListNotifications` serves; a push or e-mail gateway would hang off the
//! same outbox.

mod grpc;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Notification, NotificationKind, PurchaseCompleted, PurchaseDetails, Step};
use sagamesh_router_client::{
    OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES, OUTBOX_WRITER_MIGRATION, PROCESSED_MIGRATION,
    PROCESSED_MIGRATION_POSTGRES,
};
use sagamesh_step::{Outcome, StepOwner};
use sagamesh_store::{Database, Schema, Store, StoreError, Tx, values};

pub use grpc::NotificationsService;

const SCHEMA: Schema = Schema {
    sqlite: &[
        "CREATE TABLE notifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        transaction_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        kind INTEGER NOT NULL,
        message TEXT NOT NULL,
        sent_at_ms INTEGER NOT NULL,
        UNIQUE (transaction_id, kind)
    );
    CREATE INDEX notifications_by_user ON notifications (user_id, id)",
        PROCESSED_MIGRATION,
        OUTBOX_MIGRATION,
        // Each outbox row's writer, for replicas sharing a database.
        OUTBOX_WRITER_MIGRATION,
    ],
    postgres: &[
        "CREATE TABLE notifications (
        id BIGSERIAL PRIMARY KEY,
        transaction_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        kind BIGINT NOT NULL,
        message TEXT NOT NULL,
        sent_at_ms BIGINT NOT NULL,
        UNIQUE (transaction_id, kind)
    );
    CREATE INDEX notifications_by_user ON notifications (user_id, id)",
        PROCESSED_MIGRATION_POSTGRES,
        OUTBOX_MIGRATION_POSTGRES,
    ],
};

/// Most notifications one `ListNotifications` returns, newest first.
const LIST_LIMIT: i64 = 1_000;

/// The notifications store, in `<data dir>/notifications.db`.
#[derive(Clone)]
pub struct Notifications {
    store: Store,
}

impl Notifications {
    pub fn open(database: &Database) -> Result<Notifications, StoreError> {
        let store = Store::open_service(database, "notifications", &SCHEMA)?;
        Ok(Notifications { store })
    }

    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// A user's notifications, newest first.
    pub async fn list(&self, user_id: String) -> Result<Vec<Notification>, StoreError> {
        self.store
            .read(move |tx| {
                let rows = tx.query(
                    "SELECT transaction_id, kind, message, sent_at_ms FROM notifications
                     WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
                    &values![&user_id, LIST_LIMIT],
                )?;
                rows.iter()
                    .map(|row| {
                        let millis = row.int(3)?;
                        let kind = row.int(1)?;
                        Ok(Notification {
                            transaction_id: row.string(0)?,
                            user_id: user_id.clone(),
                            kind: i32::try_from(kind).map_err(|_| {
                                StoreError::Sql(format!("integer {kind} is out of range at index 1"))
                            })?,
                            message: row.string(2)?,
                            sent_at: Some(sagamesh_proto::timestamp(
                                UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64),
                            )),
                        })
                    })
                    .collect()
            })
            .await
    }
}

fn send(
    tx: &mut dyn Tx,
    transaction_id: &str,
    user_id: &str,
    kind: NotificationKind,
    message: &str,
) -> Result<(), StoreError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    tx.execute(
        "INSERT INTO notifications (transaction_id, user_id, kind, message, sent_at_ms)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &values![
            transaction_id,
            user_id,
            kind as i32,
            message,
            now.as_millis() as i64
        ],
    )?;
    Ok(())
}

/// The notification step.
pub struct Notify;

impl StepOwner for Notify {
    const STEP: Step = Step::Notification;
    const GROUP: &'static str = "notifications";
    const HANDLER: &'static str = "NotificationHandler";

    fn execute(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Outcome, StoreError> {
        let message = format!(
            "Your purchase of {} x{} for {} is complete.",
            purchase.item_id, purchase.quantity, purchase.total_price
        );
        send(
            tx,
            transaction_id,
            &purchase.user_id,
            NotificationKind::PurchaseConfirmation,
            &message,
        )?;
        Ok(Outcome::Success {
            event: Payload::PurchaseCompleted(PurchaseCompleted {
                purchase: Some(purchase.clone()),
                timing: None,
            }),
            summary: format!("confirmation sent to {}", purchase.user_id),
        })
    }

    fn compensate(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Result<String, String>, StoreError> {
        let message = format!(
            "Your purchase of {} x{} was cancelled; nothing was charged.",
            purchase.item_id, purchase.quantity
        );
        send(
            tx,
            transaction_id,
            &purchase.user_id,
            NotificationKind::PurchaseCancellation,
            &message,
        )?;
        Ok(Ok(format!("cancellation notice sent to {}", purchase.user_id)))
    }
}

/// Starts the notifications service's step handler.
pub async fn start(
    notifications: &Notifications,
    router: sagamesh_router_client::RouterLink,
    config: sagamesh_step::StepConfig,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), sagamesh_router_client::ClientError> {
    sagamesh_step::start(
        Arc::new(Notify),
        notifications.store(),
        router,
        config,
        tasks,
        shutdown,
    )
    .await
}
