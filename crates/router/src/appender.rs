//! The one task that appends to the log, so that publishes from every stream
//! share commits and reach the core in offset order.
//!
//! While one append is being written, new publishes queue; the next append
//! takes all of them at once (group commit).
//!
//! On the embedded log the appender numbers the events itself (a
//! [`Sequencer`]) and hands them to the core for delivery at once, while
//! the log commits them; their publishers are answered only once the
//! append is durable (by the [`confirm`] task, in order). Delivering before
//! the commit and its fsync is safe because a publisher keeps its own
//! durable copy of an event (its outbox) until that answer: if the process
//! or the machine dies in between, the publisher publishes the event again
//! with the same id, and consumers dedupe by id. It takes the router's
//! commit and fsync off the path of every saga step.
//!
//! For the same reason the order of the log's writes matters little: a
//! cursor the core saves may pass an event whose append is still on its
//! way, or failed; a failed append's publishers are told so and publish
//! again, and the log starts its offsets above every saved cursor.

use std::sync::Arc;

use sagamesh_jetstream::JetStream;
use sagamesh_log::{Appended, BoxFuture, EventLog, LogError, Sequencer};
use sagamesh_proto::v1::Envelope;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Backend;
use crate::core::Command;

/// Publishes waiting for the appender. When full, publishers wait.
pub(crate) const APPEND_QUEUE: usize = 4096;
/// Most events in one append; bounds the latency of one commit.
const MAX_EVENTS_PER_APPEND: usize = 4096;
/// How many of the latest event ids the sequencer remembers, to call a
/// repeated publish a duplicate (see [`Sequencer`]).
pub(crate) const RECENT_IDS: usize = 65_536;

/// The outcome of one publish: (new events, duplicates).
pub(crate) type AppendResult = Result<(u32, u32), String>;

pub(crate) struct Append {
    pub events: Vec<Arc<Envelope>>,
    pub reply: oneshot::Sender<AppendResult>,
}

/// Appends committed but not yet answered. When full, the appender waits.
const CONFIRM_QUEUE: usize = 64;

/// The answers to one append's publishers, sent once it is durable.
struct Confirmation {
    durable: BoxFuture<'static, Result<(), LogError>>,
    replies: Vec<(oneshot::Sender<AppendResult>, (u32, u32))>,
}

/// Where the appender writes: the embedded log, numbered by the sequencer
/// that starts from its tail, or JetStream.
pub(crate) enum Target {
    Log(Arc<dyn EventLog>, Sequencer),
    JetStream(JetStream),
}

impl Target {
    pub(crate) async fn of(backend: &Backend) -> Result<Target, LogError> {
        Ok(match backend {
            Backend::Embedded(log) => {
                let tail = log.tail(RECENT_IDS).await?;
                Target::Log(log.clone(), Sequencer::new(tail, RECENT_IDS))
            }
            Backend::JetStream(bus) => Target::JetStream(bus.clone()),
        })
    }
}

pub(crate) async fn run(
    target: Target,
    requests: mpsc::Receiver<Append>,
    core: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    match target {
        Target::Log(log, sequencer) => append_to_log(log, sequencer, requests, core, shutdown).await,
        Target::JetStream(bus) => publish_to_jetstream(bus, requests, shutdown).await,
    }
}

