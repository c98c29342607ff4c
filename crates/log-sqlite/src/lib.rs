//! The embedded event log: the router's log in one SQLite file.
//!
//! Appends go through the shared group-commit writer of `sagamesh-store`,
//! so concurrent publishes share one fsync, and are staged: readable as soon
//! as committed, durable once the writer's fsync that follows is done. The `events` table's
//! AUTOINCREMENT key is the offset (never reused, even after truncation), and
//! the unique `event_id` column dedupes publishes. A batch is inserted with
//! one statement per chunk of up to 32 events.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sagamesh_log::{
    Appended, Appending, BoxFuture, DeadLetter, DeadLetterStore, EventLog, LogError, Offset, StoredEvent,
};
use sagamesh_proto::v1::Envelope;
use sagamesh_store::{Durability, Row, Store, StoreError, Tx, Value, values};

const MIGRATIONS: &[&str] = &["
    CREATE TABLE events (
        offset INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        body BLOB NOT NULL
    );
    CREATE TABLE cursors (
        grp TEXT PRIMARY KEY,
        next_offset INTEGER NOT NULL
    );
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT NOT NULL,
        dead_at_ms INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_by_group ON dead_letters (grp, id);
"];

/// The event log in `<dir>/router.db`.
#[derive(Clone)]
pub struct SqliteLog {
    store: Store,
}

impl SqliteLog {
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteLog, LogError> {
        let store = Store::open(path, durability, MIGRATIONS).map_err(storage)?;
        Ok(SqliteLog { store })
    }
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

/// The errors inside a store closure: SQL errors and corrupt records.
struct Failure(LogError);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(storage(e))
    }
}

