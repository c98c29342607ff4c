//! The one task that appends to the log, so that publishes from every stream
//! share commits and reach the core in offset order.
//!
//! While one append is being made durable, new publishes queue; the next
//! append takes all of them at once (group commit). Only after the append
//! returned are the publishers answered and the events handed to the core
//! for delivery.

use std::sync::Arc;

use sagamesh_log::{Appended, EventLog, StoredEvent};
use sagamesh_proto::v1::Envelope;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::core::Command;

/// Publishes waiting for the appender. When full, publishers wait.
pub(crate) const APPEND_QUEUE: usize = 4096;
/// Most events in one append; bounds the latency of one commit.
const MAX_EVENTS_PER_APPEND: usize = 4096;

/// The outcome of one publish: (new events, duplicates).
pub(crate) type AppendResult = Result<(u32, u32), String>;

pub(crate) struct Append {
    pub events: Vec<Arc<Envelope>>,
    pub reply: oneshot::Sender<AppendResult>,
}

pub(crate) async fn run(
    log: Arc<dyn EventLog>,
    mut requests: mpsc::Receiver<Append>,
    core: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Append> = Vec::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            first = requests.recv() => match first {
                Some(first) => first,
                None => return,
            },
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
        let events: Vec<Arc<Envelope>> = batch.iter().flat_map(|a| a.events.iter().cloned()).collect();
        match log.append(events.clone()).await {
            Ok(appended) => {
                let stored: Vec<StoredEvent> = events
                    .into_iter()
                    .zip(&appended)
                    .filter_map(|(envelope, outcome)| match outcome {
                        Appended::New(offset) => Some(StoredEvent {
                            offset: *offset,
                            envelope,
                        }),
                        Appended::Duplicate => None,
                    })
                    .collect();
                if !stored.is_empty() && core.send(Command::Appended(stored)).await.is_err() {
                    return;
                }
                let mut outcomes = appended.into_iter();
                for append in batch.drain(..) {
                    let (mut new, mut duplicates) = (0, 0);
                    for outcome in outcomes.by_ref().take(append.events.len()) {
                        match outcome {
                            Appended::New(_) => new += 1,
                            Appended::Duplicate => duplicates += 1,
                        }
                    }
                    let _ = append.reply.send(Ok((new, duplicates)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = count, "event log append failed");
                for append in batch.drain(..) {
                    let _ = append.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}
