//! The coordinator's saga records, in `<data dir>/coordinator.db`.
//!
//! Each transaction is one row: the columns it is looked up and listed by,
//! and the whole view as an encoded `Transaction`. Counts per status are kept
//! in their own table in the same transactions, so `GetStats` reads a
//! handful of rows however many sagas are stored.

use prost::Message;
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::step_record::Status as StepStatus;
use sagamesh_proto::v1::{
    Envelope, PurchaseDetails, SagaMode, SagaTimedOut, Step, Transaction, TransactionStatus,
};
use sagamesh_router_client::{
    OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES, OUTBOX_WRITER_MIGRATION, push_outbox,
};
use sagamesh_saga::PlanAction;
use sagamesh_store::{Row, Schema, StoreError, Tx, Value, values};

use crate::live::LiveView;
use crate::{CoordinatorError, orchestrator, view};

pub(crate) const SCHEMA: Schema = Schema {
    sqlite: &[
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
        // Each outbox row's writer, for replicas sharing a database.
        OUTBOX_WRITER_MIGRATION,
        // Counters per writer connection, so that concurrent writers never
        // wait on the same counter row; readers add them up.
        "CREATE TABLE status_counts_by_writer (
            writer TEXT NOT NULL DEFAULT '',
            mode INTEGER NOT NULL,
            status INTEGER NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (writer, mode, status)
        ) WITHOUT ROWID;
        INSERT INTO status_counts_by_writer (mode, status, count)
            SELECT mode, status, count FROM status_counts;
        DROP TABLE status_counts;
        ALTER TABLE status_counts_by_writer RENAME TO status_counts",
    ],
    postgres: &[
        "CREATE TABLE transactions (
            seq BIGSERIAL PRIMARY KEY,
            transaction_id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            status BIGINT NOT NULL,
            idempotency_key TEXT,
            body BYTEA NOT NULL,
            mode BIGINT NOT NULL DEFAULT 1,
            updated_ms BIGINT NOT NULL DEFAULT 0
        );
        CREATE UNIQUE INDEX transactions_by_key ON transactions (user_id, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE INDEX transactions_by_user ON transactions (user_id, seq);
        CREATE INDEX transactions_by_status ON transactions (status, seq);
        CREATE INDEX transactions_by_progress ON transactions (status, updated_ms);
        CREATE TABLE status_counts (
            writer TEXT NOT NULL DEFAULT current_setting('sagamesh.writer', true),
            mode BIGINT NOT NULL,
            status BIGINT NOT NULL,
            count BIGINT NOT NULL,
            PRIMARY KEY (writer, mode, status)
        );
        CREATE TABLE orchestrations (
            transaction_id TEXT PRIMARY KEY,
            plan TEXT NOT NULL
        )",
        OUTBOX_MIGRATION_POSTGRES,
    ],
};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

fn decode(body: &[u8]) -> Result<Transaction, CoordinatorError> {
    Transaction::decode(body).map_err(|e| CoordinatorError::Corrupt(e.to_string()))
}

/// A column that holds an `i32` (a proto enum).
fn int32(row: &Row, column: usize) -> Result<i32, StoreError> {
    let value = row.int(column)?;
    i32::try_from(value).map_err(|_| {
        StoreError::Sql(format!(
            "column {column} holds {value}, out of range for a 32-bit integer"
        ))
    })
}

/// Moves one saga's count from one status to another. The two counters are
/// always touched in the same order (by status number), so that replicas
/// moving sagas at the same time cannot deadlock on them.
fn recount(tx: &mut dyn Tx, mode: i32, from: i32, to: i32) -> Result<(), StoreError> {
    let mut moves = [(from, -1), (to, 1)];
    moves.sort_unstable();
    for (status, delta) in moves {
        count(tx, mode, status, delta)?;
    }
    Ok(())
}

fn count(tx: &mut dyn Tx, mode: i32, status: i32, delta: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO status_counts (mode, status, count) VALUES ($1, $2, $3)
         ON CONFLICT (writer, mode, status) DO UPDATE SET count = status_counts.count + excluded.count",
        &values![mode, status, delta],
    )?;
    Ok(())
}

/// The transaction already recorded for a user's idempotency key.
pub(crate) fn by_key(
    tx: &mut dyn Tx,
    user_id: &str,
    key: &str,
) -> Result<Option<Transaction>, CoordinatorError> {
    let row = tx.query_opt(
        "SELECT body FROM transactions WHERE user_id = $1 AND idempotency_key = $2",
        &values![user_id, key],
    )?;
    row.map(|row| decode(row.blob(0)?)).transpose()
}

