//! Live status for `StreamTransaction`: who is watching which transaction.
//!
//! A watcher subscribes before reading the current state, so no change falls
//! between the read and the subscription. Each transaction with watchers has
//! a broadcast channel; a watcher that falls behind (the channel is full)
//! reads the current state again instead of the missed updates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sagamesh_proto::v1::{EventType, Transaction};
use tokio::sync::broadcast;

/// Updates buffered per transaction for slow watchers.
const UPDATES_PER_WATCHER: usize = 32;

#[derive(Clone, Default)]
pub(crate) struct Watchers {
    channels: Arc<Mutex<HashMap<String, broadcast::Sender<Changed>>>>,
}

/// A transaction's new state and the event that moved it, shared by its
/// watchers (and the coordinator's live view).
#[derive(Clone)]
pub(crate) struct Changed {
    pub(crate) transaction: Arc<Transaction>,
    pub(crate) event: EventType,
}

/// One watcher's subscription; unsubscribes when dropped.
pub(crate) struct Watch {
    pub(crate) updates: broadcast::Receiver<Changed>,
    transaction_id: String,
    watchers: Watchers,
}

impl Watchers {
    pub(crate) fn watch(&self, transaction_id: &str) -> Watch {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let sender = channels
            .entry(transaction_id.to_owned())
            .or_insert_with(|| broadcast::channel(UPDATES_PER_WATCHER).0);
        Watch {
            updates: sender.subscribe(),
            transaction_id: transaction_id.to_owned(),
            watchers: self.clone(),
        }
    }

    /// Whether anyone watches the transaction.
    #[cfg(test)]
    pub(crate) fn watching(&self, transaction_id: &str) -> bool {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.contains_key(transaction_id)
    }

    /// Tells the transaction's watchers, if it has any, of its new state.
    pub(crate) fn publish(&self, transaction: Arc<Transaction>, event: EventType) {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = channels.get(&transaction.transaction_id) {
            let _ = sender.send(Changed { transaction, event });
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut channels = self.watchers.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = channels.get(&self.transaction_id) {
            // This watcher's receiver is still alive while `drop` runs.
            if sender.receiver_count() <= 1 {
                channels.remove(&self.transaction_id);
            }
        }
    }
}
