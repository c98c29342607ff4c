//! The purchase-log service: one log entry per purchase. It owns the
//! log-record step (write the entry) and its compensation (mark the entry
//! failed; the record of what happened is kept, not deleted).

mod grpc;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{LogRecorded, LogStatus, PurchaseDetails, PurchaseLogEntry, Step};
use sagamesh_router_client::{OUTBOX_MIGRATION, PROCESSED_MIGRATION};
use sagamesh_sqlite::{Durability, Store, StoreError};
use sagamesh_step::{Outcome, StepOwner};

pub use grpc::PurchaseLogsService;

const MIGRATIONS: &[&str] = &[
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
];

#[derive(Debug, thiserror::Error)]
pub enum PurchaseLogError {
    #[error("there is no log entry for transaction '{0}'")]
    NoSuchEntry(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for PurchaseLogError {
    fn from(e: rusqlite::Error) -> Self {
        PurchaseLogError::Store(StoreError::Sqlite(e))
    }
}

/// The purchase log, in `<data dir>/purchase-log.db`.
#[derive(Clone)]
pub struct PurchaseLog {
    store: Store,
}

impl PurchaseLog {
    pub fn open(data_dir: &Path, durability: Durability) -> Result<PurchaseLog, StoreError> {
        let store = Store::open(&data_dir.join("purchase-log.db"), durability, MIGRATIONS)?;
        Ok(PurchaseLog { store })
    }

    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub async fn entry(&self, transaction_id: String) -> Result<PurchaseLogEntry, PurchaseLogError> {
        self.store
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT user_id, item_id, quantity, total_price, status, recorded_at_ms
                     FROM logs WHERE transaction_id = ?1",
                )?
                .query_row([&transaction_id], |row| {
                    let millis: i64 = row.get(5)?;
                    Ok(PurchaseLogEntry {
                        transaction_id: transaction_id.clone(),
                        user_id: row.get(0)?,
                        item_id: row.get(1)?,
                        quantity: row.get(2)?,
                        total_price: row.get::<_, i64>(3)? as u64,
                        status: row.get(4)?,
                        recorded_at: Some(sagamesh_proto::timestamp(
                            UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64),
                        )),
                    })
                })
                .optional()?
                .ok_or(PurchaseLogError::NoSuchEntry(transaction_id))
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
        conn: &Connection,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> rusqlite::Result<Outcome> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        conn.prepare_cached(
            "INSERT INTO logs (transaction_id, user_id, item_id, quantity, total_price, status, recorded_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            transaction_id,
            purchase.user_id,
            purchase.item_id,
            purchase.quantity,
            purchase.total_price as i64,
            LogStatus::Recorded as i32,
            now.as_millis() as i64
        ])?;
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
        conn: &Connection,
        transaction_id: &str,
        _purchase: &PurchaseDetails,
    ) -> rusqlite::Result<Result<String, String>> {
        let marked = conn
            .prepare_cached("UPDATE logs SET status = ?2 WHERE transaction_id = ?1")?
            .execute(params![transaction_id, LogStatus::LogFailedByCompensation as i32])?;
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
    router: tonic::transport::Channel,
    config: sagamesh_step::StepConfig,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), sagamesh_router_client::ClientError> {
    sagamesh_step::start(Arc::new(LogRecord), log.store(), router, config, tasks, shutdown).await
}
