//! The coordinator's saga records, in `<data dir>/coordinator.db`.
//!
//! Each transaction is one row: the columns it is looked up and listed by,
//! and the whole view as an encoded `Transaction`. Counts per status are kept
//! in their own table in the same transactions, so `GetStats` reads a
//! handful of rows however many sagas are stored.

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    Envelope, PurchaseDetails, SagaMode, SagaTimedOut, Step, StepStatus, Transaction, TransactionStatus,
};
use sagamesh_router_client::{OUTBOX_MIGRATION, push_outbox};
use sagamesh_saga::PlanAction;

use crate::{CoordinatorError, orchestrator, view};

pub(crate) const MIGRATIONS: &[&str] = &[
    "CREATE TABLE transactions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        transaction_id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        idempotency_key TEXT,
        body BLOB NOT NULL
    );
    CREATE UNIQUE INDEX transactions_by_key ON transactions (user_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX transactions_by_user ON transactions (user_id, seq);
    CREATE INDEX transactions_by_status ON transactions (status, seq);
    CREATE TABLE status_counts (
        status INTEGER PRIMARY KEY,
        count INTEGER NOT NULL
    )",
    OUTBOX_MIGRATION,
    // Counts per saga mode, and orchestration's compensation plans.
    "ALTER TABLE transactions ADD COLUMN mode INTEGER NOT NULL DEFAULT 1;
    DROP TABLE status_counts;
    CREATE TABLE status_counts (
        mode INTEGER NOT NULL,
        status INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (mode, status)
    ) WITHOUT ROWID;
    INSERT INTO status_counts (mode, status, count)
        SELECT mode, status, count(*) FROM transactions GROUP BY mode, status;
    CREATE TABLE orchestrations (
        transaction_id TEXT PRIMARY KEY,
        plan TEXT NOT NULL
    ) WITHOUT ROWID",
    // When each saga last moved, for saga deadlines.
    "ALTER TABLE transactions ADD COLUMN updated_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX transactions_by_progress ON transactions (status, updated_ms)",
];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

fn decode(body: &[u8]) -> Result<Transaction, CoordinatorError> {
    Transaction::decode(body).map_err(|e| CoordinatorError::Corrupt(e.to_string()))
}

fn count(conn: &Connection, mode: i32, status: i32, delta: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO status_counts (mode, status, count) VALUES (?1, ?2, ?3)
         ON CONFLICT (mode, status) DO UPDATE SET count = count + excluded.count",
    )?
    .execute(params![mode, status, delta])?;
    Ok(())
}

/// The transaction already recorded for a user's idempotency key.
pub(crate) fn by_key(
    conn: &Connection,
    user_id: &str,
    key: &str,
) -> Result<Option<Transaction>, CoordinatorError> {
    let body: Option<Vec<u8>> = conn
        .prepare_cached("SELECT body FROM transactions WHERE user_id = ?1 AND idempotency_key = ?2")?
        .query_row(params![user_id, key], |row| row.get(0))
        .optional()?;
    body.map(|b| decode(&b)).transpose()
}

/// Records a new saga and its first events, unless the idempotency key was
/// used already: then returns the saga recorded for it.
pub(crate) fn insert(
    conn: &Connection,
    transaction: &Transaction,
    first_events: &[Envelope],
) -> Result<Option<Transaction>, CoordinatorError> {
    let key = (!transaction.idempotency_key.is_empty()).then_some(&transaction.idempotency_key);
    if let Some(key) = key
        && let Some(existing) = by_key(conn, &transaction.user_id, key)?
    {
        return Ok(Some(existing));
    }
    conn.prepare_cached(
        "INSERT INTO transactions (transaction_id, user_id, status, idempotency_key, mode, body, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        transaction.transaction_id,
        transaction.user_id,
        transaction.status,
        key,
        transaction.mode,
        transaction.encode_to_vec(),
        now_ms()
    ])?;
    count(conn, transaction.mode, transaction.status, 1)?;
    for event in first_events {
        push_outbox(conn, event)?;
    }
    Ok(None)
}

pub(crate) fn get(conn: &Connection, transaction_id: &str) -> Result<Option<Transaction>, CoordinatorError> {
    let body: Option<Vec<u8>> = conn
        .prepare_cached("SELECT body FROM transactions WHERE transaction_id = ?1")?
        .query_row([transaction_id], |row| row.get(0))
        .optional()?;
    body.map(|b| decode(&b)).transpose()
}

/// What applying one event did.
pub(crate) struct Applied {
    pub transaction: Transaction,
    /// Compensation actions the orchestrator took, for the log.
    pub actions: Vec<PlanAction>,
    /// The saga reached a terminal state with this event.
    pub ended: bool,
}

