//! The transactional outbox: events written with the business change, then
//! relayed to the router.
//!
//! Each row carries its writer (the store connection that wrote it): an
//! instance's relay publishes its own connections' rows, each connection's
//! in `seq` order, which is their commit order. Where instances
//! share a database, a relay also sweeps up rows another writer left behind
//! for long (an instance that died before relaying them); publishing a row
//! twice is harmless, since the router dedupes by event id.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sagamesh_proto::v1::Envelope;
use sagamesh_store::{Row, Store, StoreError, Tx, values};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::connection::{ClientError, Publisher};

/// The outbox table, to add to a service's migrations.
pub const OUTBOX_MIGRATION: &str = "
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        body BLOB NOT NULL
    )";

/// The writer of each outbox row and when it was written, to add to a
/// service's SQLite migrations after [`OUTBOX_MIGRATION`]. (On SQLite one
/// instance writes, so the writer is always empty.)
pub const OUTBOX_WRITER_MIGRATION: &str = "
    ALTER TABLE outbox ADD COLUMN writer TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN created_ms INTEGER NOT NULL DEFAULT 0";

/// The outbox table on PostgreSQL: each row defaults to its writer
/// connection's `sagamesh.writer` and to the time it was written.
pub const OUTBOX_MIGRATION_POSTGRES: &str = "
    CREATE TABLE outbox (
        seq BIGSERIAL PRIMARY KEY,
        body BYTEA NOT NULL,
        writer TEXT NOT NULL DEFAULT current_setting('sagamesh.writer', true),
        created_ms BIGINT NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint
    );
    CREATE INDEX outbox_by_writer ON outbox (writer, seq)";

/// Most events relayed in one publish.
const RELAY_BATCH: usize = 500;
/// How often the relay looks even when nobody nudged it (after a restart, or
/// a nudge lost to a crash between commit and nudge).
const RELAY_POLL: Duration = Duration::from_millis(200);
const RELAY_RETRY: Duration = Duration::from_millis(100);

/// Adds an event to the outbox, inside the caller's transaction.
pub fn push_outbox(tx: &mut dyn Tx, event: &Envelope) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO outbox (body) VALUES ($1)",
        &values![event.encode_to_vec()],
    )?;
    Ok(())
}

/// Publishes what the outbox holds, oldest first, one batch at a time (so
/// the router sees a service's events in the order they were written).
#[derive(Clone)]
pub struct OutboxRelay {
    nudge: Arc<Notify>,
}

impl Default for OutboxRelay {
    fn default() -> Self {
        OutboxRelay::new()
    }
}

impl OutboxRelay {
    /// A relay that can be nudged now and started once a publisher exists.
    pub fn new() -> OutboxRelay {
        OutboxRelay {
            nudge: Arc::new(Notify::new()),
        }
    }

    /// Starts relaying `store`'s outbox through `publisher` until `stop`;
    /// then it relays what is left and drops the publisher.
    pub fn start(
        &self,
        store: Store,
        publisher: Publisher,
        tasks: &tokio_util::task::TaskTracker,
        stop: CancellationToken,
    ) {
        tasks.spawn(relay(store, publisher, self.nudge.clone(), stop));
    }