fn decode(offset: Offset, body: &[u8]) -> Result<Arc<Envelope>, Failure> {
    Envelope::decode(body).map(Arc::new).map_err(|e| {
        Failure(LogError::Corrupt {
            offset,
            reason: e.to_string(),
        })
    })
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

/// A dead letter from a row of `SELECT id, grp, body, attempts, last_error, dead_at_ms`.
fn to_dead_letter(row: &Row) -> Result<DeadLetter, Failure> {
    Ok(DeadLetter {
        id: row.int(0)? as u64,
        group: row.string(1)?,
        envelope: decode(0, row.blob(2)?)?,
        attempts: row.int(3)? as u32,
        last_error: row.string(4)?,
        dead_at: UNIX_EPOCH + Duration::from_millis(row.int(5)?.max(0) as u64),
    })
}

fn list_dead(
    tx: &mut dyn Tx,
    group: Option<&str>,
    before_id: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>, Failure> {
    let before = if before_id == 0 {
        i64::MAX
    } else {
        before_id as i64
    };
    let rows = tx.query(
        "SELECT id, grp, body, attempts, last_error, dead_at_ms FROM dead_letters
         WHERE id < $1 AND ($2 IS NULL OR grp = $2) ORDER BY id DESC LIMIT $3",
        &values![before, group, limit],
    )?;
    rows.iter().map(to_dead_letter).collect()
}

/// Events appended per statement: a batch is cut into chunks of these
/// sizes, so that a few prepared statements serve every batch.
const INSERT_CHUNKS: [usize; 3] = [32, 8, 1];

/// `INSERT ... VALUES ($1, $2), ($3, $4), ...` for each chunk size.
static INSERTS: LazyLock<[String; 3]> = LazyLock::new(|| {
    INSERT_CHUNKS.map(|rows| {
        let values: Vec<String> = (0..rows)
            .map(|row| format!("(${}, ${})", 2 * row + 1, 2 * row + 2))
            .collect();
        format!(
            "INSERT INTO events (event_id, body) VALUES {}
             ON CONFLICT (event_id) DO NOTHING",
            values.join(", ")
        )
    })
});

/// The statement for the next chunk of `remaining` events, and its size.
fn insert_statement(remaining: usize) -> (&'static str, usize) {
    let index = INSERT_CHUNKS
        .iter()
        .position(|&rows| rows <= remaining)
        .unwrap_or(INSERT_CHUNKS.len() - 1);
    (INSERTS[index].as_str(), INSERT_CHUNKS[index])
}

/// Appends `chunk` in one statement. Rows get offsets in the order they are
/// listed; an event id already stored, or listed earlier in the chunk, is
/// a duplicate.
///
/// The offsets come from the rowid of the last row inserted: when no row
/// conflicts, the one writer numbers a statement's rows one after another,
/// above every offset before. (A conflicting row still uses up an offset,
/// so a chunk with duplicates asks the table.) `RETURNING` would name them
/// too, but SQLite gathers its rows in a temporary table per statement,
/// which cost more than the insert.
fn insert(tx: &mut dyn Tx, sql: &str, chunk: &[Arc<Envelope>]) -> Result<Vec<Appended>, Failure> {
    let params: Vec<Value> = chunk
        .iter()
        .flat_map(|event| [Value::from(&event.event_id), Value::from(event.encode_to_vec())])
        .collect();
    let inserted = tx.execute(sql, &params)? as usize;
    if inserted == 0 {
        return Ok(vec![Appended::Duplicate; chunk.len()]);
    }
    if inserted == chunk.len() {
        let last = tx
            .last_rowid()
            .ok_or_else(|| StoreError::Sql("the event log needs rowids".into()))?;
        let first = last - inserted as i64 + 1;
        return Ok((first..=last)
            .map(|offset| Appended::New(offset as Offset))
            .collect());
    }
    // Some were duplicates (a publish repeated after a reconnect): the new
    // rows are the `inserted` highest offsets among the listed ids.
    let mut params: Vec<Value> = vec![(inserted as i64).into()];
    params.extend(chunk.iter().map(|event| Value::from(&event.event_id)));
    let placeholders: Vec<String> = (2..=params.len()).map(|n| format!("${n}")).collect();
    let stored = tx.query(
        &format!(
            "SELECT event_id, offset FROM events WHERE event_id IN ({}) ORDER BY offset DESC LIMIT $1",
            placeholders.join(", ")
        ),
        &params,
    )?;
    let mut offsets = HashMap::with_capacity(stored.len());
    for row in stored {
        offsets.insert(row.string(0)?, row.int(1)? as Offset);
    }
    Ok(chunk
        .iter()
        .map(|event| match offsets.remove(&event.event_id) {
            Some(offset) => Appended::New(offset),
            None => Appended::Duplicate,
        })
        .collect())
}

impl EventLog for SqliteLog {
    fn append_staged(&self, events: Vec<Arc<Envelope>>) -> BoxFuture<'_, Result<Appending, LogError>> {
        Box::pin(async move {
            let (outcomes, synced) = self
                .store
                .write_staged(move |tx| {
                    let mut appended = Vec::with_capacity(events.len());
                    let mut rest = &events[..];
                    while !rest.is_empty() {
                        let (sql, rows) = insert_statement(rest.len());
                        let (chunk, tail) = rest.split_at(rows);
                        appended.extend(insert(tx, sql, chunk)?);
                        rest = tail;
                    }
                    Ok::<_, Failure>(appended)
                })
                .await
                .map_err(|f| f.0)?;
            Ok(Appending {
                outcomes,
                durable: Box::pin(async move { synced.durable().await.map_err(storage) }),
            })
        })
    }

    fn read(&self, from: Offset, limit: usize) -> BoxFuture<'_, Result<Vec<StoredEvent>, LogError>> {
        Box::pin(async move {
            self.store
                .read(move |tx| {
                    let rows = tx.query(
                        "SELECT offset, body FROM events WHERE offset >= $1 ORDER BY offset LIMIT $2",
                        &values![from, limit],
                    )?;
                    rows.iter()
                        .map(|row| {
                            let offset = row.int(0)? as Offset;
                            Ok(StoredEvent {
                                offset,
                                envelope: decode(offset, row.blob(1)?)?,
                            })
                        })
                        .collect::<Result<Vec<_>, Failure>>()
                })
                .await
                .map_err(|f| f.0)
        })
    }

    /// Deferred: a cursor lost to a machine crash only makes the router
    /// deliver again what the group acked (consumers dedupe), so saves ride
    /// on the fsync of the next append instead of making their own.
    fn save_cursors(&self, cursors: Vec<(String, Offset)>) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            self.store
                .write_deferred(move |tx| {
                    for (group, offset) in &cursors {
                        tx.execute(
                            "INSERT INTO cursors (grp, next_offset) VALUES ($1, $2)
                             ON CONFLICT (grp) DO UPDATE SET next_offset = excluded.next_offset",
                            &values![group, *offset],
                        )?;
                    }
                    Ok::<_, Failure>(())
                })
                .await
                .map(|((), _synced)| ())
                .map_err(|f| f.0)
        })
    }

    fn load_cursors(&self) -> BoxFuture<'_, Result<Vec<(String, Offset)>, LogError>> {
        Box::pin(async move {
            self.store
                .read(|tx| {
                    let rows = tx.query("SELECT grp, next_offset FROM cursors", &[])?;
                    rows.iter()
                        .map(|row| Ok((row.string(0)?, row.int(1)? as Offset)))
                        .collect::<Result<Vec<_>, Failure>>()
                })
                .await
                .map_err(|f| f.0)
        })
    }

    /// Deferred, like the cursors it follows (and a commit that survives
    /// the machine means every one before it did too).
    fn truncate(&self, offset: Offset) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            self.store
                .write_deferred(move |tx| {
                    tx.execute("DELETE FROM events WHERE offset < $1", &values![offset])?;
                    Ok::<_, Failure>(())
                })
                .await
                .map(|((), _synced)| ())
                .map_err(|f| f.0)
        })
    }
}