/// What recording a purchase did.
pub(crate) enum Recorded {
    /// A new saga, and its row as [`LiveView`] keeps it where the store
    /// tells the row's `seq` (one writer numbers rows in commit order).
    New(Option<LiveView>),
    /// The idempotency key was used already, for this saga.
    Existing(Box<Transaction>),
}

/// Records a new saga and its first events, unless the idempotency key was
/// used already: then returns the saga recorded for it.
pub(crate) fn insert(
    tx: &mut dyn Tx,
    mut transaction: Transaction,
    first_events: &[Envelope],
) -> Result<Recorded, CoordinatorError> {
    // The saga's first events are in its history from the start, so their
    // return from the router needs no write.
    for event in first_events.iter().filter(|e| view::only_recorded(e)) {
        view::apply(&mut transaction, event);
    }
    let key = (!transaction.idempotency_key.is_empty()).then_some(&transaction.idempotency_key);
    if let Some(key) = key
        && let Some(existing) = by_key(tx, &transaction.user_id, key)?
    {
        return Ok(Recorded::Existing(Box::new(existing)));
    }
    let body = transaction.encode_to_vec();
    let seq = insert_row(tx, &transaction, key, &body)?;
    for event in first_events {
        push_outbox(tx, event)?;
    }
    Ok(Recorded::New(seq.map(|seq| LiveView {
        seq,
        view: std::sync::Arc::new(transaction),
        body,
    })))
}

/// Inserts a saga's row and counts it; returns its `seq` where the store
/// tells it (see [`Tx::last_rowid`]).
fn insert_row(
    tx: &mut dyn Tx,
    transaction: &Transaction,
    idempotency_key: Option<&String>,
    body: &[u8],
) -> Result<Option<i64>, StoreError> {
    tx.execute(
        "INSERT INTO transactions (transaction_id, user_id, status, idempotency_key, mode, body, updated_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &values![
            &transaction.transaction_id,
            &transaction.user_id,
            transaction.status,
            idempotency_key,
            transaction.mode,
            body,
            now_ms()
        ],
    )?;
    let seq = tx.last_rowid();
    count(tx, transaction.mode, transaction.status, 1)?;
    Ok(seq)
}

pub(crate) fn get(tx: &mut dyn Tx, transaction_id: &str) -> Result<Option<Transaction>, CoordinatorError> {
    let row = tx.query_opt(
        "SELECT body FROM transactions WHERE transaction_id = $1",
        &values![transaction_id],
    )?;
    row.map(|row| decode(row.blob(0)?)).transpose()
}

/// The transaction's row (`seq`, view), locked until this write commits:
/// replicas of the coordinator may apply an event and time the saga out at
/// the same time.
fn get_locked(tx: &mut dyn Tx, transaction_id: &str) -> Result<Option<(i64, Transaction)>, CoordinatorError> {
    let sql = format!(
        "SELECT seq, body FROM transactions WHERE transaction_id = $1{}",
        tx.for_update()
    );
    let row = tx.query_opt(&sql, &values![transaction_id])?;
    row.map(|row| Ok((row.int(0)?, decode(row.blob(1)?)?)))
        .transpose()
}

/// What applying one event did.
pub(crate) struct Applied {
    pub transaction: Transaction,
    /// `transaction` as stored, and its row's `seq` (unknown for a row
    /// inserted where writers interleave): what [`LiveView`] keeps.
    pub body: Vec<u8>,
    pub seq: Option<i64>,
    /// Compensation actions the orchestrator took, for the log.
    pub actions: Vec<PlanAction>,
    /// The saga reached a terminal state with this event.
    pub ended: bool,
}

