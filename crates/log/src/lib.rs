//! The router's durable event log, as a trait, so the embedded SQLite log and
//! (later) NATS JetStream can stand behind the same router.
//!
//! The router numbers events itself (a [`Sequencer`]), so it can deliver an
//! event before the log has even committed it; the log stores what it is
//! given. The contract every backend keeps, checked by [`conformance`]:
//! - an `append` that returned is durable and readable in offset order; an
//!   `append_staged` that returned survives the process, and once its
//!   `Durable` resolved, the machine too;
//! - an event whose id the log holds already is not stored again;
//! - [`EventLog::tail`] names an offset above every offset ever appended
//!   and every saved cursor, so offsets are never reused for anything the
//!   log or a cursor remembers;
//! - a cursor saved for a group is the offset below which that group has
//!   acked everything; it survives a restart;
//! - a dead letter stays until it is deleted.

pub mod conformance;
mod sequencer;

pub use sequencer::Sequencer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use sagamesh_proto::v1::Envelope;

/// A position in the log.
pub type Offset = u64;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log storage failed: {0}")]
    Storage(String),
    #[error("event log holds a corrupt record at offset {offset}: {reason}")]
    Corrupt { offset: Offset, reason: String },
}

/// What happened to one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New(Offset),
    Duplicate,
}

/// An event read back from the log.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub offset: Offset,
    pub envelope: Arc<Envelope>,
}

/// An event that one group could not process.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: u64,
    pub group: String,
    pub envelope: Arc<Envelope>,
    pub attempts: u32,
    pub last_error: String,
    pub dead_at: SystemTime,
}

/// Resolves once an append survives a crash of the machine.
pub type Durable = BoxFuture<'static, Result<(), LogError>>;

/// Where a router's [`Sequencer`] starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tail {
    /// Above every offset appended so far and every saved cursor.
    pub next_offset: Offset,
    /// The ids of the latest events stored, oldest first.
    pub recent_ids: Vec<String>,
}

pub trait EventLog: DeadLetterStore {
    /// Where appends go on from, with the ids of the latest `recent` events.
    fn tail(&self, recent: usize) -> BoxFuture<'_, Result<Tail, LogError>>;

    /// Stores the events at their offsets, which the caller's [`Sequencer`]
    /// gave them (growing, and above every earlier append's), skipping any
    /// whose id is stored already. Returns once they survive the process,
    /// before they are necessarily durable (see [`Durable`]).
    fn append_staged(&self, events: Vec<StoredEvent>) -> BoxFuture<'_, Result<Durable, LogError>>;

    /// Like [`EventLog::append_staged`], but returns once durable.
    fn append(&self, events: Vec<StoredEvent>) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move { self.append_staged(events).await?.await })
    }

    /// Up to `limit` events with offsets at or above `from`, in order.
    fn read(&self, from: Offset, limit: usize) -> BoxFuture<'_, Result<Vec<StoredEvent>, LogError>>;

    /// Saves, for each group, the offset below which it acked everything.
    fn save_cursors(&self, cursors: Vec<(String, Offset)>) -> BoxFuture<'_, Result<(), LogError>>;

    /// The saved cursors.
    fn load_cursors(&self) -> BoxFuture<'_, Result<Vec<(String, Offset)>, LogError>>;

    /// Forgets the events below `offset` (every group has acked them).
    fn truncate(&self, offset: Offset) -> BoxFuture<'_, Result<(), LogError>>;
}

/// Where events that a group could not process are kept until someone
/// replays or discards them. The embedded log keeps them in its own file;
/// on NATS they live in a JetStream stream of their own.
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores a dead letter; returns its id.
    fn put_dead_letter(
        &self,
        group: String,
        envelope: Arc<Envelope>,
        attempts: u32,
        last_error: String,
    ) -> BoxFuture<'_, Result<u64, LogError>>;

    /// Dead letters, newest first, of one group or all, with ids below
    /// `before_id` (0 for no bound).
    fn list_dead_letters(
        &self,
        group: Option<String>,
        before_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, LogError>>;

    fn get_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<Option<DeadLetter>, LogError>>;

    /// Deletes a dead letter; false when there was none with that id.
    fn delete_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<bool, LogError>>;
}