/// Waits for a publish, then takes what else is waiting, up to the batch
/// limit, into `batch`; returns the batch's events in order. `None` once
/// stopped.
async fn next_batch(
    requests: &mut mpsc::Receiver<Append>,
    shutdown: &CancellationToken,
    batch: &mut Vec<Append>,
) -> Option<Vec<Arc<Envelope>>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        first = requests.recv() => first?,
    };
    let mut count = first.events.len();
    batch.push(first);
    while count < MAX_EVENTS_PER_APPEND {
        match requests.try_recv() {
            Ok(next) => {
                count += next.events.len();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    Some(batch.iter().flat_map(|a| a.events.iter().cloned()).collect())
}

/// Answers every publisher of the batch with the failure.
fn fail_batch(batch: &mut Vec<Append>, reason: &str) {
    for append in batch.drain(..) {
        let _ = append.reply.send(Err(reason.to_owned()));
    }
}

/// Answers each publisher of the batch with its share of the outcomes.
fn share_outcomes(
    batch: &mut Vec<Append>,
    outcomes: Vec<Appended>,
) -> Vec<(oneshot::Sender<AppendResult>, (u32, u32))> {
    let mut outcomes = outcomes.into_iter();
    batch
        .drain(..)
        .map(|append| {
            let (mut new, mut duplicates) = (0, 0);
            for outcome in outcomes.by_ref().take(append.events.len()) {
                match outcome {
                    Appended::New(_) => new += 1,
                    Appended::Duplicate => duplicates += 1,
                }
            }
            (append.reply, (new, duplicates))
        })
        .collect()
}

/// On JetStream the stream dedupes and stores; the events reach the core
/// back through the groups' consumers, so the appender only publishes.
async fn publish_to_jetstream(
    bus: JetStream,
    mut requests: mpsc::Receiver<Append>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Append> = Vec::new();
    while let Some(events) = next_batch(&mut requests, &shutdown, &mut batch).await {
        match bus.publish(&events).await {
            Ok(outcomes) => {
                for (reply, counts) in share_outcomes(&mut batch, outcomes) {
                    let _ = reply.send(Ok(counts));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "publishing to JetStream failed");
                fail_batch(&mut batch, &e.to_string());
            }
        }
    }
}

async fn append_to_log(
    log: Arc<dyn EventLog>,
    mut sequencer: Sequencer,
    mut requests: mpsc::Receiver<Append>,
    core: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let (confirmations, pending) = mpsc::channel(CONFIRM_QUEUE);
    tokio::spawn(confirm(pending));
    let mut batch: Vec<Append> = Vec::new();
    while let Some(events) = next_batch(&mut requests, &shutdown, &mut batch).await {
        let (outcomes, new) = sequencer.assign(&events);
        if !new.is_empty() && core.send(Command::Appended(new.clone())).await.is_err() {
            return;
        }
        // A batch of duplicates only still goes through the log, so that
        // its answer waits for the appends it repeats to be durable. The
        // next batch is numbered only once this one is committed: a repeat
        // of an event whose append then failed must not count as stored.
        match log.append_staged(new.clone()).await {
            Ok(durable) => {
                let replies = share_outcomes(&mut batch, outcomes);
                if confirmations
                    .send(Confirmation { durable, replies })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "event log append failed");
                sequencer.forget(&new);
                fail_batch(&mut batch, &e.to_string());
            }
        }
    }
}

/// Answers each append's publishers once it is durable, in append order.
async fn confirm(mut pending: mpsc::Receiver<Confirmation>) {
    while let Some(Confirmation { durable, replies }) = pending.recv().await {
        let outcome = durable.await.map_err(|e| {
            tracing::error!(error = %e, "event log sync failed");
            e.to_string()
        });
        for (reply, counts) in replies {
            let _ = reply.send(outcome.clone().map(|()| counts));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::sync::watch;

    use sagamesh_log::conformance::event;
    use sagamesh_log::{DeadLetter, DeadLetterStore, Durable, Offset, StoredEvent, Tail};
    use sagamesh_log_sqlite::SqliteLog;
    use sagamesh_store::Durability;

    use super::*;

    /// The embedded log, whose appends fail while `failing` is set; an
    /// append that stores events does not become durable while
    /// `syncs_held` is (an empty one does). `committed` counts the appends
    /// committed.
    struct FlakyLog {
        log: SqliteLog,
        failing: AtomicBool,
        syncs_held: watch::Sender<bool>,
        committed: watch::Sender<usize>,
    }

    impl FlakyLog {
        fn open(dir: &std::path::Path) -> FlakyLog {
            FlakyLog {
                log: SqliteLog::open(&dir.join("router.db"), Durability::Machine).unwrap(),
                failing: AtomicBool::new(false),
                syncs_held: watch::channel(false).0,
                committed: watch::channel(0).0,
            }
        }
    }

    impl EventLog for FlakyLog {
        fn tail(&self, recent: usize) -> BoxFuture<'_, Result<Tail, LogError>> {
            self.log.tail(recent)
        }

        fn append_staged(&self, events: Vec<StoredEvent>) -> BoxFuture<'_, Result<Durable, LogError>> {
            if self.failing.load(Ordering::SeqCst) {
                return Box::pin(async { Err(LogError::Storage("the disk is full".into())) });
            }
            let held = (!events.is_empty()).then(|| self.syncs_held.subscribe());
            Box::pin(async move {
                let durable = self.log.append_staged(events).await?;
                self.committed.send_modify(|n| *n += 1);
                Ok(Box::pin(async move {
                    if let Some(mut held) = held {
                        let _ = held.wait_for(|held| !held).await;
                    }
                    durable.await
                }) as Durable)
            })
        }

        fn read(&self, from: Offset, limit: usize) -> BoxFuture<'_, Result<Vec<StoredEvent>, LogError>> {
            self.log.read(from, limit)
        }

        fn save_cursors(&self, cursors: Vec<(String, Offset)>) -> BoxFuture<'_, Result<(), LogError>> {
            self.log.save_cursors(cursors)
        }

        fn load_cursors(&self) -> BoxFuture<'_, Result<Vec<(String, Offset)>, LogError>> {
            self.log.load_cursors()
        }

        fn truncate(&self, offset: Offset) -> BoxFuture<'_, Result<(), LogError>> {
            self.log.truncate(offset)
        }
    }

    impl DeadLetterStore for FlakyLog {
        fn put_dead_letter(
            &self,
            group: String,
            envelope: Arc<Envelope>,
            attempts: u32,
            last_error: String,
        ) -> BoxFuture<'_, Result<u64, LogError>> {
            self.log.put_dead_letter(group, envelope, attempts, last_error)
        }

        fn list_dead_letters(
            &self,
            group: Option<String>,
            before_id: u64,
            limit: usize,
        ) -> BoxFuture<'_, Result<Vec<DeadLetter>, LogError>> {
            self.log.list_dead_letters(group, before_id, limit)
        }

        fn get_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<Option<DeadLetter>, LogError>> {
            self.log.get_dead_letter(id)
        }

        fn delete_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<bool, LogError>> {
            self.log.delete_dead_letter(id)
        }
    }

    async fn publish(appender: &mpsc::Sender<Append>, events: &[Arc<Envelope>]) -> AppendResult {
        let (reply, answer) = oneshot::channel();
        let events = events.to_vec();
        appender.send(Append { events, reply }).await.unwrap();
        answer.await.unwrap()
    }

    /// The offsets of the events the appender handed to the core since the
    /// last look.
    fn handed_over(core: &mut mpsc::Receiver<Command>) -> Vec<(Offset, String)> {
        let mut handed = Vec::new();
        while let Ok(command) = core.try_recv() {
            if let Command::Appended(events) = command {
                handed.extend(
                    events
                        .into_iter()
                        .map(|e| (e.offset, e.envelope.event_id.clone())),
                );
            }
        }
        handed
    }

    #[tokio::test]
    async fn an_append_that_failed_counts_as_new_when_published_again() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(FlakyLog::open(dir.path()));
        flaky.failing.store(true, Ordering::SeqCst);
        let log: Arc<dyn EventLog> = flaky.clone();
        let target = Target::of(&Backend::Embedded(log.clone())).await.unwrap();
        let (appender, requests) = mpsc::channel(4);
        let (core, mut handed) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        tokio::spawn(run(target, requests, core, shutdown.clone()));
        let e = event("tx");
        let id = e.event_id.clone();

        // Delivered at once, then the append fails: the publisher hears so.
        assert!(publish(&appender, std::slice::from_ref(&e)).await.is_err());
        assert_eq!(handed_over(&mut handed), [(1, id.clone())]);

        // Published again, it is new (not a duplicate of what never landed),
        // at a new offset, and stored there.
        flaky.failing.store(false, Ordering::SeqCst);
        assert_eq!(publish(&appender, std::slice::from_ref(&e)).await, Ok((1, 0)));
        assert_eq!(handed_over(&mut handed), [(2, id.clone())]);
        let stored: Vec<_> = log
            .read(0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.offset)
            .collect();
        assert_eq!(stored, [2]);

        // Once stored, a repeat is a duplicate and goes nowhere.
        assert_eq!(publish(&appender, &[e]).await, Ok((0, 1)));
        assert!(handed_over(&mut handed).is_empty());
        shutdown.cancel();
    }

    /// Waits until the log has committed `count` appends in all.
    async fn commits_reach(log: &FlakyLog, count: usize) {
        let mut committed = log.committed.subscribe();
        tokio::time::timeout(Duration::from_secs(10), committed.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| panic!("the log did not commit {count} appends"))
            .unwrap();
    }

    #[tokio::test]
    async fn a_duplicate_is_answered_only_once_its_original_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(FlakyLog::open(dir.path()));
        flaky.syncs_held.send_replace(true);
        let log: Arc<dyn EventLog> = flaky.clone();
        let target = Target::of(&Backend::Embedded(log)).await.unwrap();
        let (appender, requests) = mpsc::channel(4);
        let (core, _handed) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        tokio::spawn(run(target, requests, core, shutdown.clone()));
        let e = event("tx");

        let (reply, mut original) = oneshot::channel();
        let events = vec![e.clone()];
        appender.send(Append { events, reply }).await.unwrap();
        commits_reach(&flaky, 1).await;
        // The repeat is known at once as a duplicate, and goes through the
        // log as an empty append, whose own sync is not held: only the
        // original's can keep its answer waiting.
        let (reply, mut repeat) = oneshot::channel();
        appender
            .send(Append {
                events: vec![e],
                reply,
            })
            .await
            .unwrap();
        commits_reach(&flaky, 2).await;
        assert!(original.try_recv().is_err(), "answered before it was durable");
        assert!(
            repeat.try_recv().is_err(),
            "a repeat answered before its original was durable"
        );

        flaky.syncs_held.send_replace(false);
        assert_eq!(original.await.unwrap(), Ok((1, 0)));
        assert_eq!(repeat.await.unwrap(), Ok((0, 1)));
        shutdown.cancel();
    }
}