/// Applies a saga event to its transaction's view and, for an orchestration
/// saga, decides what comes next; `None` when it changed nothing (a
/// redelivery). `kept` is the view as this coordinator last committed it,
/// if it keeps one (see [`crate::live`]).
pub(crate) fn apply(
    tx: &mut dyn Tx,
    event: &Envelope,
    kept: Option<&LiveView>,
) -> Result<Option<Applied>, CoordinatorError> {
    // Only a choreography saga starts from the kept view: an orchestration
    // saga's decisions write commands before its view is updated, so it
    // must be sure of the view first, and reads it.
    if let Some(kept) = kept.filter(|kept| kept.view.mode() == SagaMode::Choreography) {
        match apply_to_kept(tx, event, kept)? {
            FromKept::Applied(applied) => return Ok(Some(*applied)),
            FromKept::Redelivery => return Ok(None),
            FromKept::Stale => {}
        }
    }
    let existing = get_locked(tx, &event.transaction_id)?;
    let seq = existing.as_ref().map(|(seq, _)| *seq);
    let mut transaction = match existing {
        Some((_, transaction)) => transaction,
        None => view::from_event(event),
    };
    let before = transaction.status;
    if !view::apply(&mut transaction, event) {
        return Ok(None);
    }
    // A saga that had already ended needs no more decisions (a timeout
    // decided on a lagging view, a late answer). Decisions come first: the
    // commands they write go into the view written below.
    let was_moving = !view::is_terminal(TransactionStatus::try_from(before).unwrap_or_default());
    let actions = if transaction.mode() == SagaMode::Orchestration && was_moving {
        orchestrator::react(tx, event, purchase_of(&transaction), &mut transaction)?
    } else {
        Vec::new()
    };
    let body = transaction.encode_to_vec();
    let seq = match seq {
        None => insert_row(tx, &transaction, None, &body)?,
        Some(seq) => {
            update(tx, seq, None, before, &transaction, &body)?;
            Some(seq)
        }
    };
    Ok(Some(applied(transaction, body, seq, actions, before)))
}

/// What applying an event to a kept view came to.
enum FromKept {
    Applied(Box<Applied>),
    /// The event is in the view already.
    Redelivery,
    /// The row no longer holds the kept view: apply to the stored one.
    Stale,
}

/// Applies the event to the kept view, if the row still holds it.
fn apply_to_kept(tx: &mut dyn Tx, event: &Envelope, kept: &LiveView) -> Result<FromKept, CoordinatorError> {
    let mut transaction = Transaction::clone(&kept.view);
    let before = transaction.status;
    // Already in a view the row held once, so in the row's history too.
    if !view::apply(&mut transaction, event) {
        return Ok(FromKept::Redelivery);
    }
    let body = transaction.encode_to_vec();
    if !update(tx, kept.seq, Some(&kept.body), before, &transaction, &body)? {
        return Ok(FromKept::Stale);
    }
    let applied = applied(transaction, body, Some(kept.seq), Vec::new(), before);
    Ok(FromKept::Applied(Box::new(applied)))
}

/// Writes the view to its row, if the row holds `expected` (when given);
/// returns whether it did.
fn update(
    tx: &mut dyn Tx,
    seq: i64,
    expected: Option<&[u8]>,
    before: i32,
    transaction: &Transaction,
    body: &[u8],
) -> Result<bool, CoordinatorError> {
    // Without `status` in the statement, its index is left alone.
    let status_moved = before != transaction.status;
    let sql = match (status_moved, expected.is_some()) {
        (false, false) => "UPDATE transactions SET body = $2, updated_ms = $3 WHERE seq = $1",
        (false, true) => "UPDATE transactions SET body = $2, updated_ms = $3 WHERE seq = $1 AND body = $4",
        (true, false) => "UPDATE transactions SET body = $2, updated_ms = $3, status = $4 WHERE seq = $1",
        (true, true) => {
            "UPDATE transactions SET body = $2, updated_ms = $3, status = $4 WHERE seq = $1 AND body = $5"
        }
    };
    // The parameters in the order the statement numbers them.
    let mut params = Vec::from(values![seq, body, now_ms()]);
    if status_moved {
        params.push(transaction.status.into());
    }
    if let Some(expected) = expected {
        params.push(expected.into());
    }
    let changed = tx.execute(sql, &params)?;
    if changed == 0 {
        return Ok(false);
    }
    if status_moved {
        recount(tx, transaction.mode, before, transaction.status)?;
    }
    Ok(true)
}

