//! The purchase-log service: one log entry per purchase. It owns the
//! log-record step (write the entry) and its compensation (mark the entry
//! failed; the record of what happened is kept, not deleted).

mod grpc;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{LogRecorded, LogStatus, PurchaseDetails, PurchaseLogEntry, Step};
use sagamesh_router_client::{
    OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES, OUTBOX_WRITER_MIGRATION, PROCESSED_MIGRATION,
    PROCESSED_MIGRATION_POSTGRES,
};
use sagamesh_step::{Outcome, StepOwner};
use sagamesh_store::{Database, Row, Schema, Store, StoreError, Tx, values};

pub use grpc::PurchaseLogsService;

const SCHEMA: Schema = Schema {
    sqlite: &[
        "CREATE TABLE logs (
        transaction_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        total_price INTEGER NOT NULL,
        status INTEGER NOT NULL,
        recorded_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID",
        PROCESSED_MIGRATION,
        OUTBOX_MIGRATION,
        // Each outbox row's writer, for replicas sharing a database.
        OUTBOX_WRITER_MIGRATION,
    ],
    postgres: &[
        "CREATE TABLE logs (
        transaction_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        total_price BIGINT NOT NULL,
        status BIGINT NOT NULL,
        recorded_at_ms BIGINT NOT NULL
    )",
        PROCESSED_MIGRATION_POSTGRES,
        OUTBOX_MIGRATION_POSTGRES,
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum PurchaseLogError {
    #[error("there is no log entry for transaction '{0}'")]
    NoSuchEntry(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An integer column narrowed to `T`; a value out of `T`'s range is an error.
fn narrow<T: TryFrom<i64>>(row: &Row, column: usize) -> Result<T, StoreError> {
    let value = row.int(column)?;
    T::try_from(value)
        .map_err(|_| StoreError::Sql(format!("integer {value} is out of range at index {column}")))
}

/// The purchase log, in `<data dir>/purchase-log.db`.
#[derive(Clone)]
pub struct PurchaseLog {
    store: Store,
}

impl PurchaseLog {
    pub fn open(database: &Database) -> Result<PurchaseLog, StoreError> {
        let store = Store::open_service(database, "purchase-log", &SCHEMA)?;
        Ok(PurchaseLog { store })
    }

    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub async fn entry(&self, transaction_id: String) -> Result<PurchaseLogEntry, PurchaseLogError> {
        self.store
            .read(move |tx| {
                let Some(row) = tx.query_opt(
                    "SELECT user_id, item_id, quantity, total_price, status, recorded_at_ms
                     FROM logs WHERE transaction_id = $1",
                    &values![&transaction_id],
                )?
                else {
                    return Err(PurchaseLogError::NoSuchEntry(transaction_id));
                };
                let millis = row.int(5)?;
                Ok(PurchaseLogEntry {
                    user_id: row.string(0)?,
                    item_id: row.string(1)?,
                    quantity: narrow(&row, 2)?,
                    total_price: row.int(3)? as u64,
                    status: narrow(&row, 4)?,
                    recorded_at: Some(sagamesh_proto::timestamp(
                        UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64),
                    )),
                    transaction_id,
                })
            })
            .await
    }
}

/// The log-record step.
pub struct LogRecord;

impl StepOwner for LogRecord {
    const STEP: Step = Step::LogRecord;
    const GROUP: &'static str = "purchase-log";
    const HANDLER: &'static str = "LogRecordHandler";

    fn execute(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Outcome, StoreError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        tx.execute(
            "INSERT INTO logs (transaction_id, user_id, item_id, quantity, total_price, status, recorded_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &values![
                transaction_id,
                &purchase.user_id,
                &purchase.item_id,
                purchase.quantity,
                purchase.total_price as i64,
                LogStatus::Recorded as i32,
                now.as_millis() as i64
            ],
        )?;
        Ok(Outcome::Success {
            event: Payload::LogRecorded(LogRecorded {
                purchase: Some(purchase.clone()),
                timing: None,
            }),
            summary: format!(
                "{} bought {} x{} for {}",
                purchase.user_id, purchase.item_id, purchase.quantity, purchase.total_price
            ),
        })
    }

    fn compensate(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        _purchase: &PurchaseDetails,
    ) -> Result<Result<String, String>, StoreError> {
        let marked = tx.execute(
            "UPDATE logs SET status = $2 WHERE transaction_id = $1",
            &values![transaction_id, LogStatus::LogFailedByCompensation as i32],
        )?;
        Ok(Ok(if marked == 1 {
            "log entry marked failed".to_owned()
        } else {
            "no log entry was written".to_owned()
        }))
    }
}

/// Starts the purchase-log service's step handler.
pub async fn start(
    log: &PurchaseLog,
    router: sagamesh_router_client::RouterLink,
    config: sagamesh_step::StepConfig,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), sagamesh_router_client::ClientError> {
    sagamesh_step::start(Arc::new(LogRecord), log.store(), router, config, tasks, shutdown).await
}