impl DeadLetterStore for SqliteLog {
    fn put_dead_letter(
        &self,
        group: String,
        envelope: Arc<Envelope>,
        attempts: u32,
        last_error: String,
    ) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            self.store
                .write(move |tx| {
                    let row = tx.query_opt(
                        "INSERT INTO dead_letters (grp, body, attempts, last_error, dead_at_ms)
                         VALUES ($1, $2, $3, $4, $5) RETURNING id",
                        &values![
                            &group,
                            envelope.encode_to_vec(),
                            attempts,
                            &last_error,
                            millis(SystemTime::now())
                        ],
                    )?;
                    let id = row
                        .ok_or_else(|| Failure(storage("the insert returned no id")))?
                        .int(0)?;
                    Ok::<_, Failure>(id as u64)
                })
                .await
                .map_err(|f| f.0)
        })
    }

    fn list_dead_letters(
        &self,
        group: Option<String>,
        before_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, LogError>> {
        Box::pin(async move {
            self.store
                .read(move |tx| list_dead(tx, group.as_deref(), before_id, limit))
                .await
                .map_err(|f| f.0)
        })
    }

    fn get_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<Option<DeadLetter>, LogError>> {
        Box::pin(async move {
            self.store
                .read(move |tx| {
                    let row = tx.query_opt(
                        "SELECT id, grp, body, attempts, last_error, dead_at_ms
                         FROM dead_letters WHERE id = $1",
                        &values![id],
                    )?;
                    row.as_ref().map(to_dead_letter).transpose()
                })
                .await
                .map_err(|f| f.0)
        })
    }

    fn delete_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<bool, LogError>> {
        Box::pin(async move {
            self.store
                .write(move |tx| {
                    let deleted = tx.execute("DELETE FROM dead_letters WHERE id = $1", &values![id])?;
                    Ok::<_, Failure>(deleted == 1)
                })
                .await
                .map_err(|f| f.0)
        })
    }
}

#[cfg(test)]
mod tests {
    use sagamesh_log::conformance;

    use super::*;

    fn open() -> (tempfile::TempDir, SqliteLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("router.db"), Durability::Machine).unwrap();
        (dir, log)
    }

    #[tokio::test]
    async fn append_read_dedupe() {
        let (_dir, log) = open();
        conformance::append_read_dedupe(&log).await;
    }

    #[tokio::test]
    async fn a_large_batch_keeps_its_order_and_dedupes_within_itself() {
        use conformance::event;
        let (_dir, log) = open();
        let stored = event("stored");
        log.append(vec![stored.clone()]).await.unwrap();
        // 45 events: chunks of 32, 8 and 1, with repeats inside the first
        // chunk, across chunks, and of an event stored before.
        let fresh: Vec<_> = (0..40).map(|i| event(&format!("tx-{i}"))).collect();
        let mut batch = fresh.clone();
        batch.insert(5, fresh[2].clone());
        batch.insert(35, fresh[10].clone());
        batch.insert(20, stored.clone());
        batch.extend([fresh[39].clone(), event("last")]);
        let outcomes = log.append(batch.clone()).await.unwrap();
        let mut seen = std::collections::HashSet::from([stored.event_id.clone()]);
        let mut last = 0;
        for (event, outcome) in batch.iter().zip(&outcomes) {
            if seen.insert(event.event_id.clone()) {
                let Appended::New(offset) = *outcome else {
                    panic!("{} is new: {outcome:?}", event.transaction_id)
                };
                assert!(offset > last, "offsets follow the batch's order");
                last = offset;
            } else {
                assert_eq!(
                    *outcome,
                    Appended::Duplicate,
                    "{} was seen before",
                    event.transaction_id
                );
            }
        }
        let read = log.read(0, 100).await.unwrap();
        let ids: Vec<_> = read.iter().map(|e| e.envelope.transaction_id.clone()).collect();
        let mut expected = vec!["stored".to_owned()];
        expected.extend((0..40).map(|i| format!("tx-{i}")));
        expected.push("last".to_owned());
        assert_eq!(ids, expected);
        // Each offset handed back is where the event was stored.
        let stored_at: std::collections::HashMap<_, _> = read
            .iter()
            .map(|e| (e.envelope.event_id.clone(), e.offset))
            .collect();
        for (event, outcome) in batch.iter().zip(&outcomes) {
            if let Appended::New(offset) = outcome {
                assert_eq!(
                    Some(offset),
                    stored_at.get(&event.event_id),
                    "{}",
                    event.transaction_id
                );
            }
        }
    }

    #[tokio::test]
    async fn cursors_and_truncate() {
        let (_dir, log) = open();
        conformance::cursors_and_truncate(&log).await;
    }

    #[tokio::test]
    async fn dead_letters() {
        let (_dir, log) = open();
        conformance::dead_letters(&log).await;
    }

    #[tokio::test]
    async fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.db");
        {
            let log = SqliteLog::open(&path, Durability::Machine).unwrap();
            conformance::append_read_dedupe(&log).await;
        }
        let log = SqliteLog::open(&path, Durability::Machine).unwrap();
        assert_eq!(log.read(0, 10).await.unwrap().len(), 3);
    }
}