fn applied(
    transaction: Transaction,
    body: Vec<u8>,
    seq: Option<i64>,
    actions: Vec<PlanAction>,
    before: i32,
) -> Applied {
    let ended = !view::is_terminal(TransactionStatus::try_from(before).unwrap_or_default())
        && view::is_terminal(transaction.status());
    Applied {
        transaction,
        body,
        seq,
        actions,
        ended,
    }
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
    tx: &mut dyn Tx,
    before_ms: i64,
    limit: usize,
) -> Result<Vec<String>, CoordinatorError> {
    let rows = tx.query(
        "SELECT transaction_id FROM transactions
         WHERE status IN ($1, $2) AND updated_ms < $3 ORDER BY updated_ms LIMIT $4",
        &values![
            TransactionStatus::Initiated as i32,
            TransactionStatus::InProgress as i32,
            before_ms,
            limit as i64
        ],
    )?;
    Ok(rows
        .iter()
        .map(|row| row.string(0))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Gives up on a stalled saga: puts `SagaTimedOut` in the outbox, unless
/// it moved meanwhile. Returns whether it timed the saga out.
pub(crate) fn time_out(
    tx: &mut dyn Tx,
    transaction_id: &str,
    before_ms: i64,
    deadline: std::time::Duration,
) -> Result<bool, CoordinatorError> {
    let Some((_, transaction)) = get_locked(tx, transaction_id)? else {
        return Ok(false);
    };
    let updated_ms = tx
        .query_opt(
            "SELECT updated_ms FROM transactions WHERE transaction_id = $1",
            &values![transaction_id],
        )?
        .map(|row| row.int(0))
        .transpose()?;
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
    // A saga this coordinator did not start may be known only from a
    // notice without its purchase: the router would refuse a timeout
    // without one, and nothing could undo a step of it anyway.
    let complete = sagamesh_saga::validate_purchase(&purchase).is_ok();
    if complete {
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
        push_outbox(tx, &event)?;
    } else {
        tracing::warn!(
            tx_id = transaction_id,
            "a stalled saga holds no complete purchase (this coordinator did not start it); not timed out"
        );
    }
    // Not again until the event is back and has moved the saga (or, for an
    // incomplete one, until another deadline has passed).
    tx.execute(
        "UPDATE transactions SET updated_ms = $2 WHERE transaction_id = $1",
        &values![transaction_id, now_ms()],
    )?;
    Ok(complete)
}

/// How many sagas have not ended.
pub(crate) fn unfinished(tx: &mut dyn Tx) -> Result<u64, CoordinatorError> {
    Ok(status_counts(tx)?
        .into_iter()
        .filter(|(_, status, _)| !view::is_terminal(TransactionStatus::try_from(*status).unwrap_or_default()))
        .map(|(_, _, count)| count)
        .sum())
}

/// A page of transactions, newest first, below the sequence number `before`.
pub(crate) fn list(
    tx: &mut dyn Tx,
    status: Option<TransactionStatus>,
    user_id: Option<&str>,
    before: i64,
    limit: usize,
) -> Result<Vec<(i64, Transaction)>, CoordinatorError> {
    // Only the parameters the statement uses, numbered without gaps.
    let mut params: Vec<Value> = vec![before.into()];
    let mut sql = String::from("SELECT seq, body FROM transactions WHERE seq < $1");
    if let Some(status) = status {
        params.push((status as i32).into());
        sql.push_str(&format!(" AND status = ${}", params.len()));
    }
    if let Some(user_id) = user_id {
        params.push(user_id.into());
        sql.push_str(&format!(" AND user_id = ${}", params.len()));
    }
    params.push((limit as i64).into());
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", params.len()));
    let rows = tx.query(&sql, &params)?;
    let mut page = Vec::with_capacity(rows.len());
    for row in &rows {
        page.push((row.int(0)?, decode(row.blob(1)?)?));
    }
    Ok(page)
}

/// `(mode, status, count)` for every pair with sagas.
pub(crate) fn status_counts(tx: &mut dyn Tx) -> Result<Vec<(i32, i32, u64)>, CoordinatorError> {
    let rows = tx.query(
        "SELECT mode, status, CAST(SUM(count) AS BIGINT) FROM status_counts
         GROUP BY mode, status HAVING SUM(count) > 0 ORDER BY mode, status",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|row| Ok((int32(row, 0)?, int32(row, 1)?, row.int(2)?.max(0) as u64)))
        .collect::<Result<Vec<_>, StoreError>>()?)
}

#[cfg(test)]
mod tests {
    use sagamesh_proto::v1::{EventType, ItemGranted, PurchaseInitiated, UserValidated};
    use std::sync::Arc;

    use sagamesh_store::{Durability, Store};

    use super::*;

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(
            &dir.path().join("coordinator.db"),
            Durability::Process,
            SCHEMA.sqlite,
        )
        .unwrap()
    }

    fn event(payload: Payload) -> Envelope {
        Envelope::new("tx-1", "", "test", payload)
    }

    fn history(transaction: &Transaction) -> Vec<i32> {
        transaction.history.iter().map(|h| h.event).collect()
    }

    async fn stored(store: &Store) -> Transaction {
        store
            .read(|tx| get(tx, "tx-1"))
            .await
            .unwrap()
            .expect("the saga is stored")
    }

    /// Applies `event` starting from the kept view `kept`.
    async fn apply_from_kept(store: &Store, kept: &Arc<LiveView>, event: &Envelope) -> Option<Applied> {
        let (kept, event) = (kept.clone(), event.clone());
        store
            .write(move |tx| apply(tx, &event, Some(&kept)))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_kept_view_that_fell_behind_changes_nothing_and_the_stored_view_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let initiated = event(Payload::PurchaseInitiated(PurchaseInitiated::default()));
        let record = Transaction {
            transaction_id: "tx-1".into(),
            user_id: "user-1".into(),
            status: TransactionStatus::Initiated as i32,
            mode: SagaMode::Choreography as i32,
            ..Default::default()
        };
        let recorded = store
            .write(move |tx| insert(tx, record.clone(), std::slice::from_ref(&initiated)))
            .await
            .unwrap();
        let Recorded::New(Some(first)) = recorded else {
            panic!("a new saga on SQLite is kept with its row");
        };
        let first = Arc::new(first);

        // From the kept view: the row held exactly these bytes.
        let validated = event(Payload::UserValidated(UserValidated::default()));
        let applied = apply_from_kept(&store, &first, &validated)
            .await
            .expect("a new event changes the view");
        assert_eq!(applied.seq, Some(first.seq));
        assert_eq!(applied.transaction.status(), TransactionStatus::InProgress);
        assert_eq!(applied.body, stored(&store).await.encode_to_vec());

        // The same kept view again: it is behind the row now, so the next
        // event is applied to the stored view and keeps the one before.
        let granted = event(Payload::ItemGranted(ItemGranted::default()));
        let applied = apply_from_kept(&store, &first, &granted)
            .await
            .expect("a new event changes the view");
        let expected = vec![
            EventType::PurchaseInitiated as i32,
            EventType::UserValidated as i32,
            EventType::ItemGranted as i32,
        ];
        assert_eq!(history(&applied.transaction), expected);
        assert_eq!(history(&stored(&store).await), expected);

        // A redelivery judged against the stale view is still a redelivery.
        let again = apply_from_kept(&store, &first, &validated).await;
        assert!(again.is_none());
        assert_eq!(history(&stored(&store).await), expected);

        let counts = store.read(status_counts).await.unwrap();
        assert_eq!(
            counts,
            vec![(
                SagaMode::Choreography as i32,
                TransactionStatus::InProgress as i32,
                1
            )]
        );
    }

    /// Times out the saga of `record` as if its deadline passed; returns
    /// whether it did, and how many events the outbox then holds.
    async fn time_out_now(store: &Store, record: Transaction) -> (bool, i64) {
        let initiated = event(Payload::PurchaseInitiated(PurchaseInitiated::default()));
        store
            .write(move |tx| insert(tx, record.clone(), std::slice::from_ref(&initiated)))
            .await
            .unwrap();
        let later = now_ms() + 1_000;
        let timed_out = store
            .write(move |tx| time_out(tx, "tx-1", later, std::time::Duration::from_secs(1)))
            .await
            .unwrap();
        let outbox = store
            .read(|tx| {
                let row = tx
                    .query_opt("SELECT count(*) FROM outbox", &[])?
                    .expect("a count");
                Ok::<_, CoordinatorError>(row.int(0)?)
            })
            .await
            .unwrap();
        (timed_out, outbox)
    }

    #[tokio::test]
    async fn a_stalled_saga_times_out_only_with_a_purchase_the_router_takes() {
        let record = Transaction {
            transaction_id: "tx-1".into(),
            user_id: "user-1".into(),
            item_id: "item-1".into(),
            quantity: 2,
            unit_price: 50,
            total_price: 100,
            status: TransactionStatus::InProgress as i32,
            mode: SagaMode::Choreography as i32,
            ..Default::default()
        };
        // The outbox holds `PurchaseInitiated`, and then the timeout.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(time_out_now(&store(&dir), record.clone()).await, (true, 2));

        // Known only from a notice: no item, no quantity.
        let unknown = Transaction {
            item_id: String::new(),
            quantity: 0,
            unit_price: 0,
            total_price: 0,
            ..record
        };
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(time_out_now(&store(&dir), unknown).await, (false, 1));
    }
}
