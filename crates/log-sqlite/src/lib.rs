//! The embedded event log: the router's log in one SQLite file.
//!
//! Appends go through the shared group-commit writer of `sagamesh-store`,
//! so concurrent publishes share one fsync, and are staged: readable as soon
//! as committed, durable once the writer's fsync that follows is done. The
//! `events` table's key is the offset the router gave the event; being
//! AUTOINCREMENT, the table remembers the highest one even after
//! truncation, which is where [`EventLog::tail`] goes on from. The unique
//! `event_id` column keeps an event from being stored twice. A batch is
//! inserted with one statement per chunk of up to 32 events.

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sagamesh_log::{
    BoxFuture, DeadLetter, DeadLetterStore, Durable, EventLog, LogError, Offset, StoredEvent, Tail,
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

/// `INSERT ... VALUES ($1, $2, $3), ($4, $5, $6), ...` for each chunk size.
static INSERTS: LazyLock<[String; 3]> = LazyLock::new(|| {
    INSERT_CHUNKS.map(|rows| {
        let values: Vec<String> = (0..rows)
            .map(|row| format!("(${}, ${}, ${})", 3 * row + 1, 3 * row + 2, 3 * row + 3))
            .collect();
        format!(
            "INSERT INTO events (offset, event_id, body) VALUES {}
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

/// Stores `chunk` in one statement; an event id stored already (or listed
/// earlier in the chunk) is skipped.
fn insert(tx: &mut dyn Tx, sql: &str, chunk: &[StoredEvent]) -> Result<(), Failure> {
    let params: Vec<Value> = chunk
        .iter()
        .flat_map(|event| {
            [
                Value::from(event.offset),
                Value::from(&event.envelope.event_id),
                Value::from(event.envelope.encode_to_vec()),
            ]
        })
        .collect();
    tx.execute(sql, &params)?;
    Ok(())
}

impl EventLog for SqliteLog {
    fn tail(&self, recent: usize) -> BoxFuture<'_, Result<Tail, LogError>> {
        Box::pin(async move {
            self.store
                .read(move |tx| {
                    // The highest offset ever stored, and the highest
                    // cursor; either is NULL in a new log.
                    let row = tx
                        .query_opt(
                            "SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'events'),
                                    (SELECT max(next_offset) FROM cursors)",
                            &[],
                        )?
                        .ok_or_else(|| Failure(storage("the tail query returned no row")))?;
                    let appended = row.opt_int(0)?.unwrap_or(0) as Offset;
                    let passed = row.opt_int(1)?.unwrap_or(0) as Offset;
                    let rows = tx.query(
                        "SELECT event_id FROM events ORDER BY offset DESC LIMIT $1",
                        &values![recent],
                    )?;
                    let mut recent_ids = rows
                        .iter()
                        .map(|row| row.string(0))
                        .collect::<Result<Vec<_>, _>>()?;
                    recent_ids.reverse();
                    Ok::<_, Failure>(Tail {
                        next_offset: (appended + 1).max(passed),
                        recent_ids,
                    })
                })
                .await
                .map_err(|f| f.0)
        })
    }

    fn append_staged(&self, events: Vec<StoredEvent>) -> BoxFuture<'_, Result<Durable, LogError>> {
        Box::pin(async move {
            let ((), synced) = self
                .store
                .write_staged(move |tx| {
                    let mut rest = &events[..];
                    while !rest.is_empty() {
                        let (sql, rows) = insert_statement(rest.len());
                        let (chunk, tail) = rest.split_at(rows);
                        insert(tx, sql, chunk)?;
                        rest = tail;
                    }
                    Ok::<_, Failure>(())
                })
                .await
                .map_err(|f| f.0)?;
            Ok(Box::pin(async move { synced.durable().await.map_err(storage) }) as Durable)
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
    async fn a_large_batch_keeps_its_order_and_stores_each_id_once() {
        use conformance::{event, numbered};
        let (_dir, log) = open();
        let stored = event("stored");
        log.append(numbered(1, std::slice::from_ref(&stored)))
            .await
            .unwrap();
        // 45 events: chunks of 32, 8 and 1, with repeats inside the first
        // chunk, across chunks, and of an event stored before.
        let fresh: Vec<_> = (0..40).map(|i| event(&format!("tx-{i}"))).collect();
        let mut batch = fresh.clone();
        batch.insert(5, fresh[2].clone());
        batch.insert(35, fresh[10].clone());
        batch.insert(20, stored.clone());
        batch.extend([fresh[39].clone(), event("last")]);
        let appended = numbered(2, &batch);
        log.append(appended.clone()).await.unwrap();
        let read = log.read(0, 100).await.unwrap();
        let ids: Vec<_> = read.iter().map(|e| e.envelope.transaction_id.clone()).collect();
        let mut expected = vec!["stored".to_owned()];
        expected.extend((0..40).map(|i| format!("tx-{i}")));
        expected.push("last".to_owned());
        assert_eq!(ids, expected);
        // Each event is stored at the offset of its first listing.
        let mut first_offsets = std::collections::HashMap::from([(stored.event_id.clone(), 1)]);
        for event in &appended {
            first_offsets
                .entry(event.envelope.event_id.clone())
                .or_insert(event.offset);
        }
        for event in &read {
            assert_eq!(
                Some(&event.offset),
                first_offsets.get(&event.envelope.event_id),
                "{}",
                event.envelope.transaction_id
            );
        }
    }

    #[tokio::test]
    async fn tail_of_a_new_log_starts_at_one() {
        let (_dir, log) = open();
        let tail = log.tail(10).await.unwrap();
        assert_eq!(
            tail,
            Tail {
                next_offset: 1,
                recent_ids: vec![]
            }
        );
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