    /// Tells the relay that new events were committed.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}

struct RelayError(String);

impl From<StoreError> for RelayError {
    fn from(e: StoreError) -> Self {
        RelayError(e.to_string())
    }
}

/// The relay's progress: what the router confirmed, and what is deleted.
/// Deletes trail confirmations and are batched: a delete that is lost in a
/// crash only makes the relay publish those events again, which the router
/// dedupes, so they need not cost an fsync each on the hot path.
struct Progress {
    /// The writer connection whose rows these are.
    writer: String,
    published_through: i64,
    deleted_through: i64,
}

/// How long confirmed events may wait before their rows are deleted.
const DELETE_EVERY: Duration = Duration::from_millis(250);
/// How often a relay on a shared database looks for rows left behind.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How old a row of another writer must be to count as left behind.
const LEFT_BEHIND_AFTER: Duration = Duration::from_secs(5);

async fn relay(store: Store, publisher: Publisher, nudge: Arc<Notify>, stop: CancellationToken) {
    let mut progress: Vec<Progress> = store
        .writers()
        .into_iter()
        .map(|writer| Progress {
            writer,
            published_through: 0,
            deleted_through: 0,
        })
        .collect();
    let mut delete_timer = tokio::time::interval(DELETE_EVERY);
    delete_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep_timer = tokio::time::interval(SWEEP_EVERY);
    sweep_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match relay_batches(&store, &publisher, &mut progress).await {
            // A full batch: more may be waiting.
            Ok(n) if n == RELAY_BATCH => continue,
            Ok(_) => {
                tokio::select! {
                    _ = nudge.notified() => {}
                    _ = tokio::time::sleep(RELAY_POLL) => {}
                    _ = delete_timer.tick() => {
                        for progress in &mut progress {
                            if let Err(e) = delete_confirmed(&store, progress).await {
                                tracing::warn!(error = %e.0, "could not delete relayed outbox rows");
                            }
                        }
                    }
                    _ = sweep_timer.tick(), if store.shared() => {
                        if let Err(e) = sweep_left_behind(&store, &publisher).await {
                            tracing::warn!(error = %e.0, "could not relay rows left behind");
                        }
                    }
                    _ = stop.cancelled() => {
                        // Last passes, so a clean stop leaves an empty outbox.
                        while let Ok(n) = relay_batches(&store, &publisher, &mut progress).await {
                            if n == 0 {
                                break;
                            }
                        }
                        for progress in &mut progress {
                            let _ = delete_confirmed(&store, progress).await;
                        }
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.0, "outbox relay failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RELAY_RETRY) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn delete_confirmed(store: &Store, progress: &mut Progress) -> Result<(), RelayError> {
    if progress.deleted_through >= progress.published_through {
        return Ok(());
    }
    let through = progress.published_through;
    let writer = progress.writer.clone();
    // Deferred: the delete rides on the next fsync that some write asks
    // for, so nothing waits for it to be durable.
    let ((), _durable) = store
        .write_deferred(move |tx| {
            tx.execute(
                "DELETE FROM outbox WHERE writer = $1 AND seq <= $2",
                &values![&writer, through],
            )?;
            Ok::<_, RelayError>(())
        })
        .await?;
    progress.deleted_through = through;
    Ok(())
}

/// Publishes the next batch of each writer connection; returns the largest.
async fn relay_batches(
    store: &Store,
    publisher: &Publisher,
    progress: &mut [Progress],
) -> Result<usize, RelayError> {
    let mut largest = 0;
    for progress in progress {
        largest = largest.max(relay_batch(store, publisher, progress).await?);
    }
    Ok(largest)
}

/// Publishes a writer's next batch after what was confirmed; returns its
/// size.
async fn relay_batch(
    store: &Store,
    publisher: &Publisher,
    progress: &mut Progress,
) -> Result<usize, RelayError> {
    let pending = Pending::After {
        writer: progress.writer.clone(),
        after: progress.published_through,
    };
    let handled = publish_pending(store, publisher, &pending).await?;
    let Some(&last) = handled.last() else {
        return Ok(0);
    };
    let count = handled.len();
    progress.published_through = last;
    if progress.published_through - progress.deleted_through > 4 * RELAY_BATCH as i64 {
        delete_confirmed(store, progress).await?;
    }
    Ok(count)
}

/// Publishes, then deletes, rows that another writer left in the outbox for
/// longer than [`LEFT_BEHIND_AFTER`] (its instance died before relaying
/// them); returns how many.
async fn sweep_left_behind(store: &Store, publisher: &Publisher) -> Result<usize, RelayError> {
    // This instance's connections share a prefix: `<instance>-<n>`.
    let mine = store
        .writers()
        .first()
        .and_then(|w| w.rsplit_once('-').map(|(instance, _)| format!("{instance}-%")))
        .unwrap_or_default();
    let before_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(LEFT_BEHIND_AFTER)
        .as_millis() as i64;
    let pending = Pending::LeftBehind { mine, before_ms };
    let seqs = publish_pending(store, publisher, &pending).await?;
    if seqs.is_empty() {
        return Ok(0);
    }
    tracing::info!(
        rows = seqs.len(),
        "relayed outbox rows another instance left behind"
    );
    let count = seqs.len();
    store
        .write(move |tx| {
            for &seq in &seqs {
                tx.execute("DELETE FROM outbox WHERE seq = $1", &values![seq])?;
            }
            Ok::<_, RelayError>(())
        })
        .await?;
    Ok(count)
}

/// Which outbox rows a relay publishes next.
#[derive(Clone)]
enum Pending {
    /// One writer connection's, after `seq` `after`, in order.
    After { writer: String, after: i64 },
    /// Other writers' rows written before `before_ms`, except this
    /// instance's connections (`writer NOT LIKE mine`).
    LeftBehind { mine: String, before_ms: i64 },
}

/// The next batch of `pending` rows that survive the machine: an event
/// must not outlive the business change committed with it.
async fn pending_rows(store: &Store, pending: &Pending) -> Result<Vec<(i64, Envelope)>, RelayError> {
    let pending = pending.clone();
    store
        .read_durable(move |tx| {
            let rows = match &pending {
                Pending::After { writer, after } => tx.query(
                    "SELECT seq, body FROM outbox WHERE writer = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &values![writer, *after, RELAY_BATCH],
                )?,
                Pending::LeftBehind { mine, before_ms } => tx.query(
                    "SELECT seq, body FROM outbox WHERE writer NOT LIKE $1 AND created_ms < $2 ORDER BY seq LIMIT $3",
                    &values![mine, *before_ms, RELAY_BATCH],
                )?,
            };
            decode_rows(&rows)
        })
        .await
}

/// Publishes the next batch of `pending` rows in one publish; returns the
/// `seq`s it dealt with, in order.
///
/// When the router refuses the events themselves, which publishing them
/// again cannot change, the batch goes out again one event at a time, and
/// an event refused on its own is set aside: logged at error level and
/// passed over (its row is deleted with the rest), as an undecodable row
/// is, so that one bad event does not hold back every event behind it.
async fn publish_pending(
    store: &Store,
    publisher: &Publisher,
    pending: &Pending,
) -> Result<Vec<i64>, RelayError> {
    let rows = pending_rows(store, pending).await?;
    let seqs: Vec<i64> = rows.iter().map(|(seq, _)| *seq).collect();
    if rows.is_empty() {
        return Ok(seqs);
    }
    match publisher
        .publish(rows.into_iter().map(|(_, e)| e).collect())
        .await
    {
        Ok(_) => Ok(seqs),
        Err(ClientError::PublishRefused(reason)) => {
            tracing::warn!(
                events = seqs.len(),
                %reason,
                "the router refused a batch of outbox events; publishing them one at a time"
            );
            publish_one_at_a_time(store, publisher, pending, &seqs).await
        }
        Err(e) => Err(RelayError(e.to_string())),
    }
}

/// Publishes the rows `seqs` of `pending` one by one (read again: the
/// batch's events went to the router); returns the `seq`s dealt with, up
/// to a failure that a retry may cure.
async fn publish_one_at_a_time(
    store: &Store,
    publisher: &Publisher,
    pending: &Pending,
    seqs: &[i64],
) -> Result<Vec<i64>, RelayError> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Ok(Vec::new());
    };
    let rows = pending_rows(store, pending).await?;
    let mut handled = Vec::with_capacity(seqs.len());
    for (seq, event) in rows.into_iter().filter(|(seq, _)| (first..=last).contains(seq)) {
        let (event_id, tx_id, kind) = (
            event.event_id.clone(),
            event.transaction_id.clone(),
            event.event_type(),
        );
        match publisher.publish(vec![event]).await {
            Ok(_) => {}
            Err(ClientError::PublishRefused(reason)) => tracing::error!(
                seq,
                %event_id,
                %tx_id,
                event = kind.as_str_name(),
                %reason,
                "the router refused an outbox event; it is set aside, and its saga waits for its deadline"
            ),
            Err(e) if handled.is_empty() => return Err(RelayError(e.to_string())),
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay failed; retrying");
                break;
            }
        }
        handled.push(seq);
    }
    Ok(handled)
}

/// The events of `SELECT seq, body` outbox rows, skipping (and logging) a
/// row that does not decode.
fn decode_rows(rows: &[Row]) -> Result<Vec<(i64, Envelope)>, RelayError> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let seq = row.int(0)?;
        match Envelope::decode(row.blob(1)?) {
            Ok(event) => events.push((seq, event)),
            Err(e) => tracing::error!(seq, error = %e, "skipping an undecodable outbox row"),
        }
    }
    Ok(events)
}
