//! Which of a SQLite store's commits are synced, for reads that pass on
//! what they see.
//!
//! Readers see a commit before its fsync (see `sqlite`), so a read can
//! return rows that a power cut would still take back. That is fine for
//! showing state, not for passing it on: the outbox relay must not publish
//! an event whose row, and the business change committed with it, may yet
//! be lost. So the writer numbers its batches and says how far they are
//! synced; a read that must see only durable rows notes the last batch
//! that had begun to commit and waits until the syncs reach it.
//!
//! The number is taken just before `COMMIT`, and read after the read's own
//! transaction began: a read that sees a batch's rows began after that
//! `COMMIT` ended (SQLite orders the two with its own locks and memory
//! barriers), so it finds the batch's number taken. A failed fsync is
//! final: Linux may drop the pages it could not write, so no later sync
//! proves them durable, and every durable read from then on fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::StoreError;

/// A new store's pair: the writer's [`Marker`] and the readers' [`Watermark`].
pub(crate) fn marks() -> (Marker, Watermark) {
    let begun = Arc::new(AtomicU64::new(0));
    let (synced, watched) = watch::channel(Synced::Through(0));
    (
        Marker {
            begun: begun.clone(),
            synced: Arc::new(synced),
        },
        Watermark {
            begun,
            synced: watched,
        },
    )
}

/// The writer's side, shared with its syncer.
#[derive(Clone)]
pub(crate) struct Marker {
    begun: Arc<AtomicU64>,
    synced: Arc<watch::Sender<Synced>>,
}

/// How far the batches are synced.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Synced {
    /// Every batch up to this number.
    Through(u64),
    /// An fsync failed: nothing from then on is known to be durable.
    Failed,
}

impl Marker {
    /// Numbers the next batch. Called just before the batch's `COMMIT`, so
    /// that a read that sees its rows finds its number already taken.
    pub(crate) fn begin_batch(&self) {
        self.begun.fetch_add(1, Ordering::SeqCst);
    }

    /// The number of the last batch that began to commit.
    pub(crate) fn last_begun(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    /// Says that every batch up to `batch` is synced.
    pub(crate) fn synced_through(&self, batch: u64) {
        self.synced.send_if_modified(|synced| match *synced {
            Synced::Through(through) if batch > through => {
                *synced = Synced::Through(batch);
                true
            }
            _ => false,
        });
    }

    /// The last batch known synced (after a failed sync, every batch: no
    /// sync is worth waiting for any more).
    pub(crate) fn synced_now(&self) -> u64 {
        match *self.synced.borrow() {
            Synced::Through(through) => through,
            Synced::Failed => u64::MAX,
        }
    }

    /// Whether every batch before `batch` is synced (never after a failed
    /// sync).
    pub(crate) fn synced_before(&self, batch: u64) -> bool {
        matches!(*self.synced.borrow(), Synced::Through(through) if through.saturating_add(1) >= batch)
    }

    /// Whether an fsync failed.
    pub(crate) fn has_failed(&self) -> bool {
        *self.synced.borrow() == Synced::Failed
    }

    /// Says that an fsync failed, for good.
    pub(crate) fn sync_failed(&self) {
        self.synced.send_replace(Synced::Failed);
    }
}

/// The readers' side.
#[derive(Clone)]
pub(crate) struct Watermark {
    begun: Arc<AtomicU64>,
    synced: watch::Receiver<Synced>,
}

impl Watermark {
    /// Waits until every batch that had begun to commit is synced. Called
    /// after a read, it returns once whatever the read saw is durable.
    #[cfg(test)]
    pub(crate) async fn covers_reads_so_far(&self) -> Result<(), StoreError> {
        self.covers(self.seen()).await
    }

    /// The last batch that had begun to commit: called after a read, every
    /// batch whose rows it may have seen.
    pub(crate) fn seen(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    /// Whether batch `seen` and every one before it are synced.
    pub(crate) fn is_synced(&self, seen: u64) -> bool {
        matches!(*self.synced.borrow(), Synced::Through(through) if through >= seen)
    }

    /// Waits until batch `seen` and every one before it are synced.
    pub(crate) async fn covers(&self, seen: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.clone();
        let reached = synced
            .wait_for(|synced| match *synced {
                Synced::Through(through) => through >= seen,
                Synced::Failed => true,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        match *reached {
            Synced::Through(_) => Ok(()),
            Synced::Failed => Err(StoreError::Commit(
                "an fsync of the store failed, so what it holds may not be durable; restart the service"
                    .to_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::{Context, Waker};

    use super::*;

    fn poll_once(future: std::pin::Pin<&mut impl Future<Output = Result<(), StoreError>>>) -> bool {
        future.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[tokio::test]
    async fn a_read_waits_for_the_sync_of_every_batch_that_began_before_it_ended() {
        let (marker, watermark) = marks();
        assert!(
            watermark.covers_reads_so_far().await.is_ok(),
            "nothing committed yet"
        );

        marker.begin_batch();
        let first = marker.last_begun();
        marker.begin_batch();
        let second = marker.last_begun();
        let mut waiting = pin!(watermark.covers_reads_so_far());
        assert!(!poll_once(waiting.as_mut()), "two batches committed, none synced");
        marker.synced_through(first);
        assert!(!poll_once(waiting.as_mut()), "the second batch is not synced yet");
        marker.synced_through(second);
        assert!(poll_once(waiting.as_mut()));

        // Marks only move forward: a late report of an older sync changes nothing.
        marker.synced_through(first);
        assert!(watermark.covers_reads_so_far().await.is_ok());
    }

    #[tokio::test]
    async fn after_a_failed_sync_no_read_is_durable_even_when_a_later_sync_works() {
        let (marker, watermark) = marks();
        marker.begin_batch();
        let waiting = watermark.covers_reads_so_far();
        marker.sync_failed();
        assert!(matches!(waiting.await, Err(StoreError::Commit(_))));
        marker.begin_batch();
        marker.synced_through(marker.last_begun());
        assert!(matches!(
            watermark.covers_reads_so_far().await,
            Err(StoreError::Commit(_))
        ));
    }

    #[tokio::test]
    async fn a_read_waiting_on_a_store_that_closed_fails() {
        let (marker, watermark) = marks();
        marker.begin_batch();
        let waiting = watermark.covers_reads_so_far();
        drop(marker);
        assert!(matches!(waiting.await, Err(StoreError::Closed)));
    }
}