/// Applies a saga event to its transaction's view and, for an orchestration
/// saga, decides what comes next; `None` when it changed nothing (a
/// redelivery).
pub(crate) fn apply(conn: &Connection, event: &Envelope) -> Result<Option<Applied>, CoordinatorError> {
    let existing = get(conn, &event.transaction_id)?;
    let is_new = existing.is_none();
    let mut transaction = existing.unwrap_or_else(|| view::from_event(event));
    let before = transaction.status;
    if !view::apply(&mut transaction, event) {
        return Ok(None);
    }
    if is_new {
        conn.prepare_cached(
            "INSERT INTO transactions (transaction_id, user_id, status, mode, body, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            transaction.transaction_id,
            transaction.user_id,
            transaction.status,
            transaction.mode,
            transaction.encode_to_vec(),
            now_ms()
        ])?;
        count(conn, transaction.mode, transaction.status, 1)?;
    } else {
        conn.prepare_cached(
            "UPDATE transactions SET status = ?2, body = ?3, updated_ms = ?4 WHERE transaction_id = ?1",
        )?
        .execute(params![
            transaction.transaction_id,
            transaction.status,
            transaction.encode_to_vec(),
            now_ms()
        ])?;
        if before != transaction.status {
            count(conn, transaction.mode, before, -1)?;
            count(conn, transaction.mode, transaction.status, 1)?;
        }
    }
    // A saga that had already ended needs no more decisions (a timeout
    // decided on a lagging view, a late answer).
    let was_moving = !view::is_terminal(TransactionStatus::try_from(before).unwrap_or_default());
    let actions = if transaction.mode() == SagaMode::Orchestration && was_moving {
        orchestrator::react(conn, event, purchase_of(&transaction))?
    } else {
        Vec::new()
    };
    let ended = !view::is_terminal(TransactionStatus::try_from(before).unwrap_or_default())
        && view::is_terminal(transaction.status());
    Ok(Some(Applied {
        transaction,
        actions,
        ended,
    }))
}

/// What a saga buys, as its events carry it.
fn purchase_of(transaction: &Transaction) -> PurchaseDetails {
    PurchaseDetails {
        user_id: transaction.user_id.clone(),
        item_id: transaction.item_id.clone(),
        quantity: transaction.quantity,
        unit_price: transaction.unit_price,
        total_price: transaction.total_price,
        mode: transaction.mode,
    }
}

/// Sagas still going forward that have not moved since `before_ms`.
pub(crate) fn stalled(
    conn: &Connection,
    before_ms: i64,
    limit: usize,
) -> Result<Vec<String>, CoordinatorError> {
    let mut stmt = conn.prepare_cached(
        "SELECT transaction_id FROM transactions
         WHERE status IN (?1, ?2) AND updated_ms < ?3 ORDER BY updated_ms LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        params![
            TransactionStatus::Initiated as i32,
            TransactionStatus::InProgress as i32,
            before_ms,
            limit as i64
        ],
        |row| row.get(0),
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Gives up on a stalled saga: puts `SagaTimedOut` in the outbox, unless
/// it moved meanwhile. Returns whether it timed the saga out.
pub(crate) fn time_out(
    conn: &Connection,
    transaction_id: &str,
    before_ms: i64,
    deadline: std::time::Duration,
) -> Result<bool, CoordinatorError> {
    let updated_ms: Option<i64> = conn
        .prepare_cached("SELECT updated_ms FROM transactions WHERE transaction_id = ?1")?
        .query_row([transaction_id], |row| row.get(0))
        .optional()?;
    let Some(transaction) = get(conn, transaction_id)? else {
        return Ok(false);
    };
    let moving = matches!(
        transaction.status(),
        TransactionStatus::Initiated | TransactionStatus::InProgress
    );
    if !moving || updated_ms.is_none_or(|ms| ms >= before_ms) {
        return Ok(false);
    }
    let pending = sagamesh_saga::STEPS
        .into_iter()
        .find(|step| {
            !transaction
                .steps
                .iter()
                .any(|s| s.step == *step as i32 && s.status() == StepStatus::Success)
        })
        .unwrap_or(Step::UserValidation);
    let purchase = purchase_of(&transaction);
    let reason = format!(
        "deadline exceeded: no progress for {:.1}s while waiting for {}",
        deadline.as_secs_f64(),
        pending.name()
    );
    let event = Envelope::new(
        transaction_id,
        "",
        crate::GROUP,
        Payload::SagaTimedOut(SagaTimedOut {
            purchase: Some(purchase),
            pending_step: pending as i32,
            reason,
        }),
    );
    push_outbox(conn, &event)?;
    // Not again until the event is back and has moved the saga.
    conn.prepare_cached("UPDATE transactions SET updated_ms = ?2 WHERE transaction_id = ?1")?
        .execute(params![transaction_id, now_ms()])?;
    Ok(true)
}

/// How many sagas have not ended.
pub(crate) fn unfinished(conn: &Connection) -> Result<u64, CoordinatorError> {
    Ok(status_counts(conn)?
        .into_iter()
        .filter(|(_, status, _)| !view::is_terminal(TransactionStatus::try_from(*status).unwrap_or_default()))
        .map(|(_, _, count)| count)
        .sum())
}

/// A page of transactions, newest first, below the sequence number `before`.
pub(crate) fn list(
    conn: &Connection,
    status: Option<TransactionStatus>,
    user_id: Option<&str>,
    before: i64,
    limit: usize,
) -> Result<Vec<(i64, Transaction)>, CoordinatorError> {
    let mut sql = String::from("SELECT seq, body FROM transactions WHERE seq < ?1");
    if status.is_some() {
        sql.push_str(" AND status = ?2");
    }
    if user_id.is_some() {
        sql.push_str(" AND user_id = ?3");
    }
    sql.push_str(" ORDER BY seq DESC LIMIT ?4");
    let mut stmt = conn.prepare_cached(&sql)?;
    let status = status.map(|s| s as i32);
    let mut rows = stmt.query(params![before, status, user_id, limit as i64])?;
    let mut page = Vec::new();
    while let Some(row) = rows.next()? {
        let body: Vec<u8> = row.get(1)?;
        page.push((row.get(0)?, decode(&body)?));
    }
    Ok(page)
}

/// `(mode, status, count)` for every pair with sagas.
pub(crate) fn status_counts(conn: &Connection) -> Result<Vec<(i32, i32, u64)>, CoordinatorError> {
    let mut stmt = conn.prepare_cached(
        "SELECT mode, status, count FROM status_counts WHERE count > 0 ORDER BY mode, status",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)?.max(0) as u64))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
